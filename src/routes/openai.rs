//! The OpenAI-compatible routes: `POST /v1/chat/completions` and `GET /v1/models`, metered
//! exactly like `/chat`, and answering errors with OpenAI's error object.

use std::convert::Infallible;

use axum::{
    body::{to_bytes, Body},
    extract::State,
    http::{header, HeaderValue},
    response::{
        sse::{Event, Sse},
        IntoResponse, Response,
    },
    Extension, Json,
};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{
    chat::{event_data, keep_alive, IDEMPOTENT_REPLAYED},
    error::{error_responses, ApiError},
    extract::{AuthUser, IdempotencyKey, Payload, TokensRemaining},
};
use crate::{
    db::unix_now,
    domain::Message,
    llm::{Role, Usage},
    services::chat::{self, ClientPrompt, Question, StreamEvent, StreamedChat},
    AppState,
};

/// The sampling fields passed upstream as the client gave them.
const PASSED_THROUGH: [&str; 9] = [
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",
];

/// Fields of OpenAI's request this gateway does not serve: refused rather than ignored,
/// since a client that sends them expects what they do.
const REFUSED: [&str; 5] = [
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "audio",
];

/// OpenAI's error object, which the `/v1` routes answer errors in.
#[derive(Serialize, ToSchema)]
pub struct OpenAiError<'a> {
    #[schema(value_type = Object)]
    error: OpenAiErrorDetail<'a>,
}

#[derive(Serialize)]
struct OpenAiErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    param: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
}

error_responses! { OpenAiError =>
    /// What a `/v1` route answers before its handler runs.
    OpenAiUnauthorised {
        401: "invalid_api_key",
        403: "permission_error",
    }
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    data: Vec<Model>,
    object: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Model {
    created: i64,
    id: String,
    object: &'static str,
    owned_by: &'static str,
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    security(("bearer" = []), ("token" = [])),
    responses(
        (status = 200, body = ModelList, description = "The models served"),
        OpenAiUnauthorised,
    )
)]
pub async fn models(State(state): State<AppState>, _user: AuthUser) -> Json<ModelList> {
    let (names, since) = state.llm.served_models();
    let data = names
        .iter()
        .map(|name| Model {
            created: since,
            id: name.clone(),
            object: "model",
            owned_by: "tokenchat",
        })
        .collect();
    Json(ModelList {
        data,
        object: "list",
    })
}

/// OpenAI's chat completion request; sampling fields (temperature, top_p, max_tokens,
/// stop, seed, ...) pass through to the model.
// Read as any JSON object, each field then checked by [`parse`], so that a field of the
// wrong type is a 400 `invalid_input` naming it, not a bare `invalid_json`.
#[derive(Deserialize, ToSchema)]
#[serde(from = "Map<String, Value>")]
pub struct CompletionRequest {
    /// One of GET /v1/models.
    #[schema(value_type = String)]
    model: Option<Value>,
    // `None` when absent or not an array.
    #[schema(value_type = Vec<CompletionMessage>)]
    messages: Option<Vec<CompletionMessage>>,
    /// true: chat.completion.chunk events, then `[DONE]`.
    #[schema(value_type = Option<bool>)]
    stream: Option<Value>,
    #[schema(value_type = Option<Object>)]
    stream_options: Option<Value>,
    // Every other field: refused, passed through or ignored.
    #[schema(ignore)]
    other: Map<String, Value>,
}

impl From<Map<String, Value>> for CompletionRequest {
    fn from(mut body: Map<String, Value>) -> Self {
        let messages = match body.remove("messages") {
            Some(Value::Array(messages)) => {
                Some(messages.into_iter().map(CompletionMessage::from).collect())
            }
            _ => None,
        };
        Self {
            model: body.remove("model"),
            messages,
            stream: body.remove("stream"),
            stream_options: body.remove("stream_options"),
            other: body,
        }
    }
}

// One message of the conversation, read like the request: whatever its fields hold.
#[derive(ToSchema)]
pub struct CompletionMessage {
    /// system, user or assistant
    #[schema(value_type = String)]
    role: Value,
    #[schema(value_type = String)]
    content: Value,
}

impl From<Value> for CompletionMessage {
    fn from(mut message: Value) -> Self {
        let mut take = |field| message.get_mut(field).map(Value::take).unwrap_or_default();
        Self {
            role: take("role"),
            content: take("content"),
        }
    }
}

/// A chat completion request as checked, field by field so that each problem names its
/// field.
struct Checked {
    prompt: ClientPrompt,
    last_user_message: String,
    stream: bool,
    include_usage: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_input(field, message)
}

fn parse(state: &AppState, request: CompletionRequest) -> Result<Checked, ApiError> {
    let CompletionRequest {
        model,
        messages,
        stream,
        stream_options,
        other,
    } = request;
    let model = match model {
        Some(Value::String(model)) => model,
        _ => {
            return Err(invalid(
                "model",
                "model must be a string naming a served model",
            ))
        }
    };
    if let Some(field) = REFUSED.iter().find(|field| other.contains_key(**field)) {
        return Err(invalid(
            field,
            format!("{field} is not supported by this gateway"),
        ));
    }
    match other.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(_) => return Err(invalid("n", "only n = 1 is supported")),
    }
    let stream = match stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => return Err(invalid("stream", "stream must be true or false")),
    };
    let include_usage = stream_options
        .as_ref()
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(raw_messages) = messages else {
        return Err(invalid("messages", "messages must be an array of messages"));
    };
    if raw_messages.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(raw_messages.len());
    let mut total_chars = 0;
    for message in raw_messages {
        let role =
            message.role.as_str().and_then(Role::parse).ok_or_else(|| {
                invalid("messages", "each role must be system, user or assistant")
            })?;
        let content = content_text(message.content)?;
        total_chars += content.chars().count();
        messages.push((role, content));
    }
    let Some((_, last_user_message)) = messages.iter().rev().find(|(role, _)| *role == Role::User)
    else {
        return Err(invalid("messages", "messages must hold a user message"));
    };
    // The whole conversation is bounded like one message and its context together.
    let most = state.config.max_message_chars + state.config.context_max_chars;
    if total_chars > most {
        return Err(invalid(
            "messages",
            format!("messages must be at most {most} characters in all"),
        ));
    }
    if !state.llm.serves(&model) {
        return Err(ApiError::ModelNotFound(model));
    }
    let last_user_message = last_user_message.clone();
    let extra: Map<String, Value> = other
        .into_iter()
        .filter(|(field, _)| PASSED_THROUGH.contains(&field.as_str()))
        .collect();
    Ok(Checked {
        prompt: ClientPrompt {
            messages,
            model,
            extra,
        },
        last_user_message,
        stream,
        include_usage,
    })
}

/// A message's `content`: a string, or an array of text parts joined.
fn content_text(content: Value) -> Result<String, ApiError> {
    match content {
        Value::String(text) => Ok(text),
        Value::Array(parts) => parts
            .iter()
            .map(
                |part| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text),
                    _ => Err(invalid(
                        "messages",
                        "only text content parts are supported (no images or audio)",
                    )),
                },
            )
            .collect(),
        _ => Err(invalid(
            "messages",
            "content must be a string or an array of text parts",
        )),
    }
}

/// OpenAI's chat completion (`object: chat.completion`).
#[derive(Serialize, ToSchema)]
pub struct Completion {
    #[schema(value_type = Vec<Object>)]
    choices: [Choice; 1],
    created: i64,
    id: String,
    model: String,
    object: &'static str,
    #[schema(value_type = Object)]
    usage: CompletionUsage,
}

#[derive(Serialize)]
struct Choice {
    finish_reason: &'static str,
    index: u32,
    message: AssistantMessage,
}

#[derive(Serialize)]
struct AssistantMessage {
    content: String,
    role: &'static str,
}

/// OpenAI's usage object, zeros when the model reported none (the SDKs expect numbers).
#[derive(Serialize)]
struct CompletionUsage {
    completion_tokens: i64,
    prompt_tokens: i64,
    total_tokens: i64,
}

impl From<Option<Usage>> for CompletionUsage {
    fn from(usage: Option<Usage>) -> Self {
        let usage = usage.unwrap_or(Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
        });
        Self {
            completion_tokens: usage.completion_tokens,
            prompt_tokens: usage.prompt_tokens,
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
        }
    }
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    security(("bearer" = []), ("token" = [])),
    params((
        "Idempotency-Key" = Option<String>,
        Header,
        description = "Makes a retried request return the first answer"
    )),
    request_body(content = CompletionRequest, content_type = "application/json"),
    responses(
        (
            status = 200,
            description = "A chat.completion (or, streamed, chat.completion.chunk events and [DONE])",
            body = Completion
        ),
        (status = 400, description = "invalid_request_error", body = OpenAiError),
        OpenAiUnauthorised,
        (status = 402, description = "insufficient_quota", body = OpenAiError),
        (status = 404, description = "model_not_found", body = OpenAiError),
        (status = 429, description = "rate_limit_exceeded", body = OpenAiError),
        (status = 502, description = "upstream_error", body = OpenAiError),
        (status = 504, description = "upstream_timeout", body = OpenAiError),
    )
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    Payload(request): Payload<CompletionRequest>,
) -> Result<Response, ApiError> {
    let request = parse(&state, request)?;
    // The stored chat is the last user message and the answer, by the same rules as /chat.
    let message = Message::parse(request.last_user_message, state.config.max_message_chars)
        .map_err(|mut err| {
            err.field = "messages";
            err
        })?;
    let model = request.prompt.model.clone();
    let question = Question {
        message,
        conversation_id: None,
        idempotency_key,
        client_prompt: Some(request.prompt),
    };
    if request.stream {
        let started = chat::chat_streamed(&state, user.id, question).await?;
        return Ok(chunk_stream(started, model, request.include_usage));
    }
    let answer = chat::chat(&state, user.id, question).await?;
    let body = Json(Completion {
        choices: [Choice {
            finish_reason: "stop",
            index: 0,
            message: AssistantMessage {
                content: answer.response,
                role: "assistant",
            },
        }],
        created: unix_now(),
        id: completion_id(answer.chat_id),
        model,
        object: "chat.completion",
        usage: answer.usage.into(),
    });
    let fresh_balance = (!answer.replayed).then_some(TokensRemaining(answer.balance));
    let replayed = answer.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    Ok((fresh_balance.map(Extension), replayed, body).into_response())
}

fn completion_id(chat_id: i64) -> String {
    format!("chatcmpl-{chat_id}")
}

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
fn chunk_stream(started: StreamedChat, model: String, include_usage: bool) -> Response {
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

/// Middleware of the `/v1` routes: every error answer, from a handler or a layer, in
/// OpenAI's error object instead of the contract's envelope, so the SDKs raise the right
/// exception with the right message.
pub async fn openai_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, 64 * 1024).await else {
        return (parts.status, parts.headers, Body::empty()).into_response();
    };
    let envelope: Received = serde_json::from_slice(&bytes).unwrap_or_default();
    let error = openai_error(
        envelope.error.as_deref().unwrap_or("the request failed"),
        envelope.code.as_deref().unwrap_or("internal"),
        envelope.field.as_deref(),
        status.as_u16(),
    );
    let body = serde_json::to_string(&error).expect("an error object serialises");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (parts.status, parts.headers, body).into_response()
}

/// What [`openai_errors`] reads of an error answer: the contract's envelope, or nothing of
/// it from a body that is not one.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Received {
    code: Option<String>,
    error: Option<String>,
    field: Option<String>,
}

/// `{"error": {"message", "type", "param", "code"}}` for the contract's envelope, typed as
/// OpenAI types its errors of that status.
fn openai_error<'a>(
    message: &'a str,
    our_code: &'a str,
    field: Option<&'a str>,
    status: u16,
) -> OpenAiError<'a> {
    let (kind, code) = match (status, our_code) {
        (401, _) => ("invalid_request_error", "invalid_api_key"),
        (402, _) => ("insufficient_quota", "insufficient_quota"),
        (403, _) => ("permission_error", our_code),
        (429, _) => ("requests", "rate_limit_exceeded"),
        (status, _) if status >= 500 => ("api_error", our_code),
        // A streamed failure is reported as the server's, whatever its code.
        (_, "upstream_error" | "upstream_timeout" | "shutting_down" | "internal") => {
            ("api_error", our_code)
        }
        _ => ("invalid_request_error", our_code),
    };
    OpenAiError {
        error: OpenAiErrorDetail {
            code,
            message,
            param: field,
            kind,
        },
    }
}
