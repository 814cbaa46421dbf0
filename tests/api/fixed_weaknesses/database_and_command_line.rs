//! The database and the command line: a process with another time-out refunds no live
//! chat, expired tokens are swept, the schema and `grant` keep balances whole and under the
//! ceiling, the database file is private, and the operator's commands work with
//! registration closed or no address to listen on; a SQLite file another process holds
//! locked is 503, as a database away is.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use tokenchat::services::recovery;

use crate::common::{Reply, TestApp};

#[tokio::test]
async fn a_process_with_a_shorter_time_out_never_refunds_anothers_live_chat() {
    let app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "60")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::Stall(Duration::from_secs(2)));
    let chat = {
        let (router, token) = (app.router.clone(), token.clone());
        tokio::spawn(async move {
            let request = axum::http::Request::post("/chat")
                .header("authorization", format!("Token {token}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(r#"{"message": "slow"}"#))
                .unwrap();
            let response = tower::ServiceExt::oneshot(router, request).await.unwrap();
            crate::common::TestResponse::read(response).await
        })
    };
    while app.llm.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A second process, whose own chats would be abandoned after 1 + 5 seconds, sweeps
    // ten seconds on: the first process's chat still has time, by its own deadline.
    let impatient = app.another_process(&[("LLM_TIMEOUT_SECS", "1")]).await;
    let now = tokenchat::db::unix_now();
    let swept = impatient.recovery.sweep(now + 10).await.unwrap();
    assert_eq!(swept.refunded_chats, 0);
    let answered = chat.await.unwrap();
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    assert_eq!(app.balance(&token).await, 3900);
    // A chat that process abandons is refunded by the other once its own deadline
    // (60 + 5 s) is past, and not before.
    let user_id: i64 =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT id FROM users")
        .fetch_one(pool)
        .await)
        .unwrap();
    let settle_within = recovery::abandoned_after(&app.state.config);
    tokenchat::db::chats::reserve(
        &app.state.db,
        tokenchat::db::chats::NewChat {
            user_id,
            conversation_id: None,
            message: "orphan",
            cost: 100,
            priced: None,
            budgets: Default::default(),
            settle_within,
        },
    )
    .await
    .unwrap();
    let now = tokenchat::db::unix_now();
    assert_eq!(
        impatient
            .recovery
            .sweep(now + 10)
            .await
            .unwrap()
            .refunded_chats,
        0
    );
    assert_eq!(
        impatient
            .recovery
            .sweep(now + 66)
            .await
            .unwrap()
            .refunded_chats,
        1
    );
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn recovery_deletes_expired_login_tokens() {
    let app = TestApp::with_env(&[("TOKEN_TTL_SECS", "60")]).await;
    let token = app.user_with_token("user").await;
    let count = || async {
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM login_tokens")
            .fetch_one(pool)
            .await)
            .unwrap()
    };
    let now = tokenchat::db::unix_now();
    app.state.recovery.sweep(now).await.unwrap();
    assert_eq!(count().await, 1);
    assert_eq!(app.balance(&token).await, 4000);
    let swept = app.state.recovery.sweep(now + 61).await.unwrap();
    assert_eq!(swept.expired_tokens, 1);
    assert_eq!(count().await, 0);
}

#[tokio::test]
async fn the_schema_refuses_a_balance_that_is_not_whole_tokens_under_the_ceiling() {
    let app = TestApp::new().await;
    app.user_with_token("user").await;
    // PostgreSQL's BIGINT admits no fraction and no overflow by itself; SQLite needs the
    // triggers, since it would store a REAL.
    let fraction = if app.database.sqlite_file().is_some() {
        "UPDATE users SET tokens = 1.5"
    } else {
        "UPDATE users SET tokens = 1.5e19"
    };
    for statement in [
        fraction,
        "UPDATE users SET tokens = tokens + 9223372036854775807",
        "UPDATE users SET tokens = 1000000000000001",
        "INSERT INTO ledger (user_id, amount, reason, balance_after, created_at)
         SELECT id, 9223372036854775807, 'grant', tokens + 9223372036854775807, 0 FROM users",
    ] {
        let refused = tokenchat::db_run!(&app.state.db, pool => sqlx::query(statement).execute(pool).await.map(|done| done.rows_affected()));
        assert!(refused.is_err(), "{statement} was accepted");
    }
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_new_database_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;

    let app = TestApp::new().await;
    let Some(file) = app.database.sqlite_file() else {
        println!("skipped on PostgreSQL: its files are the server's");
        return;
    };
    app.user_with_token("user").await;
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", file.display());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{path}");
    }
}

/// The binary's commands, run in `dir` against its default database file.
fn command(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    crate::server::Server::command(dir, &[])
        .args(args)
        .output()
        .unwrap()
}

/// A fresh directory whose database the server has created, with user `mallory`.
async fn database_with_a_user() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tokenchat.db").display());
    let db = tokenchat::db::connect(&url, tokenchat::db::Open::CreateIfMissing)
        .await
        .unwrap();
    tokenchat::db::migrate(&db).await.unwrap();
    tokenchat::db::users::insert(&db, "mallory", "mallory", "$argon2id$x", 4000)
        .await
        .unwrap();
    db.close().await;
    (dir, url)
}

async fn balance_in(url: &str) -> (String, i64) {
    let db = tokenchat::db::connect(url, tokenchat::db::Open::ExistingOnly)
        .await
        .unwrap();
    let row =
        tokenchat::db_run!(&db, pool => sqlx::query_as("SELECT typeof(tokens), tokens FROM users")
        .fetch_one(pool)
        .await)
        .unwrap();
    db.close().await;
    row
}

#[tokio::test]
async fn a_grant_past_the_ceiling_or_below_zero_is_refused_and_writes_nothing() {
    let (dir, url) = database_with_a_user().await;
    for amount in [
        "9223372036854775807",
        "1000000000000001",
        "0",
        "-4001",
        "-9223372036854775808",
    ] {
        let refused = command(dir.path(), &["grant", "mallory", amount]);
        assert_eq!(refused.status.code(), Some(1), "{amount}");
        assert!(!String::from_utf8_lossy(&refused.stderr).is_empty());
    }
    // Up to the ceiling exactly, then not one token more.
    let to_ceiling = (tokenchat::config::MAX_BALANCE - 4000).to_string();
    assert!(command(dir.path(), &["grant", "mallory", &to_ceiling])
        .status
        .success());
    let over = command(dir.path(), &["grant", "mallory", "1"]);
    assert_eq!(over.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&over.stderr).contains("ceiling"));
    assert_eq!(
        balance_in(&url).await,
        ("integer".to_string(), tokenchat::config::MAX_BALANCE)
    );
    let audit = command(dir.path(), &["audit"]);
    assert!(audit.status.success(), "{:?}", audit);
}

#[tokio::test]
async fn with_registration_closed_the_operator_creates_users_from_the_command_line() {
    let (dir, _) = database_with_a_user().await;
    let mut create = crate::server::Server::command(dir.path(), &[("REGISTRATION_OPEN", "false")]);
    let mut child = create
        .args(["create-user", "carol"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"s3cret-pass\n").unwrap();
    }
    let created = child.wait_with_output().unwrap();
    assert!(created.status.success(), "{created:?}");
    assert!(String::from_utf8_lossy(&created.stdout).contains("created carol with 4000 tokens"));
    // The same rules as /register: a taken name or a short password is refused.
    let again = command(dir.path(), &["create-user", "CAROL"]);
    assert_eq!(again.status.code(), Some(1));

    let server = crate::server::Server::start(dir.path(), &[("REGISTRATION_OPEN", "false")]);
    let http = reqwest::Client::new();
    let closed = http
        .post(format!("{}/register", server.base))
        .json(&json!({ "username": "dave", "password": "pass123" }))
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 403);
    let login = http
        .post(format!("{}/login", server.base))
        .json(&json!({ "username": "carol", "password": "s3cret-pass" }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
}

#[test]
fn a_server_that_cannot_listen_creates_no_database() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = crate::server::Server::command(dir.path(), &[("BIND_ADDR", &address)])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot listen on BIND_ADDR"));
    assert!(!dir.path().join("tokenchat.db").exists());
}

#[tokio::test]
async fn a_sqlite_file_another_process_holds_locked_is_503_database_unavailable_while_it_lasts() {
    let app = TestApp::new().await;
    let crate::common::database::TestDatabase::Sqlite { path, .. } = &app.database else {
        println!("skipped: SQLite's file lock");
        return;
    };
    let token = app.user_with_token("user").await;
    // An operator's `sqlite3` in a write transaction, past the busy time-out (10 s).
    let url = format!("sqlite://{}", path.display());
    let mut holder = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    app.chat(&token, "while locked")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable");
    assert_eq!(
        app.llm.calls(),
        0,
        "the model was asked without a reservation"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_eq!(app.chat(&token, "after").await.status, StatusCode::OK);
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}
