//! A user's limits: the configuration's defaults (`USER_*`) for everyone, the operator's
//! own for one user (`tokenchat user limits`); each holds for every credential of theirs,
//! a budget exactly under any concurrency.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{grant, key_with};
use crate::{
    common::TestApp,
    openai::completions,
    operations::{run_with, stderr, stdout},
    server::{send, Server},
};

#[tokio::test]
async fn two_hundred_concurrent_chats_of_a_user_whose_budget_covers_thirty_answer_thirty() {
    let app = TestApp::with_env(&[
        ("USER_BUDGET_TOKENS", "3000"),
        ("USER_BUDGET_PERIOD", "total"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    grant(&app, "user", 96_000).await;
    let (key, _) = key_with(&app, &token, json!({})).await;
    let chats = futures_util::future::join_all((0..200).map(|n| {
        let app = &app;
        // Half on the login token, half on a key: one user, one budget.
        let credential = if n % 2 == 0 { &token } else { &key };
        async move { app.chat(credential, &format!("n{n}")).await }
    }))
    .await;
    let answered = chats.iter().filter(|chat| chat.status == StatusCode::OK);
    assert_eq!(answered.count(), 30);
    for refused in chats.iter().filter(|chat| chat.status != StatusCode::OK) {
        refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
        assert_eq!(refused.json["resets_at"], Value::Null, "a total budget");
    }
    assert_eq!(app.llm.calls(), 30, "the refused never reached the model");
    assert_eq!(app.balance(&token).await, 100_000 - 3_000);
    app.assert_audit_passes().await;
    // The audit checks the user's spending against their calls.
    app.assert_audit_finds_after(
        "UPDATE users SET budget_spent = budget_spent + 7",
        "has 3007 spent this period but its calls hold 3000",
    )
    .await;
}

#[tokio::test]
async fn the_default_models_and_requests_a_minute_hold_for_a_user_without_their_own() {
    let app = TestApp::with_env(&[
        ("LLM_MODELS", "other"),
        ("USER_MODELS", "other"),
        ("USER_RPM", "2"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    // `/chat` asks `LLM_MODEL`, which the default leaves out: refused before anything.
    app.chat(&token, "hi")
        .await
        .assert_error(StatusCode::FORBIDDEN, "model_not_allowed");
    let models = app.get_authorized("/v1/models", &token).await;
    let listed: Vec<&str> = models.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| model["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["other"]);
    let ask = || {
        completions(
            &app,
            &token,
            json!({ "model": "other", "messages": [{ "role": "user", "content": "hi" }] }),
        )
    };
    let first = ask().await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(ask().await.status, StatusCode::OK);
    let refused = ask().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(app.llm.calls(), 2);
    assert_eq!(app.balance(&token).await, 4000 - 200);
}

#[tokio::test]
async fn a_bad_default_stops_the_start_naming_its_variable() {
    for (vars, named) in [
        (&[("USER_MODELS", "gpt-9")][..], "USER_MODELS"),
        (&[("USER_RPM", "0")], "USER_RPM"),
        (&[("USER_TPM", "many")], "USER_TPM"),
        (&[("USER_BUDGET_TOKENS", "0")], "USER_BUDGET_TOKENS"),
        (
            &[("USER_BUDGET_TOKENS", "5"), ("USER_BUDGET_PERIOD", "year")],
            "USER_BUDGET_PERIOD",
        ),
        (&[("USER_BUDGET_PERIOD", "day")], "USER_BUDGET_PERIOD"),
    ] {
        let err = tokenchat::Config::from_lookup(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
        .unwrap_err();
        assert_eq!(err.variable, named, "{vars:?}: {err}");
    }
}

#[tokio::test]
async fn an_operator_sets_shows_and_resets_a_users_limits_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = [("USER_RPM", "100")];
    assert!(run_with(dir.path(), &defaults, &["migrate"])
        .status
        .success());
    let mut create = Server::command(dir.path(), &[])
        .args(["user", "create", "alice"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = create.stdin.take().unwrap();
        writeln!(stdin, "pass123").unwrap();
    }
    assert!(create.wait().unwrap().success());
    let limits = |args: &[&str]| {
        let mut all = vec!["user", "limits", "alice"];
        all.extend_from_slice(args);
        run_with(dir.path(), &defaults, &all)
    };
    let shown = limits(&[]);
    assert!(shown.status.success(), "{shown:?}");
    assert_eq!(
        stdout(&shown).trim(),
        "limits of alice: budget none, models every one, rpm 100 (default), tpm none"
    );
    let set = limits(&["--budget", "200/day", "--rpm", "5", "--models", "demo"]);
    assert!(set.status.success(), "{set:?}");
    let said = stdout(&set);
    assert!(
        said.starts_with("limits of alice: budget 200/day (spent 0, resets ")
            && said.trim_end().ends_with(", models demo, rpm 5, tpm none"),
        "{said}"
    );
    for (bad, named) in [
        (&["--budget", "0/day"][..], "--budget"),
        (&["--budget", "200/year"], "--budget"),
        (&["--models", "gpt-9"], "--models"),
        (&["--rpm", "lots"], "--rpm"),
        (&["--tpm", "0"], "--tpm"),
    ] {
        let refused = limits(bad);
        assert_eq!(refused.status.code(), Some(1), "{bad:?}: {refused:?}");
        assert!(stderr(&refused).contains(named), "{bad:?}: {refused:?}");
    }
    let nobody = run_with(dir.path(), &defaults, &["user", "limits", "carol"]);
    assert_eq!(nobody.status.code(), Some(1));
    assert!(stderr(&nobody).contains("no user named carol"));

    // The server holds alice to them: two chats of a 200 budget, the third refused.
    let server = Server::start(dir.path(), &defaults);
    let http = reqwest::Client::new();
    let base = &server.base;
    let (_, issued) = send(
        http.post(format!("{base}/login"))
            .json(&json!({ "username": "alice", "password": "pass123" })),
    )
    .await;
    let token = issued["token"].as_str().unwrap().to_string();
    let chat = || {
        http.post(format!("{base}/chat"))
            .bearer_auth(&token)
            .json(&json!({ "message": "code hello world in go" }))
    };
    assert_eq!(send(chat()).await.0, 200);
    assert_eq!(send(chat()).await.0, 200);
    let (status, refused) = send(chat()).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (402, Some("budget_exceeded"))
    );
    let shown = limits(&[]);
    assert!(
        stdout(&shown).contains("budget 200/day (spent 200, resets "),
        "{shown:?}"
    );
    // `none` gives back the configuration's default: the budget is lifted.
    let reset = limits(&["--budget", "none", "--rpm", "none"]);
    assert_eq!(
        stdout(&reset).trim(),
        "limits of alice: budget none, models demo, rpm 100 (default), tpm none"
    );
    assert_eq!(send(chat()).await.0, 200);
    drop(server);
    assert!(run_with(dir.path(), &[], &["audit"]).status.success());
}

#[tokio::test]
async fn a_call_over_both_its_keys_and_its_users_budget_is_refused_for_its_keys_on_both_backends() {
    let app =
        TestApp::with_env(&[("USER_BUDGET_TOKENS", "100"), ("USER_BUDGET_PERIOD", "day")]).await;
    let token = app.user_with_token("user").await;
    let (key, _) = key_with(
        &app,
        &token,
        json!({ "budget": { "tokens": 100, "period": "total" } }),
    )
    .await;
    assert_eq!(app.chat(&key, "first").await.status, StatusCode::OK);
    let refused = app.chat(&key, "second").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
    assert_eq!(
        refused.json["resets_at"],
        Value::Null,
        "the key's total budget"
    );
    // The login token is held by the user's daily budget alone.
    let mine = app.chat(&token, "mine").await;
    mine.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
    assert!(mine.json["resets_at"].is_string(), "{mine:?}");
}
