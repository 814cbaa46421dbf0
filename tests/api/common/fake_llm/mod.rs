//! A real HTTP server on an ephemeral loopback port that speaks OpenAI's Chat Completions
//! and Embeddings protocol and can answer, fail, talk nonsense or stall, as told.
//!
//! It answers both ways OpenAI does: one JSON completion, or, when the request says
//! `"stream": true`, server-sent events (`data: <chunk>\n\n` ... `data: [DONE]\n\n`).
//! It answers as a real model would what it is asked ([`answers`]): tool calls, structured
//! output, several choices, log probabilities, usage with its details; it rejects a bad
//! request with 400 and is busy with 429 and `Retry-After` when told; it names its model as
//! OpenAI does, with a date after the name asked for.
//! A streamed answer can also break the way real upstreams do: the connection cut mid-answer,
//! an error event mid-answer, a long silence, or a slow trickle. The fake counts streams that
//! tokenchat abandoned before their end, so tests can see that a client going away reaches
//! the upstream call.

pub mod answers;
mod failures;
mod sse;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{RawQuery, State},
    http::{header, HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use base64::Engine;
use rand::{rngs::OsRng, Rng};
use serde_json::{json, Value};

use self::{
    answers::{answer, count_words, user_message, Answer},
    failures::failure,
    sse::{sse, verbatim_events, Break, StreamPlan},
};

/// How the fake answers the next requests.
#[derive(Clone, Debug)]
pub enum Reply {
    /// `choices[0].message.content` = "Echo: <the user's message>", with `usage`.
    Echo,
    /// Like `Echo`, but without `usage` (and, streamed, without a usage chunk even when asked;
    /// embeddings without one too), as some OpenAI-compatible servers answer.
    EchoWithoutUsage,
    /// Like `Echo`, but reporting this usage whatever it answered: a model that says it used
    /// more than its cap, or one whose cache served part of the prompt.
    EchoReporting(answers::Usage),
    /// Not streamed: like `Echo`, with this `usage` object as written (odd numbers, nulls).
    /// Streamed: like `Echo`.
    EchoWithUsageAs(Value),
    /// This status, with an OpenAI-style error body.
    Status(u16),
    /// A 200 whose body is not JSON.
    Garbage,
    /// A 200 with `"choices": []` (embeddings: `"data": []`).
    NoChoices,
    /// A 200 whose answer is an empty string.
    EmptyContent,
    /// A 200 whose answer is only white space (streamed: one delta of it, then the end).
    BlankContent,
    /// Waits this long, then echoes (streamed: waits before sending the headers).
    Stall(Duration),
    /// Fails (500) this fraction of requests at random and echoes the rest.
    FailRandomly(f64),
    /// Streamed: the role chunk and this many words (or pieces of a tool call), then the
    /// connection is cut, with neither a `finish_reason` nor `[DONE]`. Not streamed: like
    /// `Echo`.
    DieMidStream { after_words: usize },
    /// Streamed: the role chunk and this many words, then an OpenAI-style error event, then
    /// the body ends normally but without `[DONE]`. Not streamed: like `Echo`.
    ErrorEventMidStream { after_words: usize },
    /// Streamed: the role chunk and this many words, then silence for `stall`, then the rest
    /// of the answer as usual. Not streamed: like `Echo`.
    StallMidStream { after_words: usize, stall: Duration },
    /// Streamed: one word every `every`. Not streamed: like `Echo`.
    SlowStream { every: Duration },
    /// Streamed, when the usage is asked for: the usage in every chunk too, as vLLM sends
    /// it with `continuous_usage_stats`. Otherwise like `Echo`.
    UsageInEveryChunk,
    /// Rejects the request as invalid with this status (400, 404, 413, 422) and OpenAI's
    /// error object: a bad tool schema.
    Reject(u16),
    /// Rejects the request as invalid (400), its message repeating the `Authorization` it
    /// was sent, as a careless upstream does.
    RejectRepeatingTheKey,
    /// Answers `307 Temporary Redirect` to this URL.
    RedirectTo(String),
    /// Not streamed: this body as it is. Streamed: these chunks, each an event, then
    /// `[DONE]`. A model's answer written out whole (a legacy `function_call`, audio).
    Verbatim { whole: Value, chunks: Vec<Value> },
    /// Streamed: these chunks, each an event, and the body's end with no `[DONE]`, as some
    /// servers end a stream. Not streamed: like `Echo`.
    WithoutDone(Vec<Value>),
    /// Streamed: these chunks, each an event, then silence, the body left open until
    /// tokenchat goes away. Not streamed: like `Echo`.
    OpenAfter(Vec<Value>),
    /// Answers whole (JSON, with its usage) even when a stream is asked, as a server that
    /// does not stream does.
    Unstreamed,
    /// An OpenAI reasoning model: refuses a request with `max_tokens` (400,
    /// `unsupported_parameter`), answers the others as `Echo` does.
    Reasoning,
    /// Busy with this status (429, 503) and, when given, this `Retry-After`.
    Busy {
        status: u16,
        retry_after: Option<&'static str>,
    },
}

/// The message of [`Reply::Reject`]'s error object.
pub const REJECTION: &str = "Invalid schema for function 'get_weather': 'strng' is not valid under any of the given schemas.";

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Received {
    /// `/v1/chat/completions` or `/v1/embeddings`.
    pub path: String,
    pub authorization: Option<String>,
    /// `Content-Length`, which a body passed through in pieces must still have.
    pub content_length: Option<usize>,
    /// The query string of the request's URL, if it had one.
    pub query: Option<String>,
    /// Every header it came with.
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone)]
pub struct FakeLlm {
    pub base_url: String,
    shared: Arc<Shared>,
}

pub(super) struct Shared {
    reply: Mutex<Reply>,
    /// How long a request waits before its body is read: an upstream slow to take it.
    read_delay: Mutex<Duration>,
    received: Mutex<Vec<Received>>,
    calls: AtomicUsize,
    /// Streams whose body was dropped (by hyper, because tokenchat went away) before the fake
    /// produced their end.
    pub(super) cancelled_streams: AtomicUsize,
    /// Streams the fake sent to their end, `[DONE]` included.
    pub(super) finished_streams: AtomicUsize,
}

impl FakeLlm {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            reply: Mutex::new(Reply::Echo),
            read_delay: Mutex::new(Duration::ZERO),
            received: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            cancelled_streams: AtomicUsize::new(0),
            finished_streams: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
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
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                delay_reading,
            ))
            // As big as tokenchat's `/v1` may send (images), and more.
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base_url, shared }
    }

    /// Makes every request wait this long before its body is read.
    pub fn set_read_delay(&self, delay: Duration) {
        *self.shared.read_delay.lock().unwrap() = delay;
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

/// Waits [`FakeLlm::set_read_delay`] before the handler reads the body.
async fn delay_reading(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let delay = *shared.read_delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    next.run(request).await
}

/// Records a request and says how to answer it: the reply a test set, or the one its
/// user message asks for (`[fail]`, `[reject]`, `[busy]`, ...).
fn receive(
    shared: &Shared,
    uri: &Uri,
    query: Option<String>,
    headers: &HeaderMap,
    body: &Value,
) -> Reply {
    shared.calls.fetch_add(1, Ordering::SeqCst);
    shared.received.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        authorization: headers
            .get("authorization")
            .map(|value| value.to_str().unwrap().to_string()),
        content_length: headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse().ok()),
        query,
        headers: headers.clone(),
        body: body.clone(),
    });
    let user = user_message(body);
    let reply = match user.split(']').next().unwrap_or_default() {
        "[fail" => Reply::Status(500),
        "[reject" => Reply::Reject(400),
        "[busy" => Reply::Busy {
            status: 429,
            retry_after: Some("7"),
        },
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
    match reply {
        Reply::FailRandomly(fraction) if OsRng.gen_bool(fraction) => Reply::Status(500),
        Reply::FailRandomly(_) => Reply::Echo,
        other => other,
    }
}

/// `chunks` as server-sent events, then `[DONE]` when `done`.
/// The model as the upstream names it: the name asked, with a date, as OpenAI does.
fn upstream_name(body: &Value) -> String {
    format!("{}-2024-08-06", body["model"].as_str().unwrap_or_default())
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let reply = receive(&shared, &uri, query, &headers, &body);
    let stream = body["stream"] == true;
    let include_usage = body["stream_options"]["include_usage"] == true;
    let model = upstream_name(&body);
    if let Reply::Stall(delay) = reply {
        // Streamed or not, nothing at all is sent before the delay: not even headers.
        tokio::time::sleep(delay).await;
    }
    // These fail before a stream would begin, so they answer the same either way.
    if let Some(failed) = failure(&reply, &headers, &body) {
        return failed;
    }
    let mut answered = answer(&body);
    if let Reply::EchoReporting(usage) = reply {
        answered.usage = usage;
    }
    let usage = include_usage.then_some(answered.usage);
    match reply {
        Reply::NoChoices => {
            Json(json!({ "id": "x", "object": "chat.completion", "choices": [] })).into_response()
        }
        Reply::EmptyContent if !stream => {
            Json(Answer::text("").completion(&model, false)).into_response()
        }
        Reply::BlankContent if !stream => {
            Json(Answer::text(" \n ").completion(&model, false)).into_response()
        }
        Reply::EchoWithoutUsage if !stream => {
            Json(answered.completion(&model, false)).into_response()
        }
        Reply::EchoWithUsageAs(usage) if !stream => {
            let mut completion = answered.completion(&model, false);
            completion["usage"] = usage;
            Json(completion).into_response()
        }
        Reply::Verbatim { whole, .. } if !stream => Json(whole).into_response(),
        Reply::Unstreamed => Json(answered.completion(&model, true)).into_response(),
        _ if !stream => Json(answered.completion(&model, true)).into_response(),
        Reply::Verbatim { chunks, .. } => verbatim_events(&chunks, true),
        Reply::WithoutDone(chunks) => verbatim_events(&chunks, false),
        Reply::OpenAfter(chunks) => sse::left_open(&shared, &chunks),
        Reply::EmptyContent => sse(&shared, &model, StreamPlan::whole("", usage)),
        Reply::EchoWithoutUsage => sse(&shared, &model, StreamPlan::of(&answered, None)),
        Reply::BlankContent => sse(&shared, &model, StreamPlan::whole(" \n ", None)),
        Reply::DieMidStream { after_words } => sse(
            &shared,
            &model,
            StreamPlan::of(&answered, None).broken(after_words, Break::Die),
        ),
        Reply::ErrorEventMidStream { after_words } => sse(
            &shared,
            &model,
            StreamPlan::of(&answered, None).broken(after_words, Break::ErrorEvent),
        ),
        Reply::StallMidStream { after_words, stall } => {
            let mut plan = StreamPlan::of(&answered, usage);
            plan.pause_after = Some((after_words, stall));
            sse(&shared, &model, plan)
        }
        Reply::SlowStream { every } => {
            let mut plan = StreamPlan::of(&answered, usage);
            plan.every = Some(every);
            sse(&shared, &model, plan)
        }
        Reply::UsageInEveryChunk => {
            let mut plan = StreamPlan::of(&answered, usage);
            plan.usage_in_every_chunk = true;
            sse(&shared, &model, plan)
        }
        _ => sse(&shared, &model, StreamPlan::of(&answered, usage)),
    }
}

/// `POST /v1/embeddings`: four numbers for each input, from its words, as floats or as
/// base64 of little-endian 32-bit floats (what OpenAI's Python SDK asks for).
async fn embeddings(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let reply = receive(&shared, &uri, query, &headers, &body);
    if let Reply::Stall(delay) = reply {
        tokio::time::sleep(delay).await;
    }
    if let Some(failed) = failure(&reply, &headers, &body) {
        return failed;
    }
    if let Reply::NoChoices = reply {
        let usage = json!({ "prompt_tokens": 1, "total_tokens": 1 });
        return Json(json!({ "object": "list", "data": [], "usage": usage })).into_response();
    }
    let inputs: Vec<String> = match &body["input"] {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().map_or_else(|| item.to_string(), str::to_string))
            .collect(),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": { "message": "'input' is a required property", "type": "invalid_request_error", "param": "input", "code": null } })),
            )
                .into_response()
        }
    };
    let base64 = body["encoding_format"] == "base64";
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let words = count_words(text) as f32;
            let vector = [words, text.len() as f32, 0.5, -0.5];
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    let tokens: usize = inputs.iter().map(|text| count_words(text)).sum();
    let mut answer = json!({ "object": "list", "data": data, "model": upstream_name(&body) });
    if !matches!(reply, Reply::EchoWithoutUsage) {
        answer["usage"] = json!({ "prompt_tokens": tokens, "total_tokens": tokens });
    }
    Json(answer).into_response()
}
