//! The official OpenAI Python SDK as a real client (`tests/sdk/openai_client.py`), and an
//! agent framework built on it, pydantic-ai (`tests/sdk/agent.py`), run with the Python of
//! `TOKENCHAT_SDK_PYTHON` (a virtual environment with both, which `.ci/run` makes); skipped,
//! saying so, when that is not set.

use serde_json::json;

use crate::{
    common::TestApp,
    server::{register_and_login, serve_in_process},
};

const PYTHON_VARIABLE: &str = "TOKENCHAT_SDK_PYTHON";

#[tokio::test]
async fn the_official_openai_sdk_lists_models_completes_streams_and_sees_our_errors() {
    let Ok(python) = std::env::var(PYTHON_VARIABLE) else {
        println!("OpenAI SDK test skipped: set {PYTHON_VARIABLE} to a Python with `openai`");
        return;
    };
    // Three chats' worth: the SDK spends two; the empty user spends all of theirs first.
    let app = TestApp::with_env(&[
        ("INITIAL_TOKENS", "300"),
        ("LLM_MODELS", "meta-llama/Llama-3.1-8B"),
        ("LLM_TIMEOUT_SECS", "1"),
    ])
    .await;
    let base = serve_in_process(&app).await;
    let http = reqwest::Client::new();
    let new_key = |token: String| {
        let (http, base) = (&http, &base);
        async move {
            let created: serde_json::Value = http
                .post(format!("{base}/keys"))
                .bearer_auth(token)
                .json(&json!({ "name": "sdk" }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (
                created["id"].clone(),
                created["key"].as_str().unwrap().to_string(),
            )
        }
    };
    let user = register_and_login(&http, &base, "pass123").await;
    let (_, key) = new_key(user.clone()).await;
    // Eight answers (a tool call's round trip among them), an embeddings call, and room for
    // the two requests that fail and are refunded.
    let grant = tokenchat::domain::GrantAmount::parse(700).unwrap();
    let name = tokenchat::domain::Username::parse("user").unwrap();
    tokenchat::services::accounts::grant(&app.state.db, &name, grant)
        .await
        .unwrap();
    let (revoked_id, revoked) = new_key(user.clone()).await;
    let deleted = http
        .delete(format!("{base}/keys/{revoked_id}"))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let poor = app.user_with_token("poor").await;
    for n in 0..3 {
        assert_eq!(
            app.chat(&poor, &format!("spend {n}")).await.json["tokens"],
            200 - 100 * n
        );
    }
    let (_, empty) = new_key(poor.clone()).await;
    let calls_before = app.llm.calls();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_client.py");
    let mut command = std::process::Command::new(&python);
    command
        .arg(script)
        .env("BASE_URL", format!("{base}/v1"))
        .env("API_KEY", &key)
        .env("REVOKED_KEY", &revoked)
        .env("EMPTY_KEY", &empty);
    // On the blocking pool: the server under test runs on this runtime meanwhile.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("sdk: every check passed"), "{stdout}");
    // Eight answers, the embeddings, the rejected request (once: the SDK does not retry a
    // 400), the failing chat (tried twice) and the stalled one (once) reached the model;
    // the chat refused for the empty balance never did, and nothing unanswered cost
    // anything.
    let received = app.llm.received();
    let rejected = received
        .iter()
        .filter(|request| request.body.to_string().contains("[reject]"))
        .count();
    assert_eq!(rejected, 1);
    assert_eq!(app.llm.calls(), calls_before + 13);
    assert_eq!(app.balance(&key).await, 1000 - 8 * 100 - 1);
    assert_eq!(app.balance(&empty).await, 0);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_pydantic_ai_agent_calls_its_tool_and_answers_through_tokenchat() {
    let Ok(python) = std::env::var(PYTHON_VARIABLE) else {
        println!("agent test skipped: set {PYTHON_VARIABLE} to a Python with `pydantic-ai`");
        return;
    };
    let app = TestApp::new().await;
    let base = serve_in_process(&app).await;
    let http = reqwest::Client::new();
    let user = register_and_login(&http, &base, "pass123").await;
    let created: serde_json::Value = http
        .post(format!("{base}/keys"))
        .bearer_auth(user)
        .json(&json!({ "name": "agent" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/agent.py");
    let mut command = std::process::Command::new(&python);
    command
        .arg(script)
        .env("BASE_URL", format!("{base}/v1"))
        .env("API_KEY", &key);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the agent failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("agent: every check passed"), "{stdout}");
    // Two calls: the model asked for the tool, then answered from what it said.
    let received = app.llm.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].body["tools"][0]["function"]["name"],
        "get_weather"
    );
    let last = received[1].body["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["role"], "tool");
    assert_eq!(last["content"], "sunny in Paris");
    assert_eq!(app.balance(&key).await, 3800);
    app.assert_all_settled().await;
}
