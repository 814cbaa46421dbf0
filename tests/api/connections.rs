//! Connections over real TCP on 127.0.0.1: slow headers and idle keep-alive connections are
//! closed, the connection cap makes room by closing idle ones, a low file-descriptor limit
//! does not lock clients out, and shutdown ends by its deadline whatever clients hold.

use std::{
    os::unix::process::CommandExt,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{sleep, timeout},
};

use crate::{
    common::{FakeLlm, Reply, TestApp},
    server::{register_and_login, serve_in_process, wait_until, Server},
};

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected_after_the_header_read_timeout() {
    let app = TestApp::with_env(&[("HEADER_READ_TIMEOUT_SECS", "1")]).await;
    let base = serve_in_process(&app).await;

    let mut slowloris = connect(&base).await;
    let started = Instant::now();
    slowloris
        .write_all(b"GET /health HTTP/1.1\r\nHost: tokenchat\r\n")
        .await
        .unwrap();
    // A header line every 200 ms, never the blank line that ends them: trickling must not
    // keep the connection open.
    let mut closed = false;
    for line in 0..25 {
        if server_closes_within(&mut slowloris, Duration::from_millis(200)).await {
            closed = true;
            break;
        }
        let header = format!("X-Trickle-{line}: still coming\r\n");
        if slowloris.write_all(header.as_bytes()).await.is_err() {
            closed = true;
            break;
        }
    }
    let waited = started.elapsed();
    assert!(closed, "still open after {waited:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );

    // Others are served as usual.
    let mut client = connect(&base).await;
    client.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client).await.0, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_but_a_slow_chat_is_not_cut()
{
    let app = TestApp::with_env(&[
        ("IDLE_TIMEOUT_SECS", "1"),
        ("HEADER_READ_TIMEOUT_SECS", "1"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;
    app.llm.set_reply(Reply::Stall(Duration::from_millis(2500)));

    let mut idle = connect(&base).await;
    idle.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut idle).await.0, 200);
    let idle_since = Instant::now();

    let mut busy = connect(&base).await;
    busy.write_all(chat(&base, &token, "a slow question").as_bytes())
        .await
        .unwrap();
    let asked_at = Instant::now();

    assert!(
        server_closes_within(&mut idle, Duration::from_secs(4)).await,
        "the idle connection is still open"
    );
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(3),
        "closed after {idle_for:?} idle"
    );

    // The chat outlasts both time-outs and still gets its answer.
    let (status, answer) = read_response(&mut busy).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], "Echo: a slow question");
    assert!(asked_at.elapsed() >= Duration::from_millis(2400));
    // The connection was kept alive, not condemned: it serves the next request, then closes
    // once idle in turn.
    busy.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut busy).await.0, 200);
    assert!(server_closes_within(&mut busy, Duration::from_secs(4)).await);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn at_the_connection_cap_the_longest_idle_connection_makes_way_for_a_new_client() {
    let app = TestApp::with_env(&[("MAX_CONNECTIONS", "20")]).await;
    let base = serve_in_process(&app).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut connection = connect(&base).await;
        connection
            .write_all(health(&base).as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(&mut connection).await.0, 200);
        held.push(connection);
    }

    let started = Instant::now();
    let mut newcomer = connect(&base).await;
    newcomer.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut newcomer).await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    assert!(
        server_closes_within(&mut held[0], Duration::from_secs(2)).await,
        "the longest-idle connection is still open"
    );
    for (index, connection) in held.iter_mut().enumerate().skip(1) {
        assert!(
            !server_closes_within(connection, Duration::from_millis(20)).await,
            "connection {index} was closed too"
        );
    }
}

#[tokio::test]
async fn at_the_connection_cap_with_every_connection_busy_a_new_client_waits_its_turn() {
    let app = TestApp::with_env(&[("MAX_CONNECTIONS", "20"), ("CHAT_RATE_PER_MINUTE", "0")]).await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;
    app.llm.set_reply(Reply::Stall(Duration::from_secs(2)));

    let busy: Vec<_> = (0..20)
        .map(|index| {
            let (base, token) = (base.clone(), token.clone());
            tokio::spawn(async move {
                let mut connection = connect(&base).await;
                let request = chat(&base, &token, &format!("question {index}"));
                connection.write_all(request.as_bytes()).await.unwrap();
                let (status, _) = read_response(&mut connection).await;
                // The connection is returned, so it stays open: idle, not closed.
                (status, Instant::now(), connection)
            })
        })
        .collect();
    wait_until(|| async { app.llm.calls() == 20 }).await;
    // Were the 21st served at once, it would be answered at once.
    app.llm.set_reply(Reply::Echo);

    let mut newcomer = connect(&base).await;
    newcomer
        .write_all(chat(&base, &token, "the 21st").as_bytes())
        .await
        .unwrap();
    let (status, answer) = read_response(&mut newcomer).await;
    let newcomer_answered = Instant::now();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], "Echo: the 21st");

    let mut first_answered = None::<Instant>;
    let mut still_open = Vec::new();
    for handle in busy {
        let (status, answered, connection) = handle.await.unwrap();
        assert_eq!(status, 200);
        first_answered = Some(first_answered.map_or(answered, |first| first.min(answered)));
        still_open.push(connection);
    }
    let first_answered = first_answered.unwrap();
    assert!(
        newcomer_answered >= first_answered,
        "the 21st was answered {:?} before any of the 20",
        first_answered - newcomer_answered
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn under_a_low_descriptor_limit_idle_connections_cannot_lock_new_clients_out() {
    let _ = rlimit::increase_nofile_limit(4096);
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_descriptor_limit(dir.path(), &[("LLM_BASE_URL", &llm.base_url)], 256);
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

#[tokio::test]
async fn sigterm_ends_a_half_sent_request_and_refunds_a_stalled_chat_within_the_grace() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("LLM_TIMEOUT_SECS", "30"),
        ("SHUTDOWN_GRACE_SECS", "2"),
    ];
    let mut server = Server::start(dir.path(), &vars);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let token = register_and_login(&http, &base, "pass123").await;

    llm.set_reply(Reply::Stall(Duration::from_secs(30)));
    let stalled = http
        .post(format!("{base}/chat"))
        .bearer_auth(&token)
        .json(&json!({ "message": "never answered" }));
    let stalled = tokio::spawn(stalled.send());
    wait_until(|| async { llm.calls() == 1 }).await;
    // Headers complete, a body of 1000 bytes promised and 10 sent.
    let mut half_sent = connect(&base).await;
    let headers = format!(
        "POST /chat HTTP/1.1\r\nHost: tokenchat\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"message\""
    );
    half_sent.write_all(headers.as_bytes()).await.unwrap();
    sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    server.signal("-TERM");
    let mut exit = None;
    while exit.is_none() && signalled.elapsed() < Duration::from_secs(10) {
        exit = server.child.try_wait().unwrap();
        sleep(Duration::from_millis(50)).await;
    }
    let exit = exit.expect("still running 10 s after SIGTERM");
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM"
    );
    if let Ok(response) = stalled.await.unwrap() {
        assert_eq!(response.status(), 503);
    }
    assert!(server_closes_within(&mut half_sent, Duration::from_secs(1)).await);
    assert!(server
        .log
        .lock()
        .unwrap()
        .contains("shutdown grace is over"));

    let database_url = format!("sqlite://{}", dir.path().join("tokenchat.db").display());
    let db = tokenchat::db::connect(&database_url, tokenchat::db::Open::ExistingOnly)
        .await
        .unwrap();
    let settled: (String, i64) =
        tokenchat::db_run!(&db, pool => sqlx::query_as("SELECT c.status, u.tokens FROM chats c JOIN users u ON u.id = c.user_id")
            .fetch_one(pool)
            .await)
            .unwrap();
    assert_eq!(settled, ("failed".to_string(), 4000));
    db.close().await;
    let audit = Server::command(dir.path(), &vars)
        .arg("audit")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{report}");
}

/// The binary, started with a file-descriptor limit of `limit` (soft and hard, so it cannot
/// raise it).
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

async fn connect(base: &str) -> TcpStream {
    let address = base.trim_start_matches("http://");
    timeout(Duration::from_secs(5), TcpStream::connect(address))
        .await
        .expect("connect timed out")
        .unwrap()
}

fn health(base: &str) -> String {
    let host = base.trim_start_matches("http://");
    format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

fn chat(base: &str, token: &str, message: &str) -> String {
    let host = base.trim_start_matches("http://");
    let body = json!({ "message": message }).to_string();
    format!(
        "POST /chat HTTP/1.1\r\nHost: {host}\r\nAuthorization: Token {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one response with a `Content-Length` body: its status and JSON body. Fails the test
/// when the server closes first or takes over ten seconds.
async fn read_response(stream: &mut TcpStream) -> (u16, Value) {
    let read = async {
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&received, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&received[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or_else(|| panic!("no Content-Length in {head}"));
                if received.len() >= end + 4 + length {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|code| code.parse().ok())
                        .unwrap_or_else(|| panic!("no status in {head}"));
                    let body = &received[end + 4..end + 4 + length];
                    return (status, serde_json::from_slice(body).unwrap_or(Value::Null));
                }
            }
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the server closed the connection mid-response");
            received.extend_from_slice(&chunk[..read]);
        }
    };
    timeout(Duration::from_secs(10), read)
        .await
        .expect("no response within ten seconds")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Whether the server closes (or resets) the connection within `limit`; anything it sends
/// meanwhile is read and ignored.
async fn server_closes_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let closed = async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    timeout(limit, closed).await.is_ok()
}
