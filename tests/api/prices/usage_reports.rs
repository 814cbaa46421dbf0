//! How a model writes its usage, and what is charged for it: more than its cap, or more
//! than can be priced, charged the reservation; counts written as floats kept and rounded
//! up, counts that are not numbers taken as absent, an answer's count left out counted
//! beside the reported prompt, and the text of every choice counted, not only the first's,
//! whole and cut short, a legacy function call and an audio transcript among it.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{
    assert_reserved_then, chat, chat_reservation, chat_row, priced_app, usage, MAX_OUTPUT, REQUEST,
};
use crate::{
    common::Reply,
    openai::{completions, key_of, stream_completion},
};

#[tokio::test]
async fn counts_written_as_floats_or_strings_keep_the_answer_and_are_charged_as_read() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("odd").await;
    let key = key_of(&app, "sdk").await;
    // 30 prompt tokens and 6.5 completion tokens, rounded up to 7: 5 + 30 + 2 x 7.
    app.llm.set_reply(Reply::EchoWithUsageAs(
        json!({ "prompt_tokens": 30.0, "completion_tokens": 6.5 }),
    ));
    let answered = chat(&app, &token, "odd numbers").await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    assert_eq!(answered.json["tokens_charged"], REQUEST + 30 + 2 * 7);
    let row = chat_row(&app, answered.json["chat_id"].as_i64().unwrap()).await;
    assert_eq!(row.usage_source.as_deref(), Some("model"));
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (Some(30), Some(7))
    );
    // A count as a string is no count: the answer is kept, and counted.
    app.llm.set_reply(Reply::EchoWithUsageAs(
        json!({ "prompt_tokens": "30", "completion_tokens": "7" }),
    ));
    let body = json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }] });
    let answered = completions(&app, &key, body).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let row = chat_row(&app, 2).await;
    assert_eq!(row.status, "answered");
    assert_eq!(row.usage_source.as_deref(), Some("counted"));
    assert_eq!(answered.json["usage"]["cost"], row.cost);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn an_answer_whose_count_the_model_left_out_is_counted_beside_the_reported_prompt() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("uncounted").await;
    for usage in [
        json!({ "prompt_tokens": 30, "completion_tokens": null }),
        json!({ "prompt_tokens": 30 }),
    ] {
        app.llm.set_reply(Reply::EchoWithUsageAs(usage));
        let answered = chat(&app, &token, "count my answer").await;
        // The prompt as reported; the answer, "Echo: count my answer", by its bytes.
        let completion = "Echo: count my answer".len() as i64;
        assert_eq!(
            answered.json["tokens_charged"],
            REQUEST + 30 + 2 * completion,
            "{answered:?}"
        );
        let row = chat_row(&app, answered.json["chat_id"].as_i64().unwrap()).await;
        assert_eq!(row.usage_source.as_deref(), Some("counted"));
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            (Some(30), Some(completion))
        );
    }
    // On `/v1`, the usage shown is what was charged: the count left out, counted, there.
    let key = key_of(&app, "sdk").await;
    let ask = json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }] });
    let answered = completions(&app, &key, ask).await;
    let row = chat_row(&app, 3).await;
    assert_eq!(row.usage_source.as_deref(), Some("counted"));
    let usage = &answered.json["usage"];
    assert_eq!(usage["prompt_tokens"], 30, "{usage}");
    assert_eq!(
        usage["completion_tokens"],
        row.completion_tokens.unwrap(),
        "{usage}"
    );
    assert_eq!(usage["cost"], row.cost, "{usage}");
    app.assert_all_settled().await;
}

/// The text each choice of a stream's `data` lines got, by choice.
fn texts_by_choice(data: &[String]) -> [String; 2] {
    let mut texts = [String::new(), String::new()];
    for line in data.iter().filter(|line| line.starts_with('{')) {
        let chunk: Value = serde_json::from_str(line).unwrap();
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            let index = choice["index"].as_u64().unwrap() as usize;
            texts[index].push_str(choice["delta"]["content"].as_str().unwrap_or_default());
        }
    }
    texts
}

#[tokio::test]
async fn every_choice_a_stream_delivered_is_counted_whole_or_cut_short() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "choices").await;
    let body = json!({
        "model": "llama3.2", "stream": true, "n": 2,
        "messages": [{ "role": "user", "content": "say it twice in many words" }],
    });
    // No usage, and a stream cut after two words of each choice.
    for (chat_id, reply) in [
        (1, Reply::EchoWithoutUsage),
        (2, Reply::DieMidStream { after_words: 2 }),
    ] {
        app.llm.set_reply(reply);
        let data = stream_completion(&app, &key, body.clone()).await;
        let [first, second] = texts_by_choice(&data);
        assert!(!second.is_empty(), "{data:?}");
        let row = chat_row(&app, chat_id).await;
        assert_eq!(row.usage_source.as_deref(), Some("counted"));
        // Both choices' text, by its bytes, though only the first is stored.
        let completion = (first.len() + second.len()) as i64;
        assert_eq!(row.completion_tokens, Some(completion), "{data:?}");
        let prompt = row.prompt_tokens.unwrap();
        assert_eq!(row.cost, REQUEST + prompt + 2 * completion, "{row:?}");
    }
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_priced_demo_model_reports_zero_usage_on_v1_and_is_charged_its_request_price() {
    let (_dir, path) = super::book_file(
        "[models.\"demo\"]\nprompt = 1000000\ncompletion = 2000000\nrequest = 5\n\
         max_output_tokens = 500\n",
    );
    let app =
        crate::common::TestApp::with_env(&[("CONFIG_FILE", path.as_str()), ("LLM_BASE_URL", "")])
            .await;
    let key = key_of(&app, "demo").await;
    let body = json!({ "model": "demo", "messages": [{ "role": "user", "content": "hi" }] });
    let answered = completions(&app, &key, body).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    // What the answer says it used is what it is charged for.
    assert_eq!(answered.json["usage"]["prompt_tokens"], 0, "{answered:?}");
    assert_eq!(answered.json["usage"]["completion_tokens"], 0);
    assert_eq!(answered.json["usage"]["cost"], REQUEST);
    let streamed = json!({
        "model": "demo", "stream": true, "stream_options": { "include_usage": true },
        "messages": [{ "role": "user", "content": "hi" }],
    });
    let data = stream_completion(&app, &key, streamed).await;
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["cost"], REQUEST, "{data:?}");
    assert_eq!(usage["usage"]["completion_tokens"], 0);
    assert_eq!(app.balance(&key).await, 4000 - 2 * REQUEST);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_that_overruns_its_cap_is_charged_the_reservation_and_the_overrun_counted() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("overrun").await;
    // 1,000 completion tokens against a cap of 50.
    app.llm
        .set_reply(Reply::EchoReporting(usage(10, 0, 1000, 0)));
    let message = "go on and on";
    let answered = chat(&app, &token, message).await;
    let reserved = chat_reservation(message, MAX_OUTPUT);
    assert_eq!(answered.json["tokens_charged"], reserved, "{answered:?}");
    let chat_id = answered.json["chat_id"].as_i64().unwrap();
    assert_reserved_then(&app, chat_id, reserved, &[("chat_charge", -reserved)]).await;
    let (_, _, metrics) = app
        .request_raw(axum::http::Method::GET, "/metrics", &[], "")
        .await;
    assert!(
        metrics.contains("tokenchat_usage_overruns_total 1"),
        "{metrics}"
    );
    // A usage too large to price at all (a broken upstream's 10^18 prompt tokens) is an
    // overrun like any other, and the audit agrees that the reservation was its charge.
    app.llm.set_reply(Reply::EchoReporting(usage(
        1_000_000_000_000_000_000,
        0,
        1,
        0,
    )));
    let absurd = chat(&app, &token, message).await;
    assert_eq!(absurd.json["tokens_charged"], reserved, "{absurd:?}");
    let chat_id = absurd.json["chat_id"].as_i64().unwrap();
    assert_reserved_then(&app, chat_id, reserved, &[("chat_charge", -reserved)]).await;
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_legacy_function_call_and_an_audio_transcript_are_counted_when_no_usage_is_reported() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "legacy").await;
    let (name, arguments, transcript) = ("lookup", r#"{"city":"Paris"}"#, "It is sunny in Paris");
    let message = json!({
        "role": "assistant", "content": null,
        "function_call": { "name": name, "arguments": arguments },
    });
    let spoken = json!({
        "role": "assistant", "content": null,
        "audio": { "id": "audio_1", "data": "UklGRiQAAABXQVZF", "expires_at": 1, "transcript": transcript },
    });
    let whole = json!({ "id": "x", "object": "chat.completion", "model": "llama3.2", "choices": [
        { "index": 0, "message": message, "finish_reason": "function_call" },
        { "index": 1, "message": spoken, "finish_reason": "stop" },
    ] });
    let piece = |index: u64, delta: Value| {
        json!({ "id": "x", "object": "chat.completion.chunk", "model": "llama3.2",
                "choices": [{ "index": index, "delta": delta, "finish_reason": null }] })
    };
    let chunks = vec![
        piece(
            0,
            json!({ "role": "assistant", "function_call": { "name": name, "arguments": "" } }),
        ),
        piece(0, json!({ "function_call": { "arguments": arguments } })),
        piece(
            1,
            json!({ "audio": { "id": "audio_1", "data": "UklGRiQA", "transcript": transcript } }),
        ),
    ];
    app.llm.set_reply(Reply::Verbatim { whole, chunks });
    let ask = json!({ "model": "llama3.2", "n": 2,
                      "messages": [{ "role": "user", "content": "weather?" }] });
    let answered = completions(&app, &key, ask.clone()).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let mut streamed = ask;
    streamed["stream"] = json!(true);
    let data = stream_completion(&app, &key, streamed).await;
    assert!(
        data.iter().any(|event| event.contains(transcript)),
        "{data:?}"
    );
    // The function's name and arguments and the transcript, by their bytes, whole or
    // streamed: what the client was given.
    let completion = (name.len() + arguments.len() + transcript.len()) as i64;
    for chat_id in [1, 2] {
        let row = chat_row(&app, chat_id).await;
        assert_eq!(row.usage_source.as_deref(), Some("counted"), "{row:?}");
        assert_eq!(row.completion_tokens, Some(completion), "{row:?}");
        let prompt = row.prompt_tokens.unwrap();
        assert_eq!(row.cost, REQUEST + prompt + 2 * completion, "{row:?}");
    }
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_v1_client_is_shown_the_counts_it_was_charged_for_when_the_model_reported_none() {
    let app = priced_app(&[]).await;
    let key = key_of(&app, "counted").await;
    let ask =
        json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "count me" }] });
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    // Sent no usage, whole and streamed; then a usage chunk it cannot read.
    app.llm.set_reply(Reply::EchoWithoutUsage);
    let whole = completions(&app, &key, ask.clone()).await;
    assert_eq!(whole.status, StatusCode::OK, "{whole:?}");
    let data = stream_completion(&app, &key, streamed.clone()).await;
    let chunk = |choices: Value, usage: Value| {
        json!({ "id": "x", "object": "chat.completion.chunk", "model": "llama3.2",
                "choices": choices, "usage": usage })
    };
    app.llm.set_reply(Reply::Verbatim {
        whole: Value::Null,
        chunks: vec![
            chunk(
                json!([{ "index": 0, "delta": { "content": "Echo: count me" } }]),
                Value::Null,
            ),
            chunk(
                json!([{ "index": 0, "delta": {}, "finish_reason": "stop" }]),
                Value::Null,
            ),
            chunk(json!([]), json!("lots")),
        ],
    });
    let unreadable = stream_completion(&app, &key, streamed).await;
    let usage_chunks = |data: &[String]| -> Vec<Value> {
        data.iter()
            .filter_map(|event| serde_json::from_str::<Value>(event).ok())
            .filter(|chunk| !chunk["usage"].is_null())
            .map(|chunk| chunk["usage"].clone())
            .collect()
    };
    let shown = [
        whole.json["usage"].clone(),
        usage_chunks(&data).pop().unwrap(),
        usage_chunks(&unreadable).pop().unwrap(),
    ];
    assert_eq!(usage_chunks(&data).len(), 1, "{data:?}");
    assert_eq!(usage_chunks(&unreadable).len(), 1, "{unreadable:?}");
    for (chat_id, usage) in (1..).zip(shown) {
        let row = chat_row(&app, chat_id).await;
        assert_eq!(row.usage_source.as_deref(), Some("counted"), "{row:?}");
        let (prompt, completion) = (row.prompt_tokens.unwrap(), row.completion_tokens.unwrap());
        assert!(prompt > 0 && completion > 0, "{row:?}");
        assert_eq!(usage["prompt_tokens"], prompt, "{usage}");
        assert_eq!(usage["completion_tokens"], completion, "{usage}");
        assert_eq!(usage["total_tokens"], prompt + completion, "{usage}");
        assert_eq!(usage["cost"], row.cost, "{usage}");
        assert_eq!(row.cost, REQUEST + prompt + 2 * completion, "{row:?}");
    }
    app.assert_all_settled().await;

    // A flat model counts nothing: zeros, which the SDKs read as numbers, beside its cost.
    let flat = crate::common::TestApp::new().await;
    let key = key_of(&flat, "flat").await;
    flat.llm.set_reply(Reply::EchoWithoutUsage);
    let whole = completions(&flat, &key, ask).await;
    assert_eq!(
        whole.json["usage"],
        json!({ "completion_tokens": 0, "cost": 100, "prompt_tokens": 0, "total_tokens": 0 })
    );
}

#[tokio::test]
async fn negative_counts_are_no_counts_so_the_answer_is_counted_not_free() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("negative").await;
    app.llm.set_reply(Reply::EchoWithUsageAs(
        json!({ "prompt_tokens": -1000, "completion_tokens": -1000 }),
    ));
    let answered = chat(&app, &token, "count me anyway").await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let row = chat_row(&app, answered.json["chat_id"].as_i64().unwrap()).await;
    assert_eq!(row.usage_source.as_deref(), Some("counted"), "{row:?}");
    let (prompt, completion) = (row.prompt_tokens.unwrap(), row.completion_tokens.unwrap());
    assert!(prompt > 0 && completion > 0, "{row:?}");
    assert_eq!(row.cost, REQUEST + prompt + 2 * completion, "{row:?}");
    assert_eq!(answered.json["tokens_charged"], row.cost);
    app.assert_all_settled().await;
}
