//! Logs and request ids: a 500 names its request id, the text line holds the request's id,
//! method, route and status, JSON logs are one object a line, and the model's URL is logged at
//! start-up without its key or credentials.

use std::io::{BufRead, BufReader};

use axum::http::Method;
use serde_json::{json, Value};

use crate::{
    common::{FakeLlm, TestApp},
    server::Server,
};

#[tokio::test]
async fn a_500_names_its_request_id_in_its_body_as_in_its_header() {
    let app = TestApp::new().await;
    app.user_with_token("user").await;
    // A database broken beneath the service: login can no longer store its token.
    tokenchat::db_run!(&app.state.db, pool => sqlx::query("DROP TABLE login_tokens")
        .execute(pool)
        .await
        .map(|_| ()))
    .unwrap();
    let failed = app
        .request(
            Method::POST,
            "/login",
            &[
                ("content-type", "application/json"),
                ("x-request-id", "quote-me-42"),
            ],
            json!({ "username": "user", "password": "pass123" }).to_string(),
        )
        .await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.json["code"], "internal");
    assert_eq!(failed.json["request_id"], "quote-me-42");
    assert_eq!(failed.headers["x-request-id"], "quote-me-42");
    assert!(
        !failed.json.to_string().contains("login_tokens"),
        "{:?}",
        failed.json
    );
    let generated = app
        .request(
            Method::POST,
            "/login",
            &[("content-type", "application/json")],
            json!({ "username": "user", "password": "pass123" }).to_string(),
        )
        .await;
    assert_eq!(generated.status, 500);
    assert_eq!(
        generated.json["request_id"],
        generated.headers["x-request-id"].to_str().unwrap()
    );
}

// Two threads: the log is read by blocking reads while the fake model answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_with_the_request_id_and_the_model_probe() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = Server::command(
        dir.path(),
        &[
            ("LLM_BASE_URL", &llm.base_url),
            ("LLM_API_KEY", "sk-never-logged"),
            ("LOG_FORMAT", "json"),
        ],
    );
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_line = String::new();
    let mut next_object = |last_line: &mut String| -> Value {
        *last_line = lines.next().expect("the server ended").unwrap();
        let line = &*last_line;
        assert!(!line.contains("sk-never-logged"), "{line}");
        serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}"))
    };
    let address = loop {
        let object = next_object(&mut last_line);
        if let Some(address) = object["fields"]["address"].as_str() {
            break address.to_string();
        }
    };
    let probe = loop {
        let object = next_object(&mut last_line);
        if object["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("the model is"))
        {
            break object;
        }
    };
    assert_eq!(
        probe["fields"]["message"],
        "the model is reachable and serves LLM_MODEL"
    );
    assert_eq!(probe["fields"]["llm"], llm.base_url);
    let response = reqwest::Client::new()
        .get(format!("http://{address}/balance"))
        .header("x-request-id", "follow-me-7")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let answered = loop {
        let object = next_object(&mut last_line);
        if object["fields"]["message"] == "answered" {
            break object;
        }
    };
    assert_eq!(answered["span"]["request_id"], "follow-me-7", "{answered}");
    assert_eq!(answered["fields"]["status"], 401);
    // The whole line but its time and latency, keys in their order: collectors parse it.
    let latency = answered["fields"]["latency_us"].as_u64().unwrap();
    let timestamp = answered["timestamp"].as_str().unwrap();
    let span = r#"{"method":"GET","request_id":"follow-me-7","route":"/balance","name":"request"}"#;
    assert_eq!(
        last_line,
        format!(
            r#"{{"timestamp":"{timestamp}","level":"INFO","fields":{{"message":"answered","status":401,"latency_us":{latency}}},"target":"tokenchat::routes","span":{span},"spans":[{span}]}}"#
        )
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The text line an operator reads (`LOG_FORMAT` unset): one per request, with the span's
/// request id, method and route, then the status and latency.
#[tokio::test]
async fn text_logs_a_line_a_request_with_its_id_method_route_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("LLM_BASE_URL", "http://127.0.0.1:9/v1")]);
    let response = reqwest::Client::new()
        .get(format!("{}/health", server.base))
        .header("x-request-id", "pin-me-3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let marker = "request_id=\"pin-me-3\"";
    crate::server::wait_until(|| async { server.log.lock().unwrap().contains(marker) }).await;
    let log = server.log.lock().unwrap().clone();
    let line = log.lines().find(|line| line.contains(marker)).unwrap();
    // `2026-12-07T00:02:01.123456Z  INFO request{...}: ...`: RFC 3339 in UTC, microseconds.
    let (time, rest) = line.split_at(27);
    assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{line}");
    let latency = rest
        .strip_prefix(
            "  INFO request{request_id=\"pin-me-3\" method=GET route=\"/health\"}: \
             tokenchat::routes: answered status=200 latency_us=",
        )
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        !latency.is_empty() && latency.bytes().all(|byte| byte.is_ascii_digit()),
        "{line}"
    );
}

#[tokio::test]
async fn start_up_logs_an_unreachable_model_with_its_url_and_never_its_key() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[("LLM_BASE_URL", &url), ("LLM_API_KEY", "sk-never-logged")],
    );
    crate::server::wait_until(|| async {
        server
            .log
            .lock()
            .unwrap()
            .contains("the model is unreachable")
    })
    .await;
    let log = server.log.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|line| line.contains("the model is unreachable"))
        .unwrap();
    assert!(line.contains(&url), "{line}");
    assert!(!log.contains("sk-never-logged"), "{log}");
    // The transport error is logged with its causes: why it could not be reached.
    let cause = log
        .lines()
        .find(|line| line.contains("model could not be reached"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(cause.contains("error.sources=["), "{cause}");
    assert!(cause.contains("Connection refused"), "{cause}");
}

#[tokio::test]
async fn credentials_in_llm_base_url_reach_the_model_but_never_a_log_line() {
    let llm = crate::common::FakeLlm::start().await;
    // The fake's root with user info and a query, as some providers take a key.
    let url = llm
        .base_url
        .replacen("http://", "http://someone:pw-never-logged@", 1)
        + "?key=query-never-logged";
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("LLM_BASE_URL", &url)]);
    crate::server::wait_until(|| async {
        server
            .log
            .lock()
            .unwrap()
            .contains("the model is reachable")
    })
    .await;
    let http = reqwest::Client::new();
    let token = crate::server::register_and_login(&http, &server.base, "pass123").await;
    let chat = http
        .post(format!("{}/chat", server.base))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "message": "hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    // The path is joined under the root's path, the query kept: the model was reached.
    let received = llm.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].query.as_deref(), Some("key=query-never-logged"));
    assert_eq!(
        received[0].authorization.as_deref(),
        Some("Basic c29tZW9uZTpwdy1uZXZlci1sb2dnZWQ="),
        "the user info is sent as basic authentication"
    );
    let log = server.log.lock().unwrap().clone();
    for secret in ["pw-never-logged", "query-never-logged", "someone"] {
        assert!(!log.contains(secret), "{secret} in {log}");
    }
    assert!(log.contains("<redacted>@127.0.0.1"), "{log}");
}
