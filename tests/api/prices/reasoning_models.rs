//! A model that refuses `max_tokens` as unsupported (OpenAI's reasoning models): tokenchat's
//! own output cap goes to it as `max_completion_tokens`, learnt from its first refusal; a
//! client's own `max_tokens` is the client's, and its refusal too.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{chat, priced_app, usage, MAX_OUTPUT, REQUEST};
use crate::{
    common::{Reply, TestApp},
    openai::{completions, key_of, stream_completion},
};

/// The output caps of the requests the fake model received, in order: (`max_tokens`,
/// `max_completion_tokens`), null where absent.
fn caps_sent(app: &TestApp) -> Vec<(Value, Value)> {
    let received = app.llm.received();
    let caps = received.iter().map(|received| {
        let body = &received.body;
        (
            body["max_tokens"].clone(),
            body["max_completion_tokens"].clone(),
        )
    });
    caps.collect()
}

#[tokio::test]
async fn a_model_refusing_max_tokens_is_asked_again_with_max_completion_tokens_and_so_from_then_on()
{
    let app = priced_app(&[]).await;
    let token = app.user_with_token("payer").await;
    app.llm.set_reply(Reply::Reasoning);
    let first = chat(&app, &token, "think").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let (max_tokens, max_completion_tokens) = (json!(MAX_OUTPUT), Value::Null);
    assert_eq!(
        caps_sent(&app),
        [
            (max_tokens, max_completion_tokens.clone()),
            (Value::Null, json!(MAX_OUTPUT))
        ]
    );
    // Charged once, for the answer: the refusal costs nothing.
    let charged = first.json["tokens_charged"].as_i64().unwrap();
    assert!(charged > REQUEST, "{first:?}");
    assert_eq!(first.json["tokens"], 4000 - charged);

    // Learnt: the next chat, and a /v1 call without a cap, whole and streamed, go once each.
    let again = chat(&app, &token, "think again").await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    let key = key_of(&app, "sdk").await;
    let body = json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }] });
    let whole = completions(&app, &key, body.clone()).await;
    assert_eq!(whole.status, StatusCode::OK, "{whole:?}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let events = stream_completion(&app, &key, streamed).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let learnt = (Value::Null, json!(MAX_OUTPUT));
    assert_eq!(
        caps_sent(&app)[2..],
        [learnt.clone(), learnt.clone(), learnt]
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_client_s_own_max_tokens_refused_by_the_model_is_the_client_s_refusal_and_costs_nothing()
{
    let app = priced_app(&[]).await;
    let key = key_of(&app, "sdk").await;
    app.llm.set_reply(Reply::Reasoning);
    let body = json!({ "model": "llama3.2", "max_tokens": 20,
                       "messages": [{ "role": "user", "content": "hi" }] });
    let refused = completions(&app, &key, body).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{refused:?}");
    assert_eq!(refused.json["error"]["param"], "max_tokens", "{refused:?}");
    assert_eq!(refused.json["error"]["code"], "unsupported_parameter");
    // Asked once, as the client wrote it; nothing learnt, nothing charged.
    assert_eq!(caps_sent(&app), [(json!(20), Value::Null)]);
    assert_eq!(refused.tokens_remaining(), 4000);
    // Nothing learnt from the client's refusal: tokenchat's own cap still goes as max_tokens.
    app.llm.set_reply(Reply::EchoReporting(usage(3, 0, 2, 0)));
    let token = app.user_with_token("payer").await;
    assert_eq!(chat(&app, &token, "plain").await.status, StatusCode::OK);
    assert_eq!(caps_sent(&app)[1], (json!(MAX_OUTPUT), Value::Null));
    app.assert_all_settled().await;
}
