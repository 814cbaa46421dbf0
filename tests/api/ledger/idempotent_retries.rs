//! `Idempotency-Key` retries: a success is replayed without a second charge, a failure or
//! `out_of_tokens` is tried again, a key is one user's for a day and reused only with its body.

use std::{sync::Arc, time::Duration};

use crate::common::{Reply, TestApp};
use axum::http::StatusCode;

#[tokio::test]
async fn a_retry_after_success_returns_the_first_answer_without_a_second_charge() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let first = app.chat_with_key(&token, "key-1", "hello").await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.headers.contains_key("idempotent-replayed"));

    let retry = app.chat_with_key(&token, "key-1", "hello").await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.json, first.json);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.tokens_remaining(), 3900);
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&token).await, 3900);

    // A new key is a new chat.
    let other = app.chat_with_key(&token, "key-2", "hello").await;
    assert_ne!(other.json["chat_id"], first.json["chat_id"]);
    assert_eq!(app.balance(&token).await, 3800);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_key_reused_with_another_body_is_422_and_charges_nothing() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.chat_with_key(&token, "key", "hello").await;
    let reused = app.chat_with_key(&token, "key", "something else").await;
    reused.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(app.llm.calls(), 1);
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_in_flight_is_409() {
    let app = Arc::new(TestApp::new().await);
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::Stall(Duration::from_millis(800)));
    let first = tokio::spawn({
        let (app, token) = (app.clone(), token.clone());
        async move { app.chat_with_key(&token, "key", "slow").await }
    });
    while app.llm.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let duplicate = app.chat_with_key(&token, "key", "slow").await;
    duplicate.assert_error(StatusCode::CONFLICT, "request_in_progress");

    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    let replay = app.chat_with_key(&token, "key", "slow").await;
    assert_eq!(replay.json, first.json);
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn a_retry_after_a_refunded_failure_is_tried_again_and_charged_only_if_answered() {
    let app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    for (reply, status) in [
        (Reply::Status(500), StatusCode::BAD_GATEWAY),
        (
            Reply::Stall(Duration::from_secs(3)),
            StatusCode::GATEWAY_TIMEOUT,
        ),
    ] {
        app.llm.set_reply(reply);
        assert_eq!(
            app.chat_with_key(&token, "key", "hello").await.status,
            status
        );
        assert_eq!(app.balance(&token).await, 4000);
    }
    app.llm.set_reply(Reply::Echo);
    let answered = app.chat_with_key(&token, "key", "hello").await;
    assert_eq!(answered.status, StatusCode::OK);
    assert_eq!(app.llm.calls(), 3);
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(
        app.chat_with_key(&token, "key", "hello").await.json,
        answered.json
    );
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_retry_after_out_of_tokens_is_tried_again_once_tokens_are_granted() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "50")]).await;
    let token = app.user_with_token("user").await;
    let refused = app.chat_with_key(&token, "key", "hello").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(refused.tokens_remaining(), 50);
    let user = tokenchat::domain::Username::parse("USER").unwrap();
    let amount = tokenchat::domain::GrantAmount::parse(100).unwrap();
    let granted = tokenchat::services::accounts::grant(&app.state.db, &user, amount)
        .await
        .unwrap();
    assert_eq!(granted, 150);
    let answered = app.chat_with_key(&token, "key", "hello").await;
    assert_eq!(answered.status, StatusCode::OK);
    assert_eq!(answered.json["tokens"], 50);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn keys_belong_to_one_user_and_expire_after_a_day() {
    let app = TestApp::new().await;
    let alice = app.user_with_token("alice").await;
    let bob = app.user_with_token("bob").await;
    let first = app.chat_with_key(&alice, "shared", "hello").await;
    let bobs = app.chat_with_key(&bob, "shared", "hello").await;
    assert_ne!(bobs.json["chat_id"], first.json["chat_id"]);
    assert_eq!(app.balance(&bob).await, 3900);

    tokenchat::db_run!(&app.state.db, pool => sqlx::query("UPDATE idempotency_keys SET created_at = created_at - 86401")
        .execute(pool)
        .await.map(|done| done.rows_affected()))
        .unwrap();
    let after_a_day = app.chat_with_key(&alice, "shared", "hello").await;
    assert_ne!(after_a_day.json["chat_id"], first.json["chat_id"]);
    assert_eq!(app.balance(&alice).await, 3800);
}

#[tokio::test]
async fn idempotency_keys_longer_than_255_characters_are_400() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let response = app.chat_with_key(&token, &"k".repeat(256), "hello").await;
    response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(response.json["field"], "Idempotency-Key");
    assert_eq!(app.llm.calls(), 0);
    let longest = app.chat_with_key(&token, &"k".repeat(255), "hello").await;
    assert_eq!(longest.status, StatusCode::OK);
}
