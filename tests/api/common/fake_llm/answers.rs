//! What the fake model answers a chat completion request, as a real model would: text that
//! echoes the user's last message, a call to a tool it was given, JSON of the schema it was
//! asked for, several choices (`n`), log probabilities, a refusal, an answer cut short by
//! `max_tokens`, and the usage with its details.

use serde::Serialize;
use serde_json::{json, Value};
// Split into words as the demo model streams them: each with the white space after it.
use tokenchat::llm::demo::pieces;

/// The whole answer to one request.
pub struct Answer {
    pub choices: Vec<Choice>,
    /// Each piece of text comes with its log probability (`logprobs: true`).
    pub logprobs: bool,
    pub usage: Usage,
}

/// One choice of the answer.
pub struct Choice {
    pub content: Option<String>,
    pub refusal: Option<String>,
    pub tool_call: Option<ToolCall>,
    pub finish_reason: &'static str,
}

pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
    pub completion_tokens_details: CompletionDetails,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct PromptDetails {
    pub cached_tokens: usize,
    pub audio_tokens: usize,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct CompletionDetails {
    pub reasoning_tokens: usize,
    pub audio_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            // Distinct numbers, so a test can see that the details came through.
            prompt_tokens_details: PromptDetails {
                cached_tokens: prompt_tokens / 2,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: 1,
                audio_tokens: 0,
            },
        }
    }
}

/// The text of a message's content: a string, or its text parts joined.
pub fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect(),
        _ => String::new(),
    }
}

pub fn count_words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// The last user message's text, which the fake answers.
pub fn user_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|message| message["role"] == "user")
        .map(|message| text_of(&message["content"]))
        .unwrap_or_default()
}

/// What a model answers `body`.
pub fn answer(body: &Value) -> Answer {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let user = user_message(body);
    let prompt_tokens = messages
        .iter()
        .map(|message| count_words(&text_of(&message["content"])))
        .sum();
    let last = messages.last().cloned().unwrap_or_default();
    let tools = body["tools"].as_array().filter(|tools| !tools.is_empty());
    let n = body["n"].as_u64().unwrap_or(1).max(1) as usize;
    let cap = body["max_completion_tokens"]
        .as_u64()
        .or(body["max_tokens"].as_u64())
        .map(|cap| cap as usize);
    let choices = (0..n)
        .map(|index| {
            if last["role"] == "tool" {
                return text_choice(format!("Tool said: {}", text_of(&last["content"])), cap);
            }
            if let (Some(tools), false) = (tools, body["tool_choice"] == "none") {
                let chosen = body["tool_choice"]["function"]["name"].as_str();
                let tool = tools
                    .iter()
                    .find(|tool| Some(tool["function"]["name"].as_str().unwrap_or("")) == chosen)
                    .unwrap_or(&tools[0]);
                let arguments = example_of(&tool["function"]["parameters"]);
                return Choice {
                    content: None,
                    refusal: None,
                    tool_call: Some(ToolCall {
                        id: format!("call_fake{index}"),
                        name: tool["function"]["name"].as_str().unwrap_or("").to_string(),
                        arguments: arguments.to_string(),
                    }),
                    finish_reason: "tool_calls",
                };
            }
            if user.starts_with("[refuse]") {
                return Choice {
                    content: None,
                    refusal: Some("I can't help with that.".into()),
                    tool_call: None,
                    finish_reason: "stop",
                };
            }
            let format = &body["response_format"];
            let content = match format["type"].as_str() {
                Some("json_schema") => example_of(&format["json_schema"]["schema"]).to_string(),
                Some("json_object") => json!({ "echo": user }).to_string(),
                _ if index == 0 => format!("Echo: {user}"),
                _ => format!("Echo {index}: {user}"),
            };
            let mut choice = text_choice(content, cap);
            if user.starts_with("[filter]") {
                choice.finish_reason = "content_filter";
            }
            choice
        })
        .collect::<Vec<_>>();
    let first = &choices[0];
    let completion_tokens = count_words(
        first
            .content
            .as_deref()
            .or(first.refusal.as_deref())
            .or(first.tool_call.as_ref().map(|call| call.arguments.as_str()))
            .unwrap_or_default(),
    );
    Answer {
        choices,
        logprobs: body["logprobs"] == true,
        usage: Usage::new(prompt_tokens, completion_tokens),
    }
}

/// A text answer, cut to `cap` words (then its finish reason is `length`).
fn text_choice(content: String, cap: Option<usize>) -> Choice {
    let words = pieces(&content);
    let (content, finish_reason) = match cap {
        Some(cap) if words.len() > cap => (words[..cap].concat(), "length"),
        _ => (content, "stop"),
    };
    Choice {
        content: Some(content),
        refusal: None,
        tool_call: None,
        finish_reason,
    }
}

/// A value of the JSON schema `schema`: every property of an object, one item of an array,
/// the first of an enum, and a fixed value of each simple type.
pub fn example_of(schema: &Value) -> Value {
    if let Some(first) = schema["enum"].as_array().and_then(|values| values.first()) {
        return first.clone();
    }
    if let Some(first) = schema["anyOf"]
        .as_array()
        .and_then(|options| options.first())
    {
        return example_of(first);
    }
    match schema["type"].as_str() {
        Some("object") => Value::Object(
            schema["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, property)| (name.clone(), example_of(property)))
                .collect(),
        ),
        Some("array") => json!([example_of(&schema["items"])]),
        Some("string") => json!("Paris"),
        Some("integer") => json!(21),
        Some("number") => json!(21.5),
        Some("boolean") => json!(true),
        _ => Value::Null,
    }
}

/// A piece of text's log probability, as OpenAI gives it.
pub fn logprob(piece: &str) -> Value {
    json!({
        "token": piece,
        "logprob": -0.25,
        "bytes": piece.as_bytes(),
        "top_logprobs": [],
    })
}

impl Answer {
    /// One choice of `text`, as it is.
    pub fn text(text: &str) -> Self {
        Self {
            choices: vec![Choice {
                content: Some(text.to_string()),
                refusal: None,
                tool_call: None,
                finish_reason: "stop",
            }],
            logprobs: false,
            usage: Usage::new(0, count_words(text)),
        }
    }

    /// The whole `chat.completion`, as OpenAI sends it, naming `model` as the upstream
    /// names it.
    pub fn completion(&self, model: &str, usage: bool) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, choice)| {
                let mut message = json!({
                    "role": "assistant",
                    "content": choice.content,
                    "refusal": choice.refusal,
                });
                if let Some(call) = &choice.tool_call {
                    message["tool_calls"] = json!([{
                        "id": call.id,
                        "type": "function",
                        "function": { "name": call.name, "arguments": call.arguments },
                    }]);
                }
                let logprobs = match (&choice.content, self.logprobs) {
                    (Some(content), true) => {
                        json!({ "content": pieces(content).iter().map(|piece| logprob(piece)).collect::<Vec<_>>() })
                    }
                    _ => Value::Null,
                };
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                })
            })
            .collect();
        let mut body = json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        });
        if usage {
            body["usage"] = json!(self.usage);
        }
        body
    }
}
