//! Limits changed while in use. A budget given another period, or set anew, counts what
//! its owner spent in the new period so far: shown as `spent`, never passed, and as the
//! audit adds it; one that keeps its period keeps its spending. A rate given another limit
//! keeps what it counted, in the new limit's units; one removed and set again starts anew.

use std::{convert::Infallible, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{header, Request, StatusCode},
};
use serde_json::{json, Value};
use tokenchat::{
    domain::{BudgetPeriod, TokenBudget, Username},
    services::user_limits::{self, UserLimitsChange},
};
use tower::ServiceExt;

use super::{grant, key_with, patch_key, periods::set_user_budget};
use crate::common::TestApp;

/// Chats with `credential` `answered` times, then once more, refused for its budget.
async fn spend_to_the_budget(app: &TestApp, credential: &str, answered: usize) {
    for n in 0..answered {
        let chat = app.chat(credential, &format!("n{n}")).await;
        assert_eq!(chat.status, StatusCode::OK, "{n}: {chat:?}");
    }
    let refused = app.chat(credential, "one more").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
}

fn budget(tokens: i64, period: &str) -> Value {
    json!({ "budget": { "tokens": tokens, "period": period } })
}

/// The key's `spent` as `GET /keys` shows it.
async fn listed_spent(app: &TestApp, token: &str) -> Value {
    app.get_authorized("/keys", token).await.json["keys"][0]["spent"].clone()
}

#[tokio::test]
async fn a_keys_budget_given_another_period_counts_what_that_period_spent_and_is_never_passed() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    grant(&app, "user", 96_000).await;
    let (key, id) = key_with(&app, &token, budget(300, "total")).await;
    spend_to_the_budget(&app, &key, 3).await;
    // A day's budget: today's spending is 300, so it is spent already.
    let daily = patch_key(&app, &token, id, budget(300, "day")).await;
    assert_eq!(daily.json["spent"], 300, "{daily:?}");
    let refused = app.chat(&key, "still spent").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
    assert_eq!(
        refused.json["error"],
        "this API key's budget for its period is spent"
    );
    // A month's: the same 300, shown, and 700 more to spend.
    let monthly = patch_key(&app, &token, id, budget(1_000, "month")).await;
    assert_eq!(monthly.json["spent"], 300, "{monthly:?}");
    spend_to_the_budget(&app, &key, 7).await;
    assert_eq!(listed_spent(&app, &token).await, 1_000);
    // The same period, more tokens: the spending is kept.
    let more = patch_key(&app, &token, id, budget(1_200, "month")).await;
    assert_eq!(more.json["spent"], 1_000, "{more:?}");
    // Taken off, a call made, and set again: today's budgeted calls count; the call made
    // while the key had none was no budget's.
    patch_key(&app, &token, id, json!({ "budget": null })).await;
    assert_eq!(app.chat(&key, "unbudgeted").await.status, StatusCode::OK);
    let again = patch_key(&app, &token, id, budget(1_200, "day")).await;
    assert_eq!(again.json["spent"], 1_000, "{again:?}");
    spend_to_the_budget(&app, &key, 2).await;
    assert_eq!(listed_spent(&app, &token).await, 1_200);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_call_looked_up_before_its_budget_got_a_longer_period_still_counts_in_it() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    grant(&app, "user", 96_000).await;
    let (key, id) = key_with(&app, &token, budget(1_000, "day")).await;
    for n in 0..9 {
        assert_eq!(
            app.chat(&key, &format!("n{n}")).await.status,
            StatusCode::OK
        );
    }
    // A chat whose body is still coming when the budget changes: its key was looked up,
    // and its period chosen, under the day's budget.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
    let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|piece| (piece, receiver))
    });
    let request = Request::post("/chat")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .unwrap();
    let slow = tokio::spawn(app.router.clone().oneshot(request));
    sender
        .send(Ok(Bytes::from_static(b"{\"message\":")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let monthly = patch_key(&app, &token, id, budget(1_000, "month")).await;
    assert_eq!(monthly.json["spent"], 900, "{monthly:?}");
    sender
        .send(Ok(Bytes::from_static(b"\"late\"}")))
        .await
        .unwrap();
    drop(sender);
    let answered = slow.await.unwrap().unwrap();
    assert_eq!(answered.status(), StatusCode::OK);
    // It counted in the month, with the nine before it: the budget is spent.
    assert_eq!(listed_spent(&app, &token).await, 1_000);
    app.chat(&key, "over")
        .await
        .assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_users_budget_given_another_period_counts_what_that_period_spent() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let budget = |tokens, period| Some(TokenBudget { tokens, period });
    set_user_budget(&app, budget(300, BudgetPeriod::Total)).await;
    spend_to_the_budget(&app, &token, 3).await;
    set_user_budget(&app, budget(300, BudgetPeriod::Day)).await;
    let refused = app.chat(&token, "still spent").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
    // The user's own budget, not a key's, as it says.
    assert_eq!(refused.json["error"], "your budget for its period is spent");
    set_user_budget(&app, budget(1_000, BudgetPeriod::Month)).await;
    let config = &app.state.config;
    let shown = tokenchat::services::user_limits::show(
        &app.state.db,
        &Username::parse("user").unwrap(),
        &config.user_limits,
        config.clock.now(),
    )
    .await
    .unwrap();
    assert_eq!(shown.spent, Some(300));
    spend_to_the_budget(&app, &token, 7).await;
    // Taken off, two chats made, and set again: those two were no budget's.
    set_user_budget(&app, None).await;
    for n in 0..2 {
        let chat = app.chat(&token, &format!("free {n}")).await;
        assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
    }
    set_user_budget(&app, budget(1_200, BudgetPeriod::Month)).await;
    spend_to_the_budget(&app, &token, 2).await;
    app.assert_all_settled().await;
}

/// Chats with `key` until one is refused for its rate; how many were answered (at most 50).
async fn answered_before_the_rate(app: &TestApp, key: &str) -> usize {
    for answered in 0..50 {
        let chat = app.chat(key, &format!("n{answered}")).await;
        if chat.status == StatusCode::TOO_MANY_REQUESTS {
            return answered;
        }
        assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
    }
    50
}

#[tokio::test]
async fn a_keys_rpm_changed_keeps_what_the_minute_counted_in_the_new_limits_units() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    grant(&app, "user", 96_000).await;
    let (key, id) = key_with(&app, &token, json!({ "rpm": 2 })).await;
    assert_eq!(answered_before_the_rate(&app, &key).await, 2);
    // Raised: the two counted stand, and the rest of the new minute is there at once.
    patch_key(&app, &token, id, json!({ "rpm": 12 })).await;
    assert_eq!(answered_before_the_rate(&app, &key).await, 10);
    // Lowered below what was counted: nothing more this minute.
    patch_key(&app, &token, id, json!({ "rpm": 6 })).await;
    assert_eq!(answered_before_the_rate(&app, &key).await, 0);
    // Removed and set again: a new count.
    patch_key(&app, &token, id, json!({ "rpm": null })).await;
    assert_eq!(app.chat(&key, "unlimited").await.status, StatusCode::OK);
    patch_key(&app, &token, id, json!({ "rpm": 3 })).await;
    assert_eq!(answered_before_the_rate(&app, &key).await, 3);
}

#[tokio::test]
async fn a_users_rpm_changed_keeps_what_the_minute_counted_in_the_new_limits_units() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let rpm = |rpm| UserLimitsChange {
        rpm: Some(rpm),
        ..UserLimitsChange::default()
    };
    let change = |change: UserLimitsChange| {
        let app = &app;
        async move {
            let config = &app.state.config;
            user_limits::change(
                &app.state.db,
                &Username::parse("user").unwrap(),
                &change,
                &config.user_limits,
                config.clock.now(),
            )
            .await
            .unwrap();
        }
    };
    change(rpm(Some(2))).await;
    assert_eq!(answered_before_the_rate(&app, &token).await, 2);
    change(rpm(Some(5))).await;
    assert_eq!(answered_before_the_rate(&app, &token).await, 3);
}
