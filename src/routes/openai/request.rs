//! What `POST /v1/chat/completions` reads: OpenAI's request, taken as any JSON object and
//! checked field by field, so that each problem names its field.

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::{llm::Role, routes::error::ApiError, services::chat::ClientPrompt, state::AppState};

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
pub(super) struct Checked {
    pub prompt: ClientPrompt,
    pub last_user_message: String,
    pub stream: bool,
    pub include_usage: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_input(field, message)
}

pub(super) fn parse(state: &AppState, request: CompletionRequest) -> Result<Checked, ApiError> {
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
