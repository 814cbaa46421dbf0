//! The answer of `POST /v1/chat/completions`, whole; its usage and id are the streamed
//! chunks' too.

use serde::Serialize;
use utoipa::ToSchema;

use crate::{clock::unix_now, llm::Usage};

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

impl Completion {
    /// The answer of chat `chat_id` to a request for `model`.
    pub(super) fn new(chat_id: i64, model: String, content: String, usage: Option<Usage>) -> Self {
        Self {
            choices: [Choice {
                finish_reason: "stop",
                index: 0,
                message: AssistantMessage {
                    content,
                    role: "assistant",
                },
            }],
            created: unix_now(),
            id: completion_id(chat_id),
            model,
            object: "chat.completion",
            usage: usage.into(),
        }
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
    content: String,
    role: &'static str,
}

/// OpenAI's usage object, zeros when the model reported none (the SDKs expect numbers).
#[derive(Serialize)]
pub(super) struct CompletionUsage {
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

pub(super) fn completion_id(chat_id: i64) -> String {
    format!("chatcmpl-{chat_id}")
}
