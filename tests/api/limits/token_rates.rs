//! Model tokens a minute (`tpm`) of a key and of a user: a call is admitted while the
//! tokens its earlier calls used stay within the minute, its own counted once it is over,
//! with OpenAI's `x-ratelimit-*-tokens` headers; 429 `rate_limited` past it. The counts
//! are swept once their time is past, on SQLite too.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;

use super::{grant, key_with, patch_key};
use crate::{
    common::{Reply, TestApp, TestResponse},
    openai::completions,
    prices::usage,
};

/// Waits until the rate `name` has counted something past `after` (its calls' tokens are
/// counted once each is over, beside its answer).
async fn counted(app: &TestApp, name: &str, after: i64) -> i64 {
    for _ in 0..200 {
        let tat: Option<i64> = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
            "SELECT tat_ms FROM rate_limits WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await)
        .unwrap();
        if let Some(tat) = tat.filter(|tat| *tat > after) {
            return tat;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} counted nothing past {after}");
}

async fn ask(app: &TestApp, key: &str) -> TestResponse {
    completions(
        app,
        key,
        json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await
}

fn header(response: &TestResponse, name: &str) -> String {
    response.headers[name].to_str().unwrap().to_string()
}

#[tokio::test]
async fn a_keys_tokens_a_minute_admit_calls_until_the_minute_is_used_then_refuse_until_it_frees() {
    let app = TestApp::new().await;
    // 40 model tokens a call (30 prompt, 10 completion), whatever is asked.
    app.llm.set_reply(Reply::EchoReporting(usage(30, 0, 10, 0)));
    let token = app.user_with_token("user").await;
    let (key, id) = key_with(&app, &token, json!({ "tpm": 50 })).await;
    let first = ask(&app, &key).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "50");
    assert_eq!(header(&first, "x-ratelimit-remaining-tokens"), "50");
    assert!(!first.headers.contains_key("x-ratelimit-limit-requests"));
    let name = format!("key-tokens:{id}");
    let after_first = counted(&app, &name, 0).await;
    // The second finds 40 of the minute's 50 used: admitted, with 10 left.
    let second = ask(&app, &key).await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert_eq!(header(&second, "x-ratelimit-remaining-tokens"), "10");
    counted(&app, &name, after_first).await;
    // 80 used: refused, before the model is called, on /chat as on /v1.
    let refused = ask(&app, &key).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    assert_eq!(refused.json["error"]["code"], "rate_limit_exceeded");
    assert_eq!(header(&refused, "x-ratelimit-remaining-tokens"), "0");
    let wait: u64 = header(&refused, "retry-after").parse().unwrap();
    // 80 tokens of a 50-a-minute rate: 96 s ahead, a minute of which may be ahead.
    assert!((30..=37).contains(&wait), "{wait}");
    app.chat(&key, "and here")
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(app.llm.calls(), 2);
    // A minute on, the window has room again.
    app.state.config.clock.advance(Duration::from_secs(60));
    let again = ask(&app, &key).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    // Shown and removed like the other limits.
    let keys = app.get_authorized("/keys", &token).await;
    assert_eq!(keys.json["keys"][0]["tpm"], 50);
    let lifted = patch_key(&app, &token, id, json!({ "tpm": null })).await;
    assert_eq!(lifted.json["tpm"], serde_json::Value::Null);
    let free = ask(&app, &key).await;
    assert!(!free.headers.contains_key("x-ratelimit-limit-tokens"));
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_users_tokens_a_minute_from_the_configuration_hold_for_every_credential_of_theirs() {
    let app = TestApp::with_env(&[("USER_TPM", "100"), ("USER_RPM", "10")]).await;
    // 150 model tokens a call: one call is half a minute past the rate.
    app.llm
        .set_reply(Reply::EchoReporting(usage(100, 0, 50, 0)));
    let token = app.user_with_token("user").await;
    grant(&app, "user", 1000).await;
    let (key, _) = key_with(&app, &token, json!({})).await;
    let user_id: i64 = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT id FROM users WHERE username = 'user'",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    let first = ask(&app, &key).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "100");
    assert_eq!(header(&first, "x-ratelimit-limit-requests"), "10");
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), "9");
    counted(&app, &format!("user-tokens:{user_id}"), 0).await;
    let requests = format!("user:{user_id}");
    let requests_before = counted(&app, &requests, 0).await;
    // The minute's 100 are used, and more; the login token is the same user.
    app.chat(&token, "mine")
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let refused = ask(&app, &key).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "x-ratelimit-remaining-tokens"), "0");
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(
        counted(&app, &requests, 0).await,
        requests_before,
        "a call refused for tokens uses none of the minute's requests"
    );
}

#[tokio::test]
async fn an_embeddings_calls_tokens_count_in_its_keys_minute_too() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let (key, id) = key_with(&app, &token, json!({ "tpm": 12 })).await;
    // Eleven words: eleven of the minute's twelve tokens in one call.
    let words = "one two three four five six seven eight nine ten eleven";
    let embed = || {
        app.post_authorized(
            "/v1/embeddings",
            &key,
            json!({ "model": "llama3.2", "input": words }),
        )
    };
    let first = embed().await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "12");
    let name = format!("key-tokens:{id}");
    let after_embedding = counted(&app, &name, 0).await;
    // The minute is not used up: a chat is admitted, and its 24 pass it.
    app.llm.set_reply(Reply::EchoReporting(usage(12, 0, 12, 0)));
    let chat = ask(&app, &key).await;
    assert_eq!(
        chat.status,
        StatusCode::OK,
        "the minute is not over yet: {chat:?}"
    );
    counted(&app, &name, after_embedding).await;
    let refused = embed().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
}

#[tokio::test]
async fn a_priced_embeddings_call_that_reports_no_usage_counts_nothing_in_the_minute() {
    // Charged by its input's bound, which is no measure of use.
    let app = crate::prices::priced_app(&[]).await;
    app.llm.set_reply(Reply::EchoWithoutUsage);
    let token = app.user_with_token("user").await;
    let (key, _) = key_with(&app, &token, json!({ "tpm": 12 })).await;
    let words = "one two three four five six seven eight nine ten eleven";
    let body = json!({ "model": "llama3.2", "input": words });
    let first = app
        .post_authorized("/v1/embeddings", &key, body.clone())
        .await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(first.json["usage"].is_object(), "charged: {first:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = app.post_authorized("/v1/embeddings", &key, body).await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert_eq!(header(&second, "x-ratelimit-remaining-tokens"), "12");
}

#[tokio::test]
async fn an_absurd_usage_holds_the_rate_shut_for_a_week_at_most_and_never_breaks_it() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let (key, id) = key_with(&app, &token, json!({ "tpm": 1 })).await;
    // A model that says it used a quadrillion tokens, three times over.
    app.llm
        .set_reply(Reply::EchoReporting(usage(1_000_000_000_000_000, 0, 1, 0)));
    let name = format!("key-tokens:{id}");
    let mut last = 0;
    for n in 0..3 {
        if n > 0 {
            // Each time the minute frees (a week on), one more call.
            app.state
                .config
                .clock
                .advance(Duration::from_secs(7 * 24 * 60 * 60));
        }
        assert_eq!(ask(&app, &key).await.status, StatusCode::OK);
        last = counted(&app, &name, last).await;
    }
    let now_ms = app.state.config.clock.now_ms();
    assert!(
        last - now_ms <= 7 * 24 * 60 * 60 * 1000,
        "{last} - {now_ms}"
    );
    let refused = ask(&app, &key).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    let wait: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!(
        (6 * 24 * 60 * 60..=7 * 24 * 60 * 60).contains(&wait),
        "{wait}"
    );
}

#[tokio::test]
async fn a_priced_model_that_reports_no_usage_counts_its_answer_not_the_prompt_s_bound() {
    // tokenchat counts such an answer itself to charge it, the `/v1` prompt by its bound
    // (about 200 tokens for "hi"): the tokens a minute count the answer it counted, not the
    // bound, which is no measure of use.
    let app = crate::prices::priced_app(&[]).await;
    app.llm.set_reply(Reply::EchoWithoutUsage);
    let token = app.user_with_token("user").await;
    let (key, _) = key_with(&app, &token, json!({ "tpm": 50 })).await;
    for _ in 0..2 {
        let answered = ask(&app, &key).await;
        assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
        let chatted = app.chat(&key, "and here").await;
        assert_eq!(chatted.status, StatusCode::OK, "{chatted:?}");
    }
    // Each call's count is made beside its answer: long done by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers: i64 = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT CAST(SUM(completion_tokens) AS BIGINT) FROM chats",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert!(answers > 0 && answers < 50, "{answers}");
    let third = ask(&app, &key).await;
    assert_eq!(third.status, StatusCode::OK, "{third:?}");
    // A token every 1.2 s comes back meanwhile: at most one by now.
    let remaining: i64 = header(&third, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        (50 - answers..=51 - answers).contains(&remaining),
        "{remaining} of 50, {answers} answered"
    );
}

#[tokio::test]
async fn a_priced_stream_cut_short_counts_the_answer_it_delivered() {
    // Charged for what it delivered, it counts that much: what tokenchat counted of the
    // text, since the model reported nothing before it broke off.
    let app = crate::prices::priced_app(&[]).await;
    let token = app.user_with_token("user").await;
    let (key, _) = key_with(&app, &token, json!({ "tpm": 60 })).await;
    let events = crate::streaming::stream_to_end(&app, &key, "[die-mid-stream] a b c d").await;
    assert_eq!(events.last().unwrap().0, "error", "{events:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered: i64 = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT completion_tokens FROM chats WHERE cost > 0",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert!(delivered > 0, "{delivered}");
    let next = ask(&app, &key).await;
    assert_eq!(next.status, StatusCode::OK, "{next:?}");
    // A token a second comes back meanwhile: at most one by now.
    let remaining: i64 = header(&next, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        (60 - delivered..=61 - delivered).contains(&remaining),
        "{remaining} of 60, {delivered} delivered"
    );
}

#[tokio::test]
async fn a_keys_counts_are_swept_once_their_time_is_past_on_either_backend() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let (key, id) = key_with(&app, &token, json!({ "rpm": 100 })).await;
    assert_eq!(ask(&app, &key).await.status, StatusCode::OK);
    let name = format!("key:{id}");
    counted(&app, &name, 0).await;
    let rows = || async {
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM rate_limits WHERE name = $1",
        )
        .bind(&name)
        .fetch_one(pool)
        .await)
        .unwrap()
    };
    // Still limiting: kept.
    app.state.throttle.forget_stale().await;
    assert_eq!(rows().await, 1);
    // Five minutes on (the key since revoked, say): gone, on SQLite too.
    let past = tokenchat::clock::unix_now_ms() - 300_000;
    tokenchat::db_run!(&app.state.db, pool => sqlx::query(
        "UPDATE rate_limits SET tat_ms = $1 WHERE name = $2",
    )
    .bind(past)
    .bind(&name)
    .execute(pool)
    .await
    .map(|done| done.rows_affected()))
    .unwrap();
    app.state.throttle.forget_stale().await;
    assert_eq!(rows().await, 0);
}
