//! Every way a stream can end early, and its charge: the model dying before or after text
//! or going silent, the client leaving before or after a delta or before `done`, and the
//! end of shutdown's grace.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::common::{Reply, TestApp};

use super::{
    deltas, only_chat, settled_chat, stream_chat, stream_message, stream_to_end, wait_until,
};

#[tokio::test]
async fn a_model_that_dies_after_text_was_delivered_ends_the_stream_with_an_error_and_charges_by_the_abandoned_rule(
) {
    for message in ["[die-mid-stream] a b c d", "[error-mid-stream] a b c d"] {
        for (rule, charged) in [("delivered", 100), ("never", 0)] {
            let app = TestApp::with_env(&[("ABANDONED_STREAM_CHARGE", rule)]).await;
            let token = app.user_with_token("user").await;
            let events = stream_to_end(&app, &token, message).await;
            let (name, error) = events.last().unwrap();
            assert_eq!(name, "error", "{message}: {events:?}");
            assert_eq!(error["code"], "upstream_error");
            assert_eq!(error["tokens_charged"], charged, "{rule}");
            assert!(error["error"].as_str().is_some_and(|text| !text.is_empty()));
            let deltas = deltas(&events).concat();
            assert!(!deltas.is_empty(), "{events:?}");
            let chat = only_chat(&app, &token).await;
            let status = if charged > 0 { "abandoned" } else { "failed" };
            assert_eq!(chat["status"], status, "{rule}");
            assert_eq!(chat["tokens_charged"], charged);
            assert_eq!(chat["response"], deltas, "the partial text is kept");
            assert_eq!(app.balance(&token).await, 4000 - charged);
            app.assert_all_settled().await;
        }
    }
}

#[tokio::test]
async fn a_model_that_dies_before_any_text_is_refunded_whatever_the_rule() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::DieMidStream { after_words: 0 });
    let events = stream_to_end(&app, &token, "hello").await;
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(error["tokens_charged"], 0);
    assert!(deltas(&events).concat().is_empty(), "{events:?}");
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "failed");
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_silent_past_the_idle_limit_ends_as_a_time_out_charged_for_what_was_delivered() {
    let app = TestApp::with_env(&[("LLM_STREAM_IDLE_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    let started = std::time::Instant::now();
    let events = stream_to_end(&app, &token, "[stall-mid-stream] a b").await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(error["code"], "upstream_timeout");
    assert_eq!(error["tokens_charged"], 100);
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["response"], "Echo: ");
    assert_eq!(app.balance(&token).await, 3900);
    // The silent upstream request was let go.
    assert!(
        app.llm
            .wait_for_cancelled_streams(1, Duration::from_secs(1))
            .await
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_client_gone_after_a_delta_leaves_an_abandoned_chat_charged_and_the_model_stopped() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let mut events = stream_message(&app, &token, "one two three four five six")
        .await
        .events();
    assert_eq!(events.next().await.unwrap().0, "start");
    let (name, first) = events.next().await.unwrap();
    assert_eq!(name, "delta");
    drop(events);
    assert!(
        app.llm
            .wait_for_cancelled_streams(1, Duration::from_secs(1))
            .await,
        "the upstream request was not dropped within a second"
    );
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 100);
    let stored = chat["response"].as_str().unwrap();
    assert!(
        stored.starts_with(first["content"].as_str().unwrap()),
        "{chat}"
    );
    assert!(
        stored.len() < "Echo: one two three four five six".len(),
        "{chat}"
    );
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(app.llm.finished_streams(), 0);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_client_gone_before_any_delta_is_refunded_and_never_means_always_refunded() {
    // Gone after the start, before the model wrote a word.
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::StallMidStream {
        after_words: 0,
        stall: Duration::from_secs(60),
    });
    let mut events = stream_message(&app, &token, "hello").await.events();
    assert_eq!(events.next().await.unwrap().0, "start");
    drop(events);
    assert!(
        app.llm
            .wait_for_cancelled_streams(1, Duration::from_secs(1))
            .await
    );
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 0);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;

    // ABANDONED_STREAM_CHARGE=never: refunded even after deltas.
    let app = TestApp::with_env(&[("ABANDONED_STREAM_CHARGE", "never")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let mut events = stream_message(&app, &token, "one two three four")
        .await
        .events();
    events.next().await.unwrap();
    assert_eq!(events.next().await.unwrap().0, "delta");
    drop(events);
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 0);
    assert!(!chat["response"].as_str().unwrap().is_empty());
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_finished_answer_is_charged_even_when_its_client_left_before_done() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let mut events = stream_message(&app, &token, "quick").await.events();
    assert_eq!(events.next().await.unwrap().0, "start");
    // Let the model finish while nobody reads, then leave.
    assert!(wait_until(|| app.llm.finished_streams() == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(events);
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "answered");
    assert_eq!(chat["response"], "Echo: quick");
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_cut_by_the_end_of_shutdown_grace_ends_with_an_error_and_is_refunded() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let mut events = stream_message(&app, &token, "one two three four five")
        .await
        .events();
    assert_eq!(events.next().await.unwrap().0, "start");
    assert_eq!(events.next().await.unwrap().0, "delta");
    app.state.chats.in_flight().cut_short.cancel();
    let rest = events.rest().await;
    let (name, error) = rest.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(error["code"], "shutting_down");
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "failed");
    assert_eq!(chat["tokens_charged"], 0);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_of_white_space_alone_is_unusable_and_refunded_though_it_was_delivered() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::BlankContent);
    let events = stream_to_end(&app, &token, "hello").await;
    assert_eq!(deltas(&events).concat(), " \n ", "{events:?}");
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(error["code"], "upstream_error");
    assert_eq!(error["tokens_charged"], 0);
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "failed");
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_chat_answered_without_text_shows_nothing_and_is_refunded_whole_or_streamed() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    // The model refuses in OpenAI's `refusal` field: `/chat` shows only text, so its client
    // would be sent nothing and charged for it.
    let whole = app.chat(&token, "[refuse] hello").await;
    whole.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    let events = stream_to_end(&app, &token, "[refuse] hello").await;
    assert!(deltas(&events).concat().is_empty(), "{events:?}");
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(error["code"], "upstream_error");
    assert_eq!(error["tokens_charged"], 0);
    assert_eq!(app.llm.calls(), 2);
    assert_eq!(app.balance(&token).await, 4000);
    assert_eq!(app.chat_counts().await, [("failed".to_string(), 2)]);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_left_by_its_client_after_its_conversation_was_deleted_keeps_none_of_its_text() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let first = app.chat(&token, "a first secret").await;
    let conversation = first.json["conversation_id"].clone();
    app.llm.set_reply(Reply::StallMidStream {
        after_words: 2,
        stall: Duration::from_secs(60),
    });
    let body =
        json!({ "message": "a second secret", "stream": true, "conversation_id": conversation });
    let mut events = stream_chat(&app, &token, body, None).await.events();
    assert_eq!(events.next().await.unwrap().0, "start");
    assert_eq!(events.next().await.unwrap().0, "delta");
    let authorization = format!("Bearer {token}");
    let deleted = app
        .request(
            Method::DELETE,
            &format!("/conversations/{conversation}"),
            &[("authorization", &authorization)],
            "",
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    // The client leaves with a delta delivered: abandoned, its partial answer kept as the
    // charge rule says, but not its text.
    drop(events);
    let statuses = || async {
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_as::<_, (String, Option<String>, String)>(
            "SELECT status, response, message FROM chats ORDER BY id")
            .fetch_all(pool)
            .await)
        .unwrap()
    };
    let mut chats = statuses().await;
    for _ in 0..300 {
        if chats[1].0 != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        chats = statuses().await;
    }
    assert_eq!(chats.len(), 2, "{chats:?}");
    assert_eq!(chats[1], ("abandoned".to_string(), None, String::new()));
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_whose_every_choice_finished_is_whole_without_done_and_one_unfinished_is_not() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let chunk = |index: u64, delta: serde_json::Value, finish: serde_json::Value| {
        json!({ "object": "chat.completion.chunk", "model": "llama3.2",
                "choices": [{ "index": index, "delta": delta, "finish_reason": finish }] })
    };
    let finished = vec![
        chunk(0, json!({ "content": "all " }), json!(null)),
        chunk(0, json!({ "content": "here" }), json!(null)),
        chunk(0, json!({}), json!("stop")),
        json!({ "object": "chat.completion.chunk", "choices": [],
                "usage": { "prompt_tokens": 9, "completion_tokens": 2 } }),
    ];
    app.llm.set_reply(Reply::WithoutDone(finished));
    let events = stream_to_end(&app, &token, "hello").await;
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    assert_eq!(done["usage"]["completion_tokens"], 2);
    assert_eq!(deltas(&events).concat(), "all here");
    assert_eq!(settled_chat(&app, &token).await["status"], "answered");
    // Two choices named, one finished: cut off, as before.
    let unfinished = vec![
        chunk(0, json!({ "content": "half" }), json!(null)),
        chunk(1, json!({ "content": "other" }), json!(null)),
        chunk(0, json!({}), json!("stop")),
    ];
    app.llm.set_reply(Reply::WithoutDone(unfinished));
    let events = stream_to_end(&app, &token, "again").await;
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(error["code"], "upstream_error");
    // A finish reason of "" names none.
    let blank = vec![
        chunk(0, json!({ "content": "cut" }), json!("")),
        chunk(0, json!({ "content": " short" }), json!("")),
    ];
    app.llm.set_reply(Reply::WithoutDone(blank));
    let events = stream_to_end(&app, &token, "once more").await;
    assert_eq!(events.last().unwrap().0, "error", "{events:?}");
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_left_open_and_silent_after_every_choice_finished_ends_whole_at_the_idle_limit() {
    let app = TestApp::with_env(&[("LLM_STREAM_IDLE_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        json!({ "object": "chat.completion.chunk", "model": "llama3.2",
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
    };
    app.llm.set_reply(Reply::OpenAfter(vec![
        chunk(json!({ "content": "all " }), json!(null)),
        chunk(json!({ "content": "here" }), json!("stop")),
        json!({ "object": "chat.completion.chunk", "choices": [],
                "usage": { "prompt_tokens": 9, "completion_tokens": 2 } }),
    ]));
    let events = stream_to_end(&app, &token, "hello").await;
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    assert_eq!(done["usage"]["completion_tokens"], 2);
    assert_eq!(done["tokens_charged"], 100);
    assert_eq!(deltas(&events).concat(), "all here");
    assert_eq!(settled_chat(&app, &token).await["status"], "answered");
    assert!(
        app.llm
            .wait_for_cancelled_streams(1, Duration::from_secs(1))
            .await
    );
    // Silent before its finish: a time-out, as before.
    app.llm.set_reply(Reply::OpenAfter(vec![chunk(
        json!({ "content": "half" }),
        json!(null),
    )]));
    let events = stream_to_end(&app, &token, "again").await;
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(error["code"], "upstream_timeout");
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_client_reading_too_slowly_has_its_stream_settled_and_charged_by_the_streams_time_limit()
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1"), ("LLM_STREAM_MAX_SECS", "3")]).await;
    let token = app.user_with_token("user").await;
    // Far more than the buffers between the server and a client with a small window hold.
    let piece = "x".repeat(16 * 1024);
    let mut chunks: Vec<serde_json::Value> = (0..500)
        .map(|_| json!({ "object": "chat.completion.chunk",
                         "choices": [{ "index": 0, "delta": { "content": piece }, "finish_reason": null }] }))
        .collect();
    chunks.push(json!({ "object": "chat.completion.chunk",
                        "choices": [{ "index": 0, "delta": {}, "finish_reason": "stop" }] }));
    app.llm.set_reply(Reply::Verbatim {
        whole: json!({}),
        chunks,
    });
    let base = crate::server::serve_in_process(&app).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut client = socket
        .connect(base.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    let body = json!({ "message": "a long one", "stream": true }).to_string();
    let request = format!(
        "POST /chat HTTP/1.1\r\nHost: tokenchat\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    // The client reads nothing. Past the stream's time (3 s) its own task settles the chat,
    // charged for what it delivered, long before recovery could count it abandoned.
    let pending = || async {
        app.get_authorized("/chats", &token).await.json["chats"][0]["status"] == "pending"
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(pending().await, "still under way while in time");
    for _ in 0..60 {
        if !pending().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let chat = app.get_authorized("/chats", &token).await.json["chats"][0].clone();
    assert_eq!(chat["status"], "abandoned", "{}", chat["status"]);
    assert_eq!(chat["tokens_charged"], 100);
    // Read at last, the stream tells what it cost.
    let mut read = Vec::new();
    let reading = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buffer = vec![0; 64 * 1024];
        while !read.ends_with(b"\r\n0\r\n\r\n") {
            match client.read(&mut buffer).await.unwrap() {
                0 => break,
                n => read.extend_from_slice(&buffer[..n]),
            }
        }
    });
    reading.await.unwrap();
    let tail = String::from_utf8_lossy(&read[read.len().saturating_sub(400)..]).into_owned();
    assert!(tail.contains("event: error"), "{tail}");
    assert!(tail.contains(r#""tokens_charged":100"#), "{tail}");
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}
