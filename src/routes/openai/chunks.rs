//! A streamed chat completion: the model's `chat.completion.chunk` events relayed as it
//! sent them, in order (see [`super::relay`]), then `[DONE]`; a replayed answer's chunks
//! written as OpenAI writes them.

use std::convert::Infallible;

use axum::response::{
    sse::{Event, Sse},
    IntoResponse, Response,
};
use futures_util::{stream, StreamExt};
use serde::Serialize;
use serde_json::value::RawValue;

use super::{
    completion::{completion_id, finish_reason, stored_tool_calls, CompletionUsage},
    errors::openai_error,
    relay::{is_usage_chunk, relay, usage_apart, Charge},
};
use crate::{
    clock::unix_now,
    routes::{
        chat::{event_data, keep_alive, max_tokens_applied, IDEMPOTENT_REPLAYED},
        error::ApiError,
    },
    services::chat::{StreamEvent, StreamedChat},
};

/// One `chat.completion.chunk` of a replayed answer.
#[derive(Serialize)]
struct Chunk<'a> {
    /// One choice, or none in the usage chunk.
    #[serde(serialize_with = "zero_or_one")]
    choices: Option<ChunkChoice<'a>>,
    created: i64,
    id: &'a str,
    model: &'a str,
    object: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<CompletionUsage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    delta: ChunkDelta<'a>,
    finish_reason: Option<&'static str>,
    index: u32,
}

#[derive(Default, Serialize)]
struct ChunkDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    /// The whole calls at once, each with its `index`.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<IndexedCall<'a>>>,
}

#[derive(Serialize)]
struct IndexedCall<'a> {
    index: usize,
    #[serde(flatten)]
    call: &'a serde_json::Map<String, serde_json::Value>,
}

/// An optional item as a JSON array of none or one.
fn zero_or_one<S: serde::Serializer, T: Serialize>(
    item: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(item)
}

/// What every chunk of one replayed stream shares.
struct ChunkHead {
    created: i64,
    id: String,
    model: String,
}

impl ChunkHead {
    /// A chunk's JSON data: `choice`, or none and `usage`.
    fn chunk(&self, choice: Option<ChunkChoice<'_>>, usage: Option<CompletionUsage>) -> String {
        event_data(&Chunk {
            choices: choice,
            created: self.created,
            id: &self.id,
            model: &self.model,
            object: "chat.completion.chunk",
            usage,
        })
    }

    fn delta(&self, delta: ChunkDelta<'_>, finish_reason: Option<&'static str>) -> String {
        let choice = ChunkChoice {
            delta,
            finish_reason,
            index: 0,
        };
        self.chunk(Some(choice), None)
    }

    /// A stored answer as OpenAI streams one: the role, the text, the tool calls, the end.
    fn replayed(&self, text: &str, tool_calls: Option<Box<RawValue>>) -> Vec<String> {
        let role = ChunkDelta {
            content: Some(""),
            role: Some("assistant"),
            ..ChunkDelta::default()
        };
        let mut chunks = vec![self.delta(role, None)];
        if !text.is_empty() {
            let content = ChunkDelta {
                content: Some(text),
                ..ChunkDelta::default()
            };
            chunks.push(self.delta(content, None));
        }
        let calls: Option<Vec<serde_json::Map<String, serde_json::Value>>> = tool_calls
            .as_ref()
            .and_then(|calls| serde_json::from_str(calls.get()).ok());
        if let Some(calls) = &calls {
            let delta = ChunkDelta {
                tool_calls: Some(
                    calls
                        .iter()
                        .enumerate()
                        .map(|(index, call)| IndexedCall { index, call })
                        .collect(),
                ),
                ..ChunkDelta::default()
            };
            chunks.push(self.delta(delta, None));
        }
        let end = finish_reason(calls.is_some());
        chunks.push(self.delta(ChunkDelta::default(), Some(end)));
        chunks
    }
}

/// `chat.completion.chunk` events: the model's, relayed as they come, with `model` the
/// name the client asked for and the usage chunk only when it asked for it, held until the
/// chat is settled so that its `usage.cost` is the charge (a usage chunk of tokenchat's own,
/// with the counts it charged for, when the model sent none it could read); `[DONE]` once
/// the chat is settled. A replayed answer is
/// written whole, as OpenAI would stream it. A failure after the start is an
/// `{"error": ...}` event.
pub(super) fn chunk_stream(started: StreamedChat, model: String, include_usage: bool) -> Response {
    let chat = started.into_events();
    let replayed = chat.replayed;
    let replayed_header = replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    let applied = chat.max_tokens_applied.map(max_tokens_applied);
    let head = ChunkHead {
        created: unix_now(),
        id: completion_id(chat.chat_id),
        model,
    };
    // The model's usage chunk (the one without choices), until the charge is known, and
    // whether its usage could be read. A chunk that carries the usage so far beside its
    // choices goes on at once, as it came, unless it also finishes one: some models (Mistral,
    // Gemini's OpenAI endpoint) put their only usage there and send no usage chunk, so that
    // usage goes on apart, as a usage chunk of its own at the end (with the charge), and the
    // chunk at once without it: a client adding up the usages it sees counts it once.
    let mut usage_chunk: Option<(String, bool)> = None;
    let events = chat
        .events
        .map(move |event| match event {
            StreamEvent::Chunk(chunk) if chunk.data.is_empty() => Vec::new(),
            // Only a chunk with a usage read, or one naming no choice, is read again for
            // it: OpenAI writes `"usage": null` in every chunk of such a stream.
            StreamEvent::Chunk(chunk)
                if include_usage
                    && (chunk.usage.is_some() || chunk.choices.named == 0)
                    && is_usage_chunk(&chunk.data) =>
            {
                usage_chunk = Some((chunk.data, chunk.usage.is_some()));
                Vec::new()
            }
            StreamEvent::Chunk(chunk) if include_usage && chunk.choices.finished != 0 => {
                let apart = usage_apart(&chunk.data);
                let keep_usage = apart.is_none();
                if let Some(apart) = apart {
                    usage_chunk = Some((apart, chunk.usage.is_some()));
                }
                relay(chunk.data, &head.model, keep_usage, Charge::None)
                    .into_iter()
                    .collect()
            }
            StreamEvent::Chunk(chunk) => {
                relay(chunk.data, &head.model, include_usage, Charge::None)
                    .into_iter()
                    .collect()
            }
            StreamEvent::Replayed { text, tool_calls } => {
                head.replayed(&text, stored_tool_calls(tool_calls))
            }
            StreamEvent::Done {
                usage,
                charged,
                counted,
                ..
            } => {
                let mut last = Vec::new();
                if include_usage {
                    match usage_chunk.take() {
                        Some((chunk, true)) if counted.is_none() => {
                            last.extend(relay(chunk, &head.model, true, Charge::Cost(charged)));
                        }
                        // None sent, none readable, or a count left out (and counted): one
                        // of tokenchat's own in its place.
                        _ => {
                            let usage = CompletionUsage::charged(counted.or(usage), charged);
                            last.push(head.chunk(None, Some(usage)));
                        }
                    }
                }
                last.push("[DONE]".to_string());
                last
            }
            StreamEvent::Failed { error, charged } => {
                let mut last = Vec::new();
                if let Some((chunk, _)) = usage_chunk.take() {
                    last.extend(relay(chunk, &head.model, true, Charge::Cost(charged)));
                }
                let envelope = ApiError::from(error).envelope();
                let error = openai_error(&envelope.error, envelope.code, envelope.field, 500);
                last.push(event_data(&error));
                last
            }
        })
        .flat_map(stream::iter)
        .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    let events = Sse::new(events).keep_alive(keep_alive());
    (replayed_header, applied, events).into_response()
}
