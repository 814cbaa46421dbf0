//! What the `/v1` routes read of OpenAI's requests: only the fields tokenchat owns or needs
//! (`model`, `stream`, `stream_options`, the roles of `messages` and the last user message's
//! text), each checked so that a problem names its field; every other field is passed on
//! as the raw JSON the client sent (see [`Forwarded`]).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::{
    domain::Message,
    llm::{
        forward::CAPS,
        raw::{given_twice, is_too_many, AtMost, Element, Field, Fields, NotAnObject},
        Forwarded,
    },
    routes::{error::ApiError, extract::RawJson},
    state::AppState,
};

/// OpenAI's chat completion request. Every field is passed to the model as sent (`tools`,
/// `tool_choice`, `response_format`, `n`, `logprobs`, ...); tokenchat sets `model` to the
/// upstream's name, always asks a stream for its usage, and puts `LLM_SYSTEM_PROMPT` first
/// when `messages` holds no system or developer message.
// Documents the request only: the route reads its body as raw JSON (see [`completion`]), so
// nothing reads these fields (hence the `_`); `serde(rename)` gives the document their names.
#[derive(ToSchema)]
pub struct CompletionRequest {
    /// One of GET /v1/models.
    #[serde(rename = "model")]
    _model: String,
    /// Roles system, developer, user, assistant (with tool_calls), tool or function; content
    /// a string or an array of parts (text, image_url, input_audio, file).
    #[schema(value_type = Vec<Object>)]
    #[serde(rename = "messages")]
    _messages: Vec<()>,
    /// true: chat.completion.chunk events, then `[DONE]`.
    #[serde(rename = "stream")]
    _stream: Option<bool>,
    /// `include_usage`: the last chunk holds the usage.
    #[schema(value_type = Option<Object>)]
    #[serde(rename = "stream_options")]
    _stream_options: Option<()>,
    #[schema(value_type = Option<Vec<Object>>)]
    #[serde(rename = "tools")]
    _tools: Option<()>,
    #[schema(value_type = Option<Object>)]
    #[serde(rename = "response_format")]
    _response_format: Option<()>,
    #[serde(rename = "n")]
    #[schema(minimum = 1)]
    _n: Option<u32>,
}

/// OpenAI's embeddings request, passed to the model as sent but `model`.
#[derive(ToSchema)]
pub struct EmbeddingRequest {
    /// One of GET /v1/models.
    #[serde(rename = "model")]
    _model: String,
    /// A string, or an array of strings, of tokens, or of token arrays.
    #[schema(schema_with = embedding_input)]
    #[serde(rename = "input")]
    _input: (),
    #[serde(rename = "encoding_format")]
    _encoding_format: Option<String>,
    #[serde(rename = "dimensions")]
    _dimensions: Option<u32>,
}

/// The shapes of an embeddings request's `input`, as OpenAI takes them.
fn embedding_input() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    let text = || ObjectBuilder::new().schema_type(Type::String);
    let token = || ObjectBuilder::new().schema_type(Type::Integer);
    OneOfBuilder::new()
        .item(text())
        .item(ArrayBuilder::new().items(text()))
        .item(ArrayBuilder::new().items(token()))
        .item(ArrayBuilder::new().items(ArrayBuilder::new().items(token())))
        .description(Some(
            "A string, or an array of strings, of tokens, or of token arrays.",
        ))
        .build()
        .into()
}

/// A chat completion request as checked: what goes upstream, and the last user message's
/// text as the chat stores it.
pub(super) struct Checked {
    pub forwarded: Forwarded,
    pub message: Message,
}

/// The roles OpenAI's protocol has; tokenchat needs to know them to find the user's
/// message and whether the client sent its own system message.
const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_input(field, message)
}

/// A request body's top-level fields, `expanded` read as an array of objects in the same
/// pass (one scan of the body, however big).
fn fields<'a>(raw: &'a RawJson, expanded: Option<&str>) -> Result<Fields<'a>, ApiError> {
    let text = std::str::from_utf8(&raw.body)
        .map_err(|_| ApiError::InvalidJson("the request body is not UTF-8".into()))?;
    Fields::parse_expanding(text, expanded).map_err(|err| match err {
        NotAnObject::Json(err) => {
            ApiError::InvalidJson(format!("the request body is not valid JSON: {err}"))
        }
        duplicate @ NotAnObject::Duplicate(_) => ApiError::InvalidJson(duplicate.to_string()),
        NotAnObject::TooMany(message) => {
            ApiError::InvalidJson(format!("the request body holds {message}"))
        }
    })
}

/// The served model a request names.
fn model(state: &AppState, fields: &Fields<'_>) -> Result<String, ApiError> {
    let model = fields
        .get("model")
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .ok_or_else(|| invalid("model", "model must be a string naming a served model"))?;
    if !state.llm.serves(&model) {
        return Err(ApiError::ModelNotFound(model));
    }
    Ok(model)
}

/// `true`, `false`, `null` or absent.
fn flag(fields: &Fields<'_>, name: &'static str) -> Result<bool, ApiError> {
    match fields.get(name).map(RawValue::get) {
        None | Some("null") => Ok(false),
        Some(raw) => serde_json::from_str(raw)
            .map_err(|_| invalid(name, format!("{name} must be true or false"))),
    }
}

pub(super) fn completion(state: &AppState, raw: RawJson) -> Result<Checked, ApiError> {
    let fields = fields(&raw, Some("messages"))?;
    let model = model(state, &fields)?;
    let stream = flag(&fields, "stream")?;
    match fields.get("stream_options").map(RawValue::get) {
        None | Some("null") => {}
        // Read as raw fields, as the body is: a stream's options are sent on as written,
        // `include_usage` set (see `Forwarded`).
        Some(options) => {
            let bad = || {
                invalid(
                    "stream_options",
                    "stream_options must be an object whose include_usage is true or false, \
                     each option given once",
                )
            };
            let options = Fields::parse(options).map_err(|_| bad())?;
            let include_usage = options.get("include_usage").map(RawValue::get);
            if !matches!(include_usage, None | Some("true" | "false" | "null")) {
                return Err(bad());
            }
        }
    }
    let Some(Field::Array(messages)) = fields.field("messages") else {
        return Err(invalid("messages", "messages must be an array of messages"));
    };
    if messages.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    let priced = state.config.price_book.model(&model).is_some();
    let mut has_system = false;
    let mut last_user = None;
    let mut media_parts = 0;
    for message in messages {
        let Element::Object(message) = message else {
            return Err(invalid(
                "messages",
                "each message must be an object with a role",
            ));
        };
        // tokenchat would read one and the model perhaps the other: its role, the text
        // stored, the parts reserved for could all differ from what the model is sent.
        if let Some(name) = given_twice(message.iter().map(|(name, _)| name.as_ref())) {
            return Err(invalid(
                "messages",
                format!("a message gives the field {name:?} twice"),
            ));
        }
        let field = |name| {
            message
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| *value)
        };
        let role: Cow<str> = field("role")
            .and_then(|role| serde_json::from_str(role.get()).ok())
            .ok_or_else(|| invalid("messages", "each message must be an object with a role"))?;
        if !ROLES.contains(&role.as_ref()) {
            return Err(invalid(
                "messages",
                "each role must be system, developer, user, assistant, tool or function",
            ));
        }
        has_system |= matches!(role.as_ref(), "system" | "developer");
        if role == "user" {
            last_user = Some(field("content"));
        }
        // Read for every model: a part giving a field twice is refused whoever serves it.
        media_parts += media_parts_of(field("content"))?;
    }
    let Some(content) = last_user else {
        return Err(invalid("messages", "messages must hold a user message"));
    };
    let max_chars = state.config.max_message_chars;
    let message =
        Message::parse(stored_text(content, max_chars)?, max_chars).map_err(|mut err| {
            err.field = "messages";
            err
        })?;
    // Read for a priced model's reservation; an unpriced model's are passed on unread.
    let mut client_cap: Option<u64> = None;
    let mut choices = 1;
    if priced {
        for name in CAPS {
            if let Some(cap) = count(&fields, name)? {
                client_cap = Some(client_cap.map_or(cap, |other| other.min(cap)));
            }
        }
        choices = count(&fields, "n")?.unwrap_or(1);
    }
    let hold = raw.hold.clone().map(|hold| Box::new(hold) as _);
    let mut forwarded =
        Forwarded::from_fields(&raw.body, &fields, model, stream, !has_system, hold);
    // Reserved for by a priced model only.
    forwarded.media_parts = if priced { media_parts } else { 0 };
    forwarded.client_cap = client_cap;
    forwarded.choices = choices;
    Ok(Checked { forwarded, message })
}

/// A count the client may send (`max_tokens`, `max_completion_tokens`, `n`): a whole number
/// of at least 1, or null or absent (`None`).
fn count(fields: &Fields<'_>, name: &'static str) -> Result<Option<u64>, ApiError> {
    match fields.get(name).map(RawValue::get) {
        None | Some("null") => Ok(None),
        Some(raw) => match serde_json::from_str::<u64>(raw) {
            Ok(count) if count >= 1 => Ok(Some(count)),
            _ => Err(invalid(
                name,
                format!("{name} must be a whole number of at least 1"),
            )),
        },
    }
}

/// The most content parts read of one message: images, text pieces, files (each part
/// costs its reading some 50 bytes, however small it is written).
const MAX_PARTS: usize = 10_000;

fn too_many_parts() -> ApiError {
    invalid(
        "messages",
        format!("a message holds more than {MAX_PARTS} content parts"),
    )
}

/// How many parts of a message's content are not text (images, audio, files). A part that
/// is not an object counts as one, as the model may yet read it as one; a part that gives a
/// field twice is refused, as its `type` could be read either way.
fn media_parts_of(content: Option<&RawValue>) -> Result<u64, ApiError> {
    let Some(raw) = content
        .map(RawValue::get)
        .filter(|raw| raw.starts_with('['))
    else {
        return Ok(0);
    };
    // A content that is not an array is refused, or passed on, elsewhere; here it holds no
    // media part.
    let parts = match serde_json::from_str::<AtMost<&RawValue, MAX_PARTS>>(raw) {
        Ok(AtMost(parts)) => parts,
        Err(err) if is_too_many(&err) => return Err(too_many_parts()),
        Err(_) => return Ok(0),
    };
    let mut media = 0;
    for part in parts {
        let is_text = match Fields::parse(part.get()) {
            Ok(fields) => fields
                .get("type")
                .is_some_and(|kind| kind.get() == r#""text""#),
            Err(NotAnObject::Duplicate(name)) => {
                return Err(invalid(
                    "messages",
                    format!("a content part gives the field {name:?} twice"),
                ))
            }
            Err(NotAnObject::Json(_) | NotAnObject::TooMany(_)) => false,
        };
        media += u64::from(!is_text);
    }
    Ok(media)
}

pub(super) fn embeddings(state: &AppState, raw: RawJson) -> Result<Forwarded, ApiError> {
    let fields = fields(&raw, None)?;
    let model = model(state, &fields)?;
    if fields.get("input").is_none() {
        return Err(invalid("input", "input is required"));
    }
    let hold = raw.hold.clone().map(|hold| Box::new(hold) as _);
    Ok(Forwarded::from_fields(
        &raw.body, &fields, model, false, false, hold,
    ))
}

/// One content part, read for its kind and text.
#[derive(Deserialize)]
struct PartView {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
}

/// The text a chat stores of a user message's content: a string as it is; text parts
/// joined as they are, each other part named (`[image]`, `[audio]`, `[file]`, or its type)
/// apart from its neighbours by a space; at most `max_chars` characters.
fn stored_text(content: Option<&RawValue>, max_chars: usize) -> Result<String, ApiError> {
    let not_content = || {
        invalid(
            "messages",
            "content must be a string or an array of content parts",
        )
    };
    // Told apart by their first byte rather than by serde's untagged enums, which would
    // copy the whole content (a 20 MiB image) to try each.
    let raw = content.map_or("null", RawValue::get);
    let mut text =
        match raw.as_bytes().first() {
            Some(b'n') if raw == "null" => String::new(),
            Some(b'"') => serde_json::from_str(raw).map_err(|_| not_content())?,
            Some(b'[') => {
                let AtMost(parts) = serde_json::from_str::<AtMost<PartView, MAX_PARTS>>(raw)
                    .map_err(|err| match is_too_many(&err) {
                        true => too_many_parts(),
                        false => not_content(),
                    })?;
                let mut text = String::new();
                let mut after_name = false;
                for part in parts {
                    let (piece, named) = match (part.kind.as_deref(), part.text) {
                        (Some("text"), Some(piece)) => (piece, false),
                        (Some("image_url" | "image"), _) => ("[image]".to_string(), true),
                        (Some("input_audio" | "audio"), _) => ("[audio]".to_string(), true),
                        (Some("file"), _) => ("[file]".to_string(), true),
                        (Some(kind), _) => (format!("[{kind}]"), true),
                        (None, _) => ("[part]".to_string(), true),
                    };
                    let spaced = |text: &str| text.ends_with(char::is_whitespace);
                    if (named || after_name)
                        && !text.is_empty()
                        && !spaced(&text)
                        && !piece.starts_with(char::is_whitespace)
                    {
                        text.push(' ');
                    }
                    text.push_str(&piece);
                    after_name = named;
                }
                text
            }
            _ => return Err(not_content()),
        };
    if let Some((cut, _)) = text.char_indices().nth(max_chars) {
        text.truncate(cut);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(content: &str) -> String {
        let raw: Box<RawValue> = serde_json::from_str(content).unwrap();
        stored_text(Some(&raw), 40).unwrap()
    }

    #[test]
    fn what_is_not_text_is_named_and_text_is_kept_as_sent() {
        assert_eq!(stored(r#""plain""#), "plain");
        assert_eq!(
            stored(r#"[{"type":"text","text":"hello "},{"type":"text","text":"there"}]"#),
            "hello there"
        );
        assert_eq!(
            stored(
                r#"[{"type":"text","text":"what is"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"input_audio"},{"type":"file"},{"type":"text","text":"?"}]"#
            ),
            "what is [image] [audio] [file] ?"
        );
        assert_eq!(stored(r#"[{"type":"video"}]"#), "[video]");
        assert_eq!(stored("null"), "");
        let long = r#""a text that is longer than forty characters, cut""#;
        assert_eq!(stored(long), "a text that is longer than forty charact");
        assert!(stored_text(
            Some(&serde_json::from_str::<Box<RawValue>>("5").unwrap()),
            40
        )
        .is_err());
    }
}
