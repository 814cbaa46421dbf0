//! A real HTTP server on an ephemeral loopback port that speaks OpenAI's Chat Completions
//! protocol and can answer, fail, talk nonsense or stall, as told.
//!
//! It answers both ways OpenAI does: one JSON completion, or, when the request says
//! `"stream": true`, server-sent events (`data: <chunk>\n\n` ... `data: [DONE]\n\n`).
//! A streamed answer can also break the way real upstreams do: the connection cut mid-answer,
//! an error event mid-answer, a long silence, or a slow trickle. The fake counts streams that
//! tokenchat abandoned before their end, so tests can see that a client going away reaches
//! the upstream call.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use hyper::body::Frame;
use rand::{rngs::OsRng, Rng};
use serde::Serialize;
use serde_json::{json, Value};
// Split into words as the demo model streams them: each with the white space after it.
use tokenchat::llm::demo::pieces;
use tokio::time::Sleep;

/// How the fake answers the next requests.
#[derive(Clone, Debug)]
pub enum Reply {
    /// `choices[0].message.content` = "Echo: <the user's message>", with `usage`.
    Echo,
    /// Like `Echo`, but without `usage` (and, streamed, without a usage chunk even when asked),
    /// as some OpenAI-compatible servers answer.
    EchoWithoutUsage,
    /// This status, with an OpenAI-style error body.
    Status(u16),
    /// A 200 whose body is not JSON.
    Garbage,
    /// A 200 with `"choices": []`.
    NoChoices,
    /// A 200 whose answer is an empty string.
    EmptyContent,
    /// A 200 whose answer is only white space (streamed: one delta of it, then the end).
    BlankContent,
    /// Waits this long, then echoes (streamed: waits before sending the headers).
    Stall(Duration),
    /// Fails (500) this fraction of requests at random and echoes the rest.
    FailRandomly(f64),
    /// Streamed: the role chunk and this many words, then the connection is cut, with neither
    /// a `finish_reason` nor `[DONE]`. Not streamed: like `Echo`.
    DieMidStream { after_words: usize },
    /// Streamed: the role chunk and this many words, then an OpenAI-style error event, then
    /// the body ends normally but without `[DONE]`. Not streamed: like `Echo`.
    ErrorEventMidStream { after_words: usize },
    /// Streamed: the role chunk and this many words, then silence for `stall`, then the rest
    /// of the answer as usual. Not streamed: like `Echo`.
    StallMidStream { after_words: usize, stall: Duration },
    /// Streamed: one word every `every`. Not streamed: like `Echo`.
    SlowStream { every: Duration },
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Received {
    pub authorization: Option<String>,
    /// The query string of the request's URL, if it had one.
    pub query: Option<String>,
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
    /// Streams whose body was dropped (by hyper, because tokenchat went away) before the fake
    /// produced their end.
    cancelled_streams: AtomicUsize,
    /// Streams the fake sent to their end, `[DONE]` included.
    finished_streams: AtomicUsize,
}

impl FakeLlm {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            reply: Mutex::new(Reply::Echo),
            received: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            cancelled_streams: AtomicUsize::new(0),
            finished_streams: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            // What tokenchat's start-up and `/ready` ask: the models it serves.
            .route(
                "/v1/models",
                axum::routing::get(|| async {
                    axum::Json(serde_json::json!({
                        "object": "list",
                        "data": [{ "id": "llama3.2", "object": "model" }],
                    }))
                }),
            )
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

    /// Streams abandoned by the caller before the fake sent their end. Streams the fake broke
    /// itself (`DieMidStream`, `ErrorEventMidStream`) do not count.
    pub fn cancelled_streams(&self) -> usize {
        self.shared.cancelled_streams.load(Ordering::SeqCst)
    }

    /// Streams sent to their end, `[DONE]` included.
    pub fn finished_streams(&self) -> usize {
        self.shared.finished_streams.load(Ordering::SeqCst)
    }

    /// Whether at least `n` streams have been abandoned within `within`. The fake only learns
    /// of a cancellation when hyper drops the body, some time after the caller went away,
    /// so tests wait for it instead of checking once.
    pub async fn wait_for_cancelled_streams(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.cancelled_streams() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    shared.calls.fetch_add(1, Ordering::SeqCst);
    // Requests carry earlier turns of the conversation (and a system prompt) before the
    // message being answered, which is the last one from the user.
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let user_message = messages
        .iter()
        .rev()
        .find(|message| message["role"] == "user")
        .and_then(|message| message["content"].as_str())
        .unwrap_or_default()
        .to_string();
    let prompt_tokens = messages
        .iter()
        .filter_map(|message| message["content"].as_str())
        .map(count_words)
        .sum();
    let stream = body["stream"] == true;
    let include_usage = body["stream_options"]["include_usage"] == true;
    let model = body["model"].as_str().unwrap_or_default().to_string();
    shared.received.lock().unwrap().push(Received {
        authorization: headers
            .get("authorization")
            .map(|value| value.to_str().unwrap().to_string()),
        query,
        body,
    });
    let reply = match user_message.split(']').next().unwrap_or_default() {
        "[fail" => Reply::Status(500),
        "[garbage" => Reply::Garbage,
        "[stall" => Reply::Stall(Duration::from_secs(10)),
        "[die-mid-stream" => Reply::DieMidStream { after_words: 2 },
        "[error-mid-stream" => Reply::ErrorEventMidStream { after_words: 2 },
        "[stall-mid-stream" => Reply::StallMidStream {
            after_words: 1,
            stall: Duration::from_secs(60),
        },
        "[slow-stream" => Reply::SlowStream {
            every: Duration::from_millis(100),
        },
        _ => shared.reply.lock().unwrap().clone(),
    };
    let reply = match reply {
        Reply::FailRandomly(fraction) if OsRng.gen_bool(fraction) => Reply::Status(500),
        Reply::FailRandomly(_) => Reply::Echo,
        other => other,
    };
    let answer = format!("Echo: {user_message}");
    let usage = |content: &str| Usage::new(prompt_tokens, count_words(content));
    if let Reply::Stall(delay) = reply {
        // Streamed or not, nothing at all is sent before the delay: not even headers.
        tokio::time::sleep(delay).await;
    }
    match reply {
        // These fail before a stream would begin, so they answer the same either way.
        Reply::Status(code) => (
            StatusCode::from_u16(code).unwrap(),
            Json(json!({ "error": { "message": "the fake model is failing", "type": "server_error" } })),
        )
            .into_response(),
        Reply::Garbage => (StatusCode::OK, "<html>definitely not json</html>").into_response(),
        Reply::NoChoices => Json(json!({ "id": "x", "object": "chat.completion", "choices": [] })).into_response(),
        Reply::EmptyContent if !stream => completion("", None),
        Reply::BlankContent if !stream => completion(" \n ", None),
        Reply::EchoWithoutUsage if !stream => completion(&answer, None),
        _ if !stream => completion(&answer, Some(usage(&answer))),
        Reply::EmptyContent => {
            let usage = include_usage.then(|| usage(""));
            sse(&shared, &model, StreamPlan::whole("", usage))
        }
        Reply::EchoWithoutUsage => sse(&shared, &model, StreamPlan::whole(&answer, None)),
        Reply::BlankContent => sse(&shared, &model, StreamPlan::whole(" \n ", None)),
        Reply::Echo | Reply::Stall(_) => {
            let usage = include_usage.then(|| usage(&answer));
            sse(&shared, &model, StreamPlan::whole(&answer, usage))
        }
        Reply::DieMidStream { after_words } => sse(
            &shared,
            &model,
            StreamPlan::broken(&answer, after_words, Break::Die),
        ),
        Reply::ErrorEventMidStream { after_words } => sse(
            &shared,
            &model,
            StreamPlan::broken(&answer, after_words, Break::ErrorEvent),
        ),
        Reply::StallMidStream { after_words, stall } => {
            let mut plan = StreamPlan::whole(&answer, include_usage.then(|| usage(&answer)));
            plan.pause_after = Some((after_words, stall));
            sse(&shared, &model, plan)
        }
        Reply::SlowStream { every } => {
            let mut plan = StreamPlan::whole(&answer, include_usage.then(|| usage(&answer)));
            plan.every = Some(every);
            sse(&shared, &model, plan)
        }
        Reply::FailRandomly(_) => unreachable!("decided above"),
    }
}

fn count_words(text: &str) -> usize {
    text.split_whitespace().count()
}

fn completion(content: &str, usage: Option<Usage>) -> Response {
    let mut body = json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": "fake",
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content },
            "finish_reason": "stop"
        }]
    });
    if let Some(usage) = usage {
        body["usage"] = json!(usage);
    }
    Json(body).into_response()
}

#[derive(Clone, Copy, Debug, Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

impl Usage {
    fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// What a streamed answer sends, before `StreamBody` turns it into timed events.
struct StreamPlan {
    pieces: Vec<String>,
    usage: Option<Usage>,
    /// How the stream ends early, if it does: after `pieces` (already cut to length).
    broken: Option<Break>,
    /// Silence after this many pieces.
    pause_after: Option<(usize, Duration)>,
    /// Silence before each piece.
    every: Option<Duration>,
}

#[derive(Clone, Copy)]
enum Break {
    /// The body fails, so hyper cuts the connection mid-response.
    Die,
    /// An OpenAI-style error event, then a normal end of the body.
    ErrorEvent,
}

impl StreamPlan {
    fn whole(answer: &str, usage: Option<Usage>) -> Self {
        Self {
            pieces: pieces(answer),
            usage,
            broken: None,
            pause_after: None,
            every: None,
        }
    }

    fn broken(answer: &str, after_words: usize, how: Break) -> Self {
        let mut pieces = pieces(answer);
        pieces.truncate(after_words);
        Self {
            pieces,
            usage: None,
            broken: Some(how),
            pause_after: None,
            every: None,
        }
    }
}

/// One chunk of a streamed answer, its fields in OpenAI's order (serde_json's `json!` would
/// sort them).
#[derive(Serialize)]
struct Chunk<'a> {
    id: &'static str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChunkChoice {
    index: u32,
    delta: Delta,
    finish_reason: Option<&'static str>,
}

#[derive(Default, Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

fn event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// A 200 `text/event-stream` answer that sends `plan` as OpenAI would.
fn sse(shared: &Arc<Shared>, model: &str, plan: StreamPlan) -> Response {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let chunk = |delta: Delta, finish_reason: Option<&'static str>| {
        let chunk = Chunk {
            id: "chatcmpl-fake",
            object: "chat.completion.chunk",
            created,
            model,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason,
            }],
            usage: None,
        };
        event(&serde_json::to_string(&chunk).unwrap())
    };
    let mut steps = VecDeque::new();
    steps.push_back(Step::Send(chunk(
        Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        },
        None,
    )));
    let words = plan.pieces.len();
    for (sent, piece) in plan.pieces.into_iter().enumerate() {
        if let Some(every) = plan.every {
            steps.push_back(Step::Pause(every));
        }
        if let Some((after_words, stall)) = plan.pause_after {
            if sent == after_words {
                steps.push_back(Step::Pause(stall));
            }
        }
        let delta = Delta {
            content: Some(piece),
            ..Delta::default()
        };
        steps.push_back(Step::Send(chunk(delta, None)));
    }
    if let Some((after_words, stall)) = plan.pause_after {
        // An answer shorter than `after_words` still stalls, before its finish chunk.
        if after_words >= words {
            steps.push_back(Step::Pause(stall));
        }
    }
    let end = match plan.broken {
        Some(Break::Die) => {
            // Long enough for what was sent to reach the client first: a model dying
            // mid-stream, not one that never answered.
            steps.push_back(Step::Pause(Duration::from_millis(50)));
            steps.push_back(Step::Die);
            End::ByTheFake
        }
        Some(Break::ErrorEvent) => {
            steps.push_back(Step::Send(event(
                r#"{"error": {"message": "the fake model broke", "type": "server_error"}}"#,
            )));
            End::ByTheFake
        }
        None => {
            steps.push_back(Step::Send(chunk(Delta::default(), Some("stop"))));
            if let Some(usage) = plan.usage {
                let chunk = Chunk {
                    id: "chatcmpl-fake",
                    object: "chat.completion.chunk",
                    created,
                    model,
                    choices: Vec::new(),
                    usage: Some(usage),
                };
                steps.push_back(Step::Send(event(&serde_json::to_string(&chunk).unwrap())));
            }
            steps.push_back(Step::Send(event("[DONE]")));
            End::Done
        }
    };
    let body = StreamBody {
        steps,
        sleeping: None,
        end,
        ended: false,
        shared: shared.clone(),
    };
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::new(body),
    )
        .into_response()
}

enum Step {
    Send(Bytes),
    Pause(Duration),
    Die,
}

#[derive(Clone, Copy)]
enum End {
    /// `[DONE]` is sent: a finished stream.
    Done,
    /// The fake breaks the stream itself: neither finished nor cancelled.
    ByTheFake,
}

/// The streamed body, a small state machine over its steps rather than a task feeding a
/// channel: hyper drops it as soon as it gives up on the response (the caller went away),
/// even mid-pause, so `Drop` sees a cancellation at once. (The crate has neither
/// futures-util nor tokio-stream as a direct dependency, so this implements hyper's `Body`
/// trait instead of handing a `Stream` to `Body::from_stream`.)
struct StreamBody {
    steps: VecDeque<Step>,
    sleeping: Option<Pin<Box<Sleep>>>,
    end: End,
    /// Whether the last step was produced: the body is dropped without counting.
    ended: bool,
    shared: Arc<Shared>,
}

impl StreamBody {
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            if let End::Done = self.end {
                self.shared.finished_streams.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

impl hyper::body::Body for StreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(sleeping) = &mut this.sleeping {
                ready!(sleeping.as_mut().poll(cx));
                this.sleeping = None;
            }
            match this.steps.pop_front() {
                Some(Step::Pause(duration)) => {
                    this.sleeping = Some(Box::pin(tokio::time::sleep(duration)));
                }
                Some(Step::Send(bytes)) => {
                    // Counted as soon as the last event is handed to hyper: hyper may stop
                    // polling once the response is written, without asking for the end.
                    if this.steps.is_empty() {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Some(Step::Die) => {
                    this.end();
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "the fake model died mid-stream",
                    ))));
                }
                None => {
                    this.end();
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        if !self.ended {
            self.shared.cancelled_streams.fetch_add(1, Ordering::SeqCst);
        }
    }
}
