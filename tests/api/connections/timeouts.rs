//! One connection's time-outs and limits: headers that never finish, an idle keep-alive
//! connection, a client that never reads, a request head beyond 64 KiB; a slow chat is
//! never cut by them.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{sleep, timeout},
};

use crate::{
    common::{Reply, TestApp},
    server::serve_in_process,
};

use super::{
    chat, connect, count_responses_until, count_responses_until_closed, health,
    pipeline_without_reading, read_response, server_closes_within, PIPELINED_REQUESTS,
};

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected_after_the_header_read_timeout() {
    let app = TestApp::with_env(&[("HEADER_READ_TIMEOUT_SECS", "1")]).await;
    let base = serve_in_process(&app).await;

    let mut slowloris = connect(&base).await;
    let started = Instant::now();
    slowloris
        .write_all(b"GET /health HTTP/1.1\r\nHost: tokenchat\r\n")
        .await
        .unwrap();
    // A header line every 200 ms, never the blank line that ends them: trickling must not
    // keep the connection open.
    let mut closed = false;
    for line in 0..25 {
        if server_closes_within(&mut slowloris, Duration::from_millis(200)).await {
            closed = true;
            break;
        }
        let header = format!("X-Trickle-{line}: still coming\r\n");
        if slowloris.write_all(header.as_bytes()).await.is_err() {
            closed = true;
            break;
        }
    }
    let waited = started.elapsed();
    assert!(closed, "still open after {waited:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );

    // Others are served as usual.
    let mut client = connect(&base).await;
    client.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client).await.0, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_but_a_slow_chat_is_not_cut()
{
    let app = TestApp::with_env(&[
        ("IDLE_TIMEOUT_SECS", "1"),
        ("HEADER_READ_TIMEOUT_SECS", "1"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;
    app.llm.set_reply(Reply::Stall(Duration::from_millis(2500)));

    let mut idle = connect(&base).await;
    idle.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut idle).await.0, 200);
    let idle_since = Instant::now();

    let mut busy = connect(&base).await;
    busy.write_all(chat(&base, &token, "a slow question").as_bytes())
        .await
        .unwrap();
    let asked_at = Instant::now();

    assert!(
        server_closes_within(&mut idle, Duration::from_secs(4)).await,
        "the idle connection is still open"
    );
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(3),
        "closed after {idle_for:?} idle"
    );

    // The chat outlasts both time-outs and still gets its answer.
    let (status, answer) = read_response(&mut busy).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], "Echo: a slow question");
    assert!(asked_at.elapsed() >= Duration::from_millis(2400));
    // The connection was kept alive, not condemned: it serves the next request, then closes
    // once idle in turn.
    busy.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut busy).await.0, 200);
    assert!(server_closes_within(&mut busy, Duration::from_secs(4)).await);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_client_that_never_reads_its_responses_is_dropped_after_the_write_stall_timeout() {
    let app = TestApp::with_env(&[("WRITE_STALL_TIMEOUT_SECS", "1")]).await;
    let base = serve_in_process(&app).await;

    let mut never_reads = pipeline_without_reading(&base, PIPELINED_REQUESTS).await;
    // Its output stalls within milliseconds; a second later it is dropped.
    sleep(Duration::from_secs(3)).await;
    let (responses, closed) = count_responses_until_closed(&mut never_reads, 5).await;
    assert!(closed, "still open; {responses} responses read");
    assert!(
        responses < PIPELINED_REQUESTS,
        "all {responses} responses were written"
    );

    // A client that reads is never stalled for long, however much it asks for, and may then
    // stay quiet for longer than the write-stall time-out.
    let mut reads = connect(&base).await;
    let pipelined = health(&base).repeat(2000);
    let (mut reader, mut writer) = reads.split();
    let (written, (responses, closed)) = tokio::join!(
        writer.write_all(pipelined.as_bytes()),
        count_responses_until(&mut reader, 2000, 10)
    );
    written.unwrap();
    assert_eq!((responses, closed), (2000, false));
    sleep(Duration::from_millis(1500)).await;
    reads.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut reads).await.0, 200);
}

#[tokio::test]
async fn a_request_head_beyond_64_kib_is_refused_without_being_served() {
    let app = TestApp::new().await;
    let base = serve_in_process(&app).await;
    let host = base.trim_start_matches("http://");

    let mut client = connect(&base).await;
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: {host}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    // The server may answer and close before it has read all of it.
    let _ = client.write_all(request.as_bytes()).await;
    let mut received = Vec::new();
    let _ = timeout(Duration::from_secs(5), client.read_to_end(&mut received)).await;
    let head = String::from_utf8_lossy(&received);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 431") || head.starts_with("HTTP/1.1 400"),
        "{head}"
    );

    // A head within the limit is served.
    let mut client = connect(&base).await;
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: {host}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    client.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client).await.0, 200);
}
