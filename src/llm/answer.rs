//! What tokenchat reads of a model's answers, whole or streamed: the first choice's text
//! and tool calls (what a chat stores), the usage (what it records), and whether the answer
//! holds anything at all. Everything else is passed on as the model sent it, unread.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::LlmError;

mod tool_calls;

pub use self::tool_calls::ToolCalls;

/// What is read of a whole `chat.completion`.
#[derive(Deserialize)]
struct CompletionView<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChoiceView<'a>>,
    #[serde(default, deserialize_with = "readable")]
    usage: Option<UsageView>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default)]
    index: u64,
    #[serde(default, borrow)]
    message: Option<MessageView<'a>>,
}

#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
    #[serde(default, borrow)]
    function_call: Option<&'a RawValue>,
    #[serde(default, borrow)]
    audio: Option<&'a RawValue>,
}

/// What the model says the question and the answer cost it, when it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: i64,
    /// `None` when the model gave the prompt's count but not the answer's: that is counted.
    pub completion_tokens: Option<i64>,
    /// Of `prompt_tokens`, those read from the model's cache (0 when it did not say).
    pub cached_tokens: i64,
}

/// Usage as servers send it, some with nulls or without a field, or with counts that are
/// not whole numbers (see [`token_count`]). Reasoning tokens (`completion_tokens_details`)
/// are among `completion_tokens` already, so they are not read: counting them again would
/// charge them twice.
#[derive(Deserialize)]
struct UsageView {
    #[serde(default, deserialize_with = "token_count")]
    prompt_tokens: Option<i64>,
    #[serde(default, deserialize_with = "token_count")]
    completion_tokens: Option<i64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    #[serde(default, deserialize_with = "token_count")]
    cached_tokens: Option<i64>,
}

impl UsageView {
    fn read(self) -> Option<Usage> {
        let cached_tokens = self
            .prompt_tokens_details
            .and_then(|details| details.cached_tokens)
            .unwrap_or(0);
        Some(Usage {
            prompt_tokens: self.prompt_tokens?,
            completion_tokens: self.completion_tokens,
            cached_tokens,
        })
    }
}

/// A usage object as a model wrote it, or none when it is not one that can be read (a
/// string, an array, a field of another shape or given twice): read apart from the answer,
/// so that how a model writes its usage never costs the client the answer it was sent.
pub(super) fn readable<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let raw = Box::<RawValue>::deserialize(deserializer)?;
    if !raw.get().starts_with('{') {
        return Ok(None);
    }
    Ok(serde_json::from_str(raw.get()).ok())
}

/// A count of tokens as a model reported it: a whole number (one beyond `i64` as
/// `i64::MAX`), or a number with a fraction, rounded up (`30.0`, `12.5`, `1e18`); anything
/// else (a negative number, a string, `null`, an object) is no count, as if the field were
/// absent, so the answer is counted rather than free. How a model writes its usage never
/// costs the client the answer it was sent.
pub(super) fn token_count<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<i64>, D::Error> {
    // Read as written: a `Value` would refuse `1e309` and lose the whole answer with it.
    let raw = Box::<RawValue>::deserialize(deserializer)?;
    let text = raw.get().trim();
    if !text.starts_with(|first: char| first == '-' || first.is_ascii_digit()) {
        return Ok(None);
    }
    if let Ok(whole) = text.parse::<i64>() {
        return Ok((whole >= 0).then_some(whole));
    }
    if text.bytes().all(|byte| byte.is_ascii_digit()) {
        // A whole number beyond i64: as far as it goes.
        return Ok(Some(i64::MAX));
    }
    // A float, or a negative beyond i64; `as` saturates, so 1e309 (infinite) is i64::MAX.
    Ok(text
        .parse::<f64>()
        .ok()
        .filter(|float| *float >= 0.0)
        .map(|float| float.ceil() as i64))
}

/// What a chat keeps of a whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The first choice's text (empty when it has none).
    pub text: String,
    /// The first choice's tool calls, the JSON array as the model sent it.
    pub tool_calls: Option<String>,
    /// What the answer holds that a chat does not store, run together: every choice's
    /// refusal, legacy `function_call` and audio transcript, and the other choices' (`n`
    /// above 1) text and tool calls' names and arguments. Sent to the client; counted when
    /// the model reports no usage.
    pub unstored: String,
    pub usage: Option<Usage>,
}

/// Why an answer that is one holds nothing: the target answered, and the request (a `stop`
/// at the start, say) made it empty, so it is not the target's failure.
pub const NO_CHOICES: &str = "no choices";
pub const EMPTY_ANSWER: &str = "empty answer";

/// Whether `err` is an answer holding nothing ([`NO_CHOICES`], [`EMPTY_ANSWER`]) rather
/// than no answer at all.
pub fn holds_nothing(err: &LlmError) -> bool {
    matches!(err, LlmError::Unusable(reason) if [NO_CHOICES, EMPTY_ANSWER].contains(reason))
}

/// Reads a whole answer; an answer none of whose choices holds text, a refusal, a tool call
/// or audio is unusable (and refunded), as an empty answer always was.
pub fn read_completion(body: &str) -> Result<Read, LlmError> {
    let completion: CompletionView = serde_json::from_str(body).map_err(|err| {
        tracing::warn!(error = %err, "model answer was not the expected JSON");
        LlmError::Unusable("not the expected JSON")
    })?;
    if completion.choices.is_empty() {
        return Err(LlmError::Unusable(NO_CHOICES));
    }
    let holds_anything = completion.choices.iter().any(|choice| {
        choice.message.as_ref().is_some_and(|message| {
            let text = |text: &Option<Cow<'_, str>>| {
                text.as_deref().is_some_and(|text| !text.trim().is_empty())
            };
            text(&message.content)
                || text(&message.refusal)
                || present(message.tool_calls)
                || present(message.function_call)
                || present(message.audio)
        })
    });
    if !holds_anything {
        return Err(LlmError::Unusable(EMPTY_ANSWER));
    }
    let first_choice = completion
        .choices
        .iter()
        .position(|choice| choice.index == 0)
        .unwrap_or(0);
    let first = completion
        .choices
        .get(first_choice)
        .and_then(|choice| choice.message.as_ref());
    let mut unstored = String::new();
    for (at, choice) in completion.choices.iter().enumerate() {
        let Some(message) = &choice.message else {
            continue;
        };
        if let Some(refusal) = &message.refusal {
            unstored.push_str(refusal);
        }
        read_unstored_parts(message.function_call, message.audio, &mut unstored);
        if at == first_choice {
            continue;
        }
        if let Some(content) = &message.content {
            unstored.push_str(content);
        }
        // Their names and arguments, as a stream's pieces of them are counted.
        let calls = message.tool_calls.map_or("null", RawValue::get);
        unstored.push_str(&tool_call_text(calls));
    }
    Ok(Read {
        unstored,
        text: first
            .and_then(|message| message.content.as_deref())
            .unwrap_or_default()
            .to_string(),
        tool_calls: first
            .and_then(|message| message.tool_calls)
            .filter(|calls| present(Some(calls)))
            .map(|calls| calls.get().to_string()),
        usage: completion.usage.and_then(UsageView::read),
    })
}

/// What is counted of tool calls (the JSON array a whole answer holds): their names and
/// arguments as the client reads them, not the JSON around them nor its escapes, as a
/// stream's pieces of them are counted.
/// What it cannot read so is counted as written, whole: nothing delivered goes uncounted.
pub fn tool_call_text(calls: &str) -> String {
    /// A function call's, or another kind's (`custom`: `name` and `input`).
    #[derive(Deserialize)]
    struct CallView<'a> {
        #[serde(borrow, alias = "custom")]
        function: FunctionView<'a>,
    }
    #[derive(Deserialize)]
    struct FunctionView<'a> {
        #[serde(default, borrow)]
        name: Option<&'a RawValue>,
        #[serde(default, borrow, alias = "input")]
        arguments: Option<&'a RawValue>,
    }
    let Ok(calls) = serde_json::from_str::<Option<Vec<&RawValue>>>(calls) else {
        return calls.to_owned();
    };
    // A string as the client reads it; anything else (`arguments` as an object, as some
    // servers send it) as written.
    let read = |raw: &RawValue| {
        serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned())
    };
    let mut text = String::new();
    for call in calls.into_iter().flatten() {
        match serde_json::from_str::<CallView>(call.get()) {
            Ok(CallView { function }) => {
                for part in [function.name, function.arguments].into_iter().flatten() {
                    text.push_str(&read(part));
                }
            }
            Err(_) => text.push_str(call.get()),
        }
    }
    text
}

/// A streamed piece of a function call, or `None` for one of another kind (`custom`) or one
/// that cannot be read as one (an `id` that is a number, `arguments` as an object).
fn function_piece(raw: &RawValue) -> Option<ToolCallDelta> {
    let piece: ToolCallDelta = serde_json::from_str(raw.get()).ok()?;
    let a_function = piece.kind.as_deref().is_none_or(|kind| kind == "function");
    a_function.then_some(piece)
}

/// The parts of a message or a delta that no chat stores, read for counting: a legacy
/// `function_call`'s name and arguments, as a tool call's are, and an `audio` part's
/// transcript (its sound is no text to count; a model that answers audio reports usage).
fn read_unstored_parts(
    function_call: Option<&RawValue>,
    audio: Option<&RawValue>,
    unstored: &mut String,
) {
    let function: FunctionDelta = function_call
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or_default();
    unstored.extend(function.name.into_iter().chain(function.arguments));
    let audio: AudioView = audio
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or_default();
    unstored.extend(audio.transcript);
}

/// What is counted of an `audio` part, whole or a streamed piece of one.
#[derive(Default, Deserialize)]
struct AudioView {
    #[serde(default)]
    transcript: Option<String>,
}

/// A raw value that holds something: not `null`, `[]` or `{}`.
fn present(value: Option<&RawValue>) -> bool {
    value.is_some_and(|value| !matches!(value.get().trim(), "null" | "[]" | "{}"))
}

/// What is read of one `chat.completion.chunk`.
#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChunkChoiceView<'a>>,
    #[serde(default, deserialize_with = "readable")]
    usage: Option<UsageView>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChunkChoiceView<'a> {
    #[serde(default)]
    index: u64,
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    /// Read one by one (see [`function_piece`]): a piece of another kind, or written
    /// oddly, costs neither the chunk nor its count.
    #[serde(default, borrow)]
    tool_calls: Option<Vec<&'a RawValue>>,
    #[serde(default, borrow)]
    function_call: Option<&'a RawValue>,
    #[serde(default, borrow)]
    audio: Option<&'a RawValue>,
}

/// One piece of a streamed tool call: the first names it, the rest add to its arguments.
/// (Also read for a whole answer's calls, whose `index` is absent.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ToolCallDelta {
    /// Absent from some servers' pieces (Gemini's OpenAI endpoint sends each call whole,
    /// with its own `id` and no `index`).
    #[serde(default)]
    pub index: Option<usize>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub function: Option<FunctionDelta>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FunctionDelta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub arguments: Option<String>,
}

/// One chunk of a streamed answer: as the model sent it, and what tokenchat reads of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// The chunk's JSON as the model sent it (empty from the demo model answering `/chat`).
    pub data: String,
    /// The text it adds to the first choice.
    pub text: String,
    /// The tool-call pieces it adds to the first choice.
    pub tool_calls: Vec<ToolCallDelta>,
    /// What it adds that a chat does not store (see [`Read::unstored`]).
    pub unstored: String,
    /// Whether it carries any of an answer, in any choice: text that is not only white
    /// space, a refusal, a tool call or audio. (The rule of issue 21 for what a stream that
    /// breaks off is charged for: something delivered, not a role or blanks.)
    pub substantial: bool,
    /// What the answer cost the model (the last chunk, when asked for).
    pub usage: Option<Usage>,
    /// The choices it names, and those it finishes (a finish reason given), as bits by
    /// index: a stream whose every choice finished is whole even without `[DONE]`.
    pub choices: Choices,
}

/// Choices of a stream by their index, as bits; those of index 128 or more are not told
/// apart, so a stream holding one never counts as finished without `[DONE]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Choices {
    pub named: u128,
    pub finished: u128,
}

impl Choices {
    fn add(&mut self, index: u64, finished: bool) {
        let bit = u32::try_from(index)
            .ok()
            .and_then(|index| 1u128.checked_shl(index))
            .unwrap_or(0);
        // One past what can be told apart: never finished.
        self.named |= if bit == 0 { u128::MAX } else { bit };
        if finished {
            self.finished |= bit;
        }
    }

    /// Both at once: what a stream has seen so far.
    pub fn merge(&mut self, other: Choices) {
        self.named |= other.named;
        self.finished |= other.finished;
    }

    /// Whether it named a choice and finished every one it named.
    pub fn all_finished(&self) -> bool {
        self.named != 0 && self.named & !self.finished == 0
    }
}

/// Reads one streamed chunk; an error object in the stream is the model breaking off.
pub fn read_chunk(data: String) -> Result<Chunk, LlmError> {
    let view: ChunkView = serde_json::from_str(&data).map_err(|err| {
        tracing::warn!(error = %err, "a streamed chunk was not the expected JSON");
        LlmError::Unusable("a chunk was not the expected JSON")
    })?;
    if view.error.is_some() {
        tracing::warn!("model sent an error in the middle of its answer");
        return Err(LlmError::BrokeOff);
    }
    let mut chunk = Chunk {
        usage: view.usage.and_then(UsageView::read),
        ..Chunk::default()
    };
    for choice in view.choices {
        // A reason named (`""` and `null` are none).
        let finished = choice
            .finish_reason
            .is_some_and(|reason| !matches!(reason.get().trim(), "null" | r#""""#));
        chunk.choices.add(choice.index, finished);
        let Some(delta) = choice.delta else {
            continue;
        };
        let text = |text: &Option<Cow<'_, str>>| {
            text.as_deref().is_some_and(|text| !text.trim().is_empty())
        };
        chunk.substantial |= text(&delta.content)
            || text(&delta.refusal)
            || delta
                .tool_calls
                .as_ref()
                .is_some_and(|calls| !calls.is_empty())
            || present(delta.function_call)
            || present(delta.audio);
        read_unstored_parts(delta.function_call, delta.audio, &mut chunk.unstored);
        if choice.index == 0 {
            if let Some(content) = delta.content {
                chunk.text.push_str(&content);
            }
            if let Some(refusal) = delta.refusal {
                chunk.unstored.push_str(&refusal);
            }
        } else {
            let others = &mut chunk.unstored;
            for text in [delta.content, delta.refusal].into_iter().flatten() {
                others.push_str(&text);
            }
        }
        for piece in delta.tool_calls.unwrap_or_default() {
            match function_piece(piece) {
                // The first choice's function calls are put together and stored.
                Some(piece) if choice.index == 0 => chunk.tool_calls.push(piece),
                Some(piece) => {
                    let function = piece.function.unwrap_or_default();
                    let text = function.name.into_iter().chain(function.arguments);
                    chunk.unstored.extend(text);
                }
                // Of another kind, or written oddly: counted, as the client got it.
                None => chunk
                    .unstored
                    .push_str(&tool_call_text(&format!("[{}]", piece.get()))),
            }
        }
    }
    chunk.data = data;
    Ok(chunk)
}

#[cfg(test)]
mod tests;
