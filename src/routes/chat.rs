//! `/chat`, whole or streamed as server-sent events, and `/balance`.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::State,
    http::{header, HeaderMap, HeaderName, HeaderValue},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Extension, Json,
};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    error::{ApiError, Envelope, InvalidBody, RateLimited, Unauthorised},
    extract::{AuthUser, IdempotencyKey, Payload, TokensRemaining},
    history::Usage,
};
use crate::{
    domain::Message,
    services::chat::{self, Question, StreamEvent, StreamedChat},
    state::AppState,
};

pub(super) const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The output cap a low balance lowered a priced chat's answer to.
const MAX_TOKENS_APPLIED: HeaderName = HeaderName::from_static("x-max-tokens-applied");

/// The header that tells a client its answer's cap was lowered to `cap` tokens.
pub(super) fn max_tokens_applied(cap: u64) -> [(HeaderName, HeaderValue); 1] {
    [(MAX_TOKENS_APPLIED, HeaderValue::from(cap))]
}

/// How often a stream whose model is silent says it is still there.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

#[derive(Deserialize, ToSchema)]
pub struct ChatRequest {
    /// 1 to MAX_MESSAGE_CHARS characters, not only white space.
    message: String,
    /// true: server-sent events (start, delta, done or error); absent: as `Accept` asks.
    stream: Option<bool>,
    /// One of the user's conversations to continue; absent or null: a new one.
    conversation_id: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ChatAnswer {
    chat_id: i64,
    conversation_id: Option<i64>,
    response: String,
    /// The balance after the charge.
    tokens: i64,
    tokens_charged: i64,
}

#[derive(Serialize, ToSchema)]
pub struct Balance {
    tokens: i64,
}

#[utoipa::path(
    post,
    path = "/chat",
    tag = "chat",
    security(("bearer" = []), ("token" = [])),
    params((
        "Idempotency-Key" = Option<String>,
        Header,
        description = "Makes a retried chat return the first answer"
    )),
    request_body(content = ChatRequest, content_type = "application/json"),
    responses(
        (
            status = 200,
            description = "Answered and charged \
                           (or, streamed, text/event-stream: start, delta, done or error events)",
            content((ChatAnswer = "application/json"), (String = "text/event-stream"))
        ),
        InvalidBody,
        (status = 401, description = "unauthorized", body = Envelope),
        (
            status = 403,
            description = "account_disabled, or model_not_allowed: an API key limited to \
                           models other than LLM_MODEL",
            body = Envelope
        ),
        (status = 402, description = "out_of_tokens, with the balance", body = Envelope),
        (status = 404, description = "not_found: a conversation_id not the user's", body = Envelope),
        (status = 409, description = "request_in_progress", body = Envelope),
        (status = 422, description = "idempotency_key_reused", body = Envelope),
        RateLimited,
        (status = 502, description = "upstream_error: nothing charged", body = Envelope),
        (
            status = 503,
            description = "upstream_busy, with Retry-After: nothing charged",
            body = Envelope
        ),
        (status = 504, description = "upstream_timeout: nothing charged", body = Envelope),
    )
)]
pub async fn chat(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    headers: HeaderMap,
    Payload(request): Payload<ChatRequest>,
) -> Result<Response, ApiError> {
    let message = Message::parse(request.message, state.config.max_message_chars)?;
    // The key's and the user's limits, counted in the database every instance shares.
    let admitted = super::limits::admit(&state, &user, state.llm.model_name()).await?;
    let streamed = request
        .stream
        .unwrap_or_else(|| accepts_event_stream(&headers));
    let question = Question {
        user_id: user.id,
        message,
        conversation_id: request.conversation_id,
        idempotency_key,
        forwarded: None,
        budgets: admitted.budgets,
        token_meters: admitted.token_meters,
    };
    if streamed {
        let started = chat::chat_streamed(&state.chats, question).await?;
        return Ok(event_stream(started));
    }
    let answer = chat::chat(&state.chats, question).await?;
    let body = Json(ChatAnswer {
        chat_id: answer.chat_id,
        conversation_id: answer.conversation_id,
        response: answer.response,
        tokens: answer.balance,
        tokens_charged: answer.charged,
    });
    // A replayed answer's balance is from the first time; the header shows today's.
    let fresh_balance = (!answer.replayed).then_some(TokensRemaining(answer.balance));
    let replayed = answer.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    let applied = answer.max_tokens_applied.map(max_tokens_applied);
    Ok((fresh_balance.map(Extension), replayed, applied, body).into_response())
}

/// The balance read with the token in this very request: one query for the whole answer.
#[utoipa::path(
    get,
    path = "/balance",
    operation_id = "balance",
    tag = "chat",
    security(("bearer" = []), ("token" = [])),
    responses(
        (status = 200, body = Balance, description = "The balance"),
        Unauthorised,
    )
)]
pub async fn balance(user: AuthUser) -> Json<Balance> {
    Json(Balance {
        tokens: user.tokens,
    })
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
    let chat = started.into_events();
    let ids = ChatIds {
        chat_id: chat.chat_id,
        conversation_id: chat.conversation_id,
    };
    let start = Event::default().event("start").data(event_data(&ids));
    let events = stream::once(async move { start })
        .chain(
            chat.events
                .filter_map(move |event| async move { sse_event(ids, event) }),
        )
        .map(Ok::<_, Infallible>);
    let replayed = chat.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    let applied = chat.max_tokens_applied.map(max_tokens_applied);
    (replayed, applied, Sse::new(events).keep_alive(keep_alive())).into_response()
}

/// A comment line every 15 seconds while the model is silent, so that proxies and clients
/// see the stream is alive.
pub(super) fn keep_alive() -> KeepAlive {
    KeepAlive::new()
        .interval(KEEP_ALIVE_EVERY)
        .text("keep-alive")
}

/// What every `start` and `done` event names; the whole of `start`.
#[derive(Clone, Copy, Serialize)]
struct ChatIds {
    chat_id: i64,
    conversation_id: Option<i64>,
}

/// The data of a `delta` event: the next text of the answer.
#[derive(Serialize)]
struct Delta<'a> {
    content: &'a str,
}

/// The data of the `done` event.
#[derive(Serialize)]
struct Done {
    chat_id: i64,
    conversation_id: Option<i64>,
    tokens: i64,
    tokens_charged: i64,
    usage: Option<Usage>,
}

/// The data of an `error` event: the envelope and what the chat cost.
#[derive(Serialize)]
struct Failed {
    #[serde(flatten)]
    envelope: Envelope,
    tokens_charged: i64,
}

/// The event that tells the client of `event`; none for a chunk without text (the role, the
/// end, the usage, which `done` reports).
fn sse_event(ids: ChatIds, event: StreamEvent) -> Option<Event> {
    let (name, data) = match event {
        StreamEvent::Chunk(chunk) if chunk.text.is_empty() => return None,
        StreamEvent::Chunk(chunk) => (
            "delta",
            event_data(&Delta {
                content: &chunk.text,
            }),
        ),
        StreamEvent::Replayed { text, .. } => ("delta", event_data(&Delta { content: &text })),
        StreamEvent::Done {
            balance,
            charged,
            usage,
            ..
        } => {
            let done = Done {
                chat_id: ids.chat_id,
                conversation_id: ids.conversation_id,
                tokens: balance,
                tokens_charged: charged,
                usage: usage.map(Usage::from),
            };
            ("done", event_data(&done))
        }
        StreamEvent::Failed { error, charged } => {
            let failed = Failed {
                envelope: ApiError::from(error).envelope(),
                tokens_charged: charged,
            };
            ("error", event_data(&failed))
        }
    };
    Some(Event::default().event(name).data(data))
}

/// An event's JSON data.
pub(super) fn event_data(data: &impl Serialize) -> String {
    serde_json::to_string(data).expect("an event's data serialises")
}

/// The same, by POST, as the original system's clients ask.
#[utoipa::path(
    post,
    path = "/balance",
    operation_id = "balance_by_post",
    tag = "chat",
    security(("bearer" = []), ("token" = [])),
    responses(
        (status = 200, body = Balance, description = "The balance"),
        Unauthorised,
    )
)]
pub async fn balance_by_post(user: AuthUser) -> Json<Balance> {
    balance(user).await
}
