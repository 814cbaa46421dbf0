//! The command line: usage errors, help and version for every command, and an operator
//! creating, listing, granting, disabling and enabling users.

use std::{
    io::Write,
    process::{Output, Stdio},
};

use serde_json::json;

use crate::server::{send, Server};

use super::{run, stderr, stdout};

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
        &["user", "limits", "--help"],
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
