//! Falling back: past refusing, dead, failing targets to a good one, charged once; never
//! after a rejection, an answer begun, or an idempotent answer; weights; keys and headers
//! per upstream.

use std::time::Duration;

use axum::http::StatusCode;
use futures_util::StreamExt;
use serde_json::json;

use super::{first_and_fallback, refusing_url, routed_app, served_by, DeadUpstream};
use crate::{
    common::{FakeLlm, Reply, TestApp},
    prices::book_file,
    streaming::{deltas, only_chat, stream_to_end},
};

#[tokio::test]
async fn a_call_passes_a_refusing_a_dead_and_a_failing_target_to_land_on_a_good_one_charged_once() {
    let refusing = refusing_url().await;
    let dead = DeadUpstream::start().await;
    let failing = FakeLlm::start().await;
    failing.set_reply(Reply::Status(500));
    let good = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("refusing", &refusing, 1, 0),
            ("dead", &dead.base_url, 1, 1),
            ("failing", &failing.base_url, 1, 2),
            ("good", &good.base_url, 1, 3),
        ],
        &[("UPSTREAM_MAX_ATTEMPTS", "4")],
    )
    .await;
    let token = app.user_with_token("user").await;
    let chat = app.chat(&token, "hello").await;
    assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
    assert_eq!(chat.json["response"], "Echo: hello");
    assert_eq!(chat.json["tokens"], 3900, "charged once: {chat:?}");
    assert_eq!(dead.connections(), 1);
    assert_eq!((failing.calls(), good.calls()), (1, 1));
    let id = chat.json["chat_id"].as_i64().unwrap();
    assert_eq!(served_by(&app, id).await, (Some("good".into()), Some(4)));
    let shown = only_chat(&app, &token).await;
    assert_eq!(shown["upstream"], "good", "{shown}");
    assert_eq!(shown["tokens_charged"], 100);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_call_gives_up_after_the_most_attempts_refunded() {
    let failing: Vec<FakeLlm> =
        futures_util::future::join_all((0..3).map(|_| FakeLlm::start())).await;
    for fake in &failing {
        fake.set_reply(Reply::Status(500));
    }
    let app = routed_app(
        &[
            ("a", &failing[0].base_url, 1, 0),
            ("b", &failing[1].base_url, 1, 0),
            ("c", &failing[2].base_url, 1, 0),
        ],
        &[("UPSTREAM_MAX_ATTEMPTS", "2")],
    )
    .await;
    let token = app.user_with_token("user").await;
    let chat = app.chat(&token, "hello").await;
    chat.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    let calls: usize = failing.iter().map(FakeLlm::calls).sum();
    assert_eq!(calls, 2, "two targets tried, the third never");
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_request_the_model_rejects_is_not_retried_anywhere() {
    let (app, rejecting, other) =
        first_and_fallback(("rejecting", Reply::Reject(400)), "other", &[]).await;
    let token = app.user_with_token("user").await;
    let chat = app.chat(&token, "hello").await;
    chat.assert_error(StatusCode::BAD_REQUEST, "upstream_rejected");
    assert_eq!((rejecting.calls(), other.calls()), (1, 0));
    assert_eq!(app.balance(&token).await, 4000);
}

#[tokio::test]
async fn calls_are_shared_by_weight_within_a_few_percent_over_a_thousand() {
    let heavy = FakeLlm::start().await;
    let light = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("heavy", &heavy.base_url, 3, 0),
            ("light", &light.base_url, 1, 0),
        ],
        &[("CHAT_COST", "1"), ("INITIAL_TOKENS", "100000")],
    )
    .await;
    let token = app.user_with_token("user").await;
    // Eight at a time, as clients would send them.
    let chats = futures_util::stream::iter(0..1000)
        .map(|n| {
            let (app, token) = (&app, &token);
            async move { app.chat(token, &format!("n{n}")).await.status }
        })
        .buffer_unordered(8);
    let statuses: Vec<StatusCode> = chats.collect().await;
    assert!(statuses.iter().all(|status| *status == StatusCode::OK));
    let (heavy, light) = (heavy.calls() as f64, light.calls() as f64);
    assert_eq!(heavy + light, 1000.0);
    assert!((heavy / 1000.0 - 0.75).abs() < 0.02, "{heavy} : {light}");
}

#[tokio::test]
async fn a_stream_that_dies_midway_is_not_retried_and_is_refunded() {
    let (app, dying, spare) = first_and_fallback(
        ("dying", Reply::DieMidStream { after_words: 0 }),
        "spare",
        &[],
    )
    .await;
    let token = app.user_with_token("user").await;
    let events = stream_to_end(&app, &token, "hello").await;
    let (name, _) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert!(deltas(&events).concat().is_empty());
    assert_eq!((dying.calls(), spare.calls()), (1, 0));
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "failed");
    assert_eq!(
        chat["upstream"], "dying",
        "the partial answer names its upstream"
    );
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_streamed_chat_falls_back_before_its_first_byte() {
    let (app, failing, good) =
        first_and_fallback(("failing", Reply::Status(502)), "good", &[]).await;
    let token = app.user_with_token("user").await;
    let events = stream_to_end(&app, &token, "hello there").await;
    assert_eq!(deltas(&events).concat(), "Echo: hello there", "{events:?}");
    let chat = only_chat(&app, &token).await;
    assert_eq!(
        (chat["status"].as_str(), chat["upstream"].as_str()),
        (Some("answered"), Some("good"))
    );
    assert_eq!((failing.calls(), good.calls()), (1, 1));
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn an_idempotent_retry_never_reaches_a_second_upstream_after_the_first_answered() {
    let one = FakeLlm::start().await;
    let two = FakeLlm::start().await;
    let app = routed_app(
        &[("one", &one.base_url, 1, 0), ("two", &two.base_url, 1, 0)],
        &[],
    )
    .await;
    let token = app.user_with_token("user").await;
    let bearer = format!("Bearer {token}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", bearer.as_str()),
        ("idempotency-key", "retry-1"),
    ];
    let send = || {
        app.request(
            axum::http::Method::POST,
            "/chat",
            &headers,
            json!({ "message": "hello" }).to_string(),
        )
    };
    let first = send().await;
    let again = send().await;
    let replayed = send().await;
    assert_eq!(first.status, StatusCode::OK);
    for retry in [&again, &replayed] {
        assert_eq!(retry.json["chat_id"], first.json["chat_id"], "{retry:?}");
        assert_eq!(retry.json["response"], first.json["response"]);
    }
    assert_eq!(one.calls() + two.calls(), 1, "one upstream answered, once");
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn v1_falls_back_the_same_way_and_its_errors_are_openai_objects() {
    let (app, failing, good) =
        first_and_fallback(("failing", Reply::Status(500)), "good", &[]).await;
    let token = app.user_with_token("user").await;
    let key = app
        .post_authorized("/keys", &token, json!({ "name": "sdk" }))
        .await;
    let key = key.json["key"].as_str().unwrap().to_string();
    let ask = |stream: bool| {
        app.post_authorized(
            "/v1/chat/completions",
            &key,
            json!({
                "model": "llama3.2",
                "stream": stream,
                "messages": [{ "role": "user", "content": "hi" }],
            }),
        )
    };
    let answered = ask(false).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    assert_eq!(
        answered.json["choices"][0]["message"]["content"],
        "Echo: hi"
    );
    let received = good.received();
    assert_eq!(received[0].body["model"], "llama3.2");
    good.set_reply(Reply::Busy {
        status: 429,
        retry_after: Some("5"),
    });
    let busy = ask(false).await;
    assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE, "{busy:?}");
    assert!(busy.json["error"]["message"].is_string(), "{busy:?}");
    assert!(busy.headers.contains_key("retry-after"));
    assert_eq!((failing.calls(), good.calls()), (2, 2));
}

#[tokio::test]
async fn each_upstream_gets_its_own_key_from_its_variable_and_its_headers_and_model_name() {
    let primary = FakeLlm::start().await;
    let local = FakeLlm::start().await;
    let file = format!(
        r#"
[upstreams.primary]
base_url = "{}"
api_key_env = "PRIMARY_KEY"
headers = {{ "X-Title" = "tokenchat" }}

[upstreams.local]
base_url = "{}"

[models."llama3.2"]
targets = [
  {{ upstream = "primary", model = "meta-llama/llama-3.2-3b", priority = 0 }},
  {{ upstream = "local", priority = 1 }},
]
"#,
        primary.base_url, local.base_url
    );
    let (_dir, path) = book_file(&file);
    let app = TestApp::with_env(&[
        ("CONFIG_FILE", path.as_str()),
        ("LLM_BASE_URL", ""),
        ("PRIMARY_KEY", "sk-primary-secret"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    assert_eq!(app.chat(&token, "hello").await.status, StatusCode::OK);
    let sent = &primary.received()[0];
    assert_eq!(
        sent.authorization.as_deref(),
        Some("Bearer sk-primary-secret")
    );
    assert_eq!(sent.headers["x-title"], "tokenchat");
    assert_eq!(sent.body["model"], "meta-llama/llama-3.2-3b");
    primary.set_reply(Reply::Status(500));
    assert_eq!(app.chat(&token, "again").await.status, StatusCode::OK);
    let fallback = &local.received()[0];
    assert_eq!(fallback.authorization, None, "no key of another upstream");
    assert!(!fallback.headers.contains_key("x-title"));
    assert_eq!(fallback.body["model"], "llama3.2");
    let ready = app
        .request_raw(axum::http::Method::GET, "/ready", &[], "")
        .await
        .2;
    assert!(ready.contains("\"name\":\"primary\""), "{ready}");
    assert!(!ready.contains("sk-primary-secret"), "{ready}");
    let models = app.get_authorized("/v1/models", &token).await;
    assert_eq!(models.json["data"][0]["id"], "llama3.2", "{models:?}");
}

#[tokio::test]
async fn a_target_slow_to_begin_its_answer_is_passed_after_its_time_out() {
    let (app, slow, good) = first_and_fallback(
        ("slow", Reply::Stall(Duration::from_secs(5))),
        "good",
        &[("LLM_TIMEOUT_SECS", "1")],
    )
    .await;
    let token = app.user_with_token("user").await;
    let started = std::time::Instant::now();
    let chat = app.chat(&token, "hello").await;
    assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let id = chat.json["chat_id"].as_i64().unwrap();
    assert_eq!(served_by(&app, id).await, (Some("good".into()), Some(2)));
    assert_eq!((slow.calls(), good.calls()), (1, 1));
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn an_upstream_at_its_most_concurrent_calls_is_passed_and_alone_it_is_busy() {
    let narrow = FakeLlm::start().await;
    narrow.set_reply(Reply::Stall(Duration::from_millis(800)));
    let wide = FakeLlm::start().await;
    let file = |with_wide: bool| {
        let mut file = format!(
            "[upstreams.narrow]\nbase_url = \"{}\"\nmax_concurrent = 1\n\n",
            narrow.base_url
        );
        if with_wide {
            file.push_str(&format!(
                "[upstreams.wide]\nbase_url = \"{}\"\n\n",
                wide.base_url
            ));
        }
        file.push_str("[models.\"llama3.2\"]\ntargets = [{ upstream = \"narrow\" }");
        if with_wide {
            file.push_str(", { upstream = \"wide\", priority = 1 }");
        }
        file.push_str("]\n");
        file
    };
    for with_wide in [true, false] {
        let (_dir, path) = book_file(&file(with_wide));
        let app = TestApp::with_env(&[("CONFIG_FILE", path.as_str()), ("LLM_BASE_URL", "")]).await;
        let token = app.user_with_token("user").await;
        let (first, second) = tokio::join!(app.chat(&token, "one"), async {
            // The first is in flight at the narrow upstream by then.
            tokio::time::sleep(Duration::from_millis(200)).await;
            app.chat(&token, "two").await
        });
        assert_eq!(first.status, StatusCode::OK, "{first:?}");
        if with_wide {
            assert_eq!(second.status, StatusCode::OK, "{second:?}");
            let id = second.json["chat_id"].as_i64().unwrap();
            assert_eq!(served_by(&app, id).await, (Some("wide".into()), Some(1)));
        } else {
            second.assert_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_busy");
            assert_eq!(second.headers["retry-after"], "1");
            assert_eq!(
                app.balance(&token).await,
                3900,
                "the busy one costs nothing"
            );
        }
    }
    assert_eq!(narrow.calls(), 2, "never two at once");
    assert_eq!(wide.calls(), 1);
}

#[tokio::test]
async fn a_chat_still_falling_back_is_not_refunded_before_its_last_target_could_answer() {
    // The first target hangs past its time-out (LLM_TIMEOUT_SECS, 1 s); the second may take
    // 30 s. A chat's deadline must cover both, not LLM_TIMEOUT_SECS alone: a sweep 10 s on
    // (of any instance) must leave it pending, or the answer that comes is thrown away.
    let hanging = FakeLlm::start().await;
    hanging.set_reply(Reply::Stall(Duration::from_secs(5)));
    let patient = FakeLlm::start().await;
    let file = format!(
        "[upstreams.hanging]\nbase_url = \"{}\"\n\n\
         [upstreams.patient]\nbase_url = \"{}\"\ntimeout_secs = 30\n\n\
         [models.\"llama3.2\"]\ntargets = [\n\
         {{ upstream = \"hanging\", priority = 0 }},\n\
         {{ upstream = \"patient\", priority = 1 }},\n]\n",
        hanging.base_url, patient.base_url
    );
    let (_dir, path) = book_file(&file);
    let app = TestApp::with_env(&[
        ("CONFIG_FILE", path.as_str()),
        ("LLM_BASE_URL", ""),
        ("LLM_TIMEOUT_SECS", "1"),
        ("LLM_STREAM_MAX_SECS", "40"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    let now = tokenchat::db::unix_now();
    let sweep_meanwhile = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.state.recovery.sweep(now + 10).await.unwrap()
    };
    let (chat, swept) = tokio::join!(app.chat(&token, "hello"), sweep_meanwhile);
    assert_eq!(swept.refunded_chats, 0, "{swept:?}");
    assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
    assert_eq!(chat.json["tokens"], 3900);
    let id = chat.json["chat_id"].as_i64().unwrap();
    assert_eq!(served_by(&app, id).await, (Some("patient".into()), Some(2)));

    // The deadlines recorded: both targets' whole time-outs, the pause between (at most
    // 0.2 s) and 5 s to settle; for a stream, its last attempt up to LLM_STREAM_MAX_SECS.
    hanging.set_reply(Reply::Status(500));
    let streamed = stream_to_end(&app, &token, "again").await;
    assert_eq!(deltas(&streamed).concat(), "Echo: again", "{streamed:?}");
    let deadlines: Vec<i64> = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT deadline_at - created_at FROM chats ORDER BY id",
    )
    .fetch_all(pool)
    .await)
    .unwrap();
    assert_eq!(deadlines, [30 + 30 + 5, 30 + 40 + 5]);
    app.assert_audit_passes().await;
}
