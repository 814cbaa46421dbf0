//! The fake model's streamed answers: OpenAI's `chat.completion.chunk` events (the role, the
//! text word by word, tool-call arguments in pieces, each choice's own chunks, the finish,
//! the usage when asked, `[DONE]`), timed and broken as told, in a body that notices when
//! its reader goes away.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{ready, Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, Bytes},
    http::header,
    response::{IntoResponse, Response},
};
use hyper::body::Frame;
use serde::Serialize;
use serde_json::{json, Value};
use tokenchat::llm::demo::pieces;
use tokio::time::Sleep;

use super::{
    answers::{logprob, Answer, Choice, Usage},
    Shared,
};

/// What a streamed answer sends, before `StreamBody` turns it into timed events.
pub struct StreamPlan {
    /// The first chunk's choices: each one's role.
    roles: Vec<Value>,
    /// The choices of the chunks that follow, one each, in order.
    deltas: Vec<Value>,
    /// The last chunk's choices: each one's finish reason.
    finishes: Vec<Value>,
    usage: Option<Usage>,
    /// How the stream ends early, if it does: after `deltas` (already cut to length).
    broken: Option<Break>,
    /// Silence after this many deltas.
    pub pause_after: Option<(usize, Duration)>,
    /// Silence before each delta.
    pub every: Option<Duration>,
    /// The usage in every chunk as well as in its own at the end (vLLM's
    /// `continuous_usage_stats`).
    pub usage_in_every_chunk: bool,
}

#[derive(Clone, Copy)]
pub enum Break {
    /// The body fails, so hyper cuts the connection mid-response.
    Die,
    /// An OpenAI-style error event, then a normal end of the body.
    ErrorEvent,
}

fn choice(index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
    json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
}

impl StreamPlan {
    /// `answer` streamed as OpenAI streams it, choices interleaved.
    pub fn of(answer: &Answer, usage: Option<Usage>) -> Self {
        let per_choice: Vec<Vec<Value>> = answer
            .choices
            .iter()
            .enumerate()
            .map(|(index, choice)| deltas(index, choice, answer.logprobs))
            .collect();
        let longest = per_choice.iter().map(Vec::len).max().unwrap_or(0);
        let deltas = (0..longest)
            .flat_map(|step| per_choice.iter().filter_map(move |deltas| deltas.get(step)))
            .cloned()
            .collect();
        let roles = answer
            .choices
            .iter()
            .enumerate()
            .map(|(index, one)| {
                let content = one.content.as_ref().map(|_| "");
                choice(
                    index,
                    json!({ "role": "assistant", "content": content }),
                    Value::Null,
                    None,
                )
            })
            .collect();
        let finishes = answer
            .choices
            .iter()
            .enumerate()
            .map(|(index, one)| choice(index, json!({}), Value::Null, Some(one.finish_reason)))
            .collect();
        Self {
            roles,
            deltas,
            finishes,
            usage,
            broken: None,
            pause_after: None,
            every: None,
            usage_in_every_chunk: false,
        }
    }

    /// One choice of `text`.
    pub fn whole(text: &str, usage: Option<Usage>) -> Self {
        Self::of(&Answer::text(text), usage)
    }

    /// This plan without its usage, broken `how` after `after` of its deltas (words, or a
    /// tool call's pieces).
    pub fn broken(mut self, after: usize, how: Break) -> Self {
        self.deltas.truncate(after);
        self.usage = None;
        self.broken = Some(how);
        self
    }
}

/// One choice's deltas after its role: its words, its refusal's words, or its tool call
/// (the name with empty arguments, then the arguments in three pieces).
fn deltas(index: usize, one: &Choice, logprobs: bool) -> Vec<Value> {
    if let Some(call) = &one.tool_call {
        let named = json!({ "tool_calls": [{
            "index": 0, "id": call.id, "type": "function",
            "function": { "name": call.name, "arguments": "" },
        }] });
        let mut deltas = vec![choice(index, named, Value::Null, None)];
        let third = call.arguments.len().div_ceil(3).max(1);
        let bytes = call.arguments.as_bytes();
        for part in bytes.chunks(third) {
            let part = String::from_utf8(part.to_vec()).expect("ASCII arguments");
            let delta =
                json!({ "tool_calls": [{ "index": 0, "function": { "arguments": part } }] });
            deltas.push(choice(index, delta, Value::Null, None));
        }
        return deltas;
    }
    if let Some(refusal) = &one.refusal {
        return pieces(refusal)
            .into_iter()
            .map(|piece| choice(index, json!({ "refusal": piece }), Value::Null, None))
            .collect();
    }
    pieces(one.content.as_deref().unwrap_or_default())
        .into_iter()
        .map(|piece| {
            let logprobs = if logprobs {
                json!({ "content": [logprob(&piece)] })
            } else {
                Value::Null
            };
            choice(index, json!({ "content": piece }), logprobs, None)
        })
        .collect()
}

/// One chunk of a streamed answer, its fields in OpenAI's order (serde_json's `json!` would
/// sort them).
#[derive(Serialize)]
struct Chunk<'a> {
    id: &'static str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

fn event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// A 200 `text/event-stream` answer that sends `plan` as OpenAI would, naming `model`.
pub fn sse(shared: &Arc<Shared>, model: &str, plan: StreamPlan) -> Response {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let chunk = |choices: Vec<Value>, usage: Option<Usage>| {
        let chunk = Chunk {
            id: "chatcmpl-fake",
            object: "chat.completion.chunk",
            created,
            model,
            system_fingerprint: "fp_fake",
            choices,
            usage,
        };
        event(&serde_json::to_string(&chunk).unwrap())
    };
    let running = plan.usage.filter(|_| plan.usage_in_every_chunk);
    let mut steps = VecDeque::new();
    steps.push_back(Step::Send(chunk(plan.roles, running)));
    let count = plan.deltas.len();
    for (sent, delta) in plan.deltas.into_iter().enumerate() {
        if let Some(every) = plan.every {
            steps.push_back(Step::Pause(every));
        }
        if let Some((after, stall)) = plan.pause_after {
            if sent == after {
                steps.push_back(Step::Pause(stall));
            }
        }
        steps.push_back(Step::Send(chunk(vec![delta], running)));
    }
    if let Some((after, stall)) = plan.pause_after {
        // An answer shorter than `after` still stalls, before its finish chunk.
        if after >= count {
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
            steps.push_back(Step::Send(chunk(plan.finishes, running)));
            if let Some(usage) = plan.usage {
                steps.push_back(Step::Send(chunk(Vec::new(), Some(usage))));
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

/// A 200 `text/event-stream` answer of `chunks`, each an event as written, then `[DONE]` if
/// `done`, and the body's end.
pub fn verbatim_events(chunks: &[Value], done: bool) -> Response {
    let done = done.then(|| "[DONE]".to_string());
    let events: String = chunks
        .iter()
        .map(Value::to_string)
        .chain(done)
        .map(|data| format!("data: {data}\n\n"))
        .collect();
    ([(header::CONTENT_TYPE, "text/event-stream")], events).into_response()
}

/// A 200 `text/event-stream` answer of `chunks`, each an event as written, then silence:
/// the body stays open until its reader goes away (counted as a cancelled stream).
pub fn left_open(shared: &Arc<Shared>, chunks: &[Value]) -> Response {
    let sent = chunks
        .iter()
        .map(|chunk| Step::Send(event(&chunk.to_string())));
    let body = StreamBody {
        steps: sent
            .chain([Step::Pause(Duration::from_secs(3600))])
            .collect(),
        sleeping: None,
        end: End::ByTheFake,
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
