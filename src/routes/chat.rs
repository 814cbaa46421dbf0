//! `/chat`, whole or streamed as server-sent events, and `/balance`.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::State,
    http::{header, HeaderMap, HeaderName},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Extension, Json,
};
use futures_util::{stream, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    error::ApiError,
    extract::{AuthUser, IdempotencyKey, Payload, TokensRemaining},
    history::usage_json,
};
use crate::{
    domain::Message,
    services::billing::{self, ChatAnswer, StreamEvent, StreamedChat},
    AppState,
};

const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// How often a stream whose model is silent says it is still there.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
pub struct ChatRequest {
    message: String,
    /// `true`: answer as server-sent events; absent: as the `Accept` header asks.
    stream: Option<bool>,
}

pub async fn chat(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    headers: HeaderMap,
    Payload(request): Payload<ChatRequest>,
) -> Result<Response, ApiError> {
    let message = Message::parse(request.message, state.config.max_message_chars)?;
    let streamed = request
        .stream
        .unwrap_or_else(|| accepts_event_stream(&headers));
    if streamed {
        let started = billing::chat_streamed(&state, user.id, message, idempotency_key).await?;
        return Ok(event_stream(started));
    }
    let answer = billing::chat(&state, user.id, message, idempotency_key).await?;
    let body = Json(json!({
        "response": answer.response,
        "tokens": answer.balance,
        "tokens_charged": answer.charged,
        "chat_id": answer.chat_id,
    }));
    // A replayed answer's balance is from the first time; the header shows today's.
    let fresh_balance = (!answer.replayed).then_some(TokensRemaining(answer.balance));
    let replayed = answer.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    Ok((fresh_balance.map(Extension), replayed, body).into_response())
}

/// The balance read with the token in this very request: one query for the whole answer.
pub async fn balance(user: AuthUser) -> Json<Value> {
    Json(json!({ "tokens": user.tokens }))
}

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|media| {
            let media = media.split(';').next().unwrap_or_default().trim();
            media.eq_ignore_ascii_case("text/event-stream")
        })
}

/// `start`, then `delta`s as the model writes, then `done` or `error`.
fn event_stream(started: StreamedChat) -> Response {
    let (chat_id, events, replayed): (i64, EventStream, bool) = match started {
        StreamedChat::Live { chat_id, events } => {
            let events = stream::unfold(events, |mut events| async move {
                events.recv().await.map(|event| (event, events))
            });
            (chat_id, Box::pin(events), false)
        }
        StreamedChat::Replayed(answer) => {
            (answer.chat_id, Box::pin(stream::iter(replay(answer))), true)
        }
    };
    let start = Event::default()
        .event("start")
        .data(json!({ "chat_id": chat_id }).to_string());
    let events = stream::once(async move { start })
        .chain(events.map(move |event| sse_event(chat_id, event)))
        .map(Ok::<_, Infallible>);
    let keep_alive = KeepAlive::new()
        .interval(KEEP_ALIVE_EVERY)
        .text("keep-alive");
    let replayed = replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    (replayed, Sse::new(events).keep_alive(keep_alive)).into_response()
}

type EventStream = std::pin::Pin<Box<dyn Stream<Item = StreamEvent> + Send>>;

/// The events of a stream that already happened: the stored answer, whole, then `done`.
fn replay(answer: ChatAnswer) -> [StreamEvent; 2] {
    [
        StreamEvent::Text(answer.response),
        StreamEvent::Done {
            balance: answer.balance,
            charged: answer.charged,
            usage: answer.usage,
        },
    ]
}

fn sse_event(chat_id: i64, event: StreamEvent) -> Event {
    let (name, data) = match event {
        StreamEvent::Text(content) => ("delta", json!({ "content": content })),
        StreamEvent::Done {
            balance,
            charged,
            usage,
        } => (
            "done",
            json!({
                "chat_id": chat_id,
                "tokens": balance,
                "tokens_charged": charged,
                "usage": usage.map(usage_json),
            }),
        ),
        StreamEvent::Failed(err) => ("error", ApiError::from(err).envelope()),
    };
    Event::default().event(name).data(data.to_string())
}
