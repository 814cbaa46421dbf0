//! Limits per API key and per user across two processes on one PostgreSQL database: a
//! key's budget, its requests a minute and a user's budget hold for both together, as for
//! one.

use serde_json::json;

use super::{chat, http_client, TwoInstances};

#[tokio::test]
async fn two_processes_racing_on_a_key_whose_budget_covers_thirty_answer_thirty() {
    let Some(pair) = TwoInstances::start(&[("INITIAL_TOKENS", "100000")]).await else {
        return;
    };
    let http = http_client();
    let token = pair.user(&http).await;
    let key = pair
        .key(
            &http,
            &token,
            json!({ "name": "agent", "budget": { "tokens": 3000, "period": "month" } }),
        )
        .await;
    let answered = pair.race_chats(&http, &key, 200).await;
    assert_eq!(answered, 30, "the budget buys thirty chats at 100");
    assert_eq!(pair.llm.calls(), 30);
    assert_eq!(pair.scalar("SELECT budget_spent FROM api_keys").await, 3000);
    assert_eq!(
        pair.scalar("SELECT tokens FROM users").await,
        100_000 - 3000
    );
    let audit = pair.audit();
    assert!(audit.status.success(), "{audit:?}");
}

#[tokio::test]
async fn two_processes_share_one_keys_requests_a_minute() {
    let Some(pair) = TwoInstances::start(&[("INITIAL_TOKENS", "100000")]).await else {
        return;
    };
    let http = http_client();
    let token = pair.user(&http).await;
    let key = pair
        .key(&http, &token, json!({ "name": "agent", "rpm": 30 }))
        .await;
    let chats: Vec<_> = (0..100)
        .map(|n| {
            let base = [&pair.first.base, &pair.second.base][n % 2].clone();
            let (http, key) = (http.clone(), key.clone());
            tokio::spawn(async move { chat(&http, &base, &key, None).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for chat in chats {
        statuses.push(chat.await.unwrap());
    }
    let admitted = statuses.iter().filter(|status| **status == 200).count();
    let limited = statuses.iter().filter(|status| **status == 429).count();
    assert_eq!(
        (admitted, limited),
        (30, 70),
        "one minute of thirty, shared"
    );
    assert_eq!(pair.llm.calls(), 30);
}

#[tokio::test]
async fn two_processes_racing_on_a_users_budget_from_the_configuration_answer_thirty() {
    let Some(pair) = TwoInstances::start(&[
        ("INITIAL_TOKENS", "100000"),
        ("USER_BUDGET_TOKENS", "3000"),
        ("USER_BUDGET_PERIOD", "week"),
    ])
    .await
    else {
        return;
    };
    let http = http_client();
    let token = pair.user(&http).await;
    let answered = pair.race_chats(&http, &token, 200).await;
    assert_eq!(answered, 30, "the user's budget buys thirty chats at 100");
    assert_eq!(pair.llm.calls(), 30);
    assert_eq!(pair.scalar("SELECT budget_spent FROM users").await, 3000);
    assert_eq!(
        pair.scalar("SELECT tokens FROM users").await,
        100_000 - 3000
    );
    let audit = pair.audit();
    assert!(audit.status.success(), "{audit:?}");
}
