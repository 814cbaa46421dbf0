//! The built binary as an operator runs it: start-up and migrations, configuration errors,
//! the log, graceful shutdown, a restart after SIGKILL, and the audit command.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::json;

use super::{only_chat_and_its_balance, register_and_login, send, send_a_stalled_chat, wait_until};
use crate::common::{FakeLlm, Reply};

/// The built binary, run in a directory with only the variables given.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
    pub(crate) log: Arc<Mutex<String>>,
}

impl Server {
    pub(crate) fn command(dir: &std::path::Path, vars: &[(&str, &str)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokenchat"));
        command
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Starts the binary in `dir` and waits for its "listening" line to learn the port.
    pub(crate) fn start(dir: &std::path::Path, vars: &[(&str, &str)]) -> Self {
        Self::start_command(Self::command(dir, vars))
    }

    /// Starts `command` (made by [`Server::command`]) and waits for its "listening" line.
    pub(crate) fn start_command(mut command: Command) -> Self {
        let mut child = command.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut lines = stdout.lines();
        let mut start_up = String::new();
        let address = loop {
            let line = lines
                .next()
                .expect("the server exited before listening")
                .unwrap();
            start_up.push_str(&line);
            start_up.push('\n');
            if let Some(rest) = line.split("address=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep reading the log so the server never blocks on a full pipe.
        let log = Arc::new(Mutex::new(start_up));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self {
            child,
            base: format!("http://{address}"),
            log,
        }
    }

    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_binary_creates_and_migrates_its_database_and_serves() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("LLM_BASE_URL", &llm.base_url)]);
    assert!(dir.path().join("tokenchat.db").exists());
    let token = register_and_login(&reqwest::Client::new(), &server.base, "pass123").await;
    assert_eq!(token.len(), 32);
}

#[tokio::test]
async fn with_no_upstream_configured_the_readme_walkthrough_answers_from_the_demo_model() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = reqwest::Client::new();
    let token = register_and_login(&http, &server.base, "pass123").await;
    let chat = http
        .post(format!("{}/chat/", server.base))
        .header("authorization", format!("Token {token}"))
        .json(&json!({ "message": "code hello world in python" }));
    let (status, chat) = send(chat).await;
    assert_eq!(status, 200, "{chat}");
    let answer = chat["response"].as_str().unwrap();
    assert!(
        answer.starts_with("Code for 'Hello World' in python:"),
        "{answer}"
    );
    assert_eq!(chat["tokens"], 3900);
    let (_, balance) = send(
        http.post(format!("{}/balance/", server.base))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(balance, json!({ "tokens": 3900 }));
    let log = server.log.lock().unwrap().clone();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("demo model"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{log}");
}

#[tokio::test]
async fn the_log_has_a_line_per_request_and_never_a_secret() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("LLM_BASE_URL", &llm.base_url),
            ("LLM_API_KEY", "sk-the-upstream-key"),
        ],
    );
    let http = reqwest::Client::new();
    let base = &server.base;
    let password = "a-memorable-password";
    let token = register_and_login(&http, base, password).await;
    for reply in [Reply::Echo, Reply::Status(500)] {
        llm.set_reply(reply);
        let chat = http.post(format!("{base}/chat")).bearer_auth(&token);
        send(chat.json(&json!({ "message": "hello" }))).await;
    }
    assert_eq!(
        llm.received()[0].authorization.as_deref(),
        Some("Bearer sk-the-upstream-key")
    );

    wait_until(|| async {
        server
            .log
            .lock()
            .unwrap()
            .matches("answered status=")
            .count()
            == 4
    })
    .await;
    let log = server.log.lock().unwrap().clone();
    for expected in [
        "method=POST route=\"/register\"}: tokenchat::routes: answered status=201",
        "method=POST route=\"/login\"}: tokenchat::routes: answered status=200",
        "method=POST route=\"/chat\"}: tokenchat::routes: answered status=200",
        "method=POST route=\"/chat\"}: tokenchat::routes: answered status=502",
    ] {
        assert!(log.contains(expected), "{expected} not in:\n{log}");
    }
    for secret in [password, &token, "sk-the-upstream-key"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[tokio::test]
async fn sigterm_lets_a_chat_in_progress_finish_and_exits_cleanly() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[("LLM_BASE_URL", &llm.base_url)]);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let token = register_and_login(&http, &base, "pass123").await;

    llm.set_reply(Reply::Stall(Duration::from_millis(1500)));
    let chat = http.post(format!("{base}/chat")).bearer_auth(token);
    let chat = tokio::spawn(send(chat.json(&json!({ "message": "finish me" }))));
    wait_until(|| async { llm.calls() == 1 }).await;
    server.signal("-TERM");

    let (status, chat) = chat.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(chat["tokens"], 3900);
    let exit = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().unwrap();
        (status, server)
    })
    .await
    .unwrap()
    .0;
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn a_bad_configuration_value_stops_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("CHAT_COST", "a hundred"),
        ("LLM_TIMEOUT_SECS", "-1"),
        ("LLM_BASE_URL", "gopher://example.com"),
        ("DATABASE_URL", "mysql://localhost/tokenchat"),
        ("BIND_ADDR", "localhost"),
    ] {
        let output = Server::command(dir.path(), &[(name, value)])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{name}={value} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
    assert!(!dir.path().join("tokenchat.db").exists());
}

#[test]
fn a_dot_env_file_in_the_working_directory_is_read_whole_or_stops_start_up_at_its_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "INITIAL_TOKENS=plenty\n").unwrap();
    let output = Server::command(dir.path(), &[]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("INITIAL_TOKENS"));
    // A line that is no variable stops start-up naming it, rather than leaving every
    // variable after it at its default: here the database, for a new empty one.
    std::fs::write(
        dir.path().join(".env"),
        "CHAT_COST=7\nLLM_SYSTEM_PROMPT=You are a \"bot\nDATABASE_URL=sqlite://kept.db\n",
    )
    .unwrap();
    let output = Server::command(dir.path(), &[]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim(),
        "tokenchat: .env, line 2: not a NAME=value line (the lines after it are not read)"
    );
    assert!(!dir.path().join("tokenchat.db").exists());
}

#[tokio::test]
async fn a_chat_cut_off_by_sigkill_is_refunded_by_the_next_process() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("LLM_TIMEOUT_SECS", "1"),
    ];
    let http = reqwest::Client::new();

    let server = Server::start(dir.path(), &vars);
    let token = register_and_login(&http, &server.base, "pass123").await;
    let cut_off = send_a_stalled_chat(&llm, &http, &server.base, &token).await;
    server.signal("-KILL");
    assert!(
        cut_off.await.unwrap().is_err(),
        "the killed server answered"
    );
    drop(server);

    let left_behind = only_chat_and_its_balance(dir.path()).await;
    assert_eq!(left_behind, ("pending".to_string(), 3900));

    llm.set_reply(Reply::Echo);
    let server = Server::start(dir.path(), &vars);
    wait_until(|| async { only_chat_and_its_balance(dir.path()).await.0 == "failed" }).await;
    let (_, balance) = send(
        http.get(format!("{}/balance", server.base))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(balance["tokens"], 4000);

    let audit = Server::command(dir.path(), &vars)
        .arg("audit")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{report}");
    assert!(
        report.contains("audit passed: 1 users, 1 chats, 3 ledger rows, 0 offences"),
        "{report}"
    );
}

#[test]
fn the_audit_command_exits_non_zero_listing_offenders() {
    let dir = tempfile::tempdir().unwrap();
    let vars: [(&str, &str); 0] = [];
    let grant = |name: &str| {
        Server::command(dir.path(), &vars)
            .args(["grant", name, "5"])
            .output()
            .unwrap()
    };
    let audit_passes = || {
        Server::command(dir.path(), &vars)
            .arg("audit")
            .status()
            .unwrap()
            .success()
    };
    // No database yet (a mistyped DATABASE_URL looks the same): both commands fail and
    // create nothing, rather than audit a new empty database.
    let audit = Server::command(dir.path(), &vars)
        .arg("audit")
        .output()
        .unwrap();
    assert_eq!(audit.status.code(), Some(1));
    let said = String::from_utf8_lossy(&audit.stderr);
    assert!(said.contains("no database file at"), "{said}");
    assert!(!grant("ghost").status.success());
    assert!(!dir.path().join("tokenchat.db").exists());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("tokenchat.db").display());
    rt.block_on(async {
        let db = tokenchat::db::connect(&database_url, tokenchat::db::Open::CreateIfMissing)
            .await
            .unwrap();
        tokenchat::db::migrate(&db).await.unwrap();
        db.close().await;
    });
    // Nobody yet: the grant fails; the (empty) audit passes.
    assert!(!grant("ghost").status.success());
    assert!(audit_passes());

    rt.block_on(async {
        let db = tokenchat::db::connect(&database_url, tokenchat::db::Open::ExistingOnly)
            .await
            .unwrap();
        tokenchat::db::users::insert(&db, "mallory", "mallory", "$argon2id$x", 4000)
            .await
            .unwrap();
        db.close().await;
    });
    let granted = grant("MALLORY");
    assert!(granted.status.success());
    assert!(String::from_utf8_lossy(&granted.stdout).contains("balance now 4005"));
    assert!(audit_passes());

    rt.block_on(async {
        let db = tokenchat::db::connect(&database_url, tokenchat::db::Open::ExistingOnly)
            .await
            .unwrap();
        tokenchat::db_run!(&db, pool => sqlx::query("UPDATE users SET tokens = 9999")
            .execute(pool)
            .await.map(|done| done.rows_affected()))
        .unwrap();
        db.close().await;
    });
    let audit = Server::command(dir.path(), &vars)
        .arg("audit")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(audit.status.code(), Some(1), "{report}");
    assert!(
        report.contains("OFFENCE user 1 (mallory): balance 9999 but ledger sums to 4005"),
        "{report}"
    );
    assert!(report.contains("audit FAILED"), "{report}");
}
