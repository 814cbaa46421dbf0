//! What one client may make the server do: registrations per address, chats and password
//! changes per user, a full hashing queue, a write holding the database, a body that
//! trickles in.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;

use crate::common::TestApp;

use super::retry_after;

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
