//! The backend comparison (`BENCH_POSTGRES_URL`): `/balance` and `/chat` on SQLite and on
//! PostgreSQL with one instance and with two, and the statements a chat costs there.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::client::{request, MakeRequest, Target};
use crate::measure::closed_loop_across;
use crate::report::{describe_machine, print_table, Row};
use crate::server::Server;
use crate::{CONNECTIONS, WARM_UP};

/// `/balance` and `/chat` (instant model) on SQLite, on PostgreSQL with one instance and with
/// two sharing the database, measured in one run; for PostgreSQL also the statements (each
/// one round trip: no pings, autocommit) a chat costs, from `pg_stat_database`.
pub async fn compare_backends(
    dir: &Path,
    model: SocketAddr,
    pinned: bool,
    measured: Duration,
    postgres_server: &str,
) {
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
        let tokens = Arc::new(register_users(&addrs, CONNECTIONS).await);
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
            drop_database(postgres_server, &name).await;
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

/// Users `bench0` to `bench{count - 1}`, registered and logged in round the servers at
/// `addrs` in turn; their login tokens.
pub(crate) async fn register_users(addrs: &[SocketAddr], count: usize) -> Vec<String> {
    let mut tokens = Vec::new();
    for n in 0..count {
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
    tokens
}

/// Drops database `name` from the server, closing its connections.
pub(crate) async fn drop_database(server: &str, name: &str) {
    use sqlx::{Connection, PgConnection};

    let mut admin = PgConnection::connect(server).await.expect("PostgreSQL");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop");
}

/// Whether [`postgres_database`] empties a database that exists.
#[derive(PartialEq)]
pub enum Fresh {
    Yes,
    KeepIfThere,
}

/// The URL of database `name` on the server, created first (or, `Fresh::Yes`, made anew).
pub async fn postgres_database(server: &str, name: &str, fresh: Fresh) -> String {
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

/// Transactions committed in database `name` so far (0 for SQLite). Statistics reach
/// `pg_stat_database` with a delay, so this first waits for them to settle.
pub(crate) async fn transactions_committed(server: &str, name: &str, backend: &str) -> u64 {
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
