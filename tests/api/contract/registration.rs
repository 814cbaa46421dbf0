//! Registration: usernames unique in any letter case, each invalid field refused by name,
//! the edges of the rules accepted, and the configurable password length.

use crate::common::TestApp;
use axum::http::StatusCode;

#[tokio::test]
async fn usernames_are_unique_in_any_letter_case_and_stored_as_given() {
    let app = TestApp::new().await;
    assert_eq!(
        app.register("Alice", "pass123").await.json["username"],
        "Alice"
    );
    for taken in ["Alice", "alice", "ALICE", "aLiCe"] {
        app.register(taken, "pass123")
            .await
            .assert_error(StatusCode::CONFLICT, "username_taken");
    }
    let stored: Vec<String> =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT username FROM users")
        .fetch_all(pool)
        .await)
        .unwrap();
    assert_eq!(stored, ["Alice"]);
}

#[tokio::test]
async fn registration_rejects_each_invalid_field_by_name() {
    let app = TestApp::new().await;
    let too_long_name = "a".repeat(51);
    let too_long_password = "p".repeat(1025);
    for (username, password, field) in [
        ("", "pass123", "username"),
        (too_long_name.as_str(), "pass123", "username"),
        ("has space", "pass123", "username"),
        ("semi;colon", "pass123", "username"),
        ("slash/", "pass123", "username"),
        ("user", "12345", "password"),
        ("user", "", "password"),
        ("user", too_long_password.as_str(), "password"),
    ] {
        let response = app.register(username, password).await;
        response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
        assert_eq!(response.json["field"], field, "{username:?} {password:?}");
    }
    let users: i64 =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(pool)
        .await)
        .unwrap();
    assert_eq!(users, 0);
}

#[tokio::test]
async fn registration_accepts_the_edges_of_the_rules() {
    let app = TestApp::new().await;
    let longest = "z".repeat(50);
    let longest_password = "p".repeat(1024);
    for (username, password) in [
        ("a", "123456"),
        (longest.as_str(), "pass123"),
        ("we.ird+name-x_y@host", "pass123"),
        ("Zoë", "pass123"),
        ("longpass", longest_password.as_str()),
    ] {
        let response = app.register(username, password).await;
        assert_eq!(
            response.status,
            StatusCode::CREATED,
            "{username:?}: {response:?}"
        );
    }
}

#[tokio::test]
async fn password_min_length_is_configurable() {
    let app = TestApp::with_env(&[("PASSWORD_MIN_LENGTH", "10")]).await;
    app.register("user", "pass123")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(
        app.register("user", "pass123456").await.status,
        StatusCode::CREATED
    );
}
