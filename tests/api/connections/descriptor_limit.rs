//! A low file-descriptor limit on the built binary: idle connections cannot lock new
//! clients out, and running out makes the server back off and close idle ones, not spin.

use std::{
    os::unix::process::CommandExt,
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    time::{sleep, timeout},
};

use crate::{common::FakeLlm, server::Server};

use super::{connect, health, read_response};

#[tokio::test]
async fn under_a_low_descriptor_limit_idle_connections_cannot_lock_new_clients_out() {
    let _ = rlimit::increase_nofile_limit(4096);
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Every connection comes from 127.0.0.1: the per-address cap would hide the global one.
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("MAX_CONNECTIONS_PER_ADDRESS", "0"),
    ];
    let server = start_with_descriptor_limit(dir.path(), &vars, 256);
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .contains("file_descriptor_limit=256 max_connections=96"),
        "{}",
        server.log.lock().unwrap()
    );

    // Answering once shows it is past start-up and accepting.
    assert_answers_promptly(&server.base).await;

    // More idle connections than the server has descriptors for.
    let attack = open_idle_connections(&server.base, 400).await;
    let cpu_before = cpu_ticks(server.child.id());
    assert_answers_promptly(&server.base).await;
    sleep(Duration::from_secs(2)).await;
    assert_answers_promptly(&server.base).await;
    let cpu_used = cpu_ticks(server.child.id()) - cpu_before;
    assert!(cpu_used < 50, "{cpu_used} ticks of CPU in about 2 s");

    drop(attack);
    assert_answers_promptly(&server.base).await;
    let log = server.log.lock().unwrap().clone();
    assert!(!log.contains("cannot accept"), "{log}");
}

#[tokio::test]
async fn when_descriptors_run_out_the_server_backs_off_and_closes_idle_connections_instead_of_spinning(
) {
    let _ = rlimit::increase_nofile_limit(4096);
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A cap the descriptor limit cannot honour: accept itself fails with EMFILE.
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("MAX_CONNECTIONS", "1000"),
        ("MAX_CONNECTIONS_PER_ADDRESS", "0"),
    ];
    let server = start_with_descriptor_limit(dir.path(), &vars, 256);

    assert_answers_promptly(&server.base).await;

    let started = Instant::now();
    let attack = open_idle_connections(&server.base, 400).await;
    let cpu_before = cpu_ticks(server.child.id());
    assert_answers_promptly(&server.base).await;
    sleep(Duration::from_secs(2)).await;
    assert_answers_promptly(&server.base).await;
    let cpu_used = cpu_ticks(server.child.id()) - cpu_before;
    assert!(cpu_used < 50, "{cpu_used} ticks of CPU in about 2 s");

    drop(attack);
    assert_answers_promptly(&server.base).await;
    let log = server.log.lock().unwrap().clone();
    let accept_failures = log.matches("cannot accept connections").count();
    let seconds = started.elapsed().as_secs() as usize;
    assert!(
        (1..=seconds + 1).contains(&accept_failures),
        "{accept_failures} accept failures logged in {seconds} s:\n{log}"
    );
}

/// The binary, started with a file-descriptor limit of `limit` (soft and hard, so it cannot
/// raise it).
#[allow(unsafe_code)] // `pre_exec` is the only way to set a child's limit before it starts
fn start_with_descriptor_limit(dir: &std::path::Path, vars: &[(&str, &str)], limit: u64) -> Server {
    let mut command = Server::command(dir, vars);
    // SAFETY: between fork and exec the closure only makes one system call; it neither
    // allocates nor takes locks.
    unsafe {
        command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, limit, limit));
    }
    Server::start_command(command)
}

/// Opens `count` connections that never send a byte.
async fn open_idle_connections(base: &str, count: usize) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        connections.push(connect(base).await);
    }
    connections
}

/// A new client asks for `/health` and is answered within three seconds.
async fn assert_answers_promptly(base: &str) {
    let started = Instant::now();
    let mut client = connect(base).await;
    client.write_all(health(base).as_bytes()).await.unwrap();
    let (status, _) = timeout(Duration::from_secs(3), read_response(&mut client))
        .await
        .expect("no answer within three seconds");
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// CPU time the process has used, user and system, in clock ticks (hundredths of a second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces: utime
    // and stime are the 14th and 15th of the line, the 12th and 13th after the name.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}
