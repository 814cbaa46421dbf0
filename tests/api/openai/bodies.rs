//! Big bodies: `/v1` admits bodies up to `V1_MAX_BODY_BYTES` (images make them large) and
//! passes them on whole; every other route keeps its limit. (The memory such bodies take
//! under a burst is measured on the real binary, in `memory.rs`.)

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{assert_openai_error, completions, key_of};
use crate::common::TestApp;

/// A chat completion with an image of `bytes` bytes of base64.
fn with_image(bytes: usize) -> serde_json::Value {
    let image = format!("data:image/png;base64,{}", "A".repeat(bytes));
    json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": [
        { "type": "text", "text": "what is this?" },
        { "type": "image_url", "image_url": { "url": image } },
    ] }] })
}

#[tokio::test]
async fn v1_admits_bodies_up_to_its_own_limit_and_passes_them_on_whole() {
    let app = TestApp::with_env(&[("V1_MAX_BODY_BYTES", "300000")]).await;
    let key = key_of(&app, "user").await;
    let big = with_image(250_000);
    let answered = completions(&app, &key, big.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let received = &app.llm.received()[0];
    let url = &received.body["messages"][1]["content"][1]["image_url"]["url"];
    assert_eq!(url, &big["messages"][0]["content"][1]["image_url"]["url"]);
    // Sent with its length declared (compact JSON, as sent, the system prompt put first).
    let length = serde_json::to_string(&received.body).unwrap().len();
    assert_eq!(received.content_length, Some(length));
    let chats = app.get_authorized("/chats", &key).await.json;
    assert_eq!(chats["chats"][0]["message"], "what is this? [image]");

    let too_big = completions(&app, &key, with_image(310_000)).await;
    assert_openai_error(
        &too_big,
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "payload_too_large",
    );
    let authorization = format!("Bearer {key}");
    let embeddings = app
        .request(
            Method::POST,
            "/v1/embeddings",
            &[("authorization", authorization.as_str())],
            json!({ "model": "llama3.2", "input": "x".repeat(310_000) }).to_string(),
        )
        .await;
    assert_eq!(embeddings.status, StatusCode::PAYLOAD_TOO_LARGE);

    // The other routes keep theirs: `/chat`'s is about 100 KB by default.
    let token = app.user_with_token("chatter").await;
    let chat = app.chat(&token, &"x".repeat(250_000)).await;
    chat.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(app.balance(&key).await, 3900);
    assert_eq!(app.llm.calls(), 1);
}

#[tokio::test]
async fn v1_refuses_a_body_that_is_not_json_saying_it_reads_json_only() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let authorization = format!("Bearer {key}");
    for (content_type, body, status, code) in [
        (
            "text/plain",
            "hello",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "application/x-www-form-urlencoded",
            "model=llama3.2",
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
    ] {
        for path in ["/v1/chat/completions", "/v1/embeddings"] {
            let refused = app
                .request(
                    Method::POST,
                    path,
                    &[
                        ("authorization", authorization.as_str()),
                        ("content-type", content_type),
                    ],
                    body.to_string(),
                )
                .await;
            assert_openai_error(&refused, status, "invalid_request_error", code);
            let message = refused.json["error"]["message"].as_str().unwrap();
            assert!(message.contains("JSON"), "{message}");
            assert!(
                !message.contains("form"),
                "{content_type} {path}: {message}"
            );
        }
    }
    assert_eq!(app.llm.calls(), 0);
    assert_eq!(app.balance(&key).await, 4000);
}

#[tokio::test]
async fn a_compressed_body_is_openai_s_415_saying_so() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let authorization = format!("Bearer {key}");
    let refused = app
        .request(
            Method::POST,
            "/v1/chat/completions",
            &[
                ("authorization", &authorization),
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            "\u{1f}\u{8b}\u{8}\u{0}",
        )
        .await;
    assert_openai_error(
        &refused,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "unsupported_media_type",
    );
    let message = refused.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("Content-Encoding"), "{message}");
    assert_eq!(app.llm.calls(), 0);
}
