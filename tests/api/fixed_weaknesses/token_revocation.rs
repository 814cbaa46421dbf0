//! Revoking login tokens: logout ends the token it came with, logout-all and a password
//! change every other one, and a password change needs the old password.

use axum::http::StatusCode;
use serde_json::json;

use crate::common::TestApp;

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
