//! Errors by whose fault they are: a request the model rejects is the client's (its status
//! and words, refunded), a key it refuses is the operator's (502 naming the configuration,
//! never the key), a busy model is a 503 with its `Retry-After`; every `/v1` answer is
//! OpenAI's error object, an unknown route's included; `/chat` answers in its own envelope
//! with the same statuses; a model that answers a stream request whole is passed on as a
//! stream.

use axum::http::{header, Method, StatusCode};
use serde_json::{json, Value};

use super::{assert_openai_error, completions, hello, key_of, stream_completion};
use crate::common::{fake_llm::REJECTION, Reply, TestApp, TestResponse};

fn streamed(body: &Value) -> Value {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body
}

/// Each failing answer, whole and streamed (which fails before its stream begins).
async fn both_ways(app: &TestApp, key: &str) -> [TestResponse; 2] {
    let whole = completions(app, key, hello("llama3.2")).await;
    let streamed = completions(app, key, streamed(&hello("llama3.2"))).await;
    [whole, streamed]
}

#[tokio::test]
async fn a_request_the_model_rejects_is_the_clients_fault_with_the_models_status_and_words() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let token = app.user_with_token("chatter").await;
    for status in [400, 404, 413, 422] {
        app.llm.set_reply(Reply::Reject(status));
        for answer in both_ways(&app, &key).await {
            assert_eq!(answer.status.as_u16(), status, "{answer:?}");
            // The model's own error object, as it gave it.
            assert_eq!(
                answer.json,
                json!({ "error": {
                    "message": REJECTION, "type": "invalid_request_error",
                    "param": "tools[0].function.parameters", "code": "invalid_function_parameters",
                } })
            );
        }
        // `/chat`: 400 upstream_rejected, in the model's words.
        let chat = app.chat(&token, "hello").await;
        chat.assert_error(StatusCode::BAD_REQUEST, "upstream_rejected");
        assert!(
            chat.json["error"].as_str().unwrap().contains(REJECTION),
            "{chat:?}"
        );
    }
    // Refunded, every one.
    assert_eq!(app.balance(&key).await, 4000);
    assert_eq!(app.balance(&token).await, 4000);
    assert_eq!(app.chat_counts().await, [("failed".to_string(), 12)]);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_rejection_asked_for_by_the_message_reaches_the_model_once_and_costs_nothing() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let rejected = completions(
        &app,
        &key,
        json!({ "model": "llama3.2",
        "messages": [{ "role": "user", "content": "[reject] with a bad schema" }] }),
    )
    .await;
    assert_eq!(rejected.status, StatusCode::BAD_REQUEST);
    assert_eq!(rejected.json["error"]["message"], REJECTION);
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&key).await, 4000);
}

#[tokio::test]
async fn a_key_the_model_refuses_is_the_operators_fault_named_but_never_shown() {
    let secret = "sk-tokenchat-test-secret-123";
    let app = TestApp::with_env(&[("LLM_API_KEY", secret)]).await;
    let key = key_of(&app, "user").await;
    let token = app.user_with_token("chatter").await;
    for status in [401, 403] {
        app.llm.set_reply(Reply::Status(status));
        let chat = app.chat(&token, "hello").await;
        for answer in both_ways(&app, &key).await.iter().chain([&chat]) {
            assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{answer:?}");
            let text = answer.json.to_string();
            assert!(text.contains("the upstream's key"), "{text}");
            assert!(!text.contains(secret), "{text}");
        }
        chat.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    }
    // The fake's 401 body repeats the key it got, as OpenAI's does.
    assert!(app
        .llm
        .received()
        .iter()
        .all(|received| received.authorization.as_deref() == Some(&format!("Bearer {secret}"))));
    assert_eq!(app.balance(&key).await, 4000);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_rejection_that_repeats_the_servers_key_reaches_the_client_without_it() {
    let secret = "sk-tokenchat-test-secret-456";
    let app = TestApp::with_env(&[("LLM_API_KEY", secret)]).await;
    let key = key_of(&app, "user").await;
    let token = app.user_with_token("chatter").await;
    app.llm.set_reply(Reply::RejectRepeatingTheKey);
    let chat = app.chat(&token, "hello").await;
    chat.assert_error(StatusCode::BAD_REQUEST, "upstream_rejected");
    let embeddings = app
        .request(
            Method::POST,
            "/v1/embeddings",
            &[("authorization", &format!("Bearer {key}"))],
            json!({ "model": "llama3.2", "input": "hello" }).to_string(),
        )
        .await;
    for answer in both_ways(&app, &key)
        .await
        .iter()
        .chain([&chat, &embeddings])
    {
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
        let text = answer.json.to_string();
        assert!(!text.contains(secret), "{text}");
        // The rest of the model's words are passed on.
        assert!(
            text.contains("Unrecognized request argument; you sent Bearer <redacted>"),
            "{text}"
        );
    }
    assert_eq!(app.llm.calls(), 4);
    assert_eq!(app.balance(&key).await, 4000);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_that_redirects_is_an_upstream_error_and_its_redirect_is_not_followed() {
    let app = TestApp::new().await;
    let elsewhere = crate::common::FakeLlm::start().await;
    let key = key_of(&app, "user").await;
    let token = app.user_with_token("chatter").await;
    app.llm.set_reply(Reply::RedirectTo(format!(
        "{}/chat/completions",
        elsewhere.base_url
    )));
    let chat = app.chat(&token, "hello").await;
    chat.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    for answer in both_ways(&app, &key).await {
        assert_openai_error(
            &answer,
            StatusCode::BAD_GATEWAY,
            "api_error",
            "upstream_error",
        );
    }
    // The prompt went to the host the operator named and nowhere else.
    assert_eq!(app.llm.calls(), 3);
    assert_eq!(elsewhere.calls(), 0);
    assert_eq!(app.balance(&key).await, 4000);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_busy_model_is_a_503_with_its_retry_after_and_other_failures_stay_502_and_504() {
    let mut app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1")]).await;
    let key = key_of(&app, "user").await;
    let token = app.user_with_token("chatter").await;
    for (status, given, expected) in [(429, Some("7"), "7"), (503, None, "1")] {
        app.llm.set_reply(Reply::Busy {
            status,
            retry_after: given,
        });
        for answer in both_ways(&app, &key).await {
            assert_openai_error(
                &answer,
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "upstream_busy",
            );
            assert_eq!(answer.headers[header::RETRY_AFTER], expected, "{answer:?}");
        }
        let chat = app.chat(&token, "hello").await;
        chat.assert_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_busy");
        assert_eq!(chat.headers[header::RETRY_AFTER], expected);
        // A model that said when to come back is left alone until then (issue 26): a
        // fresh process, with no memory of it, for the cases below.
        app.restart(&[("LLM_TIMEOUT_SECS", "1")]).await;
    }
    for (reply, status, code) in [
        (
            Reply::Status(500),
            StatusCode::BAD_GATEWAY,
            "upstream_error",
        ),
        (
            Reply::Status(502),
            StatusCode::BAD_GATEWAY,
            "upstream_error",
        ),
        (
            Reply::Stall(std::time::Duration::from_secs(3)),
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
        ),
    ] {
        app.llm.set_reply(reply);
        for answer in both_ways(&app, &key).await {
            assert_openai_error(&answer, status, "api_error", code);
            assert!(!answer.headers.contains_key(header::RETRY_AFTER));
            // A time-out is not to be retried by OpenAI's SDKs; other failures are.
            let retry = answer.headers.get("x-should-retry");
            if status == StatusCode::GATEWAY_TIMEOUT {
                assert_eq!(retry.unwrap(), "false", "{answer:?}");
            } else {
                assert!(retry.is_none(), "{answer:?}");
            }
        }
    }
    assert_eq!(app.balance(&key).await, 4000);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn every_v1_answer_is_openais_error_object_an_unknown_routes_included() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let authorization = format!("Bearer {key}");
    let headers = [
        ("authorization", authorization.as_str()),
        ("content-type", "application/json"),
    ];
    // What the OpenAI Agents SDK asks by default, and its kin.
    for (method, path) in [
        (Method::POST, "/v1/responses"),
        (Method::GET, "/v1/responses/resp_1"),
        (Method::POST, "/v1/completions"),
        (Method::GET, "/v1"),
        (Method::POST, "/v1/"),
    ] {
        let answer = app.request(method.clone(), path, &headers, "{}").await;
        assert_openai_error(
            &answer,
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
        );
        let message = answer.json["error"]["message"].as_str().unwrap();
        assert!(message.contains(path), "{message}");
    }
    // Elsewhere, the contract's envelope as ever.
    app.request(Method::POST, "/responses", &headers, "{}")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    let wrong_method = app
        .request(Method::DELETE, "/v1/models", &headers, "")
        .await;
    assert_openai_error(
        &wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
    );
    // An OPTIONS that is no CORS preflight, answered at the edge, the same way.
    let options = app
        .request(Method::OPTIONS, "/v1/chat/completions", &headers, "")
        .await;
    assert_openai_error(
        &options,
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
    );
    assert_eq!(options.headers[axum::http::header::ALLOW], "POST");
    let options = app
        .request(Method::OPTIONS, "/v1/responses", &headers, "")
        .await;
    assert_openai_error(
        &options,
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
    );
    assert!(options.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("OPTIONS /v1/responses"));
    app.request(Method::OPTIONS, "/balance", &headers, "")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let not_json = app.request(Method::POST, path, &headers, "[1, 2]").await;
        assert_openai_error(
            &not_json,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
        );
        let twice = r#"{"model": "llama3.2", "model": "other", "input": "x", "messages": []}"#;
        let duplicate = app.request(Method::POST, path, &headers, twice).await;
        assert_openai_error(
            &duplicate,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
        );
        assert!(duplicate.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"model\""));
        let anonymous = app.request(Method::POST, path, &[], "{}").await;
        assert_openai_error(
            &anonymous,
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
        );
    }
    let events = stream_completion(&app, &key, streamed(&hello("llama3.2"))).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(app.llm.calls(), 1);
}

#[tokio::test]
async fn an_answer_past_64_mib_is_unusable_and_refunded_not_held_whole() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let endless = "x".repeat(64 * 1024 * 1024);
    let whole = json!({ "id": "x", "object": "chat.completion", "model": "llama3.2", "choices": [
        { "index": 0, "message": { "role": "assistant", "content": endless }, "finish_reason": "stop" },
    ] });
    app.llm.set_reply(Reply::Verbatim {
        whole,
        chunks: Vec::new(),
    });
    let answered = completions(&app, &key, hello("llama3.2")).await;
    // Checked before anything prints the answer, which might be 64 MiB.
    assert_eq!(answered.status, StatusCode::BAD_GATEWAY, "a 64 MiB answer");
    assert_openai_error(
        &answered,
        StatusCode::BAD_GATEWAY,
        "api_error",
        "upstream_error",
    );
    assert_eq!(app.balance(&key).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_that_answers_a_stream_request_whole_reaches_the_client_as_openais_chunks() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    app.llm.set_reply(Reply::Unstreamed);
    for include_usage in [true, false] {
        let mut body = streamed(&hello("llama3.2"));
        body["stream_options"] = json!({ "include_usage": include_usage });
        let events = stream_completion(&app, &key, body).await;
        assert_eq!(events.last().unwrap(), "[DONE]", "{events:?}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        let answer = &chunks[0];
        assert_eq!(answer["object"], "chat.completion.chunk", "{events:?}");
        let choice = &answer["choices"][0];
        assert_eq!(choice["delta"]["role"], "assistant");
        assert_eq!(choice["delta"]["content"], "Echo: hello there");
        assert_eq!(choice["finish_reason"], "stop");
        assert!(choice.get("message").is_none(), "{answer}");
        assert!(answer.get("usage").is_none(), "{events:?}");
        if include_usage {
            assert_eq!(chunks.len(), 2, "{events:?}");
            assert_eq!(chunks[1]["choices"], json!([]));
            assert_eq!(chunks[1]["usage"]["completion_tokens"], 3);
            assert_eq!(chunks[1]["usage"]["cost"], 100);
        } else {
            assert_eq!(chunks.len(), 1, "{events:?}");
        }
    }
    assert_eq!(app.balance(&key).await, 3800);
    app.assert_all_settled().await;
}
