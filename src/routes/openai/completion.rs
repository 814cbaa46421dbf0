//! The answer of `POST /v1/chat/completions` that tokenchat writes itself: a replayed
//! answer (a repeated `Idempotency-Key`), whole, from what the chat stored; its usage and
//! id are a replayed stream's chunks' too. A live answer is the model's own (see
//! [`super::relay`]).

use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::{clock::unix_now, llm::Usage};

/// OpenAI's chat completion (`object: chat.completion`), as the model gave it but `model`.
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

impl Completion {
    /// The stored answer of chat `chat_id` to a request for `model`, which was charged
    /// `cost`.
    pub(super) fn replayed(
        chat_id: i64,
        model: String,
        content: String,
        tool_calls: Option<Box<RawValue>>,
        cost: i64,
    ) -> Self {
        Self {
            choices: [Choice {
                finish_reason: finish_reason(tool_calls.is_some()),
                index: 0,
                message: AssistantMessage {
                    content: (!content.is_empty() || tool_calls.is_none()).then_some(content),
                    role: "assistant",
                    tool_calls,
                },
            }],
            created: unix_now(),
            id: completion_id(chat_id),
            model,
            object: "chat.completion",
            usage: CompletionUsage::charged(None, cost),
        }
    }
}

/// Why a replayed answer ended: its tool calls, or its end.
pub(super) fn finish_reason(tool_calls: bool) -> &'static str {
    if tool_calls {
        "tool_calls"
    } else {
        "stop"
    }
}

#[derive(Serialize)]
struct Choice {
    finish_reason: &'static str,
    index: u32,
    message: AssistantMessage,
}

#[derive(Serialize)]
struct AssistantMessage {
    content: Option<String>,
    role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Box<RawValue>>,
}

/// OpenAI's usage object, zeros when the model reported none (the SDKs expect numbers),
/// with what the call was charged (`cost`).
#[derive(Serialize)]
pub(super) struct CompletionUsage {
    completion_tokens: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<i64>,
    prompt_tokens: i64,
    total_tokens: i64,
}

impl CompletionUsage {
    /// `usage`, and the charge.
    pub(super) fn charged(usage: Option<Usage>, cost: i64) -> Self {
        Self {
            cost: Some(cost),
            ..usage.into()
        }
    }
}

impl From<Option<Usage>> for CompletionUsage {
    fn from(usage: Option<Usage>) -> Self {
        let (prompt_tokens, completion_tokens) = usage.map_or((0, 0), |usage| {
            (usage.prompt_tokens, usage.completion_tokens.unwrap_or(0))
        });
        Self {
            completion_tokens,
            cost: None,
            prompt_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

pub(super) fn completion_id(chat_id: i64) -> String {
    format!("chatcmpl-{chat_id}")
}

/// A stored chat's tool calls, as the JSON they were stored as.
pub(super) fn stored_tool_calls(tool_calls: Option<String>) -> Option<Box<RawValue>> {
    tool_calls.and_then(|calls| RawValue::from_string(calls).ok())
}
