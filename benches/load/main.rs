//! `cargo bench --bench load`: tokenchat's throughput, latency overhead and memory.
//!
//! Starts the release binary on a fresh SQLite database, pinned to core 0, with an instant
//! OpenAI-compatible fake model served from this process, which is pinned to core 1 and
//! drives closed-loop HTTP/1.1 keep-alive load, recording latencies in HDR histograms.
//! `BENCH_SECS` (default 10) sets the measured time of each throughput scenario;
//! `BENCH_ONLY=<text>` runs only the throughput scenarios whose name contains it (`during`:
//! the reads beside a login burst; `busy`: logins while another process spins on the
//! server's core).
//! `BENCH_POSTGRES_URL=postgres://USER:PASSWORD@HOST/postgres` (a user that may create
//! databases) runs instead the backend comparison: `/balance` and `/chat` on SQLite, on
//! PostgreSQL with one instance and with two, in one run, with the statements a chat costs;
//! there each of the 32 connections is a user of its own. `BENCH_BIG=1` runs instead the
//! growth benchmark: the same routes on an empty database and on a big one (see `big_db`),
//! and `tokenchat audit` on each, on SQLite and, with `BENCH_POSTGRES_URL`, on PostgreSQL.
//! `BENCH_V1=1` runs instead what `/v1` adds to a 100 KB request with tools and to the first
//! tool-call delta of a stream (see `v1`). `BENCH_PRICED=1` runs instead `/chat` flat and
//! priced by a price book, in turns (see `priced`); `BENCH_BUILDS=<binary>,<binary>` the same
//! turns on flat servers of several builds. `BENCH_UPSTREAMS=1` runs instead `/chat`
//! served by three upstreams all healthy and with one of them dead, its breaker open, in
//! turns (see `upstreams`). `BENCH_KEY_LIMITS=1`, with `BENCH_POSTGRES_URL`, runs instead
//! `/chat` on PostgreSQL with two instances by API keys without limits and with a budget and
//! a requests-a-minute limit, in turns (see `key_limits`).
//!
//! The default run is `scenarios`; the others are `backends` and `growth` (its database in
//! `big_db`). `client` and `measure` drive the load, `fake_model` answers it, `server` and
//! `cores` start and pin the processes, `report` prints the results.

use std::time::Duration;

mod backends;
mod bare;
mod big_db;
mod client;
mod cores;
mod fake_model;
mod growth;
mod key_limits;
mod measure;
mod priced;
mod report;
mod scenarios;
mod server;
mod upstreams;
mod v1;

use backends::compare_backends;
use cores::{pin, raw_argon2_rate, spin};
use fake_model::start_fake_model;
use growth::growth;

/// Set in the environment of the copy of this binary that measures raw Argon2.
const ROLE: &str = "TOKENCHAT_BENCH_ROLE";
const SERVER_CORE: usize = 0;
const LOAD_CORE: usize = 1;
const CONNECTIONS: usize = 32;
const WARM_UP: Duration = Duration::from_secs(1);
const SLOW_CHATS: usize = 1000;
const LOGIN_BURST: usize = 200;
const READERS_DURING_LOGINS: usize = 8;
const SLOW_MODEL: Duration = Duration::from_secs(2);
/// Streams open at once on a slow streaming model.
const SLOW_STREAMS: usize = 2000;
/// Chunks of a streamed answer; on the slow model one every 100 ms, 2 s in all.
const STREAM_CHUNKS: usize = 20;
const SLOW_CHUNK_EVERY: Duration = Duration::from_millis(100);
/// A completion body of a realistic size (a short code answer).
const ANSWER: &str = "Here is hello world in Python:\n\n```python\nprint(\"Hello, world!\")\n```\n\nSave it as hello.py and run `python hello.py`.";

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("argon2") => return raw_argon2_rate(),
        Ok("spin") => return spin(),
        Ok("bare") => return bare::serve_bare(),
        _ => {}
    }
    let pinned = std::thread::available_parallelism().map_or(1, |cores| cores.get()) >= 2;
    if pinned {
        // Before the runtime starts, so every thread of this process inherits the core.
        pin(std::process::id(), LOAD_CORE);
    }
    let _ = rlimit::increase_nofile_limit(4 * SLOW_STREAMS as u64 + 1024);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(pinned));
}

/// One run: the growth benchmark with `BENCH_BIG=1`, else the backend comparison with
/// `BENCH_POSTGRES_URL`, else the default scenarios.
async fn run(pinned: bool) {
    let secs = bench_secs(10);
    let measured = Duration::from_secs(secs);
    let model = start_fake_model().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let postgres = std::env::var("BENCH_POSTGRES_URL").ok();
    if std::env::var("BENCH_V1").is_ok_and(|v1| v1 == "1") {
        return v1::run(dir.path(), pinned, measured).await;
    }
    if std::env::var("BENCH_PRICED").is_ok_and(|priced| priced == "1") {
        return priced::run(dir.path(), pinned, measured).await;
    }
    if let Ok(builds) = std::env::var("BENCH_BUILDS") {
        let binaries: Vec<String> = builds.split(',').map(str::to_string).collect();
        return priced::compare_builds(dir.path(), pinned, measured, &binaries).await;
    }
    if std::env::var("BENCH_UPSTREAMS").is_ok_and(|upstreams| upstreams == "1") {
        return upstreams::run(dir.path(), pinned, measured).await;
    }
    if std::env::var("BENCH_KEY_LIMITS").is_ok_and(|limits| limits == "1") {
        return key_limits::run(dir.path(), pinned, measured, postgres.as_deref()).await;
    }
    if std::env::var("BENCH_BIG").is_ok_and(|big| big == "1") {
        return growth(dir.path(), model, pinned, measured, postgres.as_deref()).await;
    }
    if let Some(postgres) = postgres {
        return compare_backends(dir.path(), model, pinned, measured, &postgres).await;
    }
    scenarios::run(dir.path(), model, pinned, secs).await;
}

/// `BENCH_SECS`, or `default` when unset.
fn bench_secs(default: u64) -> u64 {
    std::env::var("BENCH_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(default)
}
