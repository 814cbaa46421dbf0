//! A priced chat's every ending: answered, charged by its usage; failed or abandoned before
//! any text, refunded whole; failed or abandoned after text was delivered, under
//! `ABANDONED_STREAM_CHARGE=delivered`, the prompt and the completion delivered, counted;
//! under `never`, refunded.

use std::time::Duration;

use axum::http::StatusCode;
use tokenchat::config::DEFAULT_SYSTEM_PROMPT;

use super::{
    assert_reserved_then, chat_reservation, chat_row, priced_app, usage, MAX_OUTPUT, REQUEST,
};
use crate::{
    common::Reply,
    streaming::{deltas, settled_chat, stream_message, stream_to_end},
};

/// What a chat of `message` that delivered `text` is charged under `delivered`: its prompt
/// counted (by bytes, with OpenAI's 3 tokens a message and 3 for the reply) and `text`.
fn delivered_charge(message: &str, text: &str) -> i64 {
    let prompt = (DEFAULT_SYSTEM_PROMPT.len() + message.len() + 2 * 3 + 3) as i64;
    REQUEST + prompt + 2 * text.len() as i64
}

#[tokio::test]
async fn a_streamed_answer_is_settled_to_its_usage_and_done_says_the_charge() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("streamer").await;
    app.llm.set_reply(Reply::EchoReporting(usage(12, 0, 4, 0)));
    let message = "stream it";
    let events = stream_to_end(&app, &token, message).await;
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    let charged = REQUEST + 12 + 2 * 4;
    assert_eq!(done["tokens_charged"], charged);
    assert_eq!(done["tokens"], 4000 - charged);
    let chat_id = done["chat_id"].as_i64().unwrap();
    let reserved = chat_reservation(message, MAX_OUTPUT);
    assert_reserved_then(&app, chat_id, reserved, &[("chat_charge", -charged)]).await;
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_that_fails_after_text_charges_the_prompt_and_the_text_delivered_or_nothing() {
    let message = "[die-mid-stream] a b c d";
    for rule in ["delivered", "never"] {
        let app = priced_app(&[("ABANDONED_STREAM_CHARGE", rule)]).await;
        let token = app.user_with_token("cut").await;
        let events = stream_to_end(&app, &token, message).await;
        let (name, error) = events.last().unwrap();
        assert_eq!(name, "error", "{events:?}");
        let delivered = deltas(&events).concat();
        assert!(!delivered.is_empty());
        let reserved = chat_reservation(message, MAX_OUTPUT);
        let chat_id = settled_chat(&app, &token).await["id"].as_i64().unwrap();
        let row = chat_row(&app, chat_id).await;
        if rule == "delivered" {
            let charged = delivered_charge(message, &delivered);
            assert!(charged < reserved);
            assert_eq!(error["tokens_charged"], charged, "{rule}");
            assert_eq!((row.status.as_str(), row.cost), ("abandoned", charged));
            assert_eq!(row.usage_source.as_deref(), Some("counted"));
            assert_eq!(row.completion_tokens, Some(delivered.len() as i64));
            assert_reserved_then(&app, chat_id, reserved, &[("chat_charge", -charged)]).await;
            assert_eq!(app.balance(&token).await, 4000 - charged);
        } else {
            assert_eq!(error["tokens_charged"], 0, "{rule}");
            assert_eq!((row.status.as_str(), row.cost), ("failed", reserved));
            // Refunded: the hold let go of, and no row, as nothing of the balance moved.
            assert_reserved_then(&app, chat_id, reserved, &[]).await;
            assert_eq!(app.balance(&token).await, 4000);
        }
        app.assert_all_settled().await;
    }
}

#[tokio::test]
async fn a_model_that_fails_before_any_text_is_refunded_its_whole_reservation() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("unlucky").await;
    app.llm.set_reply(Reply::DieMidStream { after_words: 0 });
    let events = stream_to_end(&app, &token, "hello").await;
    let (_, error) = events.last().unwrap();
    assert_eq!(error["tokens_charged"], 0, "{events:?}");
    // Whole, too: a model failing at once.
    app.llm.set_reply(Reply::Status(500));
    let refused = app
        .post_authorized("/chat", &token, serde_json::json!({ "message": "hello" }))
        .await;
    refused.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    for chat_id in [1, 2] {
        let reserved = chat_reservation("hello", MAX_OUTPUT);
        assert_reserved_then(&app, chat_id, reserved, &[]).await;
    }
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_client_gone_after_a_delta_pays_for_its_prompt_and_what_it_was_sent() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("leaver").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let message = "one two three four five six";
    let mut events = stream_message(&app, &token, message).await.events();
    assert_eq!(events.next().await.unwrap().0, "start");
    assert_eq!(events.next().await.unwrap().0, "delta");
    drop(events);
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    let kept = chat["response"].as_str().unwrap();
    let charged = delivered_charge(message, kept);
    assert_eq!(chat["tokens_charged"], charged, "{chat}");
    assert!(charged < chat_reservation(message, MAX_OUTPUT));
    assert_eq!(app.balance(&token).await, 4000 - charged);
    app.assert_all_settled().await;
}
