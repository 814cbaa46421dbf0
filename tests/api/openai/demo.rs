//! The built-in demo model under `/v1` honours an output cap and `stop` as a model does,
//! whole and streamed, or refuses a bad one naming it.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{completions, key_of, stream_completion};
use crate::common::TestApp;

/// The streamed text of the only choice, and its finish reason.
fn streamed_text(data: &[String]) -> (String, String) {
    let chunks: Vec<Value> = data
        .iter()
        .filter_map(|event| serde_json::from_str(event).ok())
        .collect();
    let delta = |chunk: &Value| {
        chunk["choices"][0]["delta"]["content"]
            .as_str()
            .map(str::to_owned)
    };
    let text = chunks.iter().filter_map(delta).collect();
    let finish = chunks
        .iter()
        .find_map(|chunk| {
            chunk["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (text, finish)
}

#[tokio::test]
async fn the_demo_model_honours_max_tokens_and_stop_whole_and_streamed() {
    let app = TestApp::with_env(&[("LLM_BASE_URL", "")]).await;
    let key = key_of(&app, "user").await;
    // Its answer to this: "Sorry, I am unable to ..." (the original's apology).
    let full = completions(
        &app,
        &key,
        json!({ "model": "demo",
        "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    let full = full.json["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let words: Vec<&str> = full.split_inclusive(' ').collect();
    assert!(words.len() > 4, "{full}");
    let stop_word = words[3].trim();
    for (limit, text, finish) in [
        (json!({ "max_tokens": 3 }), words[..3].concat(), "length"),
        (
            json!({ "max_completion_tokens": 2, "max_tokens": 9 }),
            words[..2].concat(),
            "length",
        ),
        (json!({ "stop": stop_word }), words[..3].concat(), "stop"),
        (
            json!({ "stop": ["zzz", stop_word] }),
            words[..3].concat(),
            "stop",
        ),
        (json!({ "max_tokens": 100_000 }), full.clone(), "stop"),
    ] {
        let mut ask = json!({ "model": "demo", "messages": [{ "role": "user", "content": "hi" }] });
        ask.as_object_mut()
            .unwrap()
            .extend(limit.as_object().unwrap().clone());
        let whole = completions(&app, &key, ask.clone()).await;
        assert_eq!(whole.status, StatusCode::OK, "{limit}: {whole:?}");
        let choice = &whole.json["choices"][0];
        assert_eq!(choice["message"]["content"], text.as_str(), "{limit}");
        assert_eq!(choice["finish_reason"], finish, "{limit}");
        ask["stream"] = json!(true);
        let streamed = stream_completion(&app, &key, ask).await;
        assert_eq!(
            streamed_text(&streamed),
            (text, finish.to_string()),
            "{limit}"
        );
    }
    for (field, value) in [
        ("max_tokens", json!(0)),
        ("max_completion_tokens", json!("many")),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("stop", json!(7)),
    ] {
        let mut ask = json!({ "model": "demo", "messages": [{ "role": "user", "content": "hi" }] });
        ask[field] = value;
        let refused = completions(&app, &key, ask).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{refused:?}");
        assert_eq!(refused.json["error"]["param"], field, "{refused:?}");
    }
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stop_at_the_start_of_the_demo_models_answer_leaves_none_and_is_refunded() {
    let app = TestApp::with_env(&[("LLM_BASE_URL", "")]).await;
    let key = key_of(&app, "user").await;
    let ask = json!({ "model": "demo", "stop": "Sorry",
        "messages": [{ "role": "user", "content": "hi" }] });
    let whole = completions(&app, &key, ask).await;
    assert_eq!(whole.status, StatusCode::BAD_GATEWAY, "{whole:?}");
    assert_eq!(app.balance(&key).await, 4000);
    app.assert_all_settled().await;
}
