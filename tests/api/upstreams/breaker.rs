//! The circuit breaker: a target that keeps failing is skipped without a connection until
//! its cooling time is over, then gets one probe call; a failed probe doubles the cooling,
//! a good one closes it. `/ready`, `/metrics` and the start-up log show it.

use std::time::Duration;

use axum::http::{Method, StatusCode};

use super::{routed_app, served_by, DeadUpstream};
use crate::common::{FakeLlm, Reply};

#[tokio::test]
async fn an_opened_breaker_keeps_every_connection_from_a_dead_target_until_its_probe() {
    let dead = DeadUpstream::start().await;
    let good = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("dead", &dead.base_url, 1, 0),
            ("good", &good.base_url, 1, 1),
        ],
        &[
            ("UPSTREAM_FAILURES_TO_OPEN", "3"),
            ("UPSTREAM_COOLDOWN_SECS", "1"),
        ],
    )
    .await;
    let token = app.user_with_token("user").await;
    for n in 0..3 {
        let chat = app.chat(&token, &format!("n{n}")).await;
        let id = chat.json["chat_id"].as_i64().unwrap();
        assert_eq!(served_by(&app, id).await, (Some("good".into()), Some(2)));
    }
    assert_eq!(dead.connections(), 3);
    // Open: no connection, no added attempt.
    for n in 0..5 {
        let chat = app.chat(&token, &format!("open {n}")).await;
        let id = chat.json["chat_id"].as_i64().unwrap();
        assert_eq!(served_by(&app, id).await, (Some("good".into()), Some(1)));
    }
    assert_eq!(dead.connections(), 3, "no connection while open");
    let ready = app.request(Method::GET, "/ready", &[], "").await;
    let targets = &ready.json["upstreams"];
    let dead_state = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|upstream| upstream["name"] == "dead")
        .unwrap();
    assert_eq!(dead_state["targets"][0]["state"], "open", "{ready:?}");
    assert_eq!(dead_state["status"], "unreachable", "{ready:?}");
    assert_eq!(dead.connections(), 4, "readiness asked its GET /models");
    // Cooled: one probe, which fails and opens it for twice as long.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.chat(&token, "probe").await;
    assert_eq!(dead.connections(), 5, "one probe");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.chat(&token, "still open").await;
    assert_eq!(
        dead.connections(),
        5,
        "open for two seconds after a failed probe"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    app.chat(&token, "second probe").await;
    assert_eq!(dead.connections(), 6);
    assert_eq!(app.balance(&token).await, 4000 - 11 * 100);
    let metrics = app.request_raw(Method::GET, "/metrics", &[], "").await.2;
    for series in [
        r#"tokenchat_upstream_attempts_total{upstream="dead",outcome="unreachable"} 5"#,
        r#"tokenchat_upstream_attempts_total{upstream="good",outcome="answered"} 11"#,
        r#"tokenchat_upstream_breaker_state{upstream="dead",model="llama3.2"} 1"#,
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    assert!(metrics.contains("tokenchat_upstream_attempt_seconds_count{upstream=\"good\"} 11"));
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_good_probe_closes_the_breaker_and_the_target_serves_again() {
    let flaky = FakeLlm::start().await;
    flaky.set_reply(Reply::Status(500));
    let spare = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("flaky", &flaky.base_url, 1, 0),
            ("spare", &spare.base_url, 1, 1),
        ],
        &[
            ("UPSTREAM_FAILURES_TO_OPEN", "2"),
            ("UPSTREAM_COOLDOWN_SECS", "1"),
        ],
    )
    .await;
    let token = app.user_with_token("user").await;
    for n in 0..4 {
        app.chat(&token, &format!("n{n}")).await;
    }
    assert_eq!(flaky.calls(), 2, "opened after two failures");
    flaky.set_reply(Reply::Echo);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in 0..3 {
        let chat = app.chat(&token, &format!("back {n}")).await;
        assert_eq!(chat.status, StatusCode::OK);
        let id = chat.json["chat_id"].as_i64().unwrap();
        assert_eq!(served_by(&app, id).await, (Some("flaky".into()), Some(1)));
    }
    let metrics = app.request_raw(Method::GET, "/metrics", &[], "").await.2;
    let closed = r#"tokenchat_upstream_breaker_state{upstream="flaky",model="llama3.2"} 0"#;
    assert!(metrics.contains(closed), "{metrics}");
}

#[tokio::test]
async fn every_breaker_open_is_503_upstream_busy_until_the_first_cools() {
    let dead = DeadUpstream::start().await;
    let app = routed_app(
        &[("dead", &dead.base_url, 1, 0)],
        &[
            ("UPSTREAM_FAILURES_TO_OPEN", "2"),
            ("UPSTREAM_COOLDOWN_SECS", "4"),
        ],
    )
    .await;
    let token = app.user_with_token("user").await;
    let failed = app.chat(&token, "hello").await;
    failed.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    // The second failure opens the last breaker: the client learns when to come back.
    for _ in 0..3 {
        let chat = app.chat(&token, "hello").await;
        chat.assert_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_busy");
        let retry_after = super::retry_after(&chat);
        assert!((3..=4).contains(&retry_after), "{retry_after}");
    }
    assert_eq!(dead.connections(), 2);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn start_up_logs_one_line_for_each_upstream_with_its_url_and_never_its_key() {
    let good = FakeLlm::start().await;
    let refusing = super::refusing_url().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenchat.toml");
    std::fs::write(
        &file,
        format!(
            "[upstreams.good]\nbase_url = \"{}\"\napi_key_env = \"GOOD_KEY\"\n\n\
             [upstreams.gone]\nbase_url = \"{refusing}\"\n\n\
             [models.\"llama3.2\"]\ntargets = [{{ upstream = \"good\" }}, \
             {{ upstream = \"gone\", model = \"elsewhere\" }}]\n",
            good.base_url
        ),
    )
    .unwrap();
    let server = crate::server::Server::start(
        dir.path(),
        &[
            ("CONFIG_FILE", file.to_str().unwrap()),
            ("GOOD_KEY", "sk-good-never-logged"),
        ],
    );
    crate::server::wait_until(|| async {
        let log = server.log.lock().unwrap();
        log.contains("upstream is unreachable") && log.contains("the model is reachable")
    })
    .await;
    let log = server.log.lock().unwrap().clone();
    let line = |text: &str| {
        let found: Vec<&str> = log.lines().filter(|line| line.contains(text)).collect();
        assert_eq!(found.len(), 1, "one line for {text}: {log}");
        found[0].to_string()
    };
    let reachable = line("upstream is reachable");
    assert!(
        reachable.contains("good") && reachable.contains(&good.base_url),
        "{reachable}"
    );
    let unreachable = line("upstream is unreachable");
    assert!(
        unreachable.contains("gone") && unreachable.contains(&refusing),
        "{unreachable}"
    );
    assert!(!log.contains("sk-good-never-logged"), "{log}");
    let ready: serde_json::Value = reqwest::get(format!("{}/ready", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // In the order of their names.
    let (gone, good) = (&ready["upstreams"][0], &ready["upstreams"][1]);
    assert_eq!(
        (&gone["name"], &gone["status"]),
        (&"gone".into(), &"unreachable".into())
    );
    assert_eq!(gone["targets"][0]["upstream_model"], "elsewhere");
    assert_eq!(gone["targets"][0]["listed"], serde_json::Value::Null);
    assert_eq!(
        (&good["name"], &good["status"]),
        (&"good".into(), &"reachable".into())
    );
    assert_eq!(good["targets"][0]["listed"], true, "{ready}");
    assert_eq!(good["targets"][0]["state"], "closed");
    assert_eq!(ready["model"]["status"], "reachable", "{ready}");
}

#[tokio::test]
async fn a_whole_answer_unusable_in_its_body_falls_back_and_counts_toward_the_breaker() {
    let broken = FakeLlm::start().await;
    broken.set_reply(Reply::Garbage);
    let good = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("broken", &broken.base_url, 1, 0),
            ("good", &good.base_url, 1, 1),
        ],
        &[
            ("UPSTREAM_FAILURES_TO_OPEN", "3"),
            ("UPSTREAM_COOLDOWN_SECS", "60"),
        ],
    )
    .await;
    let token = app.user_with_token("user").await;
    for n in 0..5 {
        let chat = app.chat(&token, &format!("n{n}")).await;
        assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
        assert_eq!(chat.json["response"], format!("Echo: n{n}"));
        let id = chat.json["chat_id"].as_i64().unwrap();
        let attempts = if n < 3 { 2 } else { 1 };
        assert_eq!(
            served_by(&app, id).await,
            (Some("good".into()), Some(attempts))
        );
    }
    // A 200 whose body is no answer, three times in a row: open, asked no more.
    assert_eq!((broken.calls(), good.calls()), (3, 5));
    assert_eq!(app.balance(&token).await, 4000 - 5 * 100);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn an_answer_holding_nothing_is_final_and_opens_no_breaker() {
    let emptied = FakeLlm::start().await;
    emptied.set_reply(Reply::EmptyContent);
    let spare = FakeLlm::start().await;
    let app = routed_app(
        &[
            ("emptied", &emptied.base_url, 1, 0),
            ("spare", &spare.base_url, 1, 1),
        ],
        &[("UPSTREAM_FAILURES_TO_OPEN", "2")],
    )
    .await;
    let token = app.user_with_token("user").await;
    // An answer with nothing in it, as a client's `stop` can make one: the target
    // answered, so it is neither tried again elsewhere nor counted against.
    for n in 0..3 {
        let chat = app.chat(&token, &format!("n{n}")).await;
        chat.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    }
    assert_eq!((emptied.calls(), spare.calls()), (3, 0));
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_audit_passes().await;
}
