//! Questionable input and ambiguous credentials: invalid UTF-8 in form data, invisible
//! messages, every JSON encoding of the longest message, two `Authorization` headers,
//! look-alike usernames.

use axum::http::{Method, StatusCode};

use crate::common::TestApp;

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
