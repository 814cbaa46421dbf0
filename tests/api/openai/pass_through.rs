//! What an OpenAI client sends reaches the model as sent (every role, content part and
//! field), and what the model answers comes back as it gave it (tool calls, structured
//! output, several choices, log probabilities, its finish reason, usage details), whole and
//! streamed, metered by the same rule as every chat.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{assert_invalid_input, completions, hello, key_of, stream_completion};
use crate::common::{Reply, TestApp};

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": { "type": "string" },
                    "unit": { "type": "string", "enum": ["celsius", "fahrenheit"] },
                },
                "required": ["city", "unit"],
            },
        },
    })
}

fn user(content: &str) -> Value {
    json!([{ "role": "user", "content": content }])
}

/// The chunks of a stream, parsed, without `[DONE]` (which must end it).
fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

/// The text of each choice of a stream, by index.
fn texts(chunks: &[Value]) -> BTreeMap<u64, String> {
    let mut texts = BTreeMap::new();
    for choice in chunks
        .iter()
        .flat_map(|chunk| chunk["choices"].as_array().unwrap())
    {
        let text: &mut String = texts.entry(choice["index"].as_u64().unwrap()).or_default();
        text.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
    }
    texts
}

/// The tool calls of a stream, assembled from their pieces as OpenAI's SDKs do.
fn assembled_calls(chunks: &[Value]) -> Vec<Value> {
    let mut calls: Vec<Value> = Vec::new();
    for piece in chunks
        .iter()
        .flat_map(|chunk| chunk["choices"].as_array().unwrap())
        .filter_map(|choice| choice["delta"]["tool_calls"].as_array())
        .flatten()
    {
        let index = piece["index"].as_u64().unwrap() as usize;
        if calls.len() == index {
            calls.push(json!({ "id": piece["id"], "type": piece["type"],
                "function": { "name": piece["function"]["name"], "arguments": "" } }));
        }
        let arguments = calls[index]["function"]["arguments"]
            .as_str()
            .unwrap()
            .to_string()
            + piece["function"]["arguments"].as_str().unwrap_or_default();
        calls[index]["function"]["arguments"] = json!(arguments);
    }
    calls
}

fn finish_reasons(chunks: &[Value]) -> Vec<(u64, String)> {
    chunks
        .iter()
        .flat_map(|chunk| chunk["choices"].as_array().unwrap())
        .filter_map(|choice| {
            let reason = choice["finish_reason"].as_str()?;
            Some((choice["index"].as_u64().unwrap(), reason.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn every_role_part_and_field_reaches_the_model_as_sent_whole_and_streamed() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let sent = json!({
        "model": "llama3.2",
        "messages": [
            { "role": "developer", "content": "Answer in French." },
            { "role": "user", "content": [
                { "type": "text", "text": "what is the weather in" },
                { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low" } },
                { "type": "input_audio", "input_audio": { "data": "UklGRg==", "format": "wav" } },
                { "type": "file", "file": { "file_id": "file-abc123" } },
            ] },
            { "role": "assistant", "content": null, "tool_calls": [{ "id": "call_1", "type": "function",
                "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" } }] },
            { "role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C" },
        ],
        "tools": [weather_tool()],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "response_format": { "type": "text" },
        "logprobs": false,
        "top_logprobs": null,
        "logit_bias": { "50256": -100 },
        "reasoning_effort": "low",
        "modalities": ["text"],
        "prediction": { "type": "content", "content": "sunny" },
        "service_tier": "auto",
        "metadata": { "trace": "abc" },
        "seed": 7,
        "store": false,
        "user": "user-1",
        "n": 1,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_completion_tokens": 100,
        "stop": ["\n\n"],
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "a_field_from_the_future": { "nested": [1, 2.5, "x"] },
    });
    let answered = completions(&app, &key, sent.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    assert_eq!(
        answered.json["choices"][0]["message"]["content"],
        "Tool said: sunny, 21 C"
    );
    // Exactly as sent: with a developer message of its own, no system prompt is added.
    let received = &app.llm.received()[0];
    assert_eq!(received.body, sent);
    assert!(received.content_length.is_some());

    // Streamed: the same, but that a stream is always asked for its usage.
    let mut streamed = sent.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": false, "include_obfuscation": false });
    let events = stream_completion(&app, &key, streamed.clone()).await;
    assert_eq!(texts(&chunks(&events))[&0], "Tool said: sunny, 21 C");
    let mut expected = streamed;
    expected["stream_options"]["include_usage"] = json!(true);
    assert_eq!(app.llm.received()[1].body, expected);

    // Stored as the last user message's text, what was not text named.
    let chats = app.get_authorized("/chats", &key).await.json;
    for chat in chats["chats"].as_array().unwrap() {
        assert_eq!(
            chat["message"],
            "what is the weather in [image] [audio] [file]"
        );
        assert_eq!(chat["response"], "Tool said: sunny, 21 C");
        assert_eq!(chat["tool_calls"], Value::Null);
    }
    assert_eq!(app.balance(&key).await, 3800);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_tool_call_comes_back_as_the_model_gave_it_whole_and_streamed_and_is_kept() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let ask = json!({ "model": "llama3.2", "messages": user("weather in Paris?"), "tools": [weather_tool()] });
    let whole = completions(&app, &key, ask.clone()).await;
    assert_eq!(whole.status, StatusCode::OK, "{whole:?}");
    // The model's own object, but `model`, which names the model asked for.
    assert_eq!(whole.json["model"], "llama3.2");
    assert_eq!(whole.json["id"], "chatcmpl-fake");
    assert_eq!(whole.json["system_fingerprint"], "fp_fake");
    let choice = &whole.json["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].clone();
    assert_eq!(calls[0]["id"], "call_fake0");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({ "city": "Paris", "unit": "celsius" }));
    assert_eq!(whole.tokens_remaining(), 3900);

    let mut streamed = ask;
    streamed["stream"] = json!(true);
    let chunks = chunks(&stream_completion(&app, &key, streamed).await);
    for chunk in &chunks {
        assert_eq!(chunk["model"], "llama3.2", "{chunk}");
    }
    let argument_pieces = chunks
        .iter()
        .filter(|chunk| {
            chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].is_string()
        })
        .count();
    assert!(
        argument_pieces >= 3,
        "the arguments come in pieces: {chunks:?}"
    );
    assert_eq!(assembled_calls(&chunks), calls.as_array().unwrap().clone());
    assert_eq!(finish_reasons(&chunks), [(0, "tool_calls".to_string())]);
    assert_eq!(app.balance(&key).await, 3800);

    // Both kept with their tool calls, the streamed one's assembled from its pieces.
    let chats = app.get_authorized("/chats", &key).await.json;
    for chat in chats["chats"].as_array().unwrap() {
        assert_eq!(chat["status"], "answered");
        assert_eq!(chat["response"], "");
        assert_eq!(chat["tool_calls"], calls);
        assert_eq!(chat["tokens_charged"], 100);
    }
    app.assert_all_settled().await;
}

#[tokio::test]
async fn structured_output_several_choices_and_log_probabilities_come_back_as_given() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let schema = json!({
        "type": "object",
        "properties": { "city": { "type": "string" }, "temperature": { "type": "number" } },
        "required": ["city", "temperature"],
        "additionalProperties": false,
    });
    let ask = json!({
        "model": "llama3.2",
        "messages": user("the weather, please"),
        "response_format": { "type": "json_schema", "json_schema": { "name": "weather", "schema": schema, "strict": true } },
        "n": 2,
        "logprobs": true,
    });
    let expected = json!({ "city": "Paris", "temperature": 21.5 });
    let whole = completions(&app, &key, ask.clone()).await;
    assert_eq!(whole.status, StatusCode::OK, "{whole:?}");
    let choices = whole.json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (index, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], index);
        let content: Value =
            serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
        assert_eq!(content, expected);
        assert!(!choice["logprobs"]["content"].as_array().unwrap().is_empty());
        assert_eq!(choice["logprobs"]["content"][0]["logprob"], -0.25);
    }
    // One call, one charge, however many choices.
    assert_eq!(whole.tokens_remaining(), 3900);

    let mut streamed = ask;
    streamed["stream"] = json!(true);
    let chunks = chunks(&stream_completion(&app, &key, streamed).await);
    let texts = texts(&chunks);
    assert_eq!(texts.keys().copied().collect::<Vec<_>>(), [0, 1]);
    for text in texts.values() {
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), expected);
    }
    let with_logprobs = chunks
        .iter()
        .flat_map(|chunk| chunk["choices"].as_array().unwrap())
        .filter(|choice| {
            choice["delta"]["content"]
                .as_str()
                .is_some_and(|text| !text.is_empty())
        })
        .all(|choice| choice["logprobs"]["content"][0]["token"] == choice["delta"]["content"]);
    assert!(with_logprobs, "{chunks:?}");
    let mut finished = finish_reasons(&chunks);
    finished.sort();
    assert_eq!(finished, [(0, "stop".to_string()), (1, "stop".to_string())]);
    assert_eq!(app.balance(&key).await, 3800);

    // The first choice is what the chat keeps.
    let chats = app.get_authorized("/chats", &key).await.json;
    assert_eq!(
        serde_json::from_str::<Value>(chats["chats"][0]["response"].as_str().unwrap()).unwrap(),
        expected
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn the_models_finish_reason_refusal_and_usage_details_come_back() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let mut capped = hello("llama3.2");
    capped["max_tokens"] = json!(1);
    let cut = completions(&app, &key, capped.clone()).await;
    assert_eq!(cut.json["choices"][0]["finish_reason"], "length");
    assert_eq!(cut.json["choices"][0]["message"]["content"], "Echo: ");
    let details = &cut.json["usage"];
    let cached = details["prompt_tokens"].as_u64().unwrap() / 2;
    assert_eq!(details["prompt_tokens_details"]["cached_tokens"], cached);
    assert_eq!(details["completion_tokens_details"]["reasoning_tokens"], 1);
    capped["stream"] = json!(true);
    let streamed = chunks(&stream_completion(&app, &key, capped).await);
    assert_eq!(finish_reasons(&streamed), [(0, "length".to_string())]);

    let filtered = completions(
        &app,
        &key,
        json!({ "model": "llama3.2", "messages": user("[filter] this") }),
    )
    .await;
    assert_eq!(
        filtered.json["choices"][0]["finish_reason"],
        "content_filter"
    );

    // A refusal is an answer: charged like one, kept as none of its text.
    let refused = completions(
        &app,
        &key,
        json!({ "model": "llama3.2", "messages": user("[refuse] this") }),
    )
    .await;
    assert_eq!(refused.status, StatusCode::OK, "{refused:?}");
    let message = &refused.json["choices"][0]["message"];
    assert_eq!(message["refusal"], "I can't help with that.");
    assert_eq!(message["content"], Value::Null);
    assert_eq!(refused.tokens_remaining(), 4000 - 4 * 100);

    // The usage chunk, details and all, only to a client that asked for it; the model is
    // asked for it either way.
    let mut asked = hello("llama3.2");
    asked["stream"] = json!(true);
    asked["stream_options"] = json!({ "include_usage": true });
    let with_usage = chunks(&stream_completion(&app, &key, asked.clone()).await);
    let usage = with_usage.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["completion_tokens_details"]["reasoning_tokens"],
        1
    );
    asked["stream_options"] = json!({ "include_usage": false });
    let without = chunks(&stream_completion(&app, &key, asked).await);
    assert!(
        without.iter().all(|chunk| chunk.get("usage").is_none()),
        "{without:?}"
    );
    let last = app.llm.received().last().unwrap().body.clone();
    assert_eq!(last["stream_options"]["include_usage"], true);
    // Kept with the chat either way.
    let chats = app.get_authorized("/chats", &key).await.json;
    assert_eq!(chats["chats"][0]["usage"]["completion_tokens"], 3);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_tool_call_cut_off_mid_stream_is_charged_by_the_rule_for_delivered_text() {
    // Cut after the role alone: nothing of the answer delivered, refunded. Cut after the
    // call's name and a piece of its arguments: charged, as delivered text would be, and
    // kept as far as it got.
    for (after, balance, status) in [(0, 4000, "failed"), (2, 3900, "abandoned")] {
        let app = TestApp::new().await;
        let key = key_of(&app, "user").await;
        app.llm
            .set_reply(Reply::DieMidStream { after_words: after });
        let ask = json!({ "model": "llama3.2", "messages": user("weather?"), "tools": [weather_tool()], "stream": true });
        let events = stream_completion(&app, &key, ask).await;
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "upstream_error", "{events:?}");
        assert_eq!(app.balance(&key).await, balance, "after {after} pieces");
        let chat = &app.get_authorized("/chats", &key).await.json["chats"][0];
        assert_eq!(chat["status"], status);
        if after > 0 {
            assert_eq!(chat["tool_calls"][0]["function"]["name"], "get_weather");
            let arguments = chat["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap();
            assert!(
                r#"{"city":"Paris","unit":"celsius"}"#.starts_with(arguments),
                "{arguments}"
            );
        }
        app.assert_all_settled().await;
    }
}

#[tokio::test]
async fn the_demo_model_answers_tools_with_text_and_refuses_what_it_cannot_honour() {
    let app = TestApp::with_env(&[("LLM_BASE_URL", "")]).await;
    let key = key_of(&app, "user").await;
    let ask = json!({ "model": "demo", "messages": user("code hello world in go"),
        "tools": [weather_tool()], "n": 2 });
    let whole = completions(&app, &key, ask.clone()).await;
    assert_eq!(whole.status, StatusCode::OK, "{whole:?}");
    let choices = whole.json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for choice in choices {
        let content = choice["message"]["content"].as_str().unwrap();
        assert!(
            content.starts_with("Code for 'Hello World' in go:"),
            "{content}"
        );
        assert_eq!(choice["finish_reason"], "stop");
    }
    let mut streamed = ask;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let chunks = chunks(&stream_completion(&app, &key, streamed).await);
    let texts = texts(&chunks);
    assert_eq!(texts.len(), 2);
    assert_eq!(texts[&0], choices[0]["message"]["content"]);
    assert_eq!(texts[&1], texts[&0]);
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 0);
    assert!(chunks.iter().all(|chunk| chunk["model"] == "demo"));

    // What it cannot do it refuses as a model would: 400 naming the field, refunded.
    for (field, value) in [
        ("response_format", json!({ "type": "json_object" })),
        ("logprobs", json!(true)),
        ("modalities", json!(["text", "audio"])),
        ("n", json!(0)),
    ] {
        let mut ask = json!({ "model": "demo", "messages": user("hello") });
        ask[field] = value;
        let refused = completions(&app, &key, ask).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{refused:?}");
        assert_eq!(refused.json["error"]["param"], field);
        assert_eq!(refused.json["error"]["code"], "unsupported_parameter");
    }
    assert_eq!(app.balance(&key).await, 3800);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_content_part_giving_a_field_twice_is_refused_naming_it_for_an_unpriced_model_too() {
    let app = TestApp::new().await;
    let key = key_of(&app, "twice").await;
    for (part, field) in [
        (
            r#"{"type":"image_url","image_url":{"url":"a"},"image_url":{"url":"b"}}"#,
            "image_url",
        ),
        (r#"{"type":"text","text":"a","text":"b"}"#, "text"),
    ] {
        let body = format!(
            r#"{{"model":"llama3.2","messages":[{{"role":"user","content":[{{"type":"text","text":"hi"}},{part}]}}]}}"#
        );
        let refused = completions(&app, &key, body).await;
        assert_invalid_input(&refused, "messages");
        let message = refused.json["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{field:?} twice")), "{message}");
    }
    assert_eq!(app.llm.calls(), 0);
    assert_eq!(app.balance(&key).await, 4000);
}
