//! How long a stream may take (`LLM_TIMEOUT_SECS` for it to begin, `LLM_STREAM_MAX_SECS`
//! in all), what a stream cut short costs, and what a retry with its `Idempotency-Key`
//! gets afterwards: the text it paid for, or a fresh try when it was refunded.

use std::time::Duration;

use axum::{
    body::Body,
    http::{header, Method, Request, StatusCode},
};
use serde_json::json;
use tower::ServiceExt;

use crate::{
    common::{Reply, TestApp},
    streaming::{deltas, only_chat, settled_chat, stream_message, stream_to_end, EventReader},
};

#[tokio::test]
async fn a_stream_may_write_past_llm_timeout_secs_once_it_began_and_is_answered() {
    let app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1"), ("LLM_STREAM_IDLE_SECS", "5")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(100),
    });
    let words = "word ".repeat(15);
    let started = std::time::Instant::now();
    let events = stream_to_end(&app, &token, &words).await;
    assert!(started.elapsed() > Duration::from_millis(1500));
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    assert_eq!(done["tokens_charged"], 100);
    assert_eq!(deltas(&events).concat(), format!("Echo: {words}"));
    assert_eq!(only_chat(&app, &token).await["status"], "answered");
    app.assert_all_settled().await;
}

#[tokio::test]
async fn llm_stream_max_secs_bounds_a_whole_stream_and_charges_what_was_delivered() {
    let app =
        TestApp::with_env(&[("LLM_STREAM_MAX_SECS", "1"), ("LLM_STREAM_IDLE_SECS", "5")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(100),
    });
    let words = "word ".repeat(40);
    let events = stream_to_end(&app, &token, &words).await;
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(error["code"], "upstream_timeout");
    assert_eq!(error["tokens_charged"], 100);
    assert!(deltas(&events).len() >= 3, "it was writing: {events:?}");
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 100);
    assert_eq!(chat["response"], deltas(&events).concat());
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_that_does_not_begin_within_llm_timeout_secs_is_a_504_and_free() {
    let app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::Stall(Duration::from_secs(3)));
    let started = std::time::Instant::now();
    let refused = stream_message(&app, &token, "hello").await.refused();
    refused.assert_error(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn recovery_leaves_a_live_stream_alone_past_llm_timeout_secs() {
    let app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1"), ("LLM_STREAM_IDLE_SECS", "5")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(100),
    });
    let mut events = stream_message(&app, &token, "one two three four five")
        .await
        .events();
    assert_eq!(events.next().await.unwrap().0, "start");
    // A sweep as if the model's time-out and its margin had long passed: the stream's own
    // deadline is LLM_STREAM_MAX_SECS (600) and the margin away.
    let now = tokenchat::db::unix_now();
    let swept = app.state.recovery.sweep(now + 60).await.unwrap();
    assert_eq!(swept.refunded_chats, 0);
    let rest = events.rest().await;
    assert_eq!(rest.last().unwrap().0, "done", "{rest:?}");
    assert_eq!(app.balance(&token).await, 3900);
    let late = app.state.recovery.sweep(now + 700).await.unwrap();
    assert_eq!(late.refunded_chats, 0, "settled: nothing left to refund");
    app.assert_all_settled().await;
}

fn keyed_chat(token: &str, key: &str, message: &str, stream: bool) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri("/chat")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header("idempotency-key", key)
        .body(Body::from(
            json!({ "message": message, "stream": stream }).to_string(),
        ))
        .unwrap()
}

/// Sends a keyed streamed chat and hangs up after `deltas` deltas.
async fn hang_up_after(app: &TestApp, token: &str, key: &str, message: &str, deltas: usize) {
    let request = keyed_chat(token, key, message, true);
    let response = app.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = EventReader::new(response.into_body());
    assert_eq!(events.next().await.unwrap().0, "start");
    for _ in 0..deltas {
        assert_eq!(events.next().await.unwrap().0, "delta");
    }
}

#[tokio::test]
async fn the_key_of_a_charged_abandoned_stream_replays_the_text_it_paid_for() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let message = "one two three four five six";
    hang_up_after(&app, &token, "k-charged", message, 1).await;
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 100);

    for stream in [false, true] {
        let request = keyed_chat(&token, "k-charged", message, stream);
        let response = app.router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "stream: {stream}");
        assert_eq!(response.headers()["idempotent-replayed"], "true");
        if stream {
            let events = EventReader::new(response.into_body()).rest().await;
            assert_eq!(deltas(&events).concat(), chat["response"].as_str().unwrap());
            assert_eq!(events.last().unwrap().1["tokens_charged"], 100);
        } else {
            let answer = crate::common::TestResponse::read(response).await;
            assert_eq!(answer.json["response"], chat["response"]);
            assert_eq!(answer.json["chat_id"], chat["id"]);
        }
    }
    assert_eq!(app.llm.calls(), 1, "the model was not asked again");
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn the_key_of_a_refunded_abandoned_stream_is_released_for_a_fresh_try() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::StallMidStream {
        after_words: 0,
        stall: Duration::from_secs(60),
    });
    hang_up_after(&app, &token, "k-refunded", "hello", 0).await;
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 0);

    app.llm.set_reply(Reply::Echo);
    let request = keyed_chat(&token, "k-refunded", "hello", false);
    let response = app.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.headers().contains_key("idempotent-replayed"));
    let answer = crate::common::TestResponse::read(response).await;
    assert_eq!(answer.json["response"], "Echo: hello");
    assert_eq!(app.llm.calls(), 2);
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}
