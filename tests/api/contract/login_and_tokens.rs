//! Login and its tokens: failures alike whatever failed, letter case ignored, a new token
//! each time, rate-limited failures, and missing, malformed, unknown, expired and
//! never-expiring tokens.

use crate::common::TestApp;
use axum::http::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn login_fails_alike_for_unknown_users_and_wrong_passwords() {
    let app = TestApp::new().await;
    app.register("user", "pass123").await;
    let unknown = app.login("nobody", "pass123").await;
    let wrong = app.login("user", "wrong-password").await;
    unknown.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    wrong.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    assert_eq!(unknown.json, wrong.json);
}

#[tokio::test]
async fn login_ignores_the_letter_case_of_the_username() {
    let app = TestApp::new().await;
    app.register("Alice", "pass123").await;
    assert_eq!(app.login("aLICE", "pass123").await.status, StatusCode::OK);
}

#[tokio::test]
async fn login_validates_its_fields() {
    let app = TestApp::new().await;
    let response = app.login("", "pass123").await;
    response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(response.json["field"], "username");
    let response = app.login("user", "").await;
    assert_eq!(response.json["field"], "password");
}

#[tokio::test]
async fn every_login_issues_a_new_token_and_earlier_ones_stay_valid() {
    let app = TestApp::new().await;
    app.register("user", "pass123").await;
    let first = app.login("user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    let second = app.login("user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(first, second);
    assert_eq!(app.balance(&first).await, 4000);
    assert_eq!(app.balance(&second).await, 4000);
}

#[tokio::test]
async fn repeated_failed_logins_are_rate_limited_with_retry_after() {
    let app = TestApp::new().await;
    app.register("user", "pass123").await;
    for _ in 0..10 {
        app.login("user", "guess")
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let limited = app.login("USER", "pass123").await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=900).contains(&retry_after));
    // Other usernames are not affected.
    app.register("other", "pass123").await;
    assert_eq!(app.login("other", "pass123").await.status, StatusCode::OK);
}

#[tokio::test]
async fn missing_malformed_and_unknown_tokens_get_401() {
    let app = TestApp::new().await;
    let valid_looking = "A".repeat(32);
    let unknown_bearer = format!("Bearer {valid_looking}");
    for headers in [
        vec![],
        vec![("authorization", "")],
        vec![("authorization", "Bearer")],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
        vec![("authorization", "short")],
        vec![("authorization", valid_looking.as_str())],
        vec![("authorization", unknown_bearer.as_str())],
    ] {
        app.request(Method::POST, "/balance/", &headers, "")
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        let mut with_body = headers.clone();
        with_body.push(("content-type", "application/json"));
        app.request(Method::POST, "/chat/", &with_body, r#"{"message":"hi"}"#)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    assert_eq!(app.llm.calls(), 0);
}

#[tokio::test]
async fn an_expired_token_gets_401() {
    let app = TestApp::with_env(&[("TOKEN_TTL_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    assert_eq!(app.balance(&token).await, 4000);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    app.post_authorized("/balance/", &token, json!({}))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn a_zero_ttl_issues_tokens_that_never_expire() {
    let app = TestApp::with_env(&[("TOKEN_TTL_SECS", "0")]).await;
    app.register("user", "pass123").await;
    let login = app.login("user", "pass123").await;
    assert_eq!(login.json["expires_at"], serde_json::Value::Null);
    let expires: Option<i64> = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT expires_at FROM login_tokens")
        .fetch_one(pool)
        .await)
        .unwrap();
    assert_eq!(expires, None);
}
