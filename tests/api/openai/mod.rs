//! The OpenAI-compatible routes, as an OpenAI client sees them: `/v1/chat/completions`
//! whole and streamed, OpenAI's error object, and the same metering as `/chat`; the models
//! served ([`models`]), what passes through as sent ([`pass_through`]), errors by whose
//! fault they are ([`faults`]), embeddings ([`embeddings`]) and the size of bodies
//! ([`bodies`]).

mod bodies;
mod demo;
mod embeddings;
mod faults;
mod models;
mod pass_through;

use std::time::Duration;

use axum::{
    body::Body,
    http::{header, Method, Request, StatusCode},
};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::common::{Reply, TestApp, TestResponse};

pub(crate) async fn key_of(app: &TestApp, username: &str) -> String {
    let token = app.user_with_token(username).await;
    let created = app
        .post_authorized("/keys", &token, json!({ "name": "sdk" }))
        .await;
    created.json["key"].as_str().unwrap().to_string()
}

/// `POST /v1/chat/completions` of `body` (JSON, or text as written: a field twice) with `key`.
pub(crate) async fn completions(
    app: &TestApp,
    key: &str,
    body: impl std::fmt::Display,
) -> TestResponse {
    let authorization = format!("Bearer {key}");
    app.request(
        Method::POST,
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("authorization", &authorization),
        ],
        body.to_string(),
    )
    .await
}

pub(crate) fn completion_request(key: &str, body: &Value) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The `data:` payloads of a streamed completion, to its end.
pub(crate) async fn stream_completion(app: &TestApp, key: &str, body: Value) -> Vec<String> {
    let request = completion_request(key, &body);
    let response = app.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    std::str::from_utf8(&body)
        .unwrap()
        .split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

/// Asserts OpenAI's error object: all four keys, and this status, type and code.
#[track_caller]
pub(crate) fn assert_openai_error(
    response: &TestResponse,
    status: StatusCode,
    kind: &str,
    code: &str,
) {
    assert_eq!(response.status, status, "{response:?}");
    let error = &response.json["error"];
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "no {field}: {response:?}");
    }
    assert!(error["message"]
        .as_str()
        .is_some_and(|text| !text.is_empty()));
    assert_eq!(error["type"], kind, "{response:?}");
    assert_eq!(error["code"], code, "{response:?}");
}

/// Asserts OpenAI's 400 `invalid_input` naming `param`.
#[track_caller]
pub(crate) fn assert_invalid_input(response: &TestResponse, param: &str) {
    assert_openai_error(
        response,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_input",
    );
    assert_eq!(response.json["error"]["param"], param, "{response:?}");
}

pub(super) fn hello(model: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": "hello there" }] })
}

#[tokio::test]
async fn a_completion_is_openais_object_metered_like_a_chat() {
    let app = TestApp::with_env(&[("LLM_MODELS", "other")]).await;
    let key = key_of(&app, "user").await;
    let answered = completions(
        &app,
        &key,
        json!({
            "model": "other",
            "messages": [
                { "role": "user", "content": "earlier" },
                { "role": "assistant", "content": "an answer" },
                { "role": "user", "content": [{ "type": "text", "text": "hello " }, { "type": "text", "text": "there" }] },
            ],
            "temperature": 0.2,
            "max_tokens": 50,
            "unknown_field": "forwarded",
        }),
    )
    .await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let json = &answered.json;
    assert!(json["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(json["object"], "chat.completion");
    assert!(json["created"].is_i64());
    assert_eq!(json["model"], "other");
    assert_eq!(json["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "Echo: hello there"
    );
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert_eq!(json["usage"]["completion_tokens"], 3);
    assert!(answered.headers.contains_key("x-request-id"));
    assert_eq!(answered.tokens_remaining(), 3900);

    // Sent upstream as given, under its own name, the system prompt put first.
    let asked = &app.llm.received()[0].body;
    assert_eq!(asked["model"], "other");
    assert_eq!(asked["temperature"], 0.2);
    assert_eq!(asked["max_tokens"], 50);
    // Every field goes through, those tokenchat does not know too (issue 24).
    assert_eq!(asked["unknown_field"], "forwarded");
    let roles: Vec<&str> = asked["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    // The text parts as sent, not joined into one string (issue 24).
    assert_eq!(
        asked["messages"][3]["content"],
        json!([{ "type": "text", "text": "hello " }, { "type": "text", "text": "there" }])
    );

    // A client's own system message replaces the configured one.
    let own = json!({ "model": "llama3.2", "messages": [
        { "role": "system", "content": "be brief" }, { "role": "user", "content": "hi" }] });
    assert_eq!(completions(&app, &key, own).await.status, StatusCode::OK);
    let asked = &app.llm.received()[1].body;
    assert_eq!(asked["messages"].as_array().unwrap().len(), 2);
    assert_eq!(asked["messages"][0]["content"], "be brief");

    // Stored as chats: the last user message and the answer.
    let chats = app.get_authorized("/chats", &key).await.json;
    assert_eq!(chats["chats"][1]["message"], "hello there");
    assert_eq!(chats["chats"][1]["response"], "Echo: hello there");
    assert_eq!(app.balance(&key).await, 3800);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_streamed_completion_sends_chunks_exactly_as_openai_does() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let mut body = hello("llama3.2");
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let events = stream_completion(&app, &key, body.clone()).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let (id, created) = (&chunks[0]["id"], &chunks[0]["created"]);
    for chunk in &chunks {
        assert_eq!(&chunk["id"], id);
        assert_eq!(&chunk["created"], created);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "llama3.2");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let text: String = chunks[1..chunks.len() - 2]
        .iter()
        .map(|chunk| {
            assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
            chunk["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Echo: hello there");
    assert_eq!(app.balance(&key).await, 3900);

    // Without include_usage, no usage chunk.
    body["stream_options"] = json!({ "include_usage": false });
    let events = stream_completion(&app, &key, body).await;
    let last_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last_chunk["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn a_model_that_puts_the_usage_in_every_chunk_still_streams_its_whole_answer() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    app.llm.set_reply(Reply::UsageInEveryChunk);
    for include_usage in [true, false] {
        let mut body = hello("llama3.2");
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": include_usage });
        let events = stream_completion(&app, &key, body).await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Echo: hello there", "{events:?}");
        let finished = chunks
            .iter()
            .filter(|chunk| chunk["choices"][0]["finish_reason"] == "stop")
            .count();
        assert_eq!(finished, 1, "{events:?}");
        // The usage a client asked for ends the stream, with the charge; one that did not
        // ask sees none.
        let costs: Vec<&Value> = chunks
            .iter()
            .filter_map(|chunk| chunk["usage"].get("cost"))
            .collect();
        if include_usage {
            assert_eq!(costs, [&json!(100)], "{events:?}");
            assert_eq!(chunks.last().unwrap()["choices"], json!([]));
        } else {
            assert!(
                chunks.iter().all(|chunk| chunk.get("usage").is_none()),
                "{events:?}"
            );
        }
    }
    assert_eq!(app.balance(&key).await, 3800);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_that_fails_after_it_began_ends_with_an_error_event_charged_only_for_delivered_text(
) {
    // Cut after the role chunk: nothing delivered, nothing charged. Cut after a word of
    // text: charged, as a stream whose client left after a word would be.
    for (after_words, balance) in [(0, 4000), (1, 3900)] {
        let app = TestApp::new().await;
        let key = key_of(&app, "user").await;
        app.llm.set_reply(Reply::DieMidStream { after_words });
        let mut body = hello("llama3.2");
        body["stream"] = json!(true);
        let events = stream_completion(&app, &key, body).await;
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(last["error"]["type"], "api_error", "{events:?}");
        assert_eq!(last["error"]["code"], "upstream_error");
        assert!(!events.contains(&"[DONE]".to_string()));
        assert_eq!(
            app.balance(&key).await,
            balance,
            "after {after_words} words"
        );
        app.assert_all_settled().await;
    }
}

#[tokio::test]
async fn a_client_gone_mid_stream_is_settled_by_the_same_rule_as_on_chat() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let mut body = hello("llama3.2");
    body["messages"][0]["content"] = json!("one two three four five six");
    body["stream"] = json!(true);
    let request = completion_request(&key, &body);
    let mut response = app
        .router
        .clone()
        .oneshot(request)
        .await
        .unwrap()
        .into_body();
    // Read until the first piece of content has arrived, then hang up.
    let mut seen = String::new();
    while !seen.contains(r#""content":"Echo"#) {
        let frame = tokio::time::timeout(Duration::from_secs(5), response.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    drop(response);
    assert!(
        app.llm
            .wait_for_cancelled_streams(1, Duration::from_secs(1))
            .await
    );
    for _ in 0..300 {
        let chats = app.get_authorized("/chats", &key).await.json;
        if chats["chats"][0]["status"] != "pending" {
            assert_eq!(chats["chats"][0]["status"], "abandoned");
            assert_eq!(chats["chats"][0]["tokens_charged"], 100);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.balance(&key).await, 3900);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn errors_are_openais_error_object_with_the_same_statuses() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "100")]).await;
    let key = key_of(&app, "user").await;
    let unknown = completions(&app, &key, hello("gpt-9")).await;
    assert_openai_error(
        &unknown,
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
    );
    assert_eq!(unknown.json["error"]["param"], "model");
    // (`n`, `tools` and image parts, once refused here, go through since issue 24.)
    for (body, param) in [
        (
            json!({ "model": "llama3.2", "messages": [{ "role": "robot", "content": "hi" }] }),
            "messages",
        ),
        (json!({ "model": "llama3.2", "messages": [] }), "messages"),
        (
            json!({ "messages": [{ "role": "user", "content": "hi" }] }),
            "model",
        ),
    ] {
        let refused = completions(&app, &key, body).await;
        assert_invalid_input(&refused, param);
    }
    let unauthorised = completions(&app, "tc_wrong", hello("llama3.2")).await;
    assert_openai_error(
        &unauthorised,
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
    );
    assert_eq!(unauthorised.json["error"]["param"], Value::Null);

    assert_eq!(
        completions(&app, &key, hello("llama3.2")).await.status,
        StatusCode::OK
    );
    let broke = completions(&app, &key, hello("llama3.2")).await;
    assert_openai_error(
        &broke,
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_quota",
        "insufficient_quota",
    );
    app.llm.set_reply(Reply::Status(500));
    let grant = tokenchat::domain::GrantAmount::parse(100).unwrap();
    let user = tokenchat::domain::Username::parse("user").unwrap();
    tokenchat::services::accounts::grant(&app.state.db, &user, grant)
        .await
        .unwrap();
    let failed = completions(&app, &key, hello("llama3.2")).await;
    assert_openai_error(
        &failed,
        StatusCode::BAD_GATEWAY,
        "api_error",
        "upstream_error",
    );
    assert_eq!(app.balance(&key).await, 100);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_retried_completion_with_its_idempotency_key_is_charged_once_and_says_it_was_replayed() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let send = |body: Value| {
        let authorization = format!("Bearer {key}");
        let app = &app;
        async move {
            app.request(
                Method::POST,
                "/v1/chat/completions",
                &[
                    ("content-type", "application/json"),
                    ("authorization", &authorization),
                    ("idempotency-key", "retry-1"),
                ],
                body.to_string(),
            )
            .await
        }
    };
    let first = send(hello("llama3.2")).await;
    let second = send(hello("llama3.2")).await;
    // The replay is the stored answer: the first choice's message and how it ended (the
    // live answer is the model's whole object, log probabilities and all, since issue 24).
    let choice = |answer: &TestResponse| {
        let choice = &answer.json["choices"][0];
        (
            choice["message"]["role"].clone(),
            choice["message"]["content"].clone(),
            choice["finish_reason"].clone(),
        )
    };
    assert_eq!(choice(&first), choice(&second));
    assert_eq!(second.json["choices"].as_array().unwrap().len(), 1);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    assert_eq!(second.headers["idempotent-replayed"], "true");
    // Streamed, the replay says so too.
    let mut streamed = hello("llama3.2");
    streamed["stream"] = json!(true);
    let mut request = completion_request(&key, &streamed);
    request
        .headers_mut()
        .insert("idempotency-key", "retry-1".parse().unwrap());
    let response = app.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&key).await, 3900);

    // The same key with any forwarded field changed is another request: 422, no charge.
    let mut capped = hello("llama3.2");
    capped["max_tokens"] = json!(5);
    let reused = send(capped).await;
    assert_openai_error(
        &reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request_error",
        "idempotency_key_reused",
    );
    let mut warmer = hello("llama3.2");
    warmer["temperature"] = json!(0.5);
    assert_eq!(send(warmer).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&key).await, 3900);
}
