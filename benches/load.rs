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

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use argon2::{
    password_hash::{PasswordHasher, SaltString},
    Argon2,
};
use axum::{body::Bytes, response::IntoResponse, routing::post, Router};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{
    header::{AUTHORIZATION, CONTENT_TYPE, HOST},
    Method, Request, StatusCode,
};
use hyper_util::rt::TokioIo;
use rand::rngs::OsRng;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

#[path = "load/big_db.rs"]
mod big_db;

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

/// A command for `program`, run on the server's core when `pinned`.
fn on_server_core(program: impl AsRef<std::ffi::OsStr>, pinned: bool) -> Command {
    if pinned {
        let mut command = Command::new("taskset");
        command.args(["-c", &SERVER_CORE.to_string()]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn pin(pid: u32, core: usize) {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset (util-linux) is needed to pin processes to cores");
    assert!(status.success(), "taskset failed");
}

async fn run(pinned: bool) {
    let secs = bench_secs(10);
    let measured = Duration::from_secs(secs);
    let model = start_fake_model().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let postgres = std::env::var("BENCH_POSTGRES_URL").ok();
    if std::env::var("BENCH_BIG").is_ok_and(|big| big == "1") {
        return growth(dir.path(), model, pinned, measured, postgres.as_deref()).await;
    }
    if let Some(postgres) = postgres {
        return compare_backends(dir.path(), model, pinned, measured, &postgres).await;
    }
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    let server = Server::start(dir.path(), &sqlite, model, pinned).await;
    let target = Target {
        addr: server.addr,
        token: String::new(),
    };
    let token = target.register_and_login("bench", "bench-password").await;
    let target = Arc::new(Target { token, ..target });

    let mut rows: Vec<Row> = Vec::new();
    let chat_body = json!({ "message": "code hello world in python" }).to_string();
    let login_body = json!({ "username": "bench", "password": "bench-password" }).to_string();
    // Unique across warm-up and measurement: every registration must create a user.
    let registrations = Arc::new(AtomicU64::new(0));

    println!(
        "tokenchat load benchmark: {secs} s per scenario, {CONNECTIONS} connections unless noted"
    );
    println!("{}", describe_machine(pinned));
    println!();

    let scenarios: Vec<(&str, usize, Arc<MakeRequest>)> = vec![
        ("static GET /health", CONNECTIONS, target.get("/health")),
        ("GET /balance", CONNECTIONS, target.get("/balance")),
        (
            "POST /chat (instant model)",
            CONNECTIONS,
            target.post("/chat", chat_body.clone()),
        ),
        (
            "POST /login",
            CONNECTIONS,
            target.post("/login", login_body),
        ),
        (
            "POST /register",
            CONNECTIONS,
            Arc::new(move |_, _| {
                let n = registrations.fetch_add(1, Ordering::Relaxed);
                let body = json!({ "username": format!("user{n}"), "password": "bench-password" });
                request(Method::POST, "/register", None, body.to_string())
            }),
        ),
    ];
    // BENCH_ONLY=chat (say) runs just the throughput scenarios whose name contains it,
    // for profiling one path.
    let only = std::env::var("BENCH_ONLY").ok();
    let scenarios = scenarios
        .into_iter()
        .filter(|(name, _, _)| only.as_deref().is_none_or(|only| name.contains(only)));
    for (name, connections, make) in scenarios {
        let expected = if name.contains("register") {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        closed_loop(target.addr, connections, WARM_UP, expected, make.clone()).await;
        server.reset_peak();
        let outcome = closed_loop(target.addr, connections, measured, expected, make).await;
        rows.push(Row::new(name, connections, &outcome, server.peak_rss()));
    }

    // Reads while the server's core also hashes passwords: a few connections asking for
    // the balance beside LOGIN_BURST connections logging in.
    let during_logins = format!("GET /balance during {LOGIN_BURST} logins");
    if only
        .as_deref()
        .is_none_or(|only| during_logins.contains(only))
    {
        let login_body = json!({ "username": "bench", "password": "bench-password" }).to_string();
        let (balance, logins) = (target.get("/balance"), target.post("/login", login_body));
        let both = |duration| {
            let (balance, logins) = (balance.clone(), logins.clone());
            let addr = target.addr;
            async move {
                tokio::join!(
                    closed_loop(
                        addr,
                        READERS_DURING_LOGINS,
                        duration,
                        StatusCode::OK,
                        balance
                    ),
                    closed_loop(addr, LOGIN_BURST, duration, StatusCode::OK, logins),
                )
            }
        };
        both(WARM_UP).await;
        server.reset_peak();
        let (balance, logins) = both(measured).await;
        rows.push(Row::new(
            &during_logins,
            READERS_DURING_LOGINS,
            &balance,
            server.peak_rss(),
        ));
        rows.push(Row::new(
            "POST /login beside those reads",
            LOGIN_BURST,
            &logins,
            server.peak_rss(),
        ));
    }

    // Logins one at a time while another process keeps the server's core busy: what the
    // hashing threads' low priority costs a login when the core has nothing left over.
    let busy_core = "POST /login, server's core busy with another process";
    if pinned && only.as_deref().is_none_or(|only| busy_core.contains(only)) {
        let login_body = json!({ "username": "bench", "password": "bench-password" }).to_string();
        let _spinner = CoreSpinner::start(measured);
        server.reset_peak();
        let logins = closed_loop(
            target.addr,
            1,
            measured,
            StatusCode::OK,
            target.post("/login", login_body),
        )
        .await;
        rows.push(Row::new(busy_core, 1, &logins, server.peak_rss()));
    }

    if only.is_some() {
        print_table(&rows);
        return;
    }

    // Overhead at one connection: the same model call, direct and through tokenchat.
    let direct_body = json!({
        "model": "llama3.2",
        "messages": [{ "role": "system", "content": "You are a helpful assistant." },
                     { "role": "user", "content": "code hello world in python" }]
    })
    .to_string();
    let direct: Arc<MakeRequest> = Arc::new(move |_, _| {
        request(
            Method::POST,
            "/v1/chat/completions",
            None,
            direct_body.clone(),
        )
    });
    let chat_one = target.post("/chat", chat_body);
    closed_loop(model, 1, WARM_UP, StatusCode::OK, direct.clone()).await;
    let direct = closed_loop(model, 1, measured, StatusCode::OK, direct).await;
    rows.push(Row::new(
        "direct model call (no tokenchat)",
        1,
        &direct,
        None,
    ));
    closed_loop(target.addr, 1, WARM_UP, StatusCode::OK, chat_one.clone()).await;
    server.reset_peak();
    let chat_one = closed_loop(target.addr, 1, measured, StatusCode::OK, chat_one).await;
    rows.push(Row::new(
        "POST /chat (instant model)",
        1,
        &chat_one,
        server.peak_rss(),
    ));

    server.reset_peak();
    let slow = slow_chats(&target).await;
    rows.push(Row::new(
        "POST /chat, model takes 2 s (one shot)",
        SLOW_CHATS,
        &slow,
        server.peak_rss(),
    ));

    // Streaming: how long the first piece of an answer takes, from the model itself and
    // through tokenchat (one client, one request at a time), then many slow streams at once.
    let direct_stream_body = json!({
        "model": "llama3.2",
        "stream": true,
        "messages": [{ "role": "user", "content": "code hello world in python" }]
    })
    .to_string();
    let first_direct = first_piece_latency(
        model,
        Arc::new(move |_, _| {
            request(
                Method::POST,
                "/v1/chat/completions",
                None,
                direct_stream_body.clone(),
            )
        }),
        b"data:",
        measured,
    )
    .await;
    rows.push(Row::new(
        "first piece, direct model stream",
        1,
        &first_direct,
        None,
    ));
    server.reset_peak();
    let stream_body =
        json!({ "message": "code hello world in python", "stream": true }).to_string();
    let first_through = first_piece_latency(
        target.addr,
        target.post("/chat", stream_body),
        b"event: delta",
        measured,
    )
    .await;
    rows.push(Row::new(
        "first delta, POST /chat stream",
        1,
        &first_through,
        server.peak_rss(),
    ));
    server.reset_peak();
    let streams = slow_streams(&target).await;
    rows.push(Row::new(
        "POST /chat stream, 20 chunks over 2 s (one shot)",
        SLOW_STREAMS,
        &streams,
        server.peak_rss(),
    ));

    server.reset_peak();
    let argon2_rate = raw_argon2_rate_on_server_core(pinned, measured.min(Duration::from_secs(5)));

    print_table(&rows);
    let rate = |name: &str| {
        rows.iter()
            .find(|row| row.name.starts_with(name))
            .map_or(0.0, |row| row.rps)
    };
    let overhead = |quantile: f64| {
        chat_one.histogram.value_at_quantile(quantile) as f64 / 1000.0
            - direct.histogram.value_at_quantile(quantile) as f64 / 1000.0
    };
    println!();
    println!(
        "chat overhead at 1 connection: p50 {:.3} ms, p99 {:.3} ms (chat minus direct model call)",
        overhead(0.5),
        overhead(0.99)
    );
    println!(
        "/balance is {:.0}% of the static route",
        100.0 * rate("GET /balance") / rate("static")
    );
    println!("raw Argon2id (19 MiB, t=2, p=1) on the server's core: {argon2_rate:.1} hashes/s; /login is {:.0}% of it", 100.0 * rate("POST /login") / argon2_rate);
    println!(
        "{SLOW_CHATS} concurrent slow chats: {} answered, {} failed, all done in {:.2} s",
        slow.requests - slow.errors,
        slow.errors,
        slow.elapsed.as_secs_f64()
    );
    let first_overhead = |quantile: f64| {
        first_through.histogram.value_at_quantile(quantile) as f64 / 1000.0
            - first_direct.histogram.value_at_quantile(quantile) as f64 / 1000.0
    };
    println!(
        "time to first delta added by tokenchat at 1 connection: p50 {:.3} ms, p99 {:.3} ms",
        first_overhead(0.5),
        first_overhead(0.99)
    );
    println!(
        "{SLOW_STREAMS} concurrent slow streams: {} completed with `done`, {} did not, all done in {:.2} s",
        streams.requests - streams.errors,
        streams.errors,
        streams.elapsed.as_secs_f64()
    );
    println!(
        "server peak RSS over the whole run (VmHWM): {:.1} MB",
        server.high_water_mark() as f64 / 1e6
    );
    drop(server);
}

/// `/balance` and `/chat` (instant model) on SQLite, on PostgreSQL with one instance and with
/// two sharing the database, measured in one run; for PostgreSQL also the statements (each
/// one round trip: no pings, autocommit) a chat costs, from `pg_stat_database`.
async fn compare_backends(
    dir: &Path,
    model: SocketAddr,
    pinned: bool,
    measured: Duration,
    postgres_server: &str,
) {
    use sqlx::{Connection, PgConnection};

    println!(
        "tokenchat backend comparison: {} s per scenario, {CONNECTIONS} connections",
        measured.as_secs()
    );
    println!("{}", describe_machine(pinned));
    println!();
    let chat_body = json!({ "message": "code hello world in python" }).to_string();
    let mut rows = Vec::new();
    let mut statements_per_chat = Vec::new();
    for (backend, instances) in [("SQLite", 1), ("PostgreSQL", 1), ("PostgreSQL", 2)] {
        let name = format!("tokenchat_bench_{}_{instances}", std::process::id());
        let database_url = if backend == "SQLite" {
            format!("sqlite://{}", dir.join("compare.db").display())
        } else {
            postgres_database(postgres_server, &name, Fresh::Yes).await
        };
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(Server::start(dir, &database_url, model, pinned).await);
        }
        let addrs: Vec<SocketAddr> = servers.iter().map(|server| server.addr).collect();
        // One user per connection, as real traffic comes from many users: the chats of one
        // user queue on that user's balance (its row lock, on PostgreSQL) by design.
        let mut tokens = Vec::new();
        for n in 0..CONNECTIONS {
            let registrar = Target {
                addr: addrs[n % addrs.len()],
                token: String::new(),
            };
            let username = format!("bench{n}");
            tokens.push(
                registrar
                    .register_and_login(&username, "bench-password")
                    .await,
            );
        }
        let tokens = Arc::new(tokens);
        let per_user = |method: Method, path: &'static str, body: String| -> Arc<MakeRequest> {
            let tokens = tokens.clone();
            Arc::new(move |conn, _| {
                request(method.clone(), path, Some(&tokens[conn]), body.clone())
            })
        };
        let label = |route: &str| {
            format!(
                "{route} ({backend}, {instances} instance{})",
                if instances > 1 { "s" } else { "" }
            )
        };
        for (route, make) in [
            (
                "GET /balance",
                per_user(Method::GET, "/balance", String::new()),
            ),
            (
                "POST /chat",
                per_user(Method::POST, "/chat", chat_body.clone()),
            ),
        ] {
            closed_loop_across(&addrs, CONNECTIONS, WARM_UP, StatusCode::OK, make.clone()).await;
            let commits_before = transactions_committed(postgres_server, &name, backend).await;
            let outcome =
                closed_loop_across(&addrs, CONNECTIONS, measured, StatusCode::OK, make).await;
            let commits =
                transactions_committed(postgres_server, &name, backend).await - commits_before;
            if route == "POST /chat" && backend != "SQLite" {
                statements_per_chat.push((
                    label(route),
                    commits as f64 / outcome.requests.max(1) as f64,
                ));
            }
            rows.push(Row::new(&label(route), CONNECTIONS, &outcome, None));
        }
        drop(servers);
        if backend != "SQLite" {
            let mut admin = PgConnection::connect(postgres_server)
                .await
                .expect("PostgreSQL");
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .expect("drop");
        }
    }
    print_table(&rows);
    println!();
    let rate = |name: &str| {
        rows.iter()
            .find(|row| row.name == name)
            .map_or(0.0, |row| row.rps)
    };
    for instances in ["1 instance", "2 instances"] {
        println!(
            "PostgreSQL chat throughput ({instances}) is {:.0}% of SQLite's",
            100.0 * rate(&format!("POST /chat (PostgreSQL, {instances})"))
                / rate("POST /chat (SQLite, 1 instance)")
        );
    }
    for (label, statements) in statements_per_chat {
        println!(
            "{label}: {statements:.2} statements committed per chat (pg_stat_database.xact_commit)"
        );
    }
}

/// Whether [`postgres_database`] empties a database that exists.
#[derive(PartialEq)]
enum Fresh {
    Yes,
    KeepIfThere,
}

/// The URL of database `name` on the server, created first (or, `Fresh::Yes`, made anew).
async fn postgres_database(server: &str, name: &str, fresh: Fresh) -> String {
    use sqlx::{Connection, PgConnection};

    let mut admin = PgConnection::connect(server).await.expect("PostgreSQL");
    if fresh == Fresh::Yes {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .expect("drop");
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("catalogue");
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create");
    }
    let mut url = reqwest::Url::parse(server).expect("a URL");
    url.set_path(name);
    url.to_string()
}

/// `BENCH_BIG=1`: `/balance`, `/chat` and the history routes on an empty database and on the
/// big one of [`big_db`] (generated on the first such run, then reused), then
/// `tokenchat audit` on each, with its time and peak memory; on SQLite, and on PostgreSQL
/// too when `BENCH_POSTGRES_URL` is set. Every figure of the big database is set beside the
/// empty one's from the same run.
async fn growth(
    dir: &Path,
    model: SocketAddr,
    pinned: bool,
    measured: Duration,
    postgres_server: Option<&str>,
) {
    println!(
        "tokenchat growth benchmark: {} s per scenario, {CONNECTIONS} connections",
        measured.as_secs()
    );
    println!("{}", describe_machine(pinned));
    println!();
    let mut backends = vec![(
        "SQLite",
        format!("sqlite://{}", dir.join("empty.db").display()),
        format!("sqlite://{}/bench-big.db", env!("CARGO_TARGET_TMPDIR")),
    )];
    if let Some(server) = postgres_server {
        backends.push((
            "PostgreSQL",
            postgres_database(server, "tokenchat_bench_empty", Fresh::Yes).await,
            postgres_database(server, "tokenchat_bench_big", Fresh::KeepIfThere).await,
        ));
    }
    let password_hash = Argon2::default()
        .hash_password(b"bench-password", &SaltString::generate(&mut OsRng))
        .expect("hash")
        .to_string();
    let chat_body = json!({ "message": "code hello world in python" }).to_string();
    // BENCH_ONLY=<text>: only the routes whose name holds it, and no audit.
    let only = std::env::var("BENCH_ONLY").ok();
    let mut rows = Vec::new();
    let mut audits = Vec::new();
    for (backend, empty, big) in &backends {
        if !big_db::exists(big).await {
            println!("generating the big {backend} database (once; later runs reuse it)");
            big_db::generate(big, &password_hash).await;
        }
        let (users, ledger, chats) = big_db::counts(big).await;
        println!("big {backend} database: {users} users, {ledger} ledger rows, {chats} chats");
        // Both servers at once, measured in turns (a quarter of the time each, four times
        // over): a change in what the hypervisor steals falls on both alike.
        let mut targets = Vec::new();
        for (size, url) in [("empty", empty), ("big", big)] {
            let server = Server::start(dir, url, model, pinned).await;
            let anonymous = Target {
                addr: server.addr,
                token: String::new(),
            };
            let token = if size == "empty" {
                anonymous
                    .register_and_login("bench", "bench-password")
                    .await
            } else {
                anonymous.login("user1", "bench-password").await
            };
            targets.push((size, url, server, Target { token, ..anonymous }));
        }
        for route in GROWTH_ROUTES
            .into_iter()
            .filter(|route| only.as_deref().is_none_or(|only| route.contains(only)))
        {
            let mut makes = Vec::new();
            for (_, _, _, target) in &targets {
                let make = growth_request(target, route, &chat_body).await;
                closed_loop(
                    target.addr,
                    CONNECTIONS,
                    WARM_UP,
                    StatusCode::OK,
                    make.clone(),
                )
                .await;
                makes.push(make);
            }
            let mut outcomes: Vec<Outcome> = targets.iter().map(|_| Outcome::new()).collect();
            for _ in 0..GROWTH_TURNS {
                for ((_, _, _, target), (make, outcome)) in
                    targets.iter().zip(makes.iter().zip(&mut outcomes))
                {
                    let turn = measured / GROWTH_TURNS;
                    outcome.absorb(
                        closed_loop(target.addr, CONNECTIONS, turn, StatusCode::OK, make.clone())
                            .await,
                    );
                }
            }
            for ((size, _, _, _), outcome) in targets.iter().zip(&outcomes) {
                let label = format!("{route} ({backend}, {size})");
                rows.push(Row::new(&label, CONNECTIONS, outcome, None));
            }
        }
        for (size, url, server, _) in targets {
            drop(server);
            if only.is_none() {
                let label = format!("tokenchat audit ({backend}, {size})");
                audits.push((label, run_audit(dir, url)));
            }
        }
    }
    print_table(&rows);
    println!();
    for (label, (elapsed, peak_rss, summary)) in &audits {
        println!(
            "{label}: {:.1} s, peak RSS {:.1} MB: {summary}",
            elapsed.as_secs_f64(),
            *peak_rss as f64 / 1e6
        );
    }
    println!();
    for row in rows.iter().filter(|row| row.name.ends_with(", big)")) {
        let empty_name = row.name.replace(", big)", ", empty)");
        let Some(empty) = rows.iter().find(|other| other.name == empty_name) else {
            continue;
        };
        println!(
            "{}: big/empty requests/s {:.2}, p50 {:.2}, p99 {:.2}",
            row.name.replace(", big)", ")"),
            row.rps / empty.rps,
            row.p50 as f64 / empty.p50.max(1) as f64,
            row.p99 as f64 / empty.p99.max(1) as f64,
        );
    }
}

/// The routes the growth benchmark measures on both databases.
const GROWTH_ROUTES: [&str; 6] = [
    "GET /balance",
    "POST /chat",
    "GET /chats",
    "GET /transactions",
    "GET /chats, a page deep in the history",
    "GET /transactions, a page deep in the history",
];

/// How many turns each database takes at each route.
const GROWTH_TURNS: u32 = 4;

/// The request of one of [`GROWTH_ROUTES`] for `target`'s user. A deep page is the one
/// whose cursor is half the newest id of the user's first page, as it is now.
async fn growth_request(target: &Target, route: &str, chat_body: &str) -> Arc<MakeRequest> {
    let deep = |path: &'static str| async move {
        let list = path.trim_start_matches('/');
        let (_, first) = send_once(
            target.addr,
            request(Method::GET, path, Some(&target.token), String::new()),
        )
        .await;
        let newest = first[list][0]["id"].as_i64().expect("a first page");
        let deep: &'static str =
            Box::leak(format!("{path}?cursor={}", newest / 2).into_boxed_str());
        target.get(deep)
    };
    match route {
        "GET /balance" => target.get("/balance"),
        "POST /chat" => target.post("/chat", chat_body.to_string()),
        "GET /chats" => target.get("/chats"),
        "GET /transactions" => target.get("/transactions"),
        "GET /chats, a page deep in the history" => deep("/chats").await,
        "GET /transactions, a page deep in the history" => deep("/transactions").await,
        other => unreachable!("no growth route {other}"),
    }
}

/// Runs `tokenchat audit` on `url`: how long it took, its peak resident memory (bytes: the
/// last `VmHWM` sampled, every 10 ms, before it ended) and its summary line.
fn run_audit(dir: &Path, url: &str) -> (Duration, u64, String) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenchat"))
        .arg("audit")
        .current_dir(dir)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tokenchat audit");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut output = String::new();
        std::io::Read::read_to_string(&mut { stdout }, &mut output).map(|_| output)
    });
    let mut peak = 0;
    while child.try_wait().expect("audit").is_none() {
        peak = peak.max(proc_status_kb(pid, "VmHWM:") * 1024);
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    let output = reader.join().expect("reader").expect("audit output");
    let summary = output
        .lines()
        .rfind(|line| line.starts_with("audit "))
        .unwrap_or("no summary")
        .to_string();
    (elapsed, peak, summary)
}

/// Transactions committed in database `name` so far (0 for SQLite). Statistics reach
/// `pg_stat_database` with a delay, so this first waits for them to settle.
async fn transactions_committed(server: &str, name: &str, backend: &str) -> u64 {
    use sqlx::{Connection, PgConnection};

    if backend == "SQLite" {
        return 0;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut admin = PgConnection::connect(server).await.expect("PostgreSQL");
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut admin)
        .await
        .expect("snapshot");
    let committed: i64 =
        sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("statistics");
    committed as u64
}

type MakeRequest = dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync;

fn request(method: Method, path: &str, token: Option<&str>, body: String) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "127.0.0.1")
        .header(CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Full::new(Bytes::from(body))).expect("request")
}

struct Target {
    addr: SocketAddr,
    token: String,
}

impl Target {
    fn get(&self, path: &'static str) -> Arc<MakeRequest> {
        let token = self.token.clone();
        Arc::new(move |_, _| request(Method::GET, path, Some(&token), String::new()))
    }

    fn post(&self, path: &'static str, body: String) -> Arc<MakeRequest> {
        let token = self.token.clone();
        Arc::new(move |_, _| request(Method::POST, path, Some(&token), body.clone()))
    }

    async fn register_and_login(&self, username: &str, password: &str) -> String {
        let credentials = json!({ "username": username, "password": password }).to_string();
        let (status, _) = send_once(
            self.addr,
            request(Method::POST, "/register", None, credentials),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "bench registration failed");
        self.login(username, password).await
    }

    async fn login(&self, username: &str, password: &str) -> String {
        let credentials = json!({ "username": username, "password": password }).to_string();
        let (_, login) = send_once(
            self.addr,
            request(Method::POST, "/login", None, credentials),
        )
        .await;
        login["token"].as_str().expect("a login token").to_string()
    }
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

async fn send_once(addr: SocketAddr, request: Request<Full<Bytes>>) -> (StatusCode, Value) {
    let mut sender = connect(addr).await;
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// What one scenario measured.
struct Outcome {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    histogram: Histogram<u64>,
    /// The share of the machine's CPU time the hypervisor took (steal) while it ran.
    stolen: f64,
}

impl Outcome {
    fn new() -> Self {
        Self {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            histogram: histogram(),
            stolen: 0.0,
        }
    }
}

/// The machine's CPU time counters (`/proc/stat`, all cores), in clock ticks.
#[derive(Clone, Copy)]
struct CpuTimes {
    total: u64,
    steal: u64,
}

impl CpuTimes {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        Self {
            // user, nice, system, idle, iowait, irq, softirq, steal (guest time is in user).
            total: fields.iter().take(8).sum(),
            steal: fields.get(7).copied().unwrap_or(0),
        }
    }

    /// The share of CPU time stolen from this machine since `self`: a noisy neighbour's.
    fn stolen_since(self) -> f64 {
        let now = Self::now();
        (now.steal - self.steal) as f64 / (now.total - self.total).max(1) as f64
    }
}

impl Outcome {
    /// Adds another measurement of the same scenario to this one.
    fn absorb(&mut self, other: Outcome) {
        let (mine, theirs) = (self.elapsed.as_secs_f64(), other.elapsed.as_secs_f64());
        self.stolen = (self.stolen * mine + other.stolen * theirs) / (mine + theirs).max(1e-9);
        self.requests += other.requests;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.histogram.add(other.histogram).expect("same bounds");
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram")
}

/// `connections` clients, each sending its next request as soon as the last is answered,
/// until `duration` is over. Latencies in microseconds.
async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    expected: StatusCode,
    make: Arc<MakeRequest>,
) -> Outcome {
    closed_loop_across(&[addr], connections, duration, expected, make).await
}

/// [`closed_loop`] with the connections spread evenly over several servers.
async fn closed_loop_across(
    addrs: &[SocketAddr],
    connections: usize,
    duration: Duration,
    expected: StatusCode,
    make: Arc<MakeRequest>,
) -> Outcome {
    let start = Instant::now();
    let cpu = CpuTimes::now();
    let deadline = start + duration;
    let clients: Vec<_> = (0..connections)
        .map(|conn| {
            let make = make.clone();
            let addr = addrs[conn % addrs.len()];
            tokio::spawn(async move {
                let mut sender = connect(addr).await;
                let mut histogram = histogram();
                let (mut requests, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let request = make(conn, requests);
                    let sent = Instant::now();
                    let ok = match sender.send_request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            response.into_body().collect().await.is_ok() && status == expected
                        }
                        Err(_) => false,
                    };
                    histogram.saturating_record(sent.elapsed().as_micros() as u64);
                    requests += 1;
                    if !ok {
                        errors += 1;
                        if sender.ready().await.is_err() {
                            sender = connect(addr).await;
                        }
                    }
                }
                (requests, errors, histogram)
            })
        })
        .collect();
    let mut outcome = Outcome::new();
    for client in clients {
        let (requests, errors, histogram) = client.await.expect("client task");
        outcome.requests += requests;
        outcome.errors += errors;
        outcome.histogram.add(histogram).expect("same bounds");
    }
    outcome.elapsed = start.elapsed();
    outcome.stolen = cpu.stolen_since();
    outcome
}

/// Opens `SLOW_CHATS` connections, then sends one chat on each at once to a model that
/// takes two seconds to answer.
async fn slow_chats(target: &Target) -> Outcome {
    let body = json!({ "message": "[slow] code hello world in python" });
    one_shot(target, SLOW_CHATS, body, |_| true).await
}

/// Opens `SLOW_STREAMS` connections, then starts one streamed chat on each at once, on a
/// model that writes its answer in 20 chunks over 2 s; a stream counts when it ends with
/// `done`.
async fn slow_streams(target: &Target) -> Outcome {
    let body = json!({ "message": "[slow] code hello world in python", "stream": true });
    one_shot(target, SLOW_STREAMS, body, |body| {
        body.windows(11).any(|window| window == b"event: done")
    })
    .await
}

/// Opens `connections` connections, then sends `body` to `/chat` on each at once; a request
/// counts when it is a 200 whose whole body passes `complete`.
async fn one_shot(
    target: &Target,
    connections: usize,
    body: Value,
    complete: fn(&[u8]) -> bool,
) -> Outcome {
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect(target.addr).await);
    }
    let body = body.to_string();
    let start = Instant::now();
    let cpu = CpuTimes::now();
    let requests: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let request = request(Method::POST, "/chat", Some(&target.token), body.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let ok = match sender.send_request(request).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        match response.into_body().collect().await {
                            Ok(body) => complete(&body.to_bytes()),
                            Err(_) => false,
                        }
                    }
                    _ => false,
                };
                (ok, sent.elapsed())
            })
        })
        .collect();
    let mut outcome = Outcome::new();
    for request in requests {
        let (ok, latency) = request.await.expect("request task");
        outcome.requests += 1;
        outcome.errors += u64::from(!ok);
        outcome
            .histogram
            .saturating_record(latency.as_micros() as u64);
    }
    outcome.elapsed = start.elapsed();
    outcome.stolen = cpu.stolen_since();
    outcome
}

/// One client sending one request at a time for `duration`: the latency to the first byte
/// sequence `marker` in each response body (the rest is read before the next request).
async fn first_piece_latency(
    addr: SocketAddr,
    make: Arc<MakeRequest>,
    marker: &'static [u8],
    duration: Duration,
) -> Outcome {
    let mut sender = connect(addr).await;
    let mut outcome = Outcome::new();
    let start = Instant::now();
    let cpu = CpuTimes::now();
    let deadline = start + WARM_UP + duration;
    while Instant::now() < deadline {
        let request = make(0, outcome.requests);
        let sent = Instant::now();
        let mut first = None;
        let mut ok = false;
        if let Ok(response) = sender.send_request(request).await {
            let mut body = response.into_body();
            let mut seen = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    seen.extend_from_slice(&data);
                    if first.is_none() && seen.windows(marker.len()).any(|w| w == marker) {
                        first = Some(sent.elapsed());
                    }
                }
            }
            ok = first.is_some();
        }
        // The first second warms up, as in every other scenario.
        if sent.duration_since(start) < WARM_UP {
            continue;
        }
        outcome.requests += 1;
        outcome.errors += u64::from(!ok);
        if let Some(latency) = first {
            outcome
                .histogram
                .saturating_record(latency.as_micros() as u64);
        }
    }
    outcome.elapsed = start.elapsed() - WARM_UP;
    outcome.stolen = cpu.stolen_since();
    outcome
}

/// An OpenAI-style stream of `ANSWER` in `STREAM_CHUNKS` chunks, `every` apart, with
/// usage and `[DONE]`.
fn streamed_answer(every: Option<Duration>) -> axum::body::Body {
    let size = ANSWER.len().div_ceil(STREAM_CHUNKS);
    let mut events: Vec<String> = ANSWER
        .as_bytes()
        .chunks(size)
        .enumerate()
        .map(|(n, piece)| {
            let delta = if n == 0 {
                json!({ "role": "assistant", "content": String::from_utf8_lossy(piece) })
            } else {
                json!({ "content": String::from_utf8_lossy(piece) })
            };
            let chunk = json!({ "id": "chatcmpl-bench", "object": "chat.completion.chunk",
                "created": 0, "model": "fake",
                "choices": [{ "index": 0, "delta": delta, "finish_reason": null }] });
            format!("data: {chunk}\n\n")
        })
        .collect();
    events.push(format!(
        "data: {}\n\n",
        json!({ "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": "fake", "choices": [],
            "usage": { "prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42 } })
    ));
    events.push("data: [DONE]\n\n".to_string());
    let chunks = futures_util::stream::iter(events).then(move |event| async move {
        if let Some(every) = every {
            tokio::time::sleep(every).await;
        }
        Ok::<_, std::convert::Infallible>(Bytes::from(event))
    });
    axum::body::Body::from_stream(chunks)
}

async fn start_fake_model() -> SocketAddr {
    let completion = json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "fake",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": ANSWER }, "finish_reason": "stop" }]
    })
    .to_string();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |body: Bytes| {
            let completion = completion.clone();
            async move {
                let slow = body.windows(6).any(|window| window == b"[slow]");
                let streamed = serde_json::from_slice::<Value>(&body)
                    .is_ok_and(|request| request["stream"] == true);
                if streamed {
                    let every = slow.then_some(SLOW_CHUNK_EVERY);
                    return (
                        [(CONTENT_TYPE, "text/event-stream")],
                        streamed_answer(every),
                    )
                        .into_response();
                }
                if slow {
                    tokio::time::sleep(SLOW_MODEL).await;
                }
                ([(CONTENT_TYPE, "application/json")], completion).into_response()
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake model");
    let addr = listener.local_addr().expect("address");
    // Like a real model server, each streamed chunk leaves at once.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.expect("fake model") });
    addr
}

/// The release binary, pinned to its core, with its memory watched.
struct Server {
    child: Child,
    addr: SocketAddr,
    peak: Arc<AtomicU64>,
}

impl Server {
    async fn start(dir: &Path, database_url: &str, model: SocketAddr, pinned: bool) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port");
        let child = on_server_core(env!("CARGO_BIN_EXE_tokenchat"), pinned)
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

    fn reset_peak(&self) {
        self.peak.store(0, Ordering::Relaxed);
    }

    fn peak_rss(&self) -> Option<u64> {
        Some(self.peak.load(Ordering::Relaxed))
    }

    fn high_water_mark(&self) -> u64 {
        proc_status_kb(self.child.id(), "VmHWM:") * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
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

/// `BENCH_SECS`, or `default` when unset.
fn bench_secs(default: u64) -> u64 {
    std::env::var("BENCH_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(default)
}

/// A copy of this binary in `role` for `duration`, on the server's core when `pinned`.
fn this_binary_as(role: &str, pinned: bool, duration: Duration) -> Command {
    let exe = std::env::current_exe().expect("this binary");
    let mut command = on_server_core(exe, pinned);
    command
        .env(ROLE, role)
        .env("BENCH_SECS", duration.as_secs().to_string());
    command
}

/// Hashes per second of one thread, in a copy of this binary pinned to the server's core.
fn raw_argon2_rate_on_server_core(pinned: bool, duration: Duration) -> f64 {
    let output = this_binary_as("argon2", pinned, duration)
        .output()
        .expect("run the Argon2 measurement");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a rate")
}

fn raw_argon2_rate() {
    let secs = bench_secs(5);
    let argon2 = Argon2::default();
    let start = Instant::now();
    let mut hashes = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let salt = SaltString::generate(&mut OsRng);
        argon2
            .hash_password(b"bench-password", &salt)
            .expect("hash");
        hashes += 1;
    }
    println!("{}", hashes as f64 / start.elapsed().as_secs_f64());
}

/// A copy of this binary spinning on the server's core at normal priority, until dropped.
struct CoreSpinner(Child);

impl CoreSpinner {
    fn start(measured: Duration) -> Self {
        let child = this_binary_as("spin", true, measured)
            .spawn()
            .expect("start the spinner");
        Self(child)
    }
}

impl Drop for CoreSpinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Keeps a core busy for a minute more than the measured time at most, so it ends even if
/// the benchmark is killed.
fn spin() {
    let secs = bench_secs(10);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs + 60) {
        std::hint::black_box(0u64);
    }
}

struct Row {
    name: String,
    connections: usize,
    rps: f64,
    p50: u64,
    p90: u64,
    p99: u64,
    errors: u64,
    peak_rss: Option<u64>,
    stolen: f64,
}

impl Row {
    fn new(name: &str, connections: usize, outcome: &Outcome, peak_rss: Option<u64>) -> Self {
        let histogram = &outcome.histogram;
        Self {
            name: name.to_string(),
            connections,
            rps: outcome.requests as f64 / outcome.elapsed.as_secs_f64(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            errors: outcome.errors,
            peak_rss,
            stolen: outcome.stolen,
        }
    }
}

fn print_table(rows: &[Row]) {
    let ms = |micros: u64| format!("{:.3}", micros as f64 / 1000.0);
    println!("| scenario | connections | requests/s | p50 ms | p90 ms | p99 ms | p99/p50 | errors | server peak RSS MB | CPU stolen |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.2} | {} | {} | {:.0}% |",
            row.name,
            row.connections,
            row.rps,
            ms(row.p50),
            ms(row.p90),
            ms(row.p99),
            row.p99 as f64 / row.p50.max(1) as f64,
            row.errors,
            row.peak_rss
                .map_or("-".to_string(), |rss| format!("{:.1}", rss as f64 / 1e6)),
            100.0 * row.stolen,
        );
    }
}

fn describe_machine(pinned: bool) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    let mut text = format!("machine: {cpu}; ");
    if pinned {
        let _ = write!(text, "server pinned to core {SERVER_CORE}, load generator and fake model to core {LOAD_CORE}");
    } else {
        let _ = write!(text, "{cores} core(s): nothing pinned");
    }
    text
}
