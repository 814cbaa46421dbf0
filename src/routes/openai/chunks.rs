//! A streamed chat completion: `chat.completion.chunk` events as OpenAI sends them.

use std::convert::Infallible;

use axum::response::{
    sse::{Event, Sse},
    IntoResponse, Response,
};
use futures_util::{stream, StreamExt};
use serde::Serialize;

use super::{
    completion::{completion_id, CompletionUsage},
    errors::openai_error,
};
use crate::{
    clock::unix_now,
    routes::{
        chat::{event_data, keep_alive, IDEMPOTENT_REPLAYED},
        error::ApiError,
    },
    services::chat::{StreamEvent, StreamedChat},
};

/// One `chat.completion.chunk`.
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
}

/// An optional item as a JSON array of none or one.
fn zero_or_one<S: serde::Serializer, T: Serialize>(
    item: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(item)
}

/// What every chunk of one stream shares.
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
}

/// `chat.completion.chunk` events as OpenAI sends them: the role first, the content as it
/// comes, a last chunk with `finish_reason`, the usage chunk when asked for, `[DONE]`; a
/// failure after the start is an `{"error": ...}` event.
pub(super) fn chunk_stream(started: StreamedChat, model: String, include_usage: bool) -> Response {
    let chat = started.into_events();
    let replayed = chat.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    let head = ChunkHead {
        created: unix_now(),
        id: completion_id(chat.chat_id),
        model,
    };
    let role = ChunkDelta {
        content: Some(""),
        role: Some("assistant"),
    };
    let first = head.delta(role, None);
    let events = stream::once(async move { vec![first] })
        .chain(chat.events.map(move |event| match event {
            StreamEvent::Text(content) => {
                let delta = ChunkDelta {
                    content: Some(&content),
                    role: None,
                };
                vec![head.delta(delta, None)]
            }
            StreamEvent::Done { usage, .. } => {
                let mut last = vec![head.delta(ChunkDelta::default(), Some("stop"))];
                if include_usage {
                    last.push(head.chunk(None, Some(usage.into())));
                }
                last.push("[DONE]".to_string());
                last
            }
            StreamEvent::Failed { error, .. } => {
                let envelope = ApiError::from(error).envelope();
                let error = openai_error(&envelope.error, envelope.code, envelope.field, 500);
                vec![event_data(&error)]
            }
        }))
        .flat_map(stream::iter)
        .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    (replayed, Sse::new(events).keep_alive(keep_alive())).into_response()
}
