//! `POST /v1/embeddings`: passed to the model as sent, answered as the model gave it,
//! metered by `EMBEDDING_COST` with a ledger row of its own kind (its model and usage shown
//! by `/transactions`), refunded when it fails, and in OpenAI's shapes and errors.

use std::time::Duration;

use axum::http::{header, Method, StatusCode};
use base64::Engine;
use serde_json::{json, Value};

use super::{assert_invalid_input, assert_openai_error, key_of};
use crate::common::{fake_llm::REJECTION, Reply, TestApp, TestResponse};

async fn embed(app: &TestApp, key: &str, body: &Value) -> TestResponse {
    let authorization = format!("Bearer {key}");
    app.request(
        Method::POST,
        "/v1/embeddings",
        &[
            ("content-type", "application/json"),
            ("authorization", &authorization),
        ],
        body.to_string(),
    )
    .await
}

/// The user's ledger rows, newest first.
async fn ledger(app: &TestApp, key: &str) -> Vec<Value> {
    let page = app.get_authorized("/transactions", key).await;
    page.json["transactions"].as_array().unwrap().clone()
}

#[tokio::test]
async fn embeddings_pass_through_metered_by_their_cost_and_recorded_with_model_and_usage() {
    let app = TestApp::with_env(&[("EMBEDDING_COST", "3")]).await;
    let key = key_of(&app, "user").await;
    let sent = json!({
        "model": "llama3.2",
        "input": ["the first text", "a second"],
        "encoding_format": "float",
        "dimensions": 4,
        "user": "user-1",
    });
    let answered = embed(&app, &key, &sent).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    assert_eq!(app.llm.received()[0].path, "/v1/embeddings");
    assert_eq!(app.llm.received()[0].body, sent);
    // The model's list as it gave it, but `model`, the name asked for.
    assert_eq!(answered.json["object"], "list");
    assert_eq!(answered.json["model"], "llama3.2");
    let data = answered.json["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["embedding"], json!([3.0, 14.0, 0.5, -0.5]));
    assert_eq!(
        answered.json["usage"],
        json!({ "cost": 3, "prompt_tokens": 5, "total_tokens": 5 })
    );
    assert_eq!(answered.tokens_remaining(), 3997);

    let rows = ledger(&app, &key).await;
    assert_eq!(rows[0]["reason"], "embedding");
    assert_eq!(rows[0]["amount"], -3);
    assert_eq!(rows[0]["balance_after"], 3997);
    assert_eq!(rows[0]["model"], "llama3.2");
    assert_eq!(
        rows[0]["usage"],
        json!({ "prompt_tokens": 5, "total_tokens": 5 })
    );
    assert_eq!(rows[0]["chat_id"], Value::Null);
    assert!(rows[0]["embedding_id"].is_i64());
    // Nothing of it among the chats.
    let chats = app.get_authorized("/chats", &key).await.json;
    assert_eq!(chats["chats"], json!([]));
    assert_eq!(app.balance(&key).await, 3997);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_failed_embeddings_call_is_refunded_and_answered_as_openai_does() {
    let mut app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1")]).await;
    let key = key_of(&app, "user").await;
    let body = json!({ "model": "llama3.2", "input": "hello" });
    app.llm.set_reply(Reply::Reject(400));
    let rejected = embed(&app, &key, &body).await;
    assert_eq!(rejected.status, StatusCode::BAD_REQUEST);
    assert_eq!(rejected.json["error"]["message"], REJECTION);
    app.llm.set_reply(Reply::Busy {
        status: 429,
        retry_after: Some("9"),
    });
    let busy = embed(&app, &key, &body).await;
    assert_openai_error(
        &busy,
        StatusCode::SERVICE_UNAVAILABLE,
        "api_error",
        "upstream_busy",
    );
    assert_eq!(busy.headers[header::RETRY_AFTER], "9");
    // Left alone for the nine seconds it asked (issue 26): a fresh process, with no memory
    // of it, for the failures below.
    app.restart(&[("LLM_TIMEOUT_SECS", "1")]).await;
    app.llm.set_reply(Reply::Status(500));
    let failed = embed(&app, &key, &body).await;
    assert_openai_error(
        &failed,
        StatusCode::BAD_GATEWAY,
        "api_error",
        "upstream_error",
    );
    app.llm.set_reply(Reply::Garbage);
    let garbage = embed(&app, &key, &body).await;
    assert_openai_error(
        &garbage,
        StatusCode::BAD_GATEWAY,
        "api_error",
        "upstream_error",
    );
    // A list of no embeddings is no answer either.
    app.llm.set_reply(Reply::NoChoices);
    let empty = embed(&app, &key, &body).await;
    assert_openai_error(
        &empty,
        StatusCode::BAD_GATEWAY,
        "api_error",
        "upstream_error",
    );
    app.llm.set_reply(Reply::Stall(Duration::from_secs(3)));
    let slow = embed(&app, &key, &body).await;
    assert_openai_error(
        &slow,
        StatusCode::GATEWAY_TIMEOUT,
        "api_error",
        "upstream_timeout",
    );
    assert_eq!(app.llm.calls(), 6);
    // Each reserved, then given back.
    let rows = ledger(&app, &key).await;
    let reasons: Vec<&str> = rows
        .iter()
        .map(|row| row["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "embedding_refund",
            "embedding",
            "embedding_refund",
            "embedding",
            "embedding_refund",
            "embedding",
            "embedding_refund",
            "embedding",
            "embedding_refund",
            "embedding",
            "embedding_refund",
            "embedding",
            "initial_grant",
        ]
    );
    assert_eq!(app.balance(&key).await, 4000);

    // Refused before the model is asked: each names its field, charges nothing.
    for (body, status, code, param) in [
        (
            json!({ "input": "x" }),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "model",
        ),
        (
            json!({ "model": "llama3.2" }),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "input",
        ),
        (
            json!({ "model": "gpt-9", "input": "x" }),
            StatusCode::NOT_FOUND,
            "model_not_found",
            "model",
        ),
    ] {
        let refused = embed(&app, &key, &body).await;
        assert_openai_error(&refused, status, "invalid_request_error", code);
        assert_eq!(refused.json["error"]["param"], param);
    }
    let authorization = format!("Bearer {key}");
    let keyed = app
        .request(
            Method::POST,
            "/v1/embeddings",
            &[
                ("authorization", authorization.as_str()),
                ("idempotency-key", "once"),
            ],
            body.to_string(),
        )
        .await;
    assert_invalid_input(&keyed, "Idempotency-Key");
    // Refused before its body is read: a key on a form body is refused for the key, not for
    // the form.
    let keyed_and_unreadable = app
        .request(
            Method::POST,
            "/v1/embeddings",
            &[
                ("authorization", authorization.as_str()),
                ("idempotency-key", "once"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "model=llama3.2&input=hello".to_string(),
        )
        .await;
    assert_eq!(keyed_and_unreadable.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        keyed_and_unreadable.json["error"]["param"],
        "Idempotency-Key"
    );
    assert_eq!(app.llm.calls(), 6);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn an_embeddings_call_the_balance_does_not_cover_is_402_and_never_asked() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "2"), ("EMBEDDING_COST", "2")]).await;
    let key = key_of(&app, "user").await;
    let body = json!({ "model": "llama3.2", "input": "hello" });
    assert_eq!(embed(&app, &key, &body).await.status, StatusCode::OK);
    let broke = embed(&app, &key, &body).await;
    assert_openai_error(
        &broke,
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_quota",
        "insufficient_quota",
    );
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&key).await, 0);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn an_embeddings_call_left_pending_by_a_dead_process_is_refunded_by_recovery() {
    let app = TestApp::new().await;
    let key = key_of(&app, "user").await;
    let user_id: i64 =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT id FROM users")
        .fetch_one(pool)
        .await)
        .unwrap();
    let reserved = tokenchat::db::embeddings::reserve(
        &app.state.db,
        user_id,
        "llama3.2",
        1,
        None,
        Default::default(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(matches!(
        reserved,
        tokenchat::db::embeddings::Reservation::Reserved { .. }
    ));
    assert_eq!(app.balance(&key).await, 3999);
    // Not before its deadline; after it, once, however many sweeps.
    let now = tokenchat::db::unix_now();
    assert_eq!(
        app.state
            .recovery
            .sweep(now)
            .await
            .unwrap()
            .refunded_embeddings,
        0
    );
    for expected in [1, 0] {
        let sweep = app.state.recovery.sweep(now + 120).await.unwrap();
        assert_eq!(sweep.refunded_embeddings, expected);
    }
    assert_eq!(app.balance(&key).await, 4000);
    assert_eq!(ledger(&app, &key).await[0]["reason"], "embedding_refund");
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn the_demo_model_makes_embeddings_as_floats_or_base64() {
    let app = TestApp::with_env(&[("LLM_BASE_URL", "")]).await;
    let key = key_of(&app, "user").await;
    let floats = embed(
        &app,
        &key,
        &json!({ "model": "demo", "input": ["hello world", "hello"] }),
    )
    .await;
    assert_eq!(floats.status, StatusCode::OK, "{floats:?}");
    let vector = |value: &Value| -> Vec<f64> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let first = vector(&floats.json["data"][0]["embedding"]);
    assert_eq!(first.len(), 16);
    let norm: f64 = first.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    assert_eq!(
        floats.json["usage"],
        json!({ "cost": 1, "prompt_tokens": 3, "total_tokens": 3 })
    );

    let encoded = embed(
        &app,
        &key,
        &json!({ "model": "demo", "input": "hello world", "encoding_format": "base64", "dimensions": 8 }),
    )
    .await;
    let text = encoded.json["data"][0]["embedding"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    let decoded: Vec<f64> = bytes
        .chunks(4)
        .map(|four| f32::from_le_bytes(four.try_into().unwrap()) as f64)
        .collect();
    assert_eq!(decoded.len(), 8);
    // The same words, the same direction, whatever the encoding.
    let same = embed(
        &app,
        &key,
        &json!({ "model": "demo", "input": "Hello World", "dimensions": 8 }),
    )
    .await;
    let same = vector(&same.json["data"][0]["embedding"]);
    for (a, b) in decoded.iter().zip(&same) {
        assert!((a - b).abs() < 1e-6, "{decoded:?} {same:?}");
    }
    let refused = embed(
        &app,
        &key,
        &json!({ "model": "demo", "input": "x", "encoding_format": "int8" }),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.json["error"]["param"], "encoding_format");
    assert_eq!(app.balance(&key).await, 4000 - 3);
    app.assert_all_settled().await;
}
