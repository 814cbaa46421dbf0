//! The growth benchmark (`BENCH_BIG=1`): the same routes and `tokenchat audit` on an empty
//! database and on a big one, on SQLite and, with `BENCH_POSTGRES_URL`, on PostgreSQL.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use argon2::{
    password_hash::{PasswordHasher, SaltString},
    Argon2,
};
use hyper::{Method, StatusCode};
use rand::rngs::OsRng;
use serde_json::json;

use crate::backends::{postgres_database, Fresh};
use crate::client::{request, send_once, MakeRequest, Target};
use crate::measure::{closed_loop, Outcome};
use crate::report::{describe_machine, print_table, Row};
use crate::server::{proc_status_kb, Server};
use crate::{big_db, CONNECTIONS, WARM_UP};

/// `BENCH_BIG=1`: `/balance`, `/chat` and the history routes on an empty database and on the
/// big one of [`big_db`] (generated on the first such run, then reused), then
/// `tokenchat audit` on each, with its time and peak memory; on SQLite, and on PostgreSQL
/// too when `BENCH_POSTGRES_URL` is set. Every figure of the big database is set beside the
/// empty one's from the same run.
pub async fn growth(
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
