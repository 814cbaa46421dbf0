//! `/ready` (the database and the model) and `/metrics` (Prometheus text, optionally behind
//! a bearer token).

use std::{io::Write, process::Stdio};

use axum::http::Method;
use serde_json::json;

use crate::common::{database::on_postgres, Reply, TestApp};

use super::stdout;

#[tokio::test]
async fn ready_reports_the_database_and_the_model_and_is_503_not_ready_when_unmigrated() {
    let app = TestApp::new().await;
    let ready = app.request(Method::GET, "/ready", &[], "").await;
    assert_eq!(ready.status, 200, "{:?}", ready.json);
    assert_eq!(ready.json["status"], "ready");
    assert_eq!(ready.json["database"]["status"], "ok");
    let known = ready.json["database"]["migrations_known"].as_u64().unwrap();
    assert!(known >= 7);
    assert_eq!(ready.json["database"]["migrations_applied"], known);
    assert_eq!(ready.json["model"]["status"], "reachable");
    assert_eq!(ready.json["model"]["name"], "llama3.2");

    // A migration this build knows but the database lacks.
    tokenchat::db_run!(&app.state.db, pool => sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)"
    )
    .execute(pool)
    .await
    .map(|_| ()))
    .unwrap();
    let unmigrated = app.request(Method::GET, "/ready/", &[], "").await;
    assert_eq!(unmigrated.status, 503);
    assert_eq!(unmigrated.json["code"], "not_ready");
    assert!(unmigrated.json["error"].is_string());
    assert_eq!(unmigrated.json["database"]["status"], "not_migrated");
    assert_eq!(unmigrated.json["database"]["migrations_applied"], known - 1);

    // The database gone: still an answer, and still the envelope.
    app.state.db.close().await;
    let gone = app.request(Method::GET, "/ready", &[], "").await;
    assert_eq!(gone.status, 503);
    assert_eq!(gone.json["code"], "not_ready");
    assert_eq!(gone.json["database"]["status"], "unreachable");
    // Liveness does not depend on the database.
    assert_eq!(
        app.request(Method::GET, "/health", &[], "").await.status,
        200
    );
}

#[tokio::test]
async fn an_unreachable_model_is_reported_by_ready_without_failing_it() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let app = TestApp::with_env(&[("LLM_BASE_URL", &url)]).await;
    let ready = app.request(Method::GET, "/ready", &[], "").await;
    assert_eq!(ready.status, 200, "{:?}", ready.json);
    assert_eq!(ready.json["model"]["status"], "unreachable");
    assert!(ready.json["model"]["detail"].is_string());
    let demo = TestApp::with_env(&[("LLM_BASE_URL", "")]).await;
    let ready = demo.request(Method::GET, "/ready", &[], "").await;
    assert_eq!(ready.json["model"]["status"], "built_in");
    assert_eq!(ready.json["model"]["name"], "demo");
}

/// The value of the sample `series` (name and labels, exactly as rendered) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_chats_tokens_and_the_model_in_prometheus_text() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "250")]).await;
    let token = app.user_with_token("user").await;
    assert_eq!(app.chat(&token, "hello").await.status, 200);
    let streamed = app
        .request_raw(
            Method::POST,
            "/chat",
            &[
                ("authorization", &token),
                ("content-type", "application/json"),
            ],
            json!({ "message": "hello", "stream": true }).to_string(),
        )
        .await;
    assert!(streamed.2.contains("event: done"), "{streamed:?}");
    assert_eq!(app.chat(&token, "hello again").await.status, 402);
    app.llm.set_reply(Reply::Status(500));
    app.request(Method::POST, "/balance", &[("authorization", &token)], "")
        .await;
    app.request(Method::GET, "/nowhere/at/all", &[], "").await;

    let metrics = app.request_raw(Method::GET, "/metrics", &[], "").await;
    assert_eq!(metrics.0, 200);
    assert_eq!(metrics.1, "text/plain; version=0.0.4; charset=utf-8");
    let text = metrics.2;
    let value = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(value(r#"tokenchat_chats_total{outcome="answered"}"#), 2.0);
    assert_eq!(
        value(r#"tokenchat_chats_total{outcome="out_of_tokens"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tokenchat_chats_total{outcome="upstream_error"}"#),
        0.0
    );
    assert_eq!(value("tokenchat_tokens_charged_total"), 200.0);
    assert_eq!(value("tokenchat_tokens_refunded_total"), 0.0);
    assert_eq!(value("tokenchat_chats_in_flight"), 0.0);
    assert_eq!(
        value(r#"tokenchat_http_requests_total{route="/chat",method="POST",status="200"}"#),
        2.0
    );
    assert_eq!(
        value(r#"tokenchat_http_requests_total{route="/chat",method="POST",status="402"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tokenchat_http_requests_total{route="unmatched",method="GET",status="404"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tokenchat_http_request_duration_seconds_count{route="/register",method="POST"}"#),
        1.0
    );
    // Each answer once, streamed or not (a stream is timed to its end).
    for mode in ["complete", "stream"] {
        let series = format!(r#"tokenchat_upstream_duration_seconds_count{{mode="{mode}"}}"#);
        assert_eq!(value(&series), 1.0, "{mode}");
    }
    assert!(text.contains("# TYPE tokenchat_http_request_duration_seconds histogram"));
    let writer = if on_postgres() {
        "postgres"
    } else {
        "sqlite_writer"
    };
    let pool_max = format!(r#"tokenchat_database_connections{{pool="{writer}",state="max"}}"#);
    assert!(value(&pool_max) >= 1.0);

    // A model failure: counted by kind, and the chat refunded.
    let token = app.user_with_token("other").await;
    let failed = app.chat(&token, "hello").await;
    assert_eq!(failed.status, 502);
    let text = app.request_raw(Method::GET, "/metrics", &[], "").await.2;
    assert_eq!(
        sample(&text, r#"tokenchat_chats_total{outcome="upstream_error"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "tokenchat_tokens_refunded_total"),
        Some(100.0)
    );
    assert_eq!(
        sample(&text, r#"tokenchat_upstream_errors_total{kind="status"}"#),
        Some(1.0)
    );

    if let Ok(python) = std::env::var("TOKENCHAT_SDK_PYTHON") {
        let parsed = std::process::Command::new(python)
            .args([
                "-c",
                "import sys; from prometheus_client.parser import text_string_to_metric_families as parse\n\
                 families = list(parse(sys.stdin.read()))\n\
                 print(len(families))",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().unwrap().write_all(text.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(parsed.status.success(), "{parsed:?}");
        let families: usize = stdout(&parsed).trim().parse().unwrap();
        assert!(families >= 9, "{families} families");
    } else {
        println!("Prometheus parser check skipped: set TOKENCHAT_SDK_PYTHON (CI does)");
    }
}

#[tokio::test]
async fn with_a_metrics_token_metrics_need_it_as_a_bearer_token() {
    let app = TestApp::with_env(&[("METRICS_TOKEN", "scrape-secret")]).await;
    let without = app.request(Method::GET, "/metrics", &[], "").await;
    assert_eq!(without.status, 401);
    assert_eq!(without.json["code"], "unauthorized");
    let wrong = app
        .request(
            Method::GET,
            "/metrics",
            &[("authorization", "Bearer scrape-secreT")],
            "",
        )
        .await;
    assert_eq!(wrong.status, 401);
    let right = app
        .request_raw(
            Method::GET,
            "/metrics",
            &[("authorization", "Bearer scrape-secret")],
            "",
        )
        .await;
    assert_eq!(right.0, 200);
    assert!(right.2.contains("tokenchat_chats_total"));
    // Like every credential, in any of the three accepted forms.
    for form in [
        "bearer scrape-secret",
        "Token scrape-secret",
        "scrape-secret",
    ] {
        let answer = app
            .request_raw(Method::GET, "/metrics", &[("authorization", form)], "")
            .await;
        assert_eq!(answer.0, 200, "{form}");
    }
}
