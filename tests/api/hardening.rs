//! Attacks and operator mistakes that once worked, each tried again: lock-outs, spraying,
//! token farming, questionable input, ambiguous credentials, corrupting grants, and
//! chats refunded by a process with another time-out.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::json;
use tokenchat::services::recovery;

use crate::common::{Reply, TestApp};

fn retry_after(response: &crate::common::TestResponse) -> u64 {
    response.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn failed_logins_from_one_address_never_lock_the_owner_out_from_another() {
    let app = TestApp::with_env(&[("TRUST_PROXY_HEADERS", "true")]).await;
    app.register("alice", "pass123").await;
    let guess = json!({ "username": "alice", "password": "wrong!" });
    for _ in 0..10 {
        app.post_from("203.0.113.9", "/login", guess.clone())
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let locked = app
        .post_from(
            "203.0.113.9",
            "/login",
            json!({ "username": "alice", "password": "pass123" }),
        )
        .await;
    locked.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!((1..=900).contains(&retry_after(&locked)));

    let owner = app
        .post_from(
            "198.51.100.7",
            "/login",
            json!({ "username": "alice", "password": "pass123" }),
        )
        .await;
    assert_eq!(owner.status, StatusCode::OK, "{owner:?}");
}

#[tokio::test]
async fn one_address_may_try_only_so_many_logins_a_minute() {
    let app = TestApp::with_env(&[
        ("TRUST_PROXY_HEADERS", "true"),
        ("LOGIN_ATTEMPTS_PER_MINUTE", "30"),
    ])
    .await;
    // Spraying: a different username every time, so no per-username lock ever engages.
    for n in 0..30 {
        let body = json!({ "username": format!("user{n}"), "password": "pass123" });
        app.post_from("203.0.113.9", "/login", body)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let body = json!({ "username": "user30", "password": "pass123" });
    let limited = app.post_from("203.0.113.9", "/login", body.clone()).await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!((1..=60).contains(&retry_after(&limited)));
    // Another address is counted on its own.
    app.post_from("198.51.100.7", "/login", body)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

#[tokio::test]
async fn failures_from_many_addresses_lock_a_username_everywhere() {
    let app = TestApp::with_env(&[
        ("TRUST_PROXY_HEADERS", "true"),
        ("LOGIN_FAILURES_PER_USER", "5"),
    ])
    .await;
    app.register("alice", "pass123").await;
    for n in 1..=5 {
        let guess = json!({ "username": "alice", "password": "wrong!" });
        app.post_from(&format!("203.0.113.{n}"), "/login", guess)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let right = json!({ "username": "alice", "password": "pass123" });
    app.post_from("198.51.100.7", "/login", right)
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
}

#[tokio::test]
async fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
    // Untrusted: X-Forwarded-For is the client's own claim, so every request below comes
    // from the same (in-process, unknown) address and ten failures lock the pair.
    let app = TestApp::new().await;
    app.register("alice", "pass123").await;
    for n in 0..10 {
        let guess = json!({ "username": "alice", "password": "wrong!" });
        app.post_from(&format!("203.0.113.{n}"), "/login", guess)
            .await;
    }
    let right = json!({ "username": "alice", "password": "pass123" });
    app.post_from("198.51.100.7", "/login", right)
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
}

#[tokio::test]
async fn usernames_that_cannot_exist_fail_like_unknown_ones_and_are_never_counted() {
    let app = TestApp::new().await;
    for name in [
        "x".repeat(65_000),
        "no spaces allowed".into(),
        "\u{430}dmin".into(),
    ] {
        // Well past the ten failures that lock a real username: never locked, because
        // nothing about such a name is remembered.
        for _ in 0..12 {
            app.login(&name, "pass123")
                .await
                .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        }
    }
}

#[tokio::test]
async fn registrations_per_address_are_limited_and_can_be_closed() {
    let app = TestApp::with_env(&[
        ("TRUST_PROXY_HEADERS", "true"),
        ("REGISTRATIONS_PER_HOUR", "3"),
    ])
    .await;
    for n in 0..3 {
        let body = json!({ "username": format!("farm{n}"), "password": "pass123" });
        let created = app.post_from("203.0.113.9", "/register", body).await;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    }
    let body = json!({ "username": "farm3", "password": "pass123" });
    let limited = app
        .post_from("203.0.113.9", "/register", body.clone())
        .await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(retry_after(&limited) >= 1);
    let users: i64 =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(pool)
        .await)
        .unwrap();
    assert_eq!(users, 3);
    let elsewhere = app.post_from("198.51.100.7", "/register", body).await;
    assert_eq!(elsewhere.status, StatusCode::CREATED);

    let closed = TestApp::with_env(&[("REGISTRATION_OPEN", "false")]).await;
    closed
        .register("newcomer", "pass123")
        .await
        .assert_error(StatusCode::FORBIDDEN, "registration_closed");
}

#[tokio::test]
async fn chats_per_user_are_limited_and_a_refused_chat_costs_nothing() {
    let app = TestApp::with_env(&[("CHAT_RATE_PER_MINUTE", "2")]).await;
    let token = app.user_with_token("user").await;
    let other = app.user_with_token("other").await;
    for _ in 0..2 {
        assert_eq!(app.chat(&token, "hello").await.status, StatusCode::OK);
    }
    let limited = app.chat(&token, "hello").await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!((1..=60).contains(&retry_after(&limited)));
    assert_eq!(app.balance(&token).await, 3800);
    assert_eq!(app.llm.calls(), 2);
    // Another user's rate is their own.
    assert_eq!(app.chat(&other, "hello").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_balance_is_read_while_another_write_holds_the_database() {
    let app = TestApp::new().await;
    let token = app.user_with_token("reader").await;
    // An open write transaction: on SQLite it holds the one connection that writes, on
    // PostgreSQL the user's row.
    tokenchat::db_run!(&app.state.db, pool => {
        let mut write = pool.begin().await.unwrap();
        sqlx::query("UPDATE users SET tokens = tokens")
            .execute(&mut *write)
            .await
            .unwrap();
        let read = tokio::time::timeout(
            Duration::from_secs(4),
            app.post_authorized("/balance/", &token, json!({})),
        )
        .await
        .expect("a read waited for the write");
        assert_eq!(read.status, StatusCode::OK, "{:?}", read.json);
        assert_eq!(read.json["tokens"], 4000);
        write.rollback().await.unwrap();
    });
}

#[tokio::test]
async fn a_full_password_hashing_queue_answers_503_busy_at_once() {
    let app = TestApp::with_env(&[("PASSWORD_HASH_QUEUE", "0")]).await;
    let logins: Vec<_> = (0..12)
        .map(|n| {
            let router = app.router.clone();
            tokio::spawn(async move {
                let body = json!({ "username": format!("user{n}"), "password": "pass123" });
                let request = axum::http::Request::post("/login")
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(body.to_string()))
                    .unwrap();
                let response = tower::ServiceExt::oneshot(router, request).await.unwrap();
                crate::common::TestResponse::read(response).await
            })
        })
        .collect();
    let mut busy = 0;
    for login in logins {
        let response = login.await.unwrap();
        if response.status == StatusCode::SERVICE_UNAVAILABLE {
            response.assert_error(StatusCode::SERVICE_UNAVAILABLE, "busy");
            assert_eq!(retry_after(&response), 1);
            busy += 1;
        } else {
            response.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        }
    }
    assert!(busy > 0, "no login was turned away");
}

#[tokio::test]
async fn invalid_utf8_in_form_data_is_400_and_charges_nothing() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let authorization = format!("Token {token}");
    for body in [
        "message=%ff",
        "message=ok%C3",
        "message=%ED%A0%80",
        "message=a&x=%ff",
    ] {
        app.request(
            Method::POST,
            "/chat",
            &[
                ("authorization", &authorization),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body,
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    }
    // A well-formed multi-byte character still comes through.
    let fine = app
        .request(
            Method::POST,
            "/chat",
            &[
                ("authorization", &authorization),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "message=caf%C3%A9",
        )
        .await;
    assert_eq!(fine.json["response"], "Echo: café");
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(app.llm.calls(), 1);
}

#[tokio::test]
async fn a_message_of_invisible_characters_only_is_refused() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    for invisible in [
        "\u{200B}",
        " \u{FEFF}\u{2060}\n",
        "\u{200D}\u{200C}",
        "\u{3164}",
    ] {
        app.chat(&token, invisible)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    }
    assert_eq!(app.balance(&token).await, 4000);
    assert_eq!(app.llm.calls(), 0);
}

#[tokio::test]
async fn the_longest_message_fits_in_any_json_encoding() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    // What Python's json.dumps sends for 8,000 emoji: 12 bytes each, 96 KB in all.
    let escaped = "\\ud83d\\ude00".repeat(8000);
    let body = format!("{{\"message\": \"{escaped}\"}}");
    assert!(body.len() > 96_000);
    let authorization = format!("Token {token}");
    let answered = app
        .request(
            Method::POST,
            "/chat",
            &[
                ("authorization", &authorization),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await;
    assert_eq!(
        answered.status,
        StatusCode::OK,
        "{:?}",
        answered.json["error"]
    );
    let stored: String =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT message FROM chats")
        .fetch_one(pool)
        .await)
        .unwrap();
    assert_eq!(stored, "😀".repeat(8000));
}

#[tokio::test]
async fn two_authorization_headers_are_401_even_when_both_are_valid() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let other = app.user_with_token("other").await;
    let (mine, theirs) = (format!("Token {token}"), format!("Token {other}"));
    for pair in [[&mine, &theirs], [&mine, &mine]] {
        app.request(
            Method::GET,
            "/balance",
            &[("authorization", pair[0]), ("authorization", pair[1])],
            "",
        )
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
}

#[tokio::test]
async fn look_alike_usernames_are_one_account_and_mixed_scripts_are_refused() {
    let app = TestApp::new().await;
    assert_eq!(
        app.register("admin", "pass123").await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        app.register("Kate", "pass123").await.status,
        StatusCode::CREATED
    );
    for look_alike in ["ａｄｍｉｎ", "ADMIN", "\u{212A}ate", "KATE"] {
        app.register(look_alike, "pass123")
            .await
            .assert_error(StatusCode::CONFLICT, "username_taken");
    }
    let mixed = app.register("\u{430}dmin", "pass123").await;
    mixed.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(mixed.json["field"], "username");
    // Whichever form the owner types, it is the one account.
    assert_eq!(
        app.login("ＡＤＭＩＮ", "pass123").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn logout_revokes_the_token_it_came_with_and_logout_all_every_token() {
    let app = TestApp::new().await;
    let first = app.user_with_token("user").await;
    let second = app.login("user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    let third = app.login("user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();

    let out = app.post_authorized("/logout", &first, json!({})).await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    app.get_authorized("/balance", &first)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(app.balance(&second).await, 4000);

    let all = app
        .post_authorized("/logout/all/", &second, json!({}))
        .await;
    assert_eq!(all.status, StatusCode::NO_CONTENT);
    for token in [&second, &third] {
        app.get_authorized("/balance", token)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
}

#[tokio::test]
async fn a_password_change_needs_the_old_one_and_revokes_every_other_token() {
    let app = TestApp::new().await;
    let current = app.user_with_token("user").await;
    let elsewhere = app.login("user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();

    let wrong = app
        .post_authorized(
            "/password",
            &current,
            json!({ "old_password": "guess!", "new_password": "n3w-secret" }),
        )
        .await;
    wrong.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(wrong.json["field"], "old_password");
    let short = app
        .post_authorized(
            "/password",
            &current,
            json!({ "old_password": "pass123", "new_password": "abc" }),
        )
        .await;
    short.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(short.json["field"], "new_password");

    let changed = app
        .post_authorized(
            "/password",
            &current,
            json!({ "old_password": "pass123", "new_password": "n3w-secret" }),
        )
        .await;
    assert_eq!(changed.status, StatusCode::NO_CONTENT);
    assert_eq!(app.balance(&current).await, 4000);
    app.get_authorized("/balance", &elsewhere)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    app.login("user", "pass123")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    assert_eq!(app.login("user", "n3w-secret").await.status, StatusCode::OK);
}

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
    tokenchat::db::chats::reserve(&app.state.db, user_id, None, "orphan", 100, settle_within)
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

/// Resident memory of a process, in kB.
fn resident_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn failed_logins_with_huge_unique_usernames_do_not_grow_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = crate::server::Server::start(
        dir.path(),
        &[
            ("LOGIN_ATTEMPTS_PER_MINUTE", "0"),
            ("MAX_BODY_BYTES", "70000"),
        ],
    );
    let http = reqwest::Client::new();
    let attempt = |n: usize| {
        let http = http.clone();
        let url = format!("{}/login", server.base);
        async move {
            let username = format!("{n:08}{}", "u".repeat(60_000));
            let body = json!({ "username": username, "password": "wrong!" });
            let response = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 401);
        }
    };
    // Warm up the allocator and the connection pool, then measure.
    futures_join_all((0..40).map(attempt)).await;
    let before = resident_kb(server.child.id());
    for wave in 0..10 {
        futures_join_all((0..40).map(|n| attempt(1000 + wave * 40 + n))).await;
    }
    let after = resident_kb(server.child.id());
    // 400 usernames of 60 KB: 24 MB if any were kept.
    assert!(
        after < before + 8 * 1024,
        "resident memory grew from {before} kB to {after} kB"
    );
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn a_body_that_trickles_in_too_slowly_gets_408_and_charges_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = TestApp::with_env(&[("BODY_READ_TIMEOUT_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(tokenchat::serve(
        listener,
        app.state.clone(),
        std::future::pending(),
    ));
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /chat HTTP/1.1\r\nHost: {address}\r\nAuthorization: Token {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"message\": "
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buffer[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 5 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert_eq!(app.balance(&token).await, 4000);
    assert_eq!(app.llm.calls(), 0);
}

#[tokio::test]
async fn password_changes_are_limited_per_user_so_a_stolen_token_cannot_busy_the_cores() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let change = |old: &str, new: &str| json!({ "old_password": old, "new_password": new });
    let passwords: Vec<String> = (0..=10).map(|n| format!("password-{n}")).collect();
    let mut current = "pass123".to_string();
    for next in &passwords[..10] {
        let changed = app
            .post_authorized("/password", &token, change(&current, next))
            .await;
        assert_eq!(changed.status, StatusCode::NO_CONTENT, "{changed:?}");
        current = next.clone();
    }
    let limited = app
        .post_authorized("/password", &token, change(&current, &passwords[10]))
        .await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(retry_after(&limited) >= 1);
    assert_eq!(app.login("user", &current).await.status, StatusCode::OK);
}
