//! TLS to PostgreSQL: the `sslmode` of `DATABASE_URL` is honoured, as libpq honours it.

use sqlx::{Connection, PgConnection};

use super::instances::http_client;
use crate::{
    common::{
        database::{on_postgres, postgres_server, TestDatabase},
        FakeLlm,
    },
    server::{register_and_login, send, Server},
};

/// `url` with `sslmode=mode` among its parameters.
fn with_sslmode(url: &str, mode: &str) -> String {
    let mut url = reqwest::Url::parse(url).unwrap();
    url.query_pairs_mut().append_pair("sslmode", mode);
    url.to_string()
}

/// How many connections the server has open to `database`, and how many of them use TLS.
async fn connections_and_encrypted(database: &str) -> (i64, i64) {
    let mut admin = PgConnection::connect(&postgres_server().unwrap())
        .await
        .unwrap();
    let counts = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE ssl.ssl) FROM pg_stat_activity activity \
         JOIN pg_stat_ssl ssl USING (pid) WHERE activity.datname = $1",
    )
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    counts
}

#[tokio::test]
async fn the_database_connections_use_tls_when_the_url_requires_it_and_not_when_it_disables_it_or_is_local(
) {
    if !on_postgres() {
        println!("skipped: runs in the PostgreSQL run of the suite");
        return;
    }
    let llm = FakeLlm::start().await;
    // Unsaid, on this machine's loopback address: plain (TLS buys nothing there).
    for (mode, encrypted) in [("require", true), ("disable", false), ("", false)] {
        let database = TestDatabase::create().await;
        let TestDatabase::Postgres { url, name, .. } = &database else {
            unreachable!("the PostgreSQL run")
        };
        let dir = tempfile::tempdir().unwrap();
        let url = match mode {
            "" => url.clone(),
            mode => with_sslmode(url, mode),
        };
        let vars = [
            ("DATABASE_URL", url.as_str()),
            ("LLM_BASE_URL", &llm.base_url),
        ];
        let server = Server::start(dir.path(), &vars);
        let http = http_client();
        let token = register_and_login(&http, &server.base, "pass123").await;
        let chat = http
            .post(format!("{}/chat", server.base))
            .bearer_auth(&token);
        let (status, answer) = send(chat.json(&serde_json::json!({ "message": "hi" }))).await;
        assert_eq!(status, 200, "{answer}");
        let (connections, with_tls) = connections_and_encrypted(name).await;
        assert!(connections > 0, "sslmode={mode}: no connection seen");
        let expected = if encrypted { connections } else { 0 };
        assert_eq!(
            with_tls, expected,
            "sslmode={mode}: {with_tls} of {connections}"
        );
        drop(server);
    }
}

#[test]
fn a_server_certificate_that_cannot_be_verified_stops_start_up_with_one_line_and_no_password() {
    if !on_postgres() {
        println!("skipped: runs in the PostgreSQL run of the suite");
        return;
    }
    // The test server's certificate is its own (Debian's snakeoil), in no trusted root.
    let server = postgres_server().unwrap();
    let password = reqwest::Url::parse(&server)
        .unwrap()
        .password()
        .map(str::to_owned);
    let url = with_sslmode(&server, "verify-full");
    let dir = tempfile::tempdir().unwrap();
    let output = Server::command(dir.path(), &[("DATABASE_URL", &url)])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(said.contains("cannot open DATABASE_URL"), "{said}");
    // Why, once (sqlx's error repeats its source in its own text).
    assert_eq!(
        said.matches("invalid peer certificate").count(),
        1,
        "{said}"
    );
    if let Some(password) = password.filter(|password| !password.is_empty()) {
        let everything = format!("{said}{}", String::from_utf8_lossy(&output.stdout));
        assert!(!everything.contains(&password), "{everything}");
    }
}
