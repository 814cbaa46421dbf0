//! The instant OpenAI-compatible fake model this process serves on loopback, whole and
//! streamed, slow when asked to be.

use std::{net::SocketAddr, time::Duration};

use axum::{body::Bytes, response::IntoResponse, routing::post, Router};
use futures_util::StreamExt;
use hyper::header::CONTENT_TYPE;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::{ANSWER, SLOW_CHUNK_EVERY, SLOW_MODEL, STREAM_CHUNKS};

/// An OpenAI-style stream of `ANSWER` in `STREAM_CHUNKS` chunks, `every` apart, with
/// usage and `[DONE]`.
fn streamed_answer(every: Option<Duration>) -> axum::body::Body {
    let size = ANSWER.len().div_ceil(STREAM_CHUNKS);
    let mut events: Vec<String> = ANSWER
        .as_bytes()
        .chunks(size)
        .enumerate()
        .map(|(n, piece)| {
            let delta = if n == 0 {
                json!({ "role": "assistant", "content": String::from_utf8_lossy(piece) })
            } else {
                json!({ "content": String::from_utf8_lossy(piece) })
            };
            let chunk = json!({ "id": "chatcmpl-bench", "object": "chat.completion.chunk",
                "created": 0, "model": "fake",
                "choices": [{ "index": 0, "delta": delta, "finish_reason": null }] });
            format!("data: {chunk}\n\n")
        })
        .collect();
    events.push(format!(
        "data: {}\n\n",
        json!({ "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": "fake", "choices": [],
            "usage": { "prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42 } })
    ));
    events.push("data: [DONE]\n\n".to_string());
    let chunks = futures_util::stream::iter(events).then(move |event| async move {
        if let Some(every) = every {
            tokio::time::sleep(every).await;
        }
        Ok::<_, std::convert::Infallible>(Bytes::from(event))
    });
    axum::body::Body::from_stream(chunks)
}

pub async fn start_fake_model() -> SocketAddr {
    start_fake_model_with(false).await
}

/// [`start_fake_model`], its whole answers reporting a `usage` (as its streams always do)
/// when `usage`.
pub async fn start_fake_model_with(usage: bool) -> SocketAddr {
    let mut completion = json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "fake",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": ANSWER }, "finish_reason": "stop" }]
    });
    if usage {
        completion["usage"] =
            json!({ "prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42 });
    }
    let completion = completion.to_string();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |body: Bytes| {
            let completion = completion.clone();
            async move {
                let slow = body.windows(6).any(|window| window == b"[slow]");
                let streamed = serde_json::from_slice::<Value>(&body)
                    .is_ok_and(|request| request["stream"] == true);
                if streamed {
                    let every = slow.then_some(SLOW_CHUNK_EVERY);
                    return (
                        [(CONTENT_TYPE, "text/event-stream")],
                        streamed_answer(every),
                    )
                        .into_response();
                }
                if slow {
                    tokio::time::sleep(SLOW_MODEL).await;
                }
                ([(CONTENT_TYPE, "application/json")], completion).into_response()
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake model");
    let addr = listener.local_addr().expect("address");
    // Like a real model server, each streamed chunk leaves at once.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.expect("fake model") });
    addr
}
