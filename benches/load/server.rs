//! The release binary under test, started on its own core, and its memory as `/proc` reports it.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::net::TcpStream;

use crate::cores::on_server_core;

/// The release binary, pinned to its core, with its memory watched.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    peak: Arc<AtomicU64>,
}

impl Server {
    pub async fn start(dir: &Path, database_url: &str, model: SocketAddr, pinned: bool) -> Self {
        Self::start_with(dir, database_url, model, pinned, &[]).await
    }

    /// [`Server::start`] with more variables in its environment (`CONFIG_FILE`, say).
    pub async fn start_with(
        dir: &Path,
        database_url: &str,
        model: SocketAddr,
        pinned: bool,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_binary(&server_binary(), dir, database_url, model, pinned, env).await
    }

    /// [`Server::start_with`] of the tokenchat binary at `binary`.
    pub async fn start_binary(
        binary: &str,
        dir: &Path,
        database_url: &str,
        model: SocketAddr,
        pinned: bool,
        env: &[(&str, &str)],
    ) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port");
        let child = on_server_core(binary, pinned)
            .current_dir(dir)
            .env("BIND_ADDR", addr.to_string())
            .env("DATABASE_URL", database_url)
            // Throughput, not the abuse limits, is measured here.
            .env("LOGIN_ATTEMPTS_PER_MINUTE", "0")
            .env("REGISTRATIONS_PER_HOUR", "0")
            .env("CHAT_RATE_PER_MINUTE", "0")
            .env("LOGIN_FAILURES_PER_USER_AND_ADDRESS", "0")
            .env("LOGIN_FAILURES_PER_USER", "0")
            .env("PASSWORD_HASH_QUEUE", "100000")
            // Every load connection comes from 127.0.0.1.
            .env("MAX_CONNECTIONS_PER_ADDRESS", "0")
            .env("LLM_BASE_URL", format!("http://{model}/v1"))
            .env("INITIAL_TOKENS", "1000000000000000")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tokenchat");
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let peak = Arc::new(AtomicU64::new(0));
        let (pid, watched) = (child.id(), peak.clone());
        tokio::spawn(async move {
            loop {
                let rss = proc_status_kb(pid, "VmRSS:") * 1024;
                watched.fetch_max(rss, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Self { child, addr, peak }
    }

    pub fn reset_peak(&self) {
        self.peak.store(0, Ordering::Relaxed);
    }

    pub fn peak_rss(&self) -> Option<u64> {
        Some(self.peak.load(Ordering::Relaxed))
    }

    /// CPU time the server has used so far, all its threads, user and system.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
        let ticks: u64 = stat
            .ok()
            .and_then(|stat| {
                // After the command's name in parentheses: utime and stime are the 12th and
                // 13th fields.
                let fields: Vec<u64> = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|field| field.parse().ok())
                    .collect();
                Some(fields.iter().sum())
            })
            .unwrap_or(0);
        // In USER_HZ, which Linux fixes at 100 a second for what it reports to programs.
        Duration::from_millis(ticks * 10)
    }

    pub fn high_water_mark(&self) -> u64 {
        proc_status_kb(self.child.id(), "VmHWM:") * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary under test: this build's, or `BENCH_SERVER_BIN` (another build's, to measure
/// two builds in turns with one bench).
pub fn server_binary() -> String {
    std::env::var("BENCH_SERVER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tokenchat").into())
}

pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}
