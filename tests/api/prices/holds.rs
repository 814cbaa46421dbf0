//! A priced chat's reservation is a hold: while the chat is in flight the balance a call may
//! spend leaves it out and `users.held` records it, the ledger has no row of it, and neither
//! a second call nor an operator can take it; settled, the ledger gets the one row of its
//! charge and the hold is let go of.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;

use super::{chat_bound, chat_ledger, chat_reservation, priced_app, MAX_OUTPUT, REQUEST};
use crate::common::{Reply, TestApp};

async fn held(app: &TestApp) -> i64 {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT held FROM users WHERE username = 'holder'",
    )
    .fetch_one(pool)
    .await)
    .unwrap()
}

#[tokio::test]
async fn a_priced_chat_in_flight_holds_its_reservation_and_the_ledger_records_only_its_charge() {
    let first = "hold on";
    let second = "and me";
    let reserved = chat_reservation(first, MAX_OUTPUT);
    // What the first chat holds, and one token short of the second's shortest answer.
    let initial = reserved + REQUEST + chat_bound(second) + 2 * 16 - 1;
    let app = priced_app(&[("INITIAL_TOKENS", &initial.to_string())]).await;
    let token = app.user_with_token("holder").await;
    app.llm.set_reply(Reply::Stall(Duration::from_millis(600)));
    let asked = app.post_authorized("/chat", &token, json!({ "message": first }));
    let meanwhile = async {
        crate::server::wait_until(|| async { held(&app).await == reserved }).await;
        assert_eq!(app.balance(&token).await, initial - reserved);
        assert!(chat_ledger(&app, 1).await.is_empty());
        let moves = app.get_authorized("/transactions", &token).await;
        assert_eq!(moves.json["transactions"].as_array().unwrap().len(), 1);
        // The held tokens are not there to spend: refused, with the balance less the hold.
        let refused = app
            .post_authorized("/chat", &token, json!({ "message": second }))
            .await;
        refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
        assert_eq!(refused.json["tokens"], initial - reserved, "{refused:?}");
        assert_eq!(
            refused.json["required"],
            REQUEST + chat_bound(second) + 2 * 16
        );
        // Nor can an operator take them.
        let name = tokenchat::domain::Username::parse("holder").unwrap();
        let take = tokenchat::domain::GrantAmount::parse(-(initial - reserved + 1)).unwrap();
        let taken = tokenchat::services::accounts::grant(&app.state.db, &name, take).await;
        assert!(taken.is_err(), "{taken:?}");
    };
    let (answered, ()) = tokio::join!(asked, meanwhile);
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let charged = answered.json["tokens_charged"].as_i64().unwrap();
    assert!(0 < charged && charged < reserved, "{answered:?}");
    assert_eq!(answered.json["tokens"], initial - charged);
    assert_eq!(held(&app).await, 0);
    assert_eq!(
        chat_ledger(&app, 1).await,
        [("chat_charge".to_string(), -charged)]
    );
    assert_eq!(app.balance(&token).await, initial - charged);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn the_audit_finds_held_tokens_that_no_call_in_flight_reserved() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("holder").await;
    let answered = app
        .post_authorized("/chat", &token, json!({ "message": "hi" }))
        .await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    app.assert_audit_passes().await;
    app.assert_audit_finds_after(
        "UPDATE users SET held = 7 WHERE username = 'holder'",
        "user 1 (holder): 7 tokens held but their held calls in flight reserved 0",
    )
    .await;
}

#[tokio::test]
async fn a_priced_chat_replayed_by_its_key_answers_its_charge_and_balance_again_and_charges_nothing_more(
) {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("holder").await;
    let first = app.chat_with_key(&token, "k1", "hello").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let charged = first.json["tokens_charged"].as_i64().unwrap();
    assert_eq!(first.json["tokens"], 4000 - charged);
    // Another chat in between moves the balance; the replay still says what the first said.
    let other = app
        .post_authorized("/chat", &token, json!({ "message": "another" }))
        .await;
    let other_charged = other.json["tokens_charged"].as_i64().unwrap();
    let replayed = app.chat_with_key(&token, "k1", "hello").await;
    assert_eq!(replayed.status, StatusCode::OK, "{replayed:?}");
    assert_eq!(
        (&replayed.json["tokens_charged"], &replayed.json["tokens"]),
        (&first.json["tokens_charged"], &first.json["tokens"])
    );
    assert_eq!(app.balance(&token).await, 4000 - charged - other_charged);
    assert_eq!(held(&app).await, 0);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_priced_chat_by_a_key_with_a_budget_is_held_and_its_budget_counts_the_charge() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("holder").await;
    let reserved = chat_reservation("hi", MAX_OUTPUT);
    let (key, key_id) = crate::limits::key_with(
        &app,
        &token,
        json!({ "budget": { "tokens": reserved, "period": "day" } }),
    )
    .await;
    let answered = app.chat(&key, "hi").await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let charged = answered.json["tokens_charged"].as_i64().unwrap();
    assert!(0 < charged && charged < reserved, "{answered:?}");
    let spent: i64 = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT budget_spent FROM api_keys WHERE id = $1",
    )
    .bind(key_id)
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(spent, charged);
    assert_eq!(held(&app).await, 0);
    assert_eq!(
        chat_ledger(&app, 1).await,
        [("chat_charge".to_string(), -charged)]
    );
    app.assert_audit_passes().await;
}
