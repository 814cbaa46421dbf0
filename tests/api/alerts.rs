//! Alerts (issue 27): when a key's budget or a user's balance crosses a configured fraction
//! spent, one JSON event to `ALERT_WEBHOOK_URL`, signed with HMAC-SHA256 of its body under
//! `ALERT_WEBHOOK_SECRET`, retried when the receiver fails, once per crossing, and never in
//! a chat's way. The receiver is a small server on loopback in the test.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
    Router,
};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::{
    common::{TestApp, TestResponse},
    server::{serve_in_process, Server},
};

const SECRET: &str = "alert-secret-for-tests";

/// One request the receiver got: its signature header and raw body.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub signature: Option<String>,
    pub body: Bytes,
}

impl Delivery {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// Whether the signature is `sha256=` and the hex HMAC-SHA256 of the raw body under
    /// `secret`, computed here independently of tokenchat.
    pub fn signed_with(&self, secret: &str) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&self.body);
        let expected = format!("sha256={:x}", mac.finalize().into_bytes());
        self.signature.as_deref() == Some(expected.as_str())
    }
}

/// A webhook receiver on `127.0.0.1:0` that answers 500 to its first `fail_first`
/// requests and 200 after, passing on each request it got.
pub(crate) struct Receiver {
    pub url: String,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
}

#[derive(Clone)]
struct Receiving {
    sink: mpsc::UnboundedSender<Delivery>,
    failures_left: Arc<Mutex<usize>>,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> Self {
        let (sink, deliveries) = mpsc::unbounded_channel();
        let receiving = Receiving {
            sink,
            failures_left: Arc::new(Mutex::new(fail_first)),
        };
        let app = Router::new()
            .route("/hook/{token}", post(receive))
            .with_state(receiving);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hook/path-token-xyz",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, deliveries }
    }

    /// The next request, waited for up to twenty seconds.
    pub async fn next(&mut self) -> Delivery {
        tokio::time::timeout(Duration::from_secs(20), self.deliveries.recv())
            .await
            .expect("no alert within twenty seconds")
            .unwrap()
    }

    /// The requests already received and not yet read.
    pub fn already_received(&mut self) -> Vec<Delivery> {
        std::iter::from_fn(|| self.deliveries.try_recv().ok()).collect()
    }
}

async fn receive(
    State(receiving): State<Receiving>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let signature = headers
        .get("x-tokenchat-signature")
        .map(|value| value.to_str().unwrap().to_string());
    let _ = receiving.sink.send(Delivery { signature, body });
    let mut failures_left = receiving.failures_left.lock().unwrap();
    if *failures_left > 0 {
        *failures_left -= 1;
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    StatusCode::OK
}

/// An app alerting to `url` at `thresholds`, with its background worker running.
async fn alerting_app(url: &str, thresholds: &str, more: &[(&str, &str)]) -> TestApp {
    let mut vars = vec![
        ("ALERT_WEBHOOK_URL", url),
        ("ALERT_WEBHOOK_SECRET", SECRET),
        ("ALERT_THRESHOLDS", thresholds),
    ];
    vars.extend_from_slice(more);
    let app = TestApp::with_env(&vars).await;
    // `serve` runs the alert worker beside serving; requests still go to `app`'s router,
    // which shares its state.
    serve_in_process(&app).await;
    app
}

/// A new key of the user of `token` with a budget of `tokens` a `period`: its id and key.
async fn key_with_budget(app: &TestApp, token: &str, name: &str, tokens: i64) -> (i64, String) {
    let created = app
        .post_authorized(
            "/keys",
            token,
            json!({ "name": name, "budget": { "tokens": tokens, "period": "day" } }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    (
        created.json["id"].as_i64().unwrap(),
        created.json["key"].as_str().unwrap().to_string(),
    )
}

#[track_caller]
fn assert_answered(chat: &TestResponse) {
    assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
}

async fn alert_rows(app: &TestApp) -> i64 {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM alerts")
        .fetch_one(pool)
        .await)
    .unwrap()
}

#[tokio::test]
async fn a_key_budget_crossing_is_posted_once_signed_and_later_chats_past_it_post_nothing_more() {
    let mut receiver = Receiver::start(0).await;
    let app = alerting_app(&receiver.url, "0.8", &[]).await;
    let token = app.user_with_token("user").await;
    let (key_id, key) = key_with_budget(&app, &token, "agent", 1000).await;
    for _ in 0..8 {
        assert_answered(&app.chat(&key, "hello").await);
    }
    // The eighth chat spent 800 of 1000: 80%.
    let first = receiver.next().await;
    assert!(first.signed_with(SECRET), "{first:?}");
    assert!(!first.signed_with("another secret"));
    let event = first.json();
    let today = tokenchat::clock::unix_now() / 86_400 * 86_400;
    assert_eq!(event["type"], "key_budget", "{event}");
    assert_eq!(event["key_id"], key_id);
    assert_eq!(event["key_name"], "agent");
    assert_eq!(event["username"], "user");
    assert_eq!(event["threshold"], 0.8);
    assert_eq!(event["spent"], 800, "sent when the crossing chat settled");
    assert_eq!(event["budget_tokens"], 1000);
    assert_eq!(event["period"], "day");
    assert_eq!(event["period_start"], tokenchat::rfc3339(today));
    assert_eq!(event["resets_at"], tokenchat::rfc3339(today + 86_400));
    assert!(event["id"].is_i64(), "{event}");
    let created_at = event["created_at"].as_str().unwrap();
    assert!(tokenchat::clock::parse_rfc3339(created_at).is_some());

    // Past the threshold twice more, then the budget's end: still the one crossing.
    assert_answered(&app.chat(&key, "hello").await);
    assert_answered(&app.chat(&key, "hello").await);
    let refused = app.chat(&key, "hello").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
    // A second key crossing after them: its event comes after any the chats above caused
    // (one worker takes the checks in order), so it marks when to count.
    let (marker_id, marker) = key_with_budget(&app, &token, "marker", 100).await;
    assert_answered(&app.chat(&marker, "hello").await);
    let second = receiver.next().await;
    assert_eq!(second.json()["key_id"], marker_id, "{:?}", second.json());
    assert!(second.signed_with(SECRET));
    assert!(
        receiver.already_received().is_empty(),
        "one event a crossing"
    );
    assert_eq!(alert_rows(&app).await, 2);
    // The balance, 1100 of 4000 spent, crossed nothing.
    assert_eq!(app.balance(&token).await, 2900);
}

#[tokio::test]
async fn a_budget_given_a_longer_period_is_still_watched_and_crosses_in_its_new_period() {
    let mut receiver = Receiver::start(0).await;
    let app = alerting_app(&receiver.url, "0.8", &[]).await;
    let token = app.user_with_token("user").await;
    let (key_id, key) = key_with_budget(&app, &token, "agent", 1000).await;
    assert_answered(&app.chat(&key, "hello").await);
    // A month of 1000 from today's 100 spent: the eighth chat of it crosses 80%.
    let monthly = json!({ "budget": { "tokens": 1000, "period": "month" } });
    let authorization = format!("Bearer {token}");
    let changed = app
        .request(
            axum::http::Method::PATCH,
            &format!("/keys/{key_id}"),
            &[
                ("authorization", authorization.as_str()),
                ("content-type", "application/json"),
            ],
            monthly.to_string(),
        )
        .await;
    assert_eq!(changed.json["spent"], 100, "{changed:?}");
    for _ in 0..7 {
        assert_answered(&app.chat(&key, "hello").await);
    }
    let event = receiver.next().await.json();
    assert_eq!(event["key_id"], key_id, "{event}");
    assert_eq!(event["period"], "month");
    assert_eq!(event["spent"], 800);
}

#[tokio::test]
async fn a_balance_crossing_is_posted_once_and_a_grant_re_arms_it() {
    let mut receiver = Receiver::start(0).await;
    let app = alerting_app(&receiver.url, "0.5", &[("INITIAL_TOKENS", "1000")]).await;
    let token = app.user_with_token("user").await;
    for _ in 0..5 {
        assert_answered(&app.chat(&token, "hello").await);
    }
    let first = receiver.next().await;
    assert!(first.signed_with(SECRET));
    let event = first.json();
    assert_eq!(event["type"], "balance", "{event}");
    assert_eq!(event["username"], "user");
    assert_eq!(event["threshold"], 0.5);
    assert_eq!(event["balance"], 500);
    assert_eq!(event["spent"], 500);
    assert_eq!(event["cycle_start_balance"], 1000);
    assert!(event["user_id"].is_i64());
    assert!(tokenchat::clock::parse_rfc3339(event["cycle_started_at"].as_str().unwrap()).is_some());
    assert_answered(&app.chat(&token, "hello").await);

    // A grant starts a new cycle: half of the 1400 it leaves is 700 more.
    let user = tokenchat::domain::Username::parse("user").unwrap();
    let amount = tokenchat::domain::GrantAmount::parse(1000).unwrap();
    let granted = tokenchat::services::accounts::grant(&app.state.db, &user, amount)
        .await
        .unwrap();
    assert_eq!(granted, 1400);
    for _ in 0..7 {
        assert_answered(&app.chat(&token, "hello").await);
    }
    let second = receiver.next().await;
    let event = second.json();
    assert_eq!(event["cycle_start_balance"], 1400, "{event}");
    assert_eq!(event["balance"], 700);
    assert_eq!(event["spent"], 700);
    assert_ne!(event["id"], first.json()["id"]);
    // The sixth chat's check came before the grant's cycle: nothing else was sent.
    assert!(receiver.already_received().is_empty());
    assert_eq!(alert_rows(&app).await, 2);
}

#[tokio::test]
async fn a_receiver_that_fails_the_first_attempt_gets_the_same_event_again() {
    let mut receiver = Receiver::start(1).await;
    let app = alerting_app(&receiver.url, "0.8", &[]).await;
    let token = app.user_with_token("user").await;
    let (_, key) = key_with_budget(&app, &token, "agent", 100).await;
    assert_answered(&app.chat(&key, "hello").await);
    let failed = receiver.next().await;
    let retried = receiver.next().await;
    assert_eq!(failed.body, retried.body, "the same event, id and all");
    assert!(retried.signed_with(SECRET));
    assert_eq!(retried.json()["type"], "key_budget");
    let metrics = || async {
        app.request_raw(axum::http::Method::GET, "/metrics", &[], "")
            .await
            .2
    };
    crate::server::wait_until(|| async {
        metrics()
            .await
            .contains("tokenchat_alerts_total{outcome=\"sent\"} 1")
    })
    .await;
    let metrics = metrics().await;
    assert!(metrics.contains("tokenchat_alerts_total{outcome=\"failed\"} 0"));
}

#[tokio::test]
async fn a_receiver_that_never_answers_delays_no_chat() {
    // Accepts connections and never answers: every attempt waits for its time-out.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counting = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            counting.fetch_add(1, Ordering::SeqCst);
            held.push(connection);
        }
    });
    let app = alerting_app(&url, "0.1,0.5,0.8", &[]).await;
    let token = app.user_with_token("user").await;
    let mut slowest = Duration::ZERO;
    let timed_chat = |key: String| {
        let app = &app;
        async move {
            let began = Instant::now();
            assert_answered(&app.chat(&key, "hello").await);
            began.elapsed()
        }
    };
    let (_, first_key) = key_with_budget(&app, &token, "first", 100).await;
    slowest = slowest.max(timed_chat(first_key).await);
    // The worker is now stuck on a receiver that does not answer.
    crate::server::wait_until(|| async { accepted.load(Ordering::SeqCst) > 0 }).await;
    for n in 0..10 {
        let (_, key) = key_with_budget(&app, &token, &format!("key{n}"), 100).await;
        slowest = slowest.max(timed_chat(key).await);
    }
    // Each attempt waits ten seconds for an answer; a chat that waited on one would show it.
    assert!(slowest < Duration::from_secs(2), "a chat took {slowest:?}");
    assert!(accepted.load(Ordering::SeqCst) >= 1);
}

#[test]
fn a_webhook_url_without_a_secret_stops_start_up_naming_the_secret_and_never_showing_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let output = Server::command(
        dir.path(),
        &[(
            "ALERT_WEBHOOK_URL",
            "https://hooks.example.com/T000/secret-path",
        )],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("ALERT_WEBHOOK_SECRET"), "{stderr}");
    assert!(!stderr.contains("secret-path"), "{stderr}");
    for (name, value) in [("ALERT_THRESHOLDS", "0.8,1.5"), ("ALERT_THRESHOLDS", "80%")] {
        let output = Server::command(dir.path(), &[(name, value)])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{name}={value} started");
        assert!(String::from_utf8_lossy(&output.stderr).contains(name));
    }
}

#[tokio::test]
async fn the_secret_and_the_urls_path_never_show_in_debug_output() {
    let app = alerting_app("https://hooks.example.com/T000/secret-path", "0.8", &[]).await;
    let shown = format!("{:?}", app.state.config);
    assert!(shown.contains("https://hooks.example.com"), "{shown}");
    assert!(!shown.contains("secret-path"), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");
}
