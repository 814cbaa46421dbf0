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
use serde_json::{json, Map, Value};

use super::{
    chat::{keep_alive, IDEMPOTENT_REPLAYED},
    error::ApiError,
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

#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("bearer" = []), ("token" = [])), responses((status = 200, body = super::openapi::ModelList, description = "The models served"), (status = 401, description = "invalid_api_key", body = super::openapi::OpenAiError), (status = 403, description = "permission_error", body = super::openapi::OpenAiError)))]
pub async fn models(State(state): State<AppState>, _user: AuthUser) -> Json<Value> {
    let (names, since) = state.llm.served_models();
    let data: Vec<Value> = names
        .iter()
        .map(|name| json!({ "id": name, "object": "model", "created": since, "owned_by": "tokenchat" }))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// A chat completion request, read field by field so that each problem names its field.
struct CompletionRequest {
    prompt: ClientPrompt,
    last_user_message: String,
    stream: bool,
    include_usage: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_input(field, message)
}

fn parse(state: &AppState, mut body: Map<String, Value>) -> Result<CompletionRequest, ApiError> {
    let model = match body.remove("model") {
        Some(Value::String(model)) => model,
        _ => {
            return Err(invalid(
                "model",
                "model must be a string naming a served model",
            ))
        }
    };
    if let Some(field) = REFUSED.iter().find(|field| body.contains_key(**field)) {
        return Err(invalid(
            field,
            format!("{field} is not supported by this gateway"),
        ));
    }
    match body.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(_) => return Err(invalid("n", "only n = 1 is supported")),
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(invalid("stream", "stream must be true or false")),
    };
    let include_usage = body
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(Value::Array(raw_messages)) = body.remove("messages") else {
        return Err(invalid("messages", "messages must be an array of messages"));
    };
    if raw_messages.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(raw_messages.len());
    let mut total_chars = 0;
    for message in &raw_messages {
        let role = message["role"]
            .as_str()
            .and_then(Role::parse)
            .ok_or_else(|| invalid("messages", "each role must be system, user or assistant"))?;
        let content = content_text(&message["content"])?;
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
    let extra: Map<String, Value> = body
        .into_iter()
        .filter(|(field, _)| PASSED_THROUGH.contains(&field.as_str()))
        .collect();
    Ok(CompletionRequest {
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
fn content_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(text) => Ok(text.clone()),
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

#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", security(("bearer" = []), ("token" = [])), params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried request return the first answer")), request_body(content = super::openapi::CompletionRequest, content_type = "application/json"), responses((status = 200, description = "A chat.completion (or, streamed, chat.completion.chunk events and [DONE])", body = super::openapi::Completion), (status = 400, description = "invalid_request_error", body = super::openapi::OpenAiError), (status = 401, description = "invalid_api_key", body = super::openapi::OpenAiError), (status = 402, description = "insufficient_quota", body = super::openapi::OpenAiError), (status = 403, description = "permission_error", body = super::openapi::OpenAiError), (status = 404, description = "model_not_found", body = super::openapi::OpenAiError), (status = 429, description = "rate_limit_exceeded", body = super::openapi::OpenAiError), (status = 502, description = "upstream_error", body = super::openapi::OpenAiError), (status = 504, description = "upstream_timeout", body = super::openapi::OpenAiError)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    Payload(body): Payload<Map<String, Value>>,
) -> Result<Response, ApiError> {
    let request = parse(&state, body)?;
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
        let started = chat::chat_streamed(&state.chats, user.id, question).await?;
        return Ok(chunk_stream(started, model, request.include_usage));
    }
    let answer = chat::chat(&state.chats, user.id, question).await?;
    let body = Json(json!({
        "id": completion_id(answer.chat_id),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": answer.response },
            "finish_reason": "stop",
        }],
        "usage": usage_json(answer.usage),
    }));
    let fresh_balance = (!answer.replayed).then_some(TokensRemaining(answer.balance));
    let replayed = answer.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    Ok((fresh_balance.map(Extension), replayed, body).into_response())
}

fn completion_id(chat_id: i64) -> String {
    format!("chatcmpl-{chat_id}")
}

/// OpenAI's usage object, zeros when the model reported none (the SDKs expect numbers).
fn usage_json(usage: Option<Usage>) -> Value {
    let usage = usage.unwrap_or(Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
    });
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// `chat.completion.chunk` events as OpenAI sends them: the role first, the content as it
/// comes, a last chunk with `finish_reason`, the usage chunk when asked for, `[DONE]`; a
/// failure after the start is an `{"error": ...}` event.
fn chunk_stream(started: StreamedChat, model: String, include_usage: bool) -> Response {
    let chat = started.into_events();
    let chat_id = chat.chat_id;
    let replayed = chat.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    let created = unix_now();
    let chunk = move |delta: Value, finish_reason: Value| {
        json!({
            "id": completion_id(chat_id),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
        })
    };
    let first = chunk(json!({ "role": "assistant", "content": "" }), Value::Null);
    let events = stream::once(async move { vec![first] })
        .chain(chat.events.map(move |event| match event {
            StreamEvent::Text(content) => vec![chunk(json!({ "content": content }), Value::Null)],
            StreamEvent::Done { usage, .. } => {
                let mut last = vec![chunk(json!({}), json!("stop"))];
                if include_usage {
                    let mut usage_chunk = chunk(json!({}), Value::Null);
                    usage_chunk["choices"] = json!([]);
                    usage_chunk["usage"] = usage_json(usage);
                    last.push(usage_chunk);
                }
                last.push(json!("[DONE]"));
                last
            }
            StreamEvent::Failed { error, .. } => {
                vec![openai_error(&ApiError::from(error).envelope(), 500)]
            }
        }))
        .flat_map(stream::iter)
        .map(|data| {
            let text = match data {
                Value::String(done) => done,
                other => other.to_string(),
            };
            Ok::<_, Infallible>(Event::default().data(text))
        });
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
    let envelope: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let error = openai_error(&envelope, status.as_u16());
    let body = error.to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (parts.status, parts.headers, body).into_response()
}

/// `{"error": {"message", "type", "param", "code"}}` for the contract's envelope, typed as
/// OpenAI types its errors of that status.
fn openai_error(envelope: &Value, status: u16) -> Value {
    let message = envelope["error"].as_str().unwrap_or("the request failed");
    let our_code = envelope["code"].as_str().unwrap_or("internal");
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
    json!({
        "error": {
            "message": message,
            "type": kind,
            "param": envelope.get("field").cloned().unwrap_or(Value::Null),
            "code": code,
        }
    })
}
