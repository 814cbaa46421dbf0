//! Busy upstreams: a `Retry-After` keeps its target alone that long; every target busy is
//! 503 `upstream_busy` with the soonest, and the official SDK waits it and succeeds.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{first_and_fallback, retry_after, routed_app, served_by};
use crate::common::{FakeLlm, Reply};

#[tokio::test]
async fn a_busy_targets_retry_after_is_honoured_before_it_is_asked_again() {
    let (app, busy, spare) = first_and_fallback(
        (
            "busy",
            Reply::Busy {
                status: 429,
                retry_after: Some("2"),
            },
        ),
        "spare",
        &[],
    )
    .await;
    let token = app.user_with_token("user").await;
    let first = app.chat(&token, "one").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let id = first.json["chat_id"].as_i64().unwrap();
    assert_eq!(served_by(&app, id).await, (Some("spare".into()), Some(2)));
    let second = app.chat(&token, "two").await;
    let id = second.json["chat_id"].as_i64().unwrap();
    assert_eq!(served_by(&app, id).await, (Some("spare".into()), Some(1)));
    assert_eq!(busy.calls(), 1, "left alone while it asked to be");
    assert_eq!(spare.calls(), 2);
    busy.set_reply(Reply::Echo);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let third = app.chat(&token, "three").await;
    let id = third.json["chat_id"].as_i64().unwrap();
    assert_eq!(served_by(&app, id).await, (Some("busy".into()), Some(1)));
    assert_eq!(app.balance(&token).await, 3700);
}

#[tokio::test]
async fn every_target_busy_is_503_upstream_busy_with_the_soonest_retry_after_and_no_charge() {
    let first = FakeLlm::start().await;
    let second = FakeLlm::start().await;
    first.set_reply(Reply::Busy {
        status: 429,
        retry_after: Some("7"),
    });
    second.set_reply(Reply::Busy {
        status: 503,
        retry_after: Some("3"),
    });
    let app = routed_app(
        &[
            ("first", &first.base_url, 1, 0),
            ("second", &second.base_url, 1, 1),
        ],
        &[],
    )
    .await;
    let token = app.user_with_token("user").await;
    let chat = app.chat(&token, "hello").await;
    chat.assert_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_busy");
    let retry_after = retry_after(&chat);
    assert!((2..=3).contains(&retry_after), "{retry_after}");
    // Asked again at once: nothing is tried, the answer the same.
    let again = app.chat(&token, "hello").await;
    again.assert_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_busy");
    assert_eq!((first.calls(), second.calls()), (1, 1));
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn every_target_rate_limited_makes_the_official_sdk_wait_its_retry_after_and_succeed() {
    let Ok(python) = std::env::var("TOKENCHAT_SDK_PYTHON") else {
        println!("SDK test skipped: set TOKENCHAT_SDK_PYTHON to a Python with `openai`");
        return;
    };
    let first = FakeLlm::start().await;
    let second = FakeLlm::start().await;
    for fake in [&first, &second] {
        fake.set_reply(Reply::Busy {
            status: 429,
            retry_after: Some("1"),
        });
    }
    let app = routed_app(
        &[
            ("first", &first.base_url, 1, 0),
            ("second", &second.base_url, 1, 0),
        ],
        &[],
    )
    .await;
    let base = crate::server::serve_in_process(&app).await;
    let token = app.user_with_token("user").await;
    let key = app
        .post_authorized("/keys", &token, json!({ "name": "sdk" }))
        .await;
    let key = key.json["key"].as_str().unwrap().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/upstream_busy.py");
    let mut command = std::process::Command::new(&python);
    command
        .arg(script)
        .env("BASE_URL", format!("{base}/v1"))
        .env("API_KEY", &key);
    let run = tokio::task::spawn_blocking(move || command.output());
    // Both targets said they are busy: they recover while the SDK waits.
    crate::server::wait_until(|| async { first.calls() + second.calls() >= 2 }).await;
    first.set_reply(Reply::Echo);
    second.set_reply(Reply::Echo);
    let output = run.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["content"], "Echo: hello");
    // The SDK logs a retry in two lines; the fake's count below says it was one.
    assert!(seen["retries"].as_u64().unwrap() >= 1, "{seen}");
    assert!(seen["waited"].as_f64().unwrap() >= 0.9, "{seen}");
    assert_eq!(
        first.calls() + second.calls(),
        3,
        "two busy, then one answer"
    );
    assert_eq!(app.balance(&token).await, 3900);
}
