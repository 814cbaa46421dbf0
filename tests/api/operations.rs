//! What operators use: the command line (`migrate`, `user create|list|grant|disable|enable`),
//! readiness, metrics, request ids in 500s, JSON logs and the model probe at start-up.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Output, Stdio},
};

use axum::http::Method;
use serde_json::{json, Value};

use crate::{
    common::{database::on_postgres, FakeLlm, Reply, TestApp},
    server::{send, Server},
};

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    Server::command(dir, &[]).args(args).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `tokenchat user create NAME` with `password` on standard input.
fn create_user(dir: &std::path::Path, name: &str, password: &str) -> Output {
    let mut child = Server::command(dir, &[])
        .args(["user", "create", name])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{password}").unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

async fn ledger_rows(dir: &std::path::Path) -> i64 {
    let url = format!("sqlite://{}", dir.join("tokenchat.db").display());
    let db = tokenchat::db::connect(&url, tokenchat::db::Open::ExistingOnly)
        .await
        .unwrap();
    let rows = tokenchat::db_run!(&db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM ledger")
        .fetch_one(pool)
        .await)
    .unwrap();
    db.close().await;
    rows
}

#[test]
fn usage_errors_exit_with_status_2_and_every_command_has_help_and_a_version() {
    let dir = tempfile::tempdir().unwrap();
    for wrong in [
        &["frobnicate"][..],
        &["user"],
        &["user", "grant", "alice"],
        &["user", "grant", "alice", "lots"],
        &["audit", "--verbose"],
    ] {
        let output = run(dir.path(), wrong);
        assert_eq!(output.status.code(), Some(2), "{wrong:?}: {output:?}");
        // clap's message: what was wrong and where to read more, or the usage itself.
        let said = stderr(&output);
        assert!(
            said.starts_with("error: ") && said.contains("--help") || said.contains("Usage:"),
            "{wrong:?}: {said}"
        );
    }
    let version = run(dir.path(), &["--version"]);
    assert!(version.status.success());
    assert_eq!(
        stdout(&version).trim(),
        format!("tokenchat {}", env!("CARGO_PKG_VERSION"))
    );
    for command in [
        &["--help"][..],
        &["serve", "--help"],
        &["migrate", "--help"],
        &["audit", "--help"],
        &["user", "--help"],
        &["user", "create", "--help"],
        &["user", "list", "--help"],
        &["user", "grant", "--help"],
        &["user", "disable", "--help"],
        &["user", "enable", "--help"],
    ] {
        let help = run(dir.path(), command);
        assert!(help.status.success(), "{command:?}: {help:?}");
        assert!(stdout(&help).contains("Usage: tokenchat"), "{command:?}");
    }
    // None of that touched a database.
    assert!(!dir.path().join("tokenchat.db").exists());
}

#[tokio::test]
async fn an_operator_creates_lists_grants_disables_and_enables_users_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // Only `migrate` (and serving) may create the database.
    let refused = create_user(dir.path(), "alice", "pass123");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(!dir.path().join("tokenchat.db").exists());
    let migrated = run(dir.path(), &["migrate"]);
    assert!(migrated.status.success(), "{migrated:?}");
    assert!(
        stdout(&migrated).contains("migrations applied"),
        "{migrated:?}"
    );
    assert!(dir.path().join("tokenchat.db").exists());

    let created = create_user(dir.path(), "alice", "pass123");
    assert!(created.status.success(), "{created:?}");
    assert!(stdout(&created).contains("created alice with 4000 tokens"));
    assert!(create_user(dir.path(), "bob", "pass123").status.success());

    // A negative grant takes tokens, down to zero and not one below.
    let taken = run(dir.path(), &["user", "grant", "alice", "-100"]);
    assert!(taken.status.success(), "{taken:?}");
    assert!(stdout(&taken).contains("balance now 3900"), "{taken:?}");
    let rows_before = ledger_rows(dir.path()).await;
    let below = run(dir.path(), &["user", "grant", "alice", "-3901"]);
    assert_eq!(below.status.code(), Some(1), "{below:?}");
    assert!(stderr(&below).contains("below zero"), "{below:?}");
    assert_eq!(ledger_rows(dir.path()).await, rows_before);
    let nobody = run(dir.path(), &["user", "grant", "carol", "5"]);
    assert_eq!(nobody.status.code(), Some(1));
    assert!(stderr(&nobody).contains("no user named carol"));

    let server = Server::start(dir.path(), &[]);
    let http = reqwest::Client::new();
    let base = &server.base;
    let login = |name: &'static str| {
        http.post(format!("{base}/login"))
            .json(&json!({ "username": name, "password": "pass123" }))
    };
    let (status, issued) = send(login("alice")).await;
    assert_eq!(status, 200);
    let token = issued["token"].as_str().unwrap().to_string();
    let (status, key) = send(
        http.post(format!("{base}/keys"))
            .bearer_auth(&token)
            .json(&json!({ "name": "ci" })),
    )
    .await;
    assert_eq!(status, 201, "{key}");
    let key = key["key"].as_str().unwrap().to_string();

    let disabled = run(dir.path(), &["user", "disable", "ALICE"]);
    assert!(disabled.status.success(), "{disabled:?}");
    let list = run(dir.path(), &["user", "list"]);
    assert!(list.status.success(), "{list:?}");
    let listed = stdout(&list);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    for column in ["id", "username", "balance", "created", "disabled"] {
        assert!(lines[0].contains(column), "{listed}");
    }
    let alice: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(alice[..3], ["1", "alice", "3900"], "{listed}");
    assert!(alice[4].ends_with('Z'), "a disabled time: {listed}");
    let bob: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(bob[..3], ["2", "bob", "4000"], "{listed}");
    assert_eq!(bob[4], "-", "{listed}");

    // Login, the token issued before and the API key: all refused alike.
    let (status, body) = send(login("alice")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("account_disabled"))
    );
    for credential in [&token, &key] {
        let (status, body) =
            send(http.get(format!("{base}/balance")).bearer_auth(credential)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("account_disabled"))
        );
        let (status, body) = send(
            http.post(format!("{base}/chat"))
                .bearer_auth(credential)
                .json(&json!({ "message": "code hello world in go" })),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("account_disabled"))
        );
    }
    let (status, body) = send(
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({ "model": "demo", "messages": [{ "role": "user", "content": "hi" }] })),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "account_disabled", "{body}");
    // A wrong password says nothing about the account.
    let (status, body) = send(
        http.post(format!("{base}/login"))
            .json(&json!({ "username": "alice", "password": "wrong-password" })),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("invalid_credentials"))
    );
    // Bob is untouched.
    assert_eq!(send(login("bob")).await.0, 200);

    let enabled = run(dir.path(), &["user", "enable", "alice"]);
    assert!(enabled.status.success(), "{enabled:?}");
    let (status, balance) = send(http.get(format!("{base}/balance")).bearer_auth(&token)).await;
    assert_eq!((status, balance), (200, json!({ "tokens": 3900 })));
    assert_eq!(send(login("alice")).await.0, 200);
    let audit = run(dir.path(), &["audit"]);
    assert!(audit.status.success(), "{audit:?}");
}

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
    let mut next_object = || -> Value {
        let line = lines.next().expect("the server ended").unwrap();
        assert!(!line.contains("sk-never-logged"), "{line}");
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"))
    };
    let address = loop {
        let object = next_object();
        if let Some(address) = object["fields"]["address"].as_str() {
            break address.to_string();
        }
    };
    let probe = loop {
        let object = next_object();
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
        let object = next_object();
        if object["fields"]["message"] == "answered" {
            break object;
        }
    };
    assert_eq!(answered["span"]["request_id"], "follow-me-7", "{answered}");
    assert_eq!(answered["fields"]["status"], 401);
    let _ = child.kill();
    let _ = child.wait();
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
