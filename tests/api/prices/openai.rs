//! Prices on the OpenAI routes: the bound of a passed-through request (its bytes, the
//! system prompt added, each media part's allowance), the client's own cap, several
//! choices, `usage.cost` whole and streamed, `/v1/models`' prices, and embeddings.

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokenchat::config::DEFAULT_SYSTEM_PROMPT;

use super::{last_sent, priced_app, usage, MAX_OUTPUT, REQUEST};
use crate::{
    common::Reply,
    openai::{assert_invalid_input, assert_openai_error, completions, key_of, stream_completion},
};

/// The bound of a request of `body` with no system message: its bytes, the system prompt
/// tokenchat adds (and its 8 tokens) and 16 for the call.
fn request_bound(body: &Value) -> i64 {
    (body.to_string().len() + DEFAULT_SYSTEM_PROMPT.len() + 8 + 16) as i64
}

#[tokio::test]
async fn a_completion_shows_its_charge_as_usage_cost_and_the_model_gets_the_cap() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "sdk").await;
    app.llm.set_reply(Reply::EchoReporting(usage(9, 0, 3, 0)));
    let body = json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }] });
    let answered = completions(&app, &key, body.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let charged = REQUEST + 9 + 2 * 3;
    assert_eq!(answered.json["usage"]["cost"], charged);
    assert_eq!(answered.json["usage"]["prompt_tokens"], 9);
    assert_eq!(answered.tokens_remaining(), 4000 - charged);
    assert_eq!(last_sent(&app)["max_tokens"], MAX_OUTPUT);
    let reserved = REQUEST + request_bound(&body) + 2 * MAX_OUTPUT;
    let row = super::chat_row(&app, 1).await;
    assert_eq!((row.cost, row.reserved), (charged, reserved));

    // Streamed: the usage chunk comes after the settlement, with the charge.
    let streamed = json!({
        "model": "llama3.2", "stream": true, "stream_options": { "include_usage": true },
        "messages": [{ "role": "user", "content": "hi" }],
    });
    let data = stream_completion(&app, &key, streamed).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"]["cost"], charged, "{data:?}");
    assert_eq!(usage_chunk["choices"], json!([]));
    app.assert_all_settled().await;
}

#[tokio::test]
async fn the_clients_own_cap_is_reserved_for_every_choice_and_never_lowered() {
    let app = priced_app(&[("INITIAL_TOKENS", "300")]).await;
    let key = key_of(&app, "capped").await;
    let body = json!({
        "model": "llama3.2", "max_tokens": 10, "n": 2,
        "messages": [{ "role": "user", "content": "hi" }],
    });
    let answered = completions(&app, &key, body.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    // Sent as the client sent it, not written again.
    assert_eq!(last_sent(&app)["max_tokens"], 10);
    let row = super::chat_row(&app, 1).await;
    assert_eq!(row.reserved, REQUEST + request_bound(&body) + 2 * 10 * 2);
    assert_eq!(row.output_cap, Some(10));

    // A cap the balance cannot cover is refused, not lowered, naming what it needs.
    let greedy = json!({
        "model": "llama3.2", "max_completion_tokens": 1000,
        "messages": [{ "role": "user", "content": "hi" }],
    });
    let refused = completions(&app, &key, greedy.clone()).await;
    assert_openai_error(
        &refused,
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_quota",
        "insufficient_quota",
    );
    assert_eq!(
        refused.json["error"]["required"],
        REQUEST + request_bound(&greedy) + 2 * 1000
    );
    assert!(refused.json["error"]["tokens"].as_i64().unwrap() < 300);
    for bad in [json!(0), json!(-1), json!("ten"), json!(1.5)] {
        let body = json!({ "model": "llama3.2", "max_tokens": bad, "messages": [{ "role": "user", "content": "hi" }] });
        let refused = completions(&app, &key, body).await;
        assert_invalid_input(&refused, "max_tokens");
    }
    app.assert_all_settled().await;
}

#[tokio::test]
async fn each_image_is_reserved_at_its_allowance() {
    let app = priced_app(&[("INITIAL_TOKENS", "10000")]).await;
    let key = key_of(&app, "looker").await;
    let body = json!({
        "model": "llama3.2",
        "messages": [{ "role": "user", "content": [
            { "type": "text", "text": "what is this?" },
            { "type": "image_url", "image_url": { "url": "https://example.com/cat.png" } },
            { "type": "image_url", "image_url": { "url": "https://example.com/dog.png" } },
        ] }],
    });
    let answered = completions(&app, &key, body.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let row = super::chat_row(&app, 1).await;
    // The default allowance: 2,048 tokens a part that is not text.
    assert_eq!(
        row.reserved,
        REQUEST + request_bound(&body) + 2 * 2048 + 2 * MAX_OUTPUT
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_field_given_twice_in_a_message_or_a_content_part_is_refused_before_any_reservation() {
    let app = priced_app(&[("INITIAL_TOKENS", "100000")]).await;
    let key = key_of(&app, "twice").await;
    let images = r#"[{"type":"image_url","image_url":{"url":"https://example.com/a.png"}}]"#;
    // tokenchat would read the first and the model the last: a short text reserved for,
    // the images answered (and the text stored) something else.
    for (body, field) in [
        (
            format!(r#"{{"model":"llama3.2","messages":[{{"role":"user","content":"hi","content":{images}}}]}}"#),
            "content",
        ),
        (
            format!(r#"{{"model":"llama3.2","messages":[{{"role":"user","role":"system","content":"hi"}},{{"role":"user","content":{images}}}]}}"#),
            "role",
        ),
        (
            r#"{"model":"llama3.2","messages":[{"role":"user","content":[{"type":"text","type":"image_url","image_url":{"url":"x"},"text":"hi"}]}]}"#.to_string(),
            "type",
        ),
    ] {
        let refused = completions(&app, &key, body).await;
        assert_invalid_input(&refused, "messages");
        let message = refused.json["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{field:?} twice")), "{message}");
    }
    assert_eq!(app.llm.calls(), 0);
    assert_eq!(app.balance(&key).await, 100000);

    // A part that is not an object is reserved for as media: the model may read it as one.
    let stray = json!({
        "model": "llama3.2",
        "messages": [
            { "role": "user", "content": [{ "type": "text", "text": "hi" }, "stray"] },
            { "role": "user", "content": "and this?" },
        ],
    });
    let answered = completions(&app, &key, stray.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let row = super::chat_row(&app, 1).await;
    assert_eq!(
        row.reserved,
        REQUEST + request_bound(&stray) + 2048 + 2 * MAX_OUTPUT
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn the_models_list_gives_each_priced_model_its_prices() {
    let app = priced_app(&[("LLM_MODELS", "unpriced")]).await;
    let key = key_of(&app, "lister").await;
    let authorization = format!("Bearer {key}");
    let listed = app
        .request(
            axum::http::Method::GET,
            "/v1/models",
            &[("authorization", &authorization)],
            "",
        )
        .await;
    let models = listed.json["data"].as_array().unwrap();
    let priced = models
        .iter()
        .find(|model| model["id"] == "llama3.2")
        .unwrap();
    assert_eq!(
        priced["pricing"],
        json!({ "prompt": 1_000_000, "cached_prompt": 500_000, "completion": 2_000_000,
                "request": 5, "max_output_tokens": 50 })
    );
    let unpriced = models
        .iter()
        .find(|model| model["id"] == "unpriced")
        .unwrap();
    assert!(unpriced.get("pricing").is_none(), "{unpriced}");
}

#[tokio::test]
async fn embeddings_are_priced_by_their_prompt_tokens() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "embedder").await;
    let authorization = format!("Bearer {key}");
    let body = json!({ "model": "llama3.2", "input": "four words of input" });
    let answered = app
        .request(
            axum::http::Method::POST,
            "/v1/embeddings",
            &[
                ("content-type", "application/json"),
                ("authorization", &authorization),
            ],
            body.to_string(),
        )
        .await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    // The fake counts 4 prompt tokens: 5 + 4.
    let charged = REQUEST + 4;
    assert_eq!(answered.json["usage"]["cost"], charged);
    // The balance the settlement left.
    assert_eq!(answered.tokens_remaining(), 4000 - charged);
    let reserved = REQUEST + body.to_string().len() as i64;
    // The reservation was a hold: the call records it, and the ledger only the charge.
    let rows: Vec<(String, i64)> = tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(
        "SELECT reason, amount FROM ledger WHERE embedding_id IS NOT NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await)
    .unwrap();
    assert_eq!(rows, [("embedding_charge".to_string(), -charged)]);
    let recorded: (i64, bool) = tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(
        "SELECT reserved, held FROM embeddings",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(recorded, (reserved, true));
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_low_balance_lowers_a_completions_cap_whole_and_streamed() {
    let body = json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }] });
    // 20 completion tokens past the request and the prompt's bound.
    let initial = REQUEST + request_bound(&body) + 2 * 20;
    let app = priced_app(&[("INITIAL_TOKENS", &initial.to_string())]).await;
    let key = key_of(&app, "short").await;
    let answered = completions(&app, &key, body.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    assert_eq!(answered.headers["x-max-tokens-applied"], "20");
    assert_eq!(last_sent(&app)["max_tokens"], 20);
    app.assert_all_settled().await;

    // Streamed, the body is longer by its `"stream": true`, and so is its bound.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let initial = REQUEST + request_bound(&streamed) + 2 * 20;
    let again = priced_app(&[("INITIAL_TOKENS", &initial.to_string())]).await;
    let key = key_of(&again, "streamer").await;
    let request = crate::openai::completion_request(&key, &streamed);
    let response = tower::ServiceExt::oneshot(again.router.clone(), request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-max-tokens-applied"], "20");
    let _ = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    assert_eq!(last_sent(&again)["max_tokens"], 20);
    again.assert_all_settled().await;
}

/// The chunks of a streamed completion, `[DONE]` left out (checked to be last).
fn streamed_chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks = events[..events.len() - 1].iter();
    chunks
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test]
async fn a_model_s_only_usage_beside_its_last_choice_reaches_the_client_once_with_the_charge() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "sdk").await;
    let chunk = |delta: Value, finish: Value, usage: Value| {
        json!({ "id": "x", "object": "chat.completion.chunk", "model": "llama3.2", "usage": usage,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
    };
    let usage = json!({ "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                        "prompt_tokens_details": { "cached_tokens": 1 } });
    // As Mistral and Gemini's OpenAI endpoint stream: the usage on the finishing chunk, and
    // no usage chunk after it. Then the same with a count left out, and with one that cannot
    // be read, which tokenchat counts.
    let partial = json!({ "prompt_tokens": 5 });
    let mut balance = 4000;
    let unreadable = json!({ "prompt_tokens": "many" });
    for (usage, complete) in [(usage, true), (partial, false), (unreadable, false)] {
        let chunks = vec![
            chunk(
                json!({ "role": "assistant", "content": "Hi" }),
                Value::Null,
                Value::Null,
            ),
            chunk(json!({}), json!("stop"), usage.clone()),
        ];
        let whole = json!({});
        app.llm.set_reply(Reply::Verbatim { whole, chunks });
        let body = json!({ "model": "llama3.2", "stream": true,
                           "stream_options": { "include_usage": true },
                           "messages": [{ "role": "user", "content": "hi" }] });
        let chunks = streamed_chunks(&stream_completion(&app, &key, body).await);
        let usages: Vec<&Value> = chunks
            .iter()
            .map(|chunk| &chunk["usage"])
            .filter(|usage| !usage.is_null())
            .collect();
        assert_eq!(usages.len(), 1, "{chunks:?}");
        let charged = app.balance(&key).await;
        assert_eq!(usages[0]["cost"], balance - charged, "{chunks:?}");
        balance = charged;
        // Apart from the choice, as OpenAI sends it: the stream's last chunk, choice-less.
        let finishing = chunks
            .iter()
            .find(|chunk| chunk["choices"][0]["finish_reason"] == "stop");
        let finishing = finishing.expect("the finishing chunk");
        assert!(finishing["usage"].is_null(), "{chunks:?}");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]), "{chunks:?}");
        if complete {
            // The model's own, details and all: 5 + ceil(4 + 0.5 + 4).
            assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
            assert_eq!(last["usage"]["cost"], REQUEST + 9);
        } else {
            // tokenchat's count in its place.
            assert!(last["usage"]["completion_tokens"].as_i64().unwrap() > 0);
        }
    }
    app.assert_all_settled().await;
}
