//! Tool calls a model answers with and reports no usage for: counted by their names and
//! arguments as the client reads them (not their JSON and its escapes), and assembled as
//! the server streamed them, Gemini's whole calls without an `index` among them.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use super::{chat_row, priced_app, REQUEST};
use crate::{
    common::Reply,
    openai::{completions, key_of, stream_completion},
};

/// Arguments whose JSON escapes are many: quotes, backslashes, a line break and `é`.
const ARGUMENTS: &str = r#"{"text":"a \"quoted\" C:\\path\nand café"}"#;

#[tokio::test]
async fn tool_calls_are_counted_by_their_names_and_arguments_whole_and_streamed() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "tools").await;
    let call = json!({ "id": "call_1", "type": "function",
                       "function": { "name": "say", "arguments": ARGUMENTS } });
    let whole = json!({ "id": "x", "object": "chat.completion", "model": "llama3.2", "choices": [
        { "index": 0, "message": { "role": "assistant", "content": null, "tool_calls": [call] },
          "finish_reason": "tool_calls" },
    ] });
    // Written as a server may: `é` escaped.
    let whole = serde_json::to_string(&whole)
        .unwrap()
        .replace('é', r"\u00e9");
    let piece = |delta: Value| {
        json!({ "id": "x", "object": "chat.completion.chunk", "model": "llama3.2",
                "choices": [{ "index": 0, "delta": delta, "finish_reason": null }] })
    };
    let chunks = vec![
        piece(
            json!({ "tool_calls": [{ "index": 0, "id": "call_1", "type": "function",
                                       "function": { "name": "say", "arguments": "" } }] }),
        ),
        piece(json!({ "tool_calls": [{ "index": 0, "function": { "arguments": ARGUMENTS } }] })),
    ];
    app.llm.set_reply(Reply::Verbatim {
        whole: serde_json::from_str(&whole).unwrap(),
        chunks,
    });
    let ask = json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "say it" }],
                      "tools": [{ "type": "function", "function": { "name": "say" } }] });
    let answered = completions(&app, &key, ask.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let mut streamed = ask;
    streamed["stream"] = json!(true);
    stream_completion(&app, &key, streamed).await;
    let counted = ("say".len() + ARGUMENTS.len()) as i64;
    for chat_id in [1, 2] {
        let row = chat_row(&app, chat_id).await;
        assert_eq!(row.usage_source.as_deref(), Some("counted"), "{row:?}");
        assert_eq!(row.completion_tokens, Some(counted), "{row:?}");
        let prompt = row.prompt_tokens.unwrap();
        assert_eq!(row.cost, REQUEST + prompt + 2 * counted, "{row:?}");
    }
    app.assert_all_settled().await;
}

#[tokio::test]
async fn whole_calls_streamed_without_an_index_are_stored_and_replayed_as_separate_calls() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "gemini").await;
    let piece = |delta: Value, finish: Value| {
        json!({ "id": "x", "object": "chat.completion.chunk", "model": "llama3.2",
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
    };
    let whole_call = |id: &str, name: &str, arguments: &str| {
        json!({ "tool_calls": [{ "id": id, "type": "function",
                                 "function": { "name": name, "arguments": arguments } }] })
    };
    app.llm.set_reply(Reply::Verbatim {
        whole: Value::Null,
        chunks: vec![
            piece(
                whole_call("c1", "weather", r#"{"city":"Sydney"}"#),
                Value::Null,
            ),
            piece(whole_call("c2", "time", r#"{"tz":"AEST"}"#), Value::Null),
            piece(json!({}), json!("stop")),
        ],
    });
    let ask = json!({ "model": "llama3.2", "stream": true,
                      "messages": [{ "role": "user", "content": "weather and time?" }] });
    let authorization = format!("Bearer {key}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", authorization.as_str()),
        ("idempotency-key", "gemini-1"),
    ];
    let (status, _, streamed) = app
        .request_raw(
            Method::POST,
            "/v1/chat/completions",
            &headers,
            ask.to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{streamed}");
    assert!(streamed.ends_with("data: [DONE]\n\n"), "{streamed}");
    // The same request again, whole: the stored answer, its two calls apart.
    let mut again = ask;
    again["stream"] = json!(false);
    let replayed = app
        .request(
            Method::POST,
            "/v1/chat/completions",
            &headers,
            again.to_string(),
        )
        .await;
    assert_eq!(replayed.status, StatusCode::OK, "{replayed:?}");
    let calls = &replayed.json["choices"][0]["message"]["tool_calls"];
    let names: Vec<(&str, &str, &str)> = calls
        .as_array()
        .unwrap_or_else(|| panic!("{replayed:?}"))
        .iter()
        .map(|call| {
            (
                call["id"].as_str().unwrap(),
                call["function"]["name"].as_str().unwrap(),
                call["function"]["arguments"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("c1", "weather", r#"{"city":"Sydney"}"#),
            ("c2", "time", r#"{"tz":"AEST"}"#)
        ]
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn tool_calls_written_oddly_are_counted_as_written_never_free() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "odd").await;
    // `arguments` as an object, as some servers write it, and an `id` that is a number.
    let call = json!({ "id": 7, "type": "function",
                       "function": { "name": "say", "arguments": { "text": "hi" } } });
    let whole = json!({ "id": "x", "object": "chat.completion", "model": "llama3.2", "choices": [
        { "index": 0, "message": { "role": "assistant", "content": null, "tool_calls": [call] },
          "finish_reason": "tool_calls" },
    ] });
    app.llm.set_reply(Reply::Verbatim {
        whole,
        chunks: Vec::new(),
    });
    let ask = json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "say it" }] });
    let answered = completions(&app, &key, ask).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let row = chat_row(&app, 1).await;
    let counted = ("say".len() + r#"{"text":"hi"}"#.len()) as i64;
    assert_eq!(row.completion_tokens, Some(counted), "{row:?}");
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_streamed_call_of_another_kind_is_counted_not_free() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "custom").await;
    let input = "wxyz ".repeat(20);
    let piece = json!({ "id": "x", "object": "chat.completion.chunk", "model": "llama3.2",
        "choices": [{ "index": 0, "finish_reason": null, "delta": { "tool_calls": [
            { "index": 0, "id": "c1", "type": "custom", "custom": { "name": "sh", "input": input } },
        ] } }] });
    app.llm.set_reply(Reply::Verbatim {
        whole: Value::Null,
        chunks: vec![piece],
    });
    let ask = json!({ "model": "llama3.2", "stream": true,
                      "messages": [{ "role": "user", "content": "run it" }] });
    let data = stream_completion(&app, &key, ask).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let row = chat_row(&app, 1).await;
    assert_eq!(row.usage_source.as_deref(), Some("counted"), "{row:?}");
    assert_eq!(
        row.completion_tokens,
        Some(("sh".len() + input.len()) as i64)
    );
    app.assert_all_settled().await;
}
