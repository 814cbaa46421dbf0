//! Several upstreams serving one model: fake upstreams on loopback ports (one refusing
//! connections, one answering 500, one slow, one busy with `Retry-After`) in combinations.
//! A call lands on a good target and is charged once; weights hold; a breaker, once open,
//! keeps every connection from a dead target until its probe; `Retry-After` is honoured; a
//! stream that dies midway is not retried; an idempotent retry never reaches a second
//! upstream; every target out is 503 `upstream_busy` with `Retry-After`.

mod breaker;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::http::StatusCode;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::{
    common::{FakeLlm, Reply, TestApp},
    prices::book_file,
    streaming::{deltas, only_chat, stream_message},
};

/// An app whose `llama3.2` is served only by `targets` (upstream name, base URL, weight,
/// priority), each upstream named in the configuration file, with `overrides`.
pub(crate) struct RoutedApp {
    pub app: TestApp,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for RoutedApp {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// The configuration file serving `llama3.2` from `targets`.
pub(crate) fn routing_file(targets: &[(&str, &str, u32, u32)]) -> String {
    let mut file = String::new();
    for (name, base_url, _, _) in targets {
        file.push_str(&format!(
            "[upstreams.{name}]\nbase_url = \"{base_url}\"\n\n"
        ));
    }
    file.push_str("[models.\"llama3.2\"]\ntargets = [\n");
    for (name, _, weight, priority) in targets {
        file.push_str(&format!(
            "  {{ upstream = \"{name}\", weight = {weight}, priority = {priority} }},\n"
        ));
    }
    file.push_str("]\n");
    file
}

pub(crate) async fn routed_app(
    targets: &[(&str, &str, u32, u32)],
    overrides: &[(&str, &str)],
) -> RoutedApp {
    let (dir, path) = book_file(&routing_file(targets));
    let mut vars = vec![("CONFIG_FILE", path.as_str()), ("LLM_BASE_URL", "")];
    vars.extend_from_slice(overrides);
    RoutedApp {
        app: TestApp::with_env(&vars).await,
        _dir: dir,
    }
}

/// An upstream that takes connections and closes them at once, counting them: a dead
/// server behind a live port.
pub(crate) struct DeadUpstream {
    pub base_url: String,
    connections: Arc<AtomicUsize>,
}

impl DeadUpstream {
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Self {
            base_url,
            connections,
        }
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A loopback address nothing listens on: connections are refused.
pub(crate) async fn refusing_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}/v1")
}

/// The upstream and attempts the chat `id`'s row records.
pub(crate) async fn served_by(app: &TestApp, id: i64) -> (Option<String>, Option<i64>) {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(
        "SELECT upstream, attempts FROM chats WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await)
    .unwrap()
}

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
    let rejecting = FakeLlm::start().await;
    rejecting.set_reply(Reply::Reject(400));
    let other = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("rejecting", &rejecting.base_url, 1, 0),
            ("other", &other.base_url, 1, 1),
        ],
        &[],
    )
    .await;
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
async fn a_busy_targets_retry_after_is_honoured_before_it_is_asked_again() {
    let busy = FakeLlm::start().await;
    busy.set_reply(Reply::Busy {
        status: 429,
        retry_after: Some("2"),
    });
    let spare = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("busy", &busy.base_url, 1, 0),
            ("spare", &spare.base_url, 1, 1),
        ],
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
    let retry_after: u64 = chat.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((2..=3).contains(&retry_after), "{retry_after}");
    // Asked again at once: nothing is tried, the answer the same.
    let again = app.chat(&token, "hello").await;
    again.assert_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_busy");
    assert_eq!((first.calls(), second.calls()), (1, 1));
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_that_dies_midway_is_not_retried_and_is_refunded() {
    let dying = FakeLlm::start().await;
    dying.set_reply(Reply::DieMidStream { after_words: 0 });
    let spare = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("dying", &dying.base_url, 1, 0),
            ("spare", &spare.base_url, 1, 1),
        ],
        &[],
    )
    .await;
    let token = app.user_with_token("user").await;
    let events = stream_message(&app, &token, "hello")
        .await
        .events()
        .rest()
        .await;
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
    let failing = FakeLlm::start().await;
    failing.set_reply(Reply::Status(502));
    let good = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("failing", &failing.base_url, 1, 0),
            ("good", &good.base_url, 1, 1),
        ],
        &[],
    )
    .await;
    let token = app.user_with_token("user").await;
    let events = stream_message(&app, &token, "hello there")
        .await
        .events()
        .rest()
        .await;
    assert_eq!(deltas(&events).concat(), "Echo: hello there", "{events:?}");
    let chat = only_chat(&app, &token).await;
    assert_eq!(
        (chat["status"].as_str(), chat["upstream"].as_str()),
        (Some("answered"), Some("good"))
    );
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
    let failing = FakeLlm::start().await;
    failing.set_reply(Reply::Status(500));
    let good = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("failing", &failing.base_url, 1, 0),
            ("good", &good.base_url, 1, 1),
        ],
        &[],
    )
    .await;
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
