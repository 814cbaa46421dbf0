//! The real server over TCP: in-process on `127.0.0.1:0` here, and the built binary as an
//! operator runs it in `binary` (start-up, configuration errors, graceful shutdown,
//! restarts).

mod binary;
mod disk_full;
pub(crate) use binary::Server;

use std::time::Duration;

use crate::common::{Reply, TestApp};
use serde_json::{json, Value};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// Serves `app`'s state on an ephemeral port; returns the base URL.
pub(crate) async fn serve_in_process(app: &TestApp) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = app.state.clone();
    tokio::spawn(tokenchat::serve(listener, state, std::future::pending()));
    base
}

#[tokio::test]
async fn the_walkthrough_works_over_tcp() {
    let app = TestApp::new().await;
    let base = serve_in_process(&app).await;
    let http = reqwest::Client::new();

    let registered = http
        .post(format!("{base}/register/"))
        .json(&json!({ "username": "user", "password": "pass123" }))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    assert_eq!(registered.headers()["content-type"], "application/json");

    let login = http.post(format!("{base}/login"));
    let (_, login) = send(login.form(&[("username", "user"), ("password", "pass123")])).await;
    let token = login["token"].as_str().unwrap();

    let chat = http
        .post(format!("{base}/chat"))
        .header("authorization", token);
    let (status, chat) = send(chat.json(&json!({ "message": "code hello world in python" }))).await;
    assert_eq!(status, 200);
    assert_eq!(chat["response"], "Echo: code hello world in python");

    let (_, balance) = send(http.post(format!("{base}/balance/")).bearer_auth(token)).await;
    assert_eq!(balance, json!({ "tokens": 3900 }));

    let (status, missing) = send(http.get(format!("{base}/nowhere"))).await;
    assert_eq!(status, 404);
    assert_eq!(missing["code"], "not_found");
}

#[tokio::test]
async fn a_client_that_goes_away_mid_chat_is_not_charged_and_nothing_stays_pending() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;
    app.llm.set_reply(Reply::Stall(Duration::from_secs(2)));

    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).await.unwrap();
    let body = json!({ "message": "a slow question" }).to_string();
    let request = format!(
        "POST /chat/ HTTP/1.1\r\nHost: {address}\r\nAuthorization: Token {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Wait until the chat is reserved and the model has been asked, then hang up.
    wait_until(|| async { app.llm.calls() == 1 }).await;
    assert_eq!(app.balance(&token).await, 3900, "reserved while in flight");
    drop(stream);

    wait_until(|| async { app.chat_counts().await == [("failed".to_string(), 1)] }).await;
    assert_eq!(app.balance(&token).await, 4000);

    // An answered chat after it is charged as usual: grant - cost x answered.
    app.llm.set_reply(Reply::Echo);
    assert_eq!(app.chat(&token, "a quick one").await.json["tokens"], 3900);
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_restart_keeps_users_tokens_and_balances() {
    let mut app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.chat(&token, "hello").await;
    app.restart(&[]).await;
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(app.login("user", "pass123").await.status, 200);
    app.register("USER", "pass123")
        .await
        .assert_error(axum::http::StatusCode::CONFLICT, "username_taken");
}

#[tokio::test]
async fn the_database_holds_no_plaintext_password_or_token() {
    let app = TestApp::new().await;
    let password = "correct-horse-battery-staple";
    app.register("user", password).await;
    let token = app.login("user", password).await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    app.chat(&token, "hello").await;

    let stored_hash: String = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(pool)
        .await)
        .unwrap();
    assert!(stored_hash.starts_with("$argon2id$"));
    let token_hash: String = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT token_hash FROM login_tokens")
        .fetch_one(pool)
        .await)
        .unwrap();
    assert_eq!(token_hash, tokenchat::services::auth::token_hash(&token));

    // Every byte on disk: the database, its write-ahead log and shared memory.
    let Some(file) = app.database.sqlite_file() else {
        println!("on PostgreSQL the files are the server's: only the stored hashes were checked");
        return;
    };
    app.state.db.close().await;
    let mut on_disk = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", file.display());
        on_disk.extend(std::fs::read(path).unwrap_or_default());
    }
    assert!(on_disk.len() > 4096);
    for secret in [password.as_bytes(), token.as_bytes()] {
        assert!(
            !on_disk.windows(secret.len()).any(|window| window == secret),
            "{} found on disk",
            String::from_utf8_lossy(secret)
        );
    }
}

/// The status of the one chat in the SQLite file in `dir`, and its user's balance.
pub(crate) async fn only_chat_and_its_balance(dir: &std::path::Path) -> (String, i64) {
    let database_url = format!("sqlite://{}", dir.join("tokenchat.db").display());
    let db = tokenchat::db::connect(&database_url, tokenchat::db::Open::ExistingOnly)
        .await
        .unwrap();
    let row = tokenchat::db_run!(&db, pool => {
        sqlx::query_as("SELECT c.status, u.tokens FROM chats c JOIN users u ON u.id = c.user_id")
            .fetch_one(pool)
            .await
    })
    .unwrap();
    db.close().await;
    row
}

/// Sends a request; its status and JSON body.
pub(crate) async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Registers `user` with `password` on a running server and returns a login token.
pub(crate) async fn register_and_login(
    http: &reqwest::Client,
    base: &str,
    password: &str,
) -> String {
    let credentials = json!({ "username": "user", "password": password });
    let (registered, _) = send(http.post(format!("{base}/register")).json(&credentials)).await;
    assert_eq!(registered, 201);
    let (_, login) = send(http.post(format!("{base}/login")).json(&credentials)).await;
    login["token"].as_str().unwrap().to_string()
}

/// Polls `condition` for up to twenty seconds.
pub(crate) async fn wait_until<F, Fut>(condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within twenty seconds");
}

/// Sends `user`'s chat to a running server whose model `llm` is set to stall for thirty
/// seconds, and returns once the model has it: the chat is reserved and waiting.
pub(crate) async fn send_a_stalled_chat(
    llm: &crate::common::FakeLlm,
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    llm.set_reply(Reply::Stall(Duration::from_secs(30)));
    let request = http
        .post(format!("{base}/chat"))
        .bearer_auth(token)
        .json(&json!({ "message": "never answered" }));
    let stalled = tokio::spawn(request.send());
    wait_until(|| async { llm.calls() == 1 }).await;
    stalled
}
