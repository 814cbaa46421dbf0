//! Budget periods roll over on the service's clock, which the tests move on instead of
//! waiting a day or a month: a spent budget is refused with when it resets, and serves
//! again from then.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use tokenchat::{
    clock::parse_rfc3339,
    domain::{BudgetPeriod, TokenBudget, Username},
    services::user_limits::{self, UserLimitsChange},
};

use super::{grant, key_with};
use crate::common::TestApp;

const DAY_SECS: i64 = 24 * 60 * 60;

/// Chats with `credential` until one is refused for a budget; that refusal's `resets_at`.
async fn spend_until_refused(app: &TestApp, credential: &str, answered: usize) -> i64 {
    for n in 0..answered {
        let chat = app.chat(credential, &format!("n{n}")).await;
        assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
    }
    let refused = app.chat(credential, "one more").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
    parse_rfc3339(refused.json["resets_at"].as_str().unwrap()).unwrap()
}

/// Moves the app's clock on to `at` (Unix seconds) and one second past it.
fn move_clock_to(app: &TestApp, at: i64) {
    let now = app.state.config.clock.now();
    assert!(at > now, "{at} is not ahead of {now}");
    app.state
        .config
        .clock
        .advance(Duration::from_secs((at - now + 1) as u64));
}

#[tokio::test]
async fn a_keys_daily_budget_serves_again_from_midnight_utc() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    grant(&app, "user", 96_000).await;
    let (key, _) = key_with(
        &app,
        &token,
        json!({ "budget": { "tokens": 200, "period": "day" } }),
    )
    .await;
    let resets_at = spend_until_refused(&app, &key, 2).await;
    let now = app.state.config.clock.now();
    assert_eq!(
        resets_at,
        (now / DAY_SECS + 1) * DAY_SECS,
        "the next midnight"
    );
    move_clock_to(&app, resets_at);
    assert_eq!(app.chat(&key, "a new day").await.status, StatusCode::OK);
    let keys = app.get_authorized("/keys", &token).await;
    let listed = &keys.json["keys"][0];
    assert_eq!(listed["spent"], 100, "{listed}");
    assert_eq!(
        parse_rfc3339(listed["resets_at"].as_str().unwrap()),
        Some(resets_at + DAY_SECS)
    );
    // Two days' worth charged in all; the audit proves the key's spending from its calls.
    assert_eq!(app.balance(&token).await, 100_000 - 300);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_users_monthly_budget_from_the_configuration_serves_again_on_the_first() {
    let app = TestApp::with_env(&[
        ("USER_BUDGET_TOKENS", "200"),
        ("USER_BUDGET_PERIOD", "month"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    let resets_at = spend_until_refused(&app, &token, 2).await;
    let first_of_next_month = time::OffsetDateTime::from_unix_timestamp(resets_at).unwrap();
    assert_eq!(
        (
            first_of_next_month.day(),
            first_of_next_month.time(),
            first_of_next_month.offset()
        ),
        (1, time::Time::MIDNIGHT, time::UtcOffset::UTC)
    );
    assert!(resets_at - app.state.config.clock.now() <= 31 * DAY_SECS);
    move_clock_to(&app, resets_at);
    assert_eq!(app.chat(&token, "a new month").await.status, StatusCode::OK);
    assert_eq!(app.balance(&token).await, 4000 - 300);
    app.assert_audit_passes().await;
}

/// A key's and a user's budget as they stand: what was spent, and in which period.
async fn spending(app: &TestApp, table: &str, id: i64) -> (i64, i64) {
    let sql = format!("SELECT budget_spent, budget_period_start FROM {table} WHERE id = $1");
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(&sql)
        .bind(id)
        .fetch_one(pool)
        .await)
    .unwrap()
}

#[tokio::test]
async fn a_call_whose_period_was_chosen_before_midnight_counts_in_the_new_day_and_takes_nothing_back(
) {
    // Two budgets of a day: the key's and the user's (from the configuration).
    let app = TestApp::with_env(&[
        ("USER_BUDGET_TOKENS", "1000"),
        ("USER_BUDGET_PERIOD", "day"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    let (key, key_id) = key_with(
        &app,
        &token,
        json!({ "budget": { "tokens": 300, "period": "day" } }),
    )
    .await;
    let user_id: i64 = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT id FROM users WHERE username = 'user'",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    let today = app.state.config.clock.now() / DAY_SECS * DAY_SECS;
    // A new day's chat comes first (the clock is a day on)...
    app.state
        .config
        .clock
        .advance(Duration::from_secs(DAY_SECS as u64));
    assert_eq!(app.chat(&key, "tomorrow").await.status, StatusCode::OK);
    let tomorrow = today + DAY_SECS;
    assert_eq!(spending(&app, "api_keys", key_id).await, (100, tomorrow));
    assert_eq!(spending(&app, "users", user_id).await, (100, tomorrow));
    // ...then one whose period an instance chose just before midnight lands.
    let yesterdays = |tokens| tokenchat::domain::BudgetUse {
        tokens,
        period_start: today,
        resets_at: Some(tomorrow),
    };
    let reserved = tokenchat::db::chats::reserve(
        &app.state.db,
        tokenchat::db::chats::NewChat {
            user_id,
            conversation_id: None,
            message: "late",
            cost: 100,
            priced: None,
            budgets: tokenchat::domain::Budgets {
                key: Some((key_id, yesterdays(300))),
                user: Some(yesterdays(1000)),
            },
            settle_within: Duration::from_secs(60),
        },
    )
    .await
    .unwrap();
    let tokenchat::db::chats::Reservation::Reserved { chat_id, .. } = reserved else {
        panic!("{reserved:?}");
    };
    // Counted in the new day, which keeps what it had spent.
    assert_eq!(spending(&app, "api_keys", key_id).await, (200, tomorrow));
    assert_eq!(spending(&app, "users", user_id).await, (200, tomorrow));
    // Refunded, it gives back to the day it was counted in.
    assert!(tokenchat::db::chats::refund(&app.state.db, chat_id)
        .await
        .unwrap());
    assert_eq!(spending(&app, "api_keys", key_id).await, (100, tomorrow));
    assert_eq!(spending(&app, "users", user_id).await, (100, tomorrow));
    app.assert_audit_passes().await;
}

/// Sets `user`'s own budget as the operator's command does.
pub(super) async fn set_user_budget(app: &TestApp, budget: Option<TokenBudget>) {
    let change = UserLimitsChange {
        budget: Some(budget),
        ..UserLimitsChange::default()
    };
    let username = Username::parse("user").unwrap();
    let config = &app.state.config;
    user_limits::change(
        &app.state.db,
        &username,
        &change,
        &config.user_limits,
        config.clock.now(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_users_budget_changed_from_total_to_monthly_and_back_keeps_the_audit_clean() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let budget = |period| TokenBudget {
        tokens: 1_000,
        period,
    };
    for (period, chats) in [
        (BudgetPeriod::Total, 2),
        (BudgetPeriod::Month, 1),
        (BudgetPeriod::Total, 2),
    ] {
        set_user_budget(&app, Some(budget(period))).await;
        for n in 0..chats {
            let chat = app.chat(&token, &format!("{period:?} {n}")).await;
            assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
        }
        app.assert_audit_passes().await;
    }
    // Into the next month, still on the total budget.
    let now = app.state.config.clock.now();
    move_clock_to(&app, now + 32 * DAY_SECS);
    assert_eq!(app.chat(&token, "later").await.status, StatusCode::OK);
    app.assert_audit_passes().await;
}
