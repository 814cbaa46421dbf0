//! Streams and the balance: concurrent streams never overspend it, a repeated idempotency
//! key replays a stream without a second charge, and the demo model is metered too.

use axum::{
    body::Body,
    http::{header, Method, Request, StatusCode},
};
use serde_json::json;
use tower::ServiceExt;

use crate::common::TestApp;

use super::{deltas, stream_message, stream_to_end, EventReader, Streamed};

#[tokio::test]
async fn many_concurrent_streams_never_overspend_a_balance() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "500")]).await;
    let token = app.user_with_token("user").await;
    let streams = (0..12).map(|n| {
        let (app, token) = (&app, &token);
        async move {
            match stream_message(app, token, &format!("stream {n}")).await {
                Streamed::Events(mut events) => events.rest().await.last().unwrap().0.clone(),
                Streamed::Refused(response) => {
                    response.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
                    "refused".to_string()
                }
            }
        }
    });
    let endings = futures_util::future::join_all(streams).await;
    assert_eq!(
        endings.iter().filter(|end| *end == "done").count(),
        5,
        "{endings:?}"
    );
    assert_eq!(endings.iter().filter(|end| *end == "refused").count(), 7);
    assert_eq!(app.balance(&token).await, 0);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_replays_the_stream_without_a_second_charge() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let request = || {
        Request::builder()
            .method(Method::POST)
            .uri("/chat")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header("idempotency-key", "stream-1")
            .body(Body::from(
                json!({ "message": "hi", "stream": true }).to_string(),
            ))
            .unwrap()
    };
    let mut texts = Vec::new();
    for _ in 0..2 {
        let response = app.router.clone().oneshot(request()).await.unwrap();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let mut events = EventReader {
            body: response.into_body(),
            buffer: String::new(),
            comments: 0,
        };
        let events = events.rest().await;
        let text = deltas(&events).concat();
        assert_eq!(events.last().unwrap().1["tokens"], 3900);
        texts.push((text, replayed));
    }
    assert_eq!(texts[0], ("Echo: hi".to_string(), false));
    assert_eq!(texts[1], ("Echo: hi".to_string(), true));
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn with_no_upstream_the_demo_model_answers_whole_and_streamed_and_is_metered() {
    let app = TestApp::with_env(&[("LLM_BASE_URL", "")]).await;
    let token = app.user_with_token("user").await;
    let whole = app.chat(&token, "code hello world in python").await;
    assert_eq!(whole.status, StatusCode::OK, "{whole:?}");
    let answer = whole.json["response"].as_str().unwrap();
    assert!(
        answer.starts_with("Code for 'Hello World' in python:"),
        "{answer}"
    );
    assert!(answer.contains("print(\"Hello, World!\")"), "{answer}");
    assert_eq!(whole.json["tokens"], 3900);

    let events = stream_to_end(&app, &token, "what is the weather like").await;
    let pieces = deltas(&events);
    assert!(pieces.len() > 10, "word by word: {pieces:?}");
    let text = pieces.concat();
    assert!(
        text.starts_with("Sorry, I could not generate 'Hello World'"),
        "{text}"
    );
    assert!(text.contains("LLM_BASE_URL"), "{text}");
    assert_eq!(events.last().unwrap().1["tokens"], 3800);
    assert_eq!(app.llm.calls(), 0, "no upstream was asked");
    app.assert_all_settled().await;
}
