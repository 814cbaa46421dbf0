//! Every balance move is one ledger row with the balance after it, a storm of concurrent
//! chats charges exactly the answered ones, and every authorised answer carries the balance.

use std::{collections::BTreeSet, sync::Arc};

use crate::common::{Reply, TestApp};
use axum::http::StatusCode;
use serde_json::{json, Value};

async fn ledger_sum(app: &TestApp, username: &str) -> i64 {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger l
         JOIN users u ON u.id = l.user_id
         WHERE u.username = $1",
    )
    .bind(username)
    .fetch_one(pool)
    .await)
    .unwrap()
}

#[tokio::test]
async fn every_balance_move_is_one_ledger_row_with_the_balance_after_it() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.chat(&token, "answered").await;
    app.chat(&token, "[fail] refunded").await;

    let page = app.get_authorized("/transactions", &token).await;
    assert_eq!(page.status, StatusCode::OK);
    let rows: Vec<(i64, &str, i64)> = page.json["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["amount"].as_i64().unwrap(),
                row["reason"].as_str().unwrap(),
                row["balance_after"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (100, "chat_refund", 3900),
            (-100, "chat_reservation", 3800),
            (-100, "chat_reservation", 3900),
            (4000, "initial_grant", 4000),
        ]
    );
    assert_eq!(page.json["transactions"][3]["chat_id"], Value::Null);
    assert_eq!(page.json["next"], Value::Null);
    assert_eq!(ledger_sum(&app, "user").await, app.balance(&token).await);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_storm_of_concurrent_chats_over_four_tokens_charges_exactly_the_answered_ones() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "3700")]).await;
    app.register("storm", "pass123").await;
    let mut tokens = Vec::new();
    for _ in 0..4 {
        tokens.push(
            app.login("storm", "pass123").await.json["token"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    app.llm.set_reply(Reply::FailRandomly(1.0 / 3.0));

    let app = Arc::new(app);
    let chats: Vec<_> = (0..200)
        .map(|i| {
            let app = app.clone();
            let token = tokens[i % 4].clone();
            tokio::spawn(async move { app.chat(&token, &format!("storm {i}")).await })
        })
        .collect();
    let mut answered = BTreeSet::new();
    let (mut refused, mut failed) = (0, 0);
    for chat in chats {
        let response = chat.await.unwrap();
        match response.status {
            StatusCode::OK => {
                assert!(answered.insert(response.json["chat_id"].as_i64().unwrap()));
            }
            StatusCode::PAYMENT_REQUIRED => refused += 1,
            StatusCode::BAD_GATEWAY => failed += 1,
            other => panic!("unexpected {other}: {response:?}"),
        }
    }
    assert_eq!(answered.len() + refused + failed, 200);
    assert!(answered.len() <= 37);
    assert!(failed > 0, "the fake failed no chat");

    let balance = app.balance(&tokens[0]).await;
    assert_eq!(balance, 3700 - 100 * answered.len() as i64);
    assert_eq!(ledger_sum(&app, "storm").await, balance);
    let stored: BTreeSet<i64> =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT id FROM chats WHERE status = 'answered'")
            .fetch_all(pool)
            .await)
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(stored, answered);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn every_authorised_response_carries_the_balance_in_a_header() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "150"), ("MAX_MESSAGE_CHARS", "5")]).await;
    let token = app.user_with_token("user").await;
    let chat = app.chat(&token, "hi").await;
    assert_eq!(chat.tokens_remaining(), 50);
    for response in [
        app.post_authorized("/balance", &token, json!({})).await,
        app.get_authorized("/chats", &token).await,
        app.get_authorized(&format!("/chats/{}", chat.json["chat_id"]), &token)
            .await,
        app.get_authorized("/transactions/", &token).await,
        app.get_authorized("/chats/999", &token).await,
        app.chat(&token, "too long").await,
        app.chat(&token, "hi").await,
    ] {
        assert_eq!(response.tokens_remaining(), 50, "{response:?}");
    }
    let unauthorised = app
        .request(axum::http::Method::GET, "/chats", &[], "")
        .await;
    assert!(!unauthorised.headers.contains_key("x-tokens-remaining"));
}
