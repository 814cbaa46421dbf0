//! An answer sent before its request's body was read (a refused credential, a key past its
//! rate) ends its connection and says so, so a client does not send its next request on a
//! connection about to close; an answer after the body keeps the connection.

use std::time::Duration;

use tokio::{io::AsyncWriteExt, time::sleep};

use crate::{common::TestApp, server::serve_in_process};

use super::{chat, connect, read_response, read_whole_response, server_closes_within};

#[tokio::test]
async fn an_answer_before_the_body_was_read_says_connection_close_and_one_after_keeps_it() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;

    // The headers first, the body a moment later, as a client sending a large body does.
    let refused = chat(&base, "not-a-token", "hello");
    let (head, body) = refused.split_once("\r\n\r\n").unwrap();
    let mut stream = connect(&base).await;
    stream
        .write_all(format!("{head}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    sleep(Duration::from_millis(50)).await;
    let (status, response_head, _) = read_whole_response(&mut stream).await;
    assert_eq!(status, 401);
    let says_close = response_head
        .lines()
        .any(|line| line.eq_ignore_ascii_case("connection: close"));
    assert!(says_close, "{response_head}");
    let _ = stream.write_all(body.as_bytes()).await;
    assert!(server_closes_within(&mut stream, Duration::from_secs(2)).await);

    // Read whole: the connection goes on.
    let mut stream = connect(&base).await;
    for message in ["one", "two"] {
        let request = chat(&base, &token, message);
        stream.write_all(request.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut stream).await;
        assert_eq!(status, 200, "{body}");
    }
}
