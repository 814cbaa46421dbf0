//! Request bodies and the envelope from every layer: form data and JSON, malformed bodies,
//! other content types, oversized bodies, unknown routes and wrong methods, and chat
//! messages that fail validation.

use crate::common::TestApp;
use axum::http::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn form_data_and_a_missing_content_type_are_accepted() {
    let app = TestApp::new().await;
    let form = app
        .request(
            Method::POST,
            "/register/",
            &[("content-type", "application/x-www-form-urlencoded")],
            "username=formuser&password=pass123",
        )
        .await;
    assert_eq!(form.status, StatusCode::CREATED, "{form:?}");

    let bare = app
        .request(
            Method::POST,
            "/login/",
            &[],
            r#"{"username":"formuser","password":"pass123"}"#,
        )
        .await;
    assert_eq!(bare.status, StatusCode::OK, "{bare:?}");
    let token = bare.json["token"].as_str().unwrap();

    let chat = app
        .request(
            Method::POST,
            "/chat/",
            &[
                ("authorization", token),
                (
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
            ],
            "message=hello+there",
        )
        .await;
    assert_eq!(chat.json["response"], "Echo: hello there");
}

#[tokio::test]
async fn json_sent_as_form_data_by_curl_d_is_read_as_json() {
    let app = TestApp::new().await;
    let response = app
        .request(
            Method::POST,
            "/register",
            &[("content-type", "application/x-www-form-urlencoded")],
            r#"{"username":"curluser","password":"pass123"}"#,
        )
        .await;
    assert_eq!(response.status, StatusCode::CREATED, "{response:?}");
    assert_eq!(response.json["username"], "curluser");
}

#[tokio::test]
async fn malformed_bodies_get_invalid_json() {
    let app = TestApp::new().await;
    for body in [
        "",
        "{",
        "not json",
        r#"{"username": "user"}"#,
        r#"{"username": 5, "password": "pass123"}"#,
        r#"{"username": null, "password": "pass123"}"#,
        r#"["user", "pass123"]"#,
    ] {
        app.request(
            Method::POST,
            "/register",
            &[("content-type", "application/json")],
            body,
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    }
    app.request(
        Method::POST,
        "/register",
        &[("content-type", "application/x-www-form-urlencoded")],
        "username=only",
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
}

#[tokio::test]
async fn other_content_types_get_415() {
    let app = TestApp::new().await;
    for content_type in [
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/xml",
        // JSON by another name is another Content-Type, as the original's parser had it.
        "application/vnd.api+json",
        "application/merge-patch+json",
    ] {
        app.request(
            Method::POST,
            "/register/",
            &[("content-type", content_type)],
            r#"{"username":"user","password":"pass123"}"#,
        )
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    }
}

/// A JSON `/chat` of `body`, sent with `Content-Encoding: encoding`.
async fn chat_encoded(
    app: &TestApp,
    authorization: &str,
    encoding: &str,
    body: &'static str,
) -> crate::common::TestResponse {
    let headers = [
        ("authorization", authorization),
        ("content-type", "application/json"),
        ("content-encoding", encoding),
    ];
    app.request(Method::POST, "/chat", &headers, body).await
}

#[tokio::test]
async fn a_compressed_body_is_415_naming_the_encoding_and_never_read_as_it_came() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let authorization = format!("Token {token}");
    // A coding that would change the bytes (gzip's magic, not JSON), one whose bytes are
    // plain JSON all the same, and a list with one of them: none is taken.
    for (encoding, body) in [
        ("gzip", "\u{1f}\u{8b}\u{8}\u{0}"),
        ("br", r#"{"message":"hi"}"#),
        ("identity, gzip", r#"{"message":"hi"}"#),
    ] {
        let refused = chat_encoded(&app, &authorization, encoding, body).await;
        refused.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
        let message = refused.json["error"].as_str().unwrap();
        assert!(message.contains("Content-Encoding"), "{message}");
    }
    assert_eq!(app.llm.calls(), 0);
    assert_eq!(app.balance(&token).await, 4000);
    // `identity` is no coding at all, nor `utf-8`, a charset some clients put there.
    for encoding in ["identity", "UTF-8"] {
        let plain = chat_encoded(&app, &authorization, encoding, r#"{"message":"hi"}"#).await;
        assert_eq!(plain.status, StatusCode::OK, "{plain:?}");
    }
}

#[tokio::test]
async fn a_body_in_another_format_is_415_even_where_no_body_is_read() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let authorization = format!("Token {token}");
    app.request(
        Method::POST,
        "/balance",
        &[
            ("authorization", &authorization),
            ("content-type", "text/plain"),
        ],
        "tokens please",
    )
    .await
    .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // A Content-Type with no body, as some clients send, is fine.
    let empty = app
        .request(
            Method::POST,
            "/balance",
            &[
                ("authorization", &authorization),
                ("content-type", "text/plain"),
            ],
            "",
        )
        .await;
    assert_eq!(empty.json, json!({ "tokens": 4000 }));
}

#[tokio::test]
async fn an_oversized_body_gets_413_and_changes_nothing() {
    // /chat's limit is raised to fit the longest valid message in any encoding: 12 bytes
    // a character and 4 KiB besides, here 5,296 bytes.
    let app = TestApp::with_env(&[("MAX_BODY_BYTES", "1024"), ("MAX_MESSAGE_CHARS", "100")]).await;
    let token = app.user_with_token("user").await;
    let huge = json!({ "message": "x".repeat(5300) }).to_string();
    let authorization = format!("Bearer {token}");
    app.request(
        Method::POST,
        "/chat/",
        &[
            ("authorization", &authorization),
            ("content-type", "application/json"),
        ],
        huge,
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(app.balance(&token).await, 4000);
    assert_eq!(app.llm.calls(), 0);

    // Also where no body is read, as long as the length is declared.
    let declared = "x".repeat(2000);
    app.request(
        Method::POST,
        "/balance",
        &[
            ("authorization", &authorization),
            ("content-type", "application/json"),
        ],
        declared,
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_the_envelope() {
    let app = TestApp::new().await;
    app.request(Method::GET, "/nope", &[], "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    // `/` is the page: GET only.
    app.request(Method::POST, "/", &[], "")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    for (method, path) in [
        (Method::GET, "/register"),
        (Method::GET, "/login/"),
        (Method::GET, "/chat"),
        (Method::DELETE, "/balance/"),
    ] {
        let response = app.request(method, path, &[], "").await;
        response.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        assert!(response.headers.contains_key("allow"), "{response:?}");
    }
}

#[tokio::test]
async fn chat_messages_are_validated_and_nothing_is_charged() {
    let app = TestApp::with_env(&[("MAX_MESSAGE_CHARS", "10")]).await;
    let token = app.user_with_token("user").await;
    for message in ["", "   ", "\n\t ", "12345678901"] {
        let response = app.chat(&token, message).await;
        response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
        assert_eq!(response.json["field"], "message");
    }
    app.post_authorized("/chat/", &token, json!({ "message": 42 }))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    app.post_authorized("/chat/", &token, json!({}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    // Ten characters, multi-byte ones included, is within the limit.
    assert_eq!(app.chat(&token, "ééééééééé!").await.status, StatusCode::OK);
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(app.llm.calls(), 1);
}
