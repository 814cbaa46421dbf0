//! SIGTERM on the built binary: half-sent requests end, stalled chats are refunded or
//! answered 503 within the grace, and the process exits cleanly by its deadline.

use std::time::{Duration, Instant};

use tokio::{io::AsyncWriteExt, time::sleep};

use crate::{
    common::{FakeLlm, Reply},
    server::{register_and_login, send_a_stalled_chat, wait_until, Server},
};

use super::{chat, connect, read_response, server_closes_within};

#[tokio::test]
async fn sigterm_ends_a_half_sent_request_and_refunds_a_stalled_chat_within_the_grace() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("LLM_TIMEOUT_SECS", "30"),
        ("SHUTDOWN_GRACE_SECS", "2"),
    ];
    let mut server = Server::start(dir.path(), &vars);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let token = register_and_login(&http, &base, "pass123").await;

    let stalled = send_a_stalled_chat(&llm, &http, &base, &token).await;
    // Headers complete, a body of 1000 bytes promised and 10 sent.
    let mut half_sent = connect(&base).await;
    let headers = format!(
        "POST /chat HTTP/1.1\r\nHost: tokenchat\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"message\""
    );
    half_sent.write_all(headers.as_bytes()).await.unwrap();
    sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    server.signal("-TERM");
    let mut exit = None;
    while exit.is_none() && signalled.elapsed() < Duration::from_secs(10) {
        exit = server.child.try_wait().unwrap();
        sleep(Duration::from_millis(50)).await;
    }
    let exit = exit.expect("still running 10 s after SIGTERM");
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM"
    );
    if let Ok(response) = stalled.await.unwrap() {
        assert_eq!(response.status(), 503);
    }
    assert!(server_closes_within(&mut half_sent, Duration::from_secs(1)).await);
    assert!(server
        .log
        .lock()
        .unwrap()
        .contains("shutdown grace is over"));

    let settled = crate::server::only_chat_and_its_balance(dir.path()).await;
    assert_eq!(settled, ("failed".to_string(), 4000));
    let audit = Server::command(dir.path(), &vars)
        .arg("audit")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{report}");
}

#[tokio::test]
async fn sigterm_past_the_grace_delivers_the_503_of_a_cancelled_chat_and_exits_cleanly() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("LLM_TIMEOUT_SECS", "30"),
        ("SHUTDOWN_GRACE_SECS", "1"),
    ];
    let mut server = Server::start(dir.path(), &vars);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let token = register_and_login(&http, &base, "pass123").await;

    llm.set_reply(Reply::Stall(Duration::from_secs(30)));
    let mut chatting = connect(&base).await;
    chatting
        .write_all(chat(&base, &token, "never answered").as_bytes())
        .await
        .unwrap();
    wait_until(|| async { llm.calls() == 1 }).await;

    server.signal("-TERM");
    let (status, answer) = read_response(&mut chatting).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["code"], "shutting_down");
    let signalled = Instant::now();
    let mut exit = None;
    while exit.is_none() && signalled.elapsed() < Duration::from_secs(10) {
        exit = server.child.try_wait().unwrap();
        sleep(Duration::from_millis(50)).await;
    }
    let exit = exit.expect("still running 10 s after SIGTERM");
    assert!(exit.success(), "{exit:?}");
}
