//! Chat accounting: charged exactly once per stored answer, never below zero, never for a failure.

use std::time::Duration;

use crate::common::{Reply, TestApp};
use axum::http::StatusCode;

#[tokio::test]
async fn below_the_price_of_a_chat_the_answer_is_402_and_nothing_changes() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "150")]).await;
    let token = app.user_with_token("user").await;
    assert_eq!(app.chat(&token, "first").await.json["tokens"], 50);

    let refused = app.chat(&token, "second").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(refused.json["error"], "Out of Tokens");
    assert_eq!(refused.json["tokens"], 50);
    assert_eq!(app.balance(&token).await, 50);
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.chat_counts().await, [("answered".to_string(), 1)]);
}

#[tokio::test]
async fn every_upstream_failure_charges_nothing() {
    let app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    for (reply, status, code) in [
        (
            Reply::Status(500),
            StatusCode::BAD_GATEWAY,
            "upstream_error",
        ),
        // Busy: the model's 429 is a 503 to come back later (issue 24).
        (
            Reply::Status(429),
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_busy",
        ),
        (
            Reply::Status(401),
            StatusCode::BAD_GATEWAY,
            "upstream_error",
        ),
        (Reply::Garbage, StatusCode::BAD_GATEWAY, "upstream_error"),
        (Reply::NoChoices, StatusCode::BAD_GATEWAY, "upstream_error"),
        (
            Reply::EmptyContent,
            StatusCode::BAD_GATEWAY,
            "upstream_error",
        ),
        (
            Reply::Stall(Duration::from_secs(3)),
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
        ),
    ] {
        app.llm.set_reply(reply.clone());
        let response = app.chat(&token, "hello").await;
        response.assert_error(status, code);
        assert_eq!(app.balance(&token).await, 4000, "{reply:?}");
    }
    assert_eq!(app.chat_counts().await, [("failed".to_string(), 7)]);
}

#[tokio::test]
async fn an_unreachable_model_is_a_502_and_charges_nothing() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{closed_port}/v1");
    let app = TestApp::with_env(&[("LLM_BASE_URL", &url)]).await;
    let token = app.user_with_token("user").await;
    let response = app.chat(&token, "hello").await;
    response.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    assert!(!response.json["error"]
        .as_str()
        .unwrap()
        .contains("127.0.0.1"));
    assert_eq!(app.balance(&token).await, 4000);
}

#[tokio::test]
async fn after_a_failure_the_next_chat_is_answered_and_charged_once() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::Status(503));
    app.chat(&token, "hello").await;
    app.llm.set_reply(Reply::Echo);
    let answered = app.chat(&token, "hello again").await;
    assert_eq!(answered.status, StatusCode::OK);
    assert_eq!(answered.json["tokens"], 3900);
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn thirty_concurrent_chats_on_a_balance_worth_ten_answer_exactly_ten() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "1000")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::Stall(Duration::from_millis(50)));

    let app = std::sync::Arc::new(app);
    let chats: Vec<_> = (0..30)
        .map(|i| {
            let app = app.clone();
            let token = token.clone();
            tokio::spawn(async move { app.chat(&token, &format!("question {i}")).await })
        })
        .collect();
    let mut answered = 0;
    let mut refused = 0;
    for chat in chats {
        let response = chat.await.unwrap();
        match response.status {
            StatusCode::OK => answered += 1,
            StatusCode::PAYMENT_REQUIRED => {
                response.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
                refused += 1;
            }
            other => panic!("unexpected {other}: {response:?}"),
        }
    }
    assert_eq!((answered, refused), (10, 20));
    assert_eq!(app.balance(&token).await, 0);
    assert_eq!(app.chat_counts().await, [("answered".to_string(), 10)]);
    assert_eq!(app.llm.calls(), 10);
}

#[tokio::test]
async fn each_answered_chat_is_stored_with_its_user_message_response_and_time() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let chat = app.chat(&token, "what is rust?").await;
    let chat_id = chat.json["chat_id"].as_i64().unwrap();
    let (user, message, response, status, cost, created, finished): (
        String,
        String,
        String,
        String,
        i64,
        i64,
        i64,
    ) = tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(
        "SELECT u.username, c.message, c.response, c.status, c.cost, c.created_at, c.finished_at
             FROM chats c JOIN users u ON u.id = c.user_id WHERE c.id = $1",
    )
    .bind(chat_id)
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(
        (
            user.as_str(),
            message.as_str(),
            response.as_str(),
            status.as_str(),
            cost
        ),
        (
            "user",
            "what is rust?",
            "Echo: what is rust?",
            "answered",
            100
        )
    );
    assert!(created > 1_700_000_000 && finished >= created);
}

#[tokio::test]
async fn chat_cost_and_initial_tokens_are_configurable() {
    let app = TestApp::with_env(&[("CHAT_COST", "7"), ("INITIAL_TOKENS", "20")]).await;
    let registered = app.register("user", "pass123").await;
    assert_eq!(registered.json["tokens"], 20);
    let token = app.login("user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    let chat = app.chat(&token, "hi").await;
    assert_eq!(
        (
            chat.json["tokens"].as_i64(),
            chat.json["tokens_charged"].as_i64()
        ),
        (Some(13), Some(7))
    );
    app.chat(&token, "hi").await;
    let refused = app.chat(&token, "hi").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(refused.json["tokens"], 6);
}
