//! What a stream is: `start`, deltas and `done`, asked for by the body or an `Accept`
//! header; what is refused before it begins is ordinary JSON; usage the model did not
//! report is null; a silent model's stream says keep-alive.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::{Reply, TestApp};

use super::{only_chat, settled_chat, stream_chat, stream_message, stream_to_end};

#[tokio::test]
async fn a_streamed_answer_arrives_as_start_deltas_and_done_and_is_charged_once() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let mut events = stream_message(&app, &token, "tell me a story")
        .await
        .events();
    let (name, start) = events.next().await.unwrap();
    assert_eq!(name, "start");
    let chat_id = start["chat_id"].as_i64().unwrap();
    assert!(start["conversation_id"].is_i64(), "{start}");
    let rest = events.rest().await;
    let (done, deltas) = rest.split_last().unwrap();
    assert!(deltas.len() >= 4, "one delta per word: {deltas:?}");
    let text: String = deltas
        .iter()
        .map(|(name, data)| {
            assert_eq!(name, "delta");
            data["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Echo: tell me a story");
    assert_eq!(done.0, "done");
    assert_eq!(done.1["chat_id"], chat_id);
    assert_eq!(done.1["conversation_id"], start["conversation_id"]);
    assert_eq!(done.1["tokens"], 3900);
    assert_eq!(done.1["tokens_charged"], 100);
    assert!(
        done.1["usage"]["prompt_tokens"].as_i64().unwrap() > 0,
        "{done:?}"
    );
    assert_eq!(done.1["usage"]["completion_tokens"], 5);

    // Asked upstream as a stream, with usage.
    let asked = &app.llm.received()[0].body;
    assert_eq!(asked["stream"], true);
    assert_eq!(asked["stream_options"]["include_usage"], true);

    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["id"], chat_id);
    assert_eq!(chat["status"], "answered");
    assert_eq!(chat["response"], "Echo: tell me a story");
    assert_eq!(chat["tokens_charged"], 100);
    assert_eq!(chat["usage"], done.1["usage"]);
    assert_eq!(chat["conversation_id"], start["conversation_id"]);

    // A stream continues a conversation like a whole answer does.
    let again = json!({ "message": "and then?", "stream": true, "conversation_id": start["conversation_id"] });
    let events = stream_chat(&app, &token, again, None)
        .await
        .events()
        .rest()
        .await;
    assert_eq!(events[0].1["conversation_id"], start["conversation_id"]);
    let prompt = &app.llm.received()[1].body["messages"];
    assert_eq!(prompt[2]["content"], "Echo: tell me a story");
    assert_eq!(prompt[3]["content"], "and then?");
    assert_eq!(app.balance(&token).await, 3800);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn an_accept_header_asks_for_a_stream_and_an_explicit_false_does_not() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let accepted = stream_chat(
        &app,
        &token,
        json!({ "message": "hi" }),
        Some("application/json, text/event-stream;q=0.9"),
    )
    .await;
    let events = accepted.events().rest().await;
    assert_eq!(events.last().unwrap().0, "done");
    let whole = stream_chat(
        &app,
        &token,
        json!({ "message": "hi", "stream": false }),
        Some("text/event-stream"),
    )
    .await
    .refused();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.json["response"], "Echo: hi");
    assert_eq!(app.balance(&token).await, 3800);
}

#[tokio::test]
async fn what_is_refused_before_the_stream_begins_is_an_ordinary_json_error() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "150")]).await;
    let token = app.user_with_token("user").await;
    stream_chat(
        &app,
        "not-a-token",
        json!({ "message": "hi", "stream": true }),
        None,
    )
    .await
    .refused()
    .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    stream_message(&app, &token, "   ")
        .await
        .refused()
        .assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    stream_chat(
        &app,
        &token,
        json!({ "message": "hi", "stream": "yes" }),
        None,
    )
    .await
    .refused()
    .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    // A model failing before its first token.
    stream_message(&app, &token, "[fail] now")
        .await
        .refused()
        .assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    assert_eq!(app.balance(&token).await, 150);
    stream_to_end(&app, &token, "one").await;
    let refused = stream_message(&app, &token, "two").await.refused();
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(refused.json["tokens"], 50);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_that_reports_no_usage_leaves_it_null() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::EchoWithoutUsage);
    let events = stream_to_end(&app, &token, "hi").await;
    assert_eq!(events.last().unwrap().1["usage"], Value::Null);
    let whole = app.chat(&token, "hi again").await;
    assert_eq!(whole.status, StatusCode::OK);
    let chats = app.get_authorized("/chats", &token).await.json;
    assert_eq!(chats["chats"][0]["usage"], Value::Null);
    assert_eq!(chats["chats"][1]["usage"], Value::Null);
    // With usage, whole answers store it too.
    app.llm.set_reply(Reply::Echo);
    app.chat(&token, "counted").await;
    let chats = app.get_authorized("/chats", &token).await.json;
    assert_eq!(chats["chats"][0]["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn a_stream_whose_model_is_silent_says_keep_alive_every_fifteen_seconds() {
    let app =
        TestApp::with_env(&[("LLM_TIMEOUT_SECS", "60"), ("LLM_STREAM_IDLE_SECS", "40")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::StallMidStream {
        after_words: 1,
        stall: Duration::from_secs(30),
    });
    let mut events = stream_message(&app, &token, "hello there").await.events();
    assert_eq!(events.next().await.unwrap().0, "start");
    assert_eq!(events.next().await.unwrap().0, "delta");
    let waited = events.keep_alive(Duration::from_secs(20)).await;
    let waited = waited.expect("no keep-alive comment within 20 s of silence");
    assert!(waited > Duration::from_secs(10), "{waited:?}");
    drop(events);
    settled_chat(&app, &token).await;
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_that_answers_a_stream_request_whole_is_streamed_as_one_delta_and_charged() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::Unstreamed);
    let events = stream_to_end(&app, &token, "tell me a story").await;
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["start", "delta", "done"], "{events:?}");
    assert_eq!(events[1].1["content"], "Echo: tell me a story");
    let done = &events[2].1;
    assert_eq!(done["tokens_charged"], 100);
    assert_eq!(done["usage"]["completion_tokens"], 5, "{done}");
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "answered");
    assert_eq!(chat["response"], "Echo: tell me a story");
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}
