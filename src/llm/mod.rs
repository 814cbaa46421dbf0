//! The model clients: what the chat service asks a model, and the backends that answer
//! behind one interface: an upstream speaking OpenAI's Chat Completions protocol
//! ([`openai`]) or the built-in demo model ([`demo`]). Several upstreams serving one model
//! will be one more backend behind the same interface.

pub mod demo;
mod openai;

use std::{pin::Pin, sync::Arc};

use futures_util::{future::BoxFuture, Stream};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Cheap to clone: every clone shares one backend (and so one connection pool).
#[derive(Clone)]
pub struct LlmClient {
    backend: Arc<dyn Backend>,
    system_prompt: Arc<str>,
    /// Every model name clients may ask for: `LLM_MODEL` and `LLM_MODELS`, or `demo`.
    served: Arc<[String]>,
    /// When this client was made (Unix seconds): the `created` of the models it serves.
    since: i64,
}

/// What answers: one implementation per protocol. Its futures are boxed so the client can
/// hold any backend behind one pointer; one allocation per call to a model is nothing
/// beside the call.
trait Backend: Send + Sync {
    /// A whole answer (`choices[0].message.content`).
    fn complete<'a>(&'a self, ask: &'a Ask<'a>) -> BoxFuture<'a, Result<Completion, LlmError>>;

    /// A streamed answer, once the model has begun (its response head arrived with a
    /// success status), so that a model failing before that fails here.
    fn stream<'a>(&'a self, ask: &'a Ask<'a>) -> BoxFuture<'a, Result<AnswerStream, LlmError>>;

    /// Whether the model can be reached and serves its default model.
    fn probe(&self) -> BoxFuture<'_, ModelProbe>;

    /// The model asked when a client names none: `LLM_MODEL`, or `demo`.
    fn default_model(&self) -> &str;

    /// Where it is, for logs (never a key, user info or query); `None` for the demo model.
    fn shown_url(&self) -> Option<&str>;
}

/// What asking the model's `GET /models` found; `as_str` is the stable word `/ready`
/// reports it with.
#[derive(Debug, Clone, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum ModelProbe {
    /// The built-in demo model: nothing to reach.
    BuiltIn,
    /// Reachable, and `LLM_MODEL` is among its models.
    #[strum(serialize = "reachable")]
    Serving,
    /// Reachable, but `LLM_MODEL` is not among its models.
    #[strum(serialize = "model_missing")]
    ReachableWithoutModel,
    /// Not reachable, or its answer was not a model list; why, in words.
    Unreachable(String),
}

impl ModelProbe {
    /// The stable word `/ready` reports it with.
    pub fn as_str(&self) -> &'static str {
        self.into()
    }
}

/// Why the model gave no usable answer.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum LlmError {
    #[error("it did not answer in time")]
    Timeout,
    #[error("it could not be reached")]
    Unreachable,
    #[error("it answered with status {0}")]
    Status(u16),
    #[error("its answer was unusable ({0})")]
    Unusable(&'static str),
    #[error("it broke off its answer")]
    BrokeOff,
}

impl LlmError {
    /// A stable word for the kind of failure, for metrics.
    pub fn kind(&self) -> &'static str {
        self.into()
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub content: String,
    pub usage: Option<Usage>,
}

/// What the model says the question and the answer cost it, when it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// The next text of the answer.
    Text(String),
    /// What the answer cost the model (sent once, near the end, when asked for).
    Usage(Usage),
}

/// A streamed answer: pieces until the model finished (the stream ends) or failed (an
/// error, then nothing). Dropping it drops the upstream request, so the model stops.
pub type AnswerStream = Pin<Box<dyn Stream<Item = Result<Piece, LlmError>> + Send>>;

/// One message of the conversation the model is asked to continue.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptMessage<'a> {
    pub role: Role,
    pub content: &'a str,
}

/// Who said a message, by OpenAI's names for the roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The name OpenAI's protocol gives the role.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn parse(text: &str) -> Option<Self> {
        text.parse().ok()
    }
}

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One request to the model: the conversation to continue, and what a client of the
/// OpenAI-compatible route chose beyond it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub messages: &'a [PromptMessage<'a>],
    /// `None`: `LLM_MODEL`.
    pub model: Option<&'a str>,
    /// Sampling fields (`temperature`, `max_tokens`, ...) passed upstream as given.
    pub extra: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

impl LlmClient {
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        let (backend, served): (Arc<dyn Backend>, Vec<String>) = match &config.llm_base_url {
            None => (Arc::new(demo::Demo), vec![demo::MODEL_NAME.to_string()]),
            Some(base_url) => {
                let served = std::iter::once(&config.llm_model)
                    .chain(&config.llm_models)
                    .fold(Vec::new(), |mut names, name| {
                        if !names.contains(name) {
                            names.push(name.clone());
                        }
                        names
                    });
                let upstream = openai::Upstream::new(base_url, config)?;
                (Arc::new(upstream), served)
            }
        };
        Ok(Self {
            backend,
            system_prompt: config.llm_system_prompt.as_str().into(),
            served: served.into(),
            since: crate::clock::unix_now(),
        })
    }

    /// The names of every model served, the default first, and since when (Unix seconds).
    pub fn served_models(&self) -> (&[String], i64) {
        (&self.served, self.since)
    }

    /// Whether `name` is one of the served models.
    pub fn serves(&self, name: &str) -> bool {
        self.served.iter().any(|served| served == name)
    }

    /// The model's name: the upstream's `LLM_MODEL`, or `demo`.
    pub fn model_name(&self) -> &str {
        self.backend.default_model()
    }

    /// Asks the model's `GET /models` whether it is reachable and serves `LLM_MODEL`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn probe(&self) -> ModelProbe {
        self.backend.probe().await
    }

    /// The upstream's base URL for logs: never its key, user info or query.
    pub fn base_url(&self) -> Option<&str> {
        self.backend.shown_url()
    }

    /// What the model is asked: the system prompt, then the earlier turns (each the user's
    /// message and the model's answer), then the new `message`.
    pub fn prompt<'a>(
        &'a self,
        earlier: &'a [(String, String)],
        message: &'a str,
    ) -> Vec<PromptMessage<'a>> {
        let mut prompt = Vec::with_capacity(2 + 2 * earlier.len());
        prompt.push(PromptMessage {
            role: Role::System,
            content: &self.system_prompt,
        });
        for (asked, answered) in earlier {
            prompt.push(PromptMessage {
                role: Role::User,
                content: asked,
            });
            prompt.push(PromptMessage {
                role: Role::Assistant,
                content: answered,
            });
        }
        prompt.push(PromptMessage {
            role: Role::User,
            content: message,
        });
        prompt
    }

    /// A client's own conversation, as it sent it: `LLM_SYSTEM_PROMPT` goes first only
    /// when it holds no system message.
    pub fn prompt_as_given<'a>(&'a self, messages: &'a [(Role, String)]) -> Vec<PromptMessage<'a>> {
        let has_system = messages.iter().any(|(role, _)| *role == Role::System);
        let system = (!has_system).then(|| PromptMessage {
            role: Role::System,
            content: &self.system_prompt,
        });
        system
            .into_iter()
            .chain(messages.iter().map(|(role, content)| PromptMessage {
                role: *role,
                content,
            }))
            .collect()
    }

    /// Asks for a whole answer (`choices[0].message.content`).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn complete(&self, ask: &Ask<'_>) -> Result<Completion, LlmError> {
        self.backend.complete(ask).await
    }

    /// Asks for a streamed answer; resolves once the model has begun (its response head
    /// arrived with a success status), so that a model failing before that fails here.
    /// `LLM_TIMEOUT_SECS` bounds the wait for it to begin; past `LLM_STREAM_IDLE_SECS` of
    /// silence, or `LLM_STREAM_MAX_SECS` in all, the stream ends with `Timeout`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn stream(&self, ask: &Ask<'_>) -> Result<AnswerStream, LlmError> {
        self.backend.stream(ask).await
    }
}
