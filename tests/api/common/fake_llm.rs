//! A real HTTP server on an ephemeral loopback port that speaks OpenAI's Chat Completions
//! protocol and can answer, fail, talk nonsense or stall, as told.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use rand::{rngs::OsRng, Rng};
use serde_json::{json, Value};

/// How the fake answers the next requests.
#[derive(Clone, Debug)]
pub enum Reply {
    /// `choices[0].message.content` = "Echo: <the user's message>".
    Echo,
    /// This status, with an OpenAI-style error body.
    Status(u16),
    /// A 200 whose body is not JSON.
    Garbage,
    /// A 200 with `"choices": []`.
    NoChoices,
    /// A 200 whose answer is an empty string.
    EmptyContent,
    /// Waits this long, then echoes.
    Stall(Duration),
    /// Fails (500) this fraction of requests at random and echoes the rest.
    FailRandomly(f64),
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Received {
    pub authorization: Option<String>,
    pub body: Value,
}

#[derive(Clone)]
pub struct FakeLlm {
    pub base_url: String,
    shared: Arc<Shared>,
}

struct Shared {
    reply: Mutex<Reply>,
    received: Mutex<Vec<Received>>,
    calls: AtomicUsize,
}

impl FakeLlm {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            reply: Mutex::new(Reply::Echo),
            received: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base_url, shared }
    }

    pub fn set_reply(&self, reply: Reply) {
        *self.shared.reply.lock().unwrap() = reply;
    }

    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    shared.calls.fetch_add(1, Ordering::SeqCst);
    let user_message = body["messages"][1]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    shared.received.lock().unwrap().push(Received {
        authorization: headers
            .get("authorization")
            .map(|value| value.to_str().unwrap().to_string()),
        body,
    });
    let reply = match user_message.split(']').next().unwrap_or_default() {
        "[fail" => Reply::Status(500),
        "[garbage" => Reply::Garbage,
        "[stall" => Reply::Stall(Duration::from_secs(10)),
        _ => shared.reply.lock().unwrap().clone(),
    };
    let reply = match reply {
        Reply::FailRandomly(fraction) if OsRng.gen_bool(fraction) => Reply::Status(500),
        Reply::FailRandomly(_) => Reply::Echo,
        other => other,
    };
    match reply {
        Reply::Echo => completion(&format!("Echo: {user_message}")),
        Reply::Stall(delay) => {
            tokio::time::sleep(delay).await;
            completion(&format!("Echo: {user_message}"))
        }
        Reply::Status(code) => (
            StatusCode::from_u16(code).unwrap(),
            Json(json!({ "error": { "message": "the fake model is failing", "type": "server_error" } })),
        )
            .into_response(),
        Reply::Garbage => (StatusCode::OK, "<html>definitely not json</html>").into_response(),
        Reply::NoChoices => Json(json!({ "id": "x", "object": "chat.completion", "choices": [] })).into_response(),
        Reply::EmptyContent => completion(""),
        Reply::FailRandomly(_) => unreachable!("decided above"),
    }
}

fn completion(content: &str) -> Response {
    Json(json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": "fake",
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content },
            "finish_reason": "stop"
        }]
    }))
    .into_response()
}
