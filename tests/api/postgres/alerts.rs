//! Alerts across two processes on one PostgreSQL database: both see the crossing of one
//! key's budget, and the claim in the database lets one of them, and only one, send it.

use serde_json::json;

use super::{chat, http_client, TwoInstances};
use crate::alerts::Receiver;

#[tokio::test]
async fn two_processes_pushing_one_key_across_its_threshold_at_once_send_one_event() {
    let mut receiver = Receiver::start(0).await;
    let Some(pair) = TwoInstances::start(&[
        ("INITIAL_TOKENS", "100000"),
        ("ALERT_WEBHOOK_URL", receiver.url.as_str()),
        ("ALERT_WEBHOOK_SECRET", "two-process-secret"),
        ("ALERT_THRESHOLDS", "0.8"),
    ])
    .await
    else {
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
    // Thirty chats fit; from the twenty-fourth on, every settled one is past 80%, on both.
    let answered = pair.race_chats(&http, &key, 100).await;
    assert_eq!(answered, 30);
    let first = receiver.next().await;
    assert!(first.signed_with("two-process-secret"), "{first:?}");
    let event = first.json();
    assert_eq!(event["type"], "key_budget", "{event}");
    assert_eq!(event["key_name"], "agent");
    assert!(event["spent"].as_i64().unwrap() >= 2400, "{event}");
    // A crossing of a fresh key on each process: each worker takes its checks in order, so
    // once both have come any second event of the race's crossing would have been sent.
    for (name, base) in [("first", &pair.first.base), ("second", &pair.second.base)] {
        let marker = pair
            .key(
                &http,
                &token,
                json!({ "name": name, "budget": { "tokens": 100, "period": "month" } }),
            )
            .await;
        assert_eq!(chat(&http, base, &marker, None).await, 200);
    }
    let mut markers = Vec::new();
    for _ in 0..2 {
        let delivery = receiver.next().await;
        markers.push(delivery.json()["key_name"].as_str().unwrap().to_string());
    }
    markers.sort();
    assert_eq!(markers, ["first", "second"], "the race's crossing once");
    assert!(receiver.already_received().is_empty());
    assert_eq!(
        pair.scalar("SELECT COUNT(*) FROM alerts WHERE kind = 'key_budget'")
            .await,
        3
    );
}
