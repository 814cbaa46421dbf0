//! `BENCH_V1=1`: what `/v1` adds to a request that passes through, at one client: a 100 KB
//! chat completion with tools (a coding agent's: a long conversation and a dozen tool
//! schemas), the same call direct to the model and through tokenchat; and the time to the
//! first tool-call delta of a streamed tool call, direct and through. The model is a fake of
//! its own here, answering every request with a call to the first tool, whole or streamed.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{body::Bytes, response::IntoResponse, routing::post, Router};
use hyper::{header::CONTENT_TYPE, Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::client::{request, send_once, MakeRequest, Target};
use crate::measure::{closed_loop, first_piece_latency, Outcome};
use crate::report::{describe_machine, print_table, Row};
use crate::server::Server;
use crate::WARM_UP;

/// The request body's size: a conversation and tool schemas of about 100 KB.
const REQUEST_BYTES: usize = 100_000;
/// What marks the first tool-call delta of a stream, direct or relayed.
const TOOL_CALL_MARKER: &[u8] = b"\"tool_calls\"";

pub async fn run(dir: &Path, pinned: bool, measured: Duration) {
    let model = start_tool_model().await;
    let sqlite = format!("sqlite://{}", dir.join("bench-v1.db").display());
    let server = Server::start(dir, &sqlite, model, pinned).await;
    let target = Target {
        addr: server.addr,
        token: String::new(),
    };
    let login = target.register_and_login("bench", "bench-password").await;
    let (status, created) = send_once(
        server.addr,
        request(
            Method::POST,
            "/keys",
            Some(&login),
            json!({ "name": "bench" }).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().expect("an API key").to_string();
    println!(
        "tokenchat /v1 benchmark: {} s per scenario, 1 connection",
        measured.as_secs()
    );
    println!("{}", describe_machine(pinned));
    println!();

    let body = agent_request(false);
    assert!(body.len() >= REQUEST_BYTES, "{}", body.len());
    let streamed = agent_request(true);
    let mut rows = Vec::new();
    // The same for a small request (one message and one tool), to tell what is the route's
    // own from what grows with the body.
    let small = json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }],
        "tools": [{ "type": "function", "function": { "name": "tool_0" } }] })
    .to_string();
    let small_direct = measure(model, None, small.clone(), measured).await;
    rows.push(Row::new(
        "direct model call, small with a tool",
        1,
        &small_direct,
        None,
    ));
    let small_through = measure(server.addr, Some(key.clone()), small, measured).await;
    rows.push(Row::new(
        "POST /v1/chat/completions, small with a tool",
        1,
        &small_through,
        server.peak_rss(),
    ));
    let direct = measure(model, None, body.clone(), measured).await;
    rows.push(Row::new(
        "direct model call, 100 KB with tools",
        1,
        &direct,
        None,
    ));
    server.reset_peak();
    let through = measure(server.addr, Some(key.clone()), body, measured).await;
    rows.push(Row::new(
        "POST /v1/chat/completions, 100 KB with tools",
        1,
        &through,
        server.peak_rss(),
    ));
    let first_direct = first_tool_call(model, None, streamed.clone(), measured).await;
    rows.push(Row::new(
        "first tool-call delta, direct",
        1,
        &first_direct,
        None,
    ));
    server.reset_peak();
    let first_through = first_tool_call(server.addr, Some(key), streamed, measured).await;
    rows.push(Row::new(
        "first tool-call delta, through /v1",
        1,
        &first_through,
        server.peak_rss(),
    ));
    print_table(&rows);
    let added = |with: &Outcome, without: &Outcome, quantile: f64| {
        with.histogram.value_at_quantile(quantile) as f64 / 1000.0
            - without.histogram.value_at_quantile(quantile) as f64 / 1000.0
    };
    println!();
    println!(
        "/v1 overhead at 1 connection, a small request: p50 {:.3} ms, p99 {:.3} ms",
        added(&small_through, &small_direct, 0.5),
        added(&small_through, &small_direct, 0.99)
    );
    println!(
        "/v1 overhead at 1 connection, 100 KB with tools: p50 {:.3} ms, p99 {:.3} ms",
        added(&through, &direct, 0.5),
        added(&through, &direct, 0.99)
    );
    println!(
        "time to first tool-call delta added by /v1: p50 {:.3} ms, p99 {:.3} ms",
        added(&first_through, &first_direct, 0.5),
        added(&first_through, &first_direct, 0.99)
    );
}

fn make(key: Option<String>, body: String) -> Arc<MakeRequest> {
    Arc::new(move |_, _| {
        request(
            Method::POST,
            "/v1/chat/completions",
            key.as_deref(),
            body.clone(),
        )
    })
}

async fn measure(
    addr: SocketAddr,
    key: Option<String>,
    body: String,
    measured: Duration,
) -> Outcome {
    let make = make(key, body);
    closed_loop(addr, 1, WARM_UP, StatusCode::OK, make.clone()).await;
    closed_loop(addr, 1, measured, StatusCode::OK, make).await
}

async fn first_tool_call(
    addr: SocketAddr,
    key: Option<String>,
    body: String,
    measured: Duration,
) -> Outcome {
    first_piece_latency(addr, make(key, body), TOOL_CALL_MARKER, measured).await
}

/// A coding agent's request: a dozen tools with long descriptions and a conversation of
/// earlier turns, about [`REQUEST_BYTES`] in all.
fn agent_request(stream: bool) -> String {
    let tools: Vec<Value> = (0..12)
        .map(|n| {
            json!({ "type": "function", "function": {
                "name": format!("tool_{n}"),
                "description": "Reads, edits or searches files of the project. ".repeat(20),
                "parameters": { "type": "object", "properties": {
                    "path": { "type": "string", "description": "A path in the project" },
                    "pattern": { "type": "string" },
                    "limit": { "type": "integer" },
                }, "required": ["path"] },
            } })
        })
        .collect();
    let mut messages = vec![json!({ "role": "system", "content": "You are a coding agent." })];
    let turn = "fn main() { println!(\"hello\"); } // an earlier file, read back\n".repeat(30);
    let tools_bytes = serde_json::to_string(&tools).map_or(0, |text| text.len());
    while serde_json::to_string(&messages).map_or(0, |text| text.len()) + tools_bytes
        < REQUEST_BYTES
    {
        messages.push(json!({ "role": "user", "content": "Look at this file." }));
        messages.push(json!({ "role": "assistant", "content": turn }));
    }
    messages.push(json!({ "role": "user", "content": "Now fix the bug." }));
    let mut body = json!({ "model": "llama3.2", "messages": messages, "tools": tools });
    if stream {
        body["stream"] = json!(true);
    }
    body.to_string()
}

/// A model that answers every request with a call to `tool_0`: whole, or streamed as OpenAI
/// streams one (the role, the call's name, its arguments in three pieces, the finish, the
/// usage, `[DONE]`).
async fn start_tool_model() -> SocketAddr {
    let call = json!({ "index": 0, "id": "call_bench", "type": "function",
        "function": { "name": "tool_0", "arguments": "{\"path\":\"src/main.rs\"}" } });
    let whole = json!({ "id": "chatcmpl-bench", "object": "chat.completion", "created": 0,
        "model": "llama3.2-2024", "choices": [{ "index": 0, "message": { "role": "assistant",
        "content": null, "tool_calls": [call] }, "finish_reason": "tool_calls" }],
        "usage": { "prompt_tokens": 25000, "completion_tokens": 12, "total_tokens": 25012 } })
    .to_string();
    let chunk = |delta: Value, finish: Value| {
        let chunk = json!({ "id": "chatcmpl-bench", "object": "chat.completion.chunk",
            "created": 0, "model": "llama3.2-2024",
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] });
        format!("data: {chunk}\n\n")
    };
    let mut events = vec![
        chunk(json!({ "role": "assistant", "content": null }), Value::Null),
        chunk(
            json!({ "tool_calls": [{ "index": 0, "id": "call_bench", "type": "function",
                "function": { "name": "tool_0", "arguments": "" } }] }),
            Value::Null,
        ),
    ];
    for piece in ["{\"path\":", "\"src/main", ".rs\"}"] {
        let delta = json!({ "tool_calls": [{ "index": 0, "function": { "arguments": piece } }] });
        events.push(chunk(delta, Value::Null));
    }
    events.push(chunk(json!({}), json!("tool_calls")));
    events.push(format!(
        "data: {}\n\n",
        json!({ "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": "llama3.2-2024", "choices": [],
            "usage": { "prompt_tokens": 25000, "completion_tokens": 12, "total_tokens": 25012 } })
    ));
    events.push("data: [DONE]\n\n".to_string());
    let streamed: Bytes = events.concat().into();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |body: Bytes| {
            let (whole, streamed) = (whole.clone(), streamed.clone());
            async move {
                let stream = serde_json::from_slice::<Value>(&body)
                    .is_ok_and(|request| request["stream"] == true);
                if stream {
                    ([(CONTENT_TYPE, "text/event-stream")], streamed).into_response()
                } else {
                    ([(CONTENT_TYPE, "application/json")], whole).into_response()
                }
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the tool model");
    let addr = listener.local_addr().expect("address");
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.expect("tool model") });
    addr
}
