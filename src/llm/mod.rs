//! The model clients: what the chat service asks a model, and the backends that answer
//! behind one interface: the upstreams speaking OpenAI's Chat Completions protocol
//! ([`openai`]), each served model routed among its targets with fallback and circuit
//! breaking ([`routing`]), or the built-in demo model ([`demo`]). An OpenAI client's own
//! request is passed through as it sent it ([`forward`]), and the answer back as the model
//! gave it, read only for what a chat keeps ([`answer`]).

pub mod answer;
pub mod demo;
mod error;
pub mod forward;
mod openai;
mod output_cap;
pub mod raw;
pub mod routing;

use std::{pin::Pin, sync::Arc};

use axum::body::Bytes;
use futures_util::{future::BoxFuture, Stream};
use serde::{Deserialize, Serialize};

pub use self::{
    answer::{Chunk, ToolCallDelta, ToolCalls, Usage},
    error::{LlmError, Rejection},
    forward::{BodyHold, Forwarded},
    routing::{health::BreakerState, longest_call, TargetReport, UpstreamProbe},
};
use crate::{config::Config, telemetry::Metrics};

/// Cheap to clone: every clone shares one backend (and so one connection pool).
#[derive(Clone)]
pub struct LlmClient {
    backend: Arc<dyn Backend>,
    system_prompt: Arc<str>,
    /// Every model name clients may ask for, the default (`LLM_MODEL`, or `demo`) first:
    /// `LLM_MODELS` and the configuration file's routed models.
    served: Arc<[String]>,
    /// When this client was made (Unix seconds): the `created` of the models it serves.
    since: i64,
    /// Each upstream's base URL as logs show it, by name.
    upstream_urls: Arc<[(String, String)]>,
}

/// What answers: one implementation per protocol. Its futures are boxed so the client can
/// hold any backend behind one pointer; one allocation per call to a model is nothing
/// beside the call.
trait Backend: Send + Sync {
    /// A whole answer.
    fn complete<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Completion, LlmError>>;

    /// A streamed answer, once the model has begun (its response head arrived with a
    /// success status), so that a model failing before that fails here.
    fn stream<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Streamed, LlmError>>;

    /// Embeddings of an OpenAI client's `/v1/embeddings` request.
    fn embed(&self, request: Forwarded) -> BoxFuture<'_, Result<Embedding, LlmError>>;

    /// Whether the default model can be reached and is served, and what each upstream's
    /// `GET /models` said.
    fn probe(&self) -> BoxFuture<'_, (ModelProbe, Vec<UpstreamProbe>)>;

    /// Every target of every served model, with its breaker's state now.
    fn targets(&self) -> Vec<TargetReport>;

    /// Routes one call of `model` without making it (see
    /// [`LlmClient::route_without_calling`]); `None` without routing.
    fn route_without_calling(&self, _model: &str) -> Option<Arc<str>> {
        None
    }
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

/// A whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The first choice's text (empty when it holds only tool calls or a refusal).
    pub content: String,
    /// The first choice's tool calls, the JSON array the model gave.
    pub tool_calls: Option<String>,
    /// What the answer holds that a chat does not store (see [`answer::Read::unstored`]).
    pub unstored: String,
    pub usage: Option<Usage>,
    /// The answer as the model sent it, for a client of `/v1` to get as it is; `None` from
    /// the demo model answering `/chat`.
    pub body: Option<Bytes>,
    /// Which upstream answered; `None` for the demo model.
    pub served_by: Option<ServedBy>,
}

/// The upstream that answered a call, and how many targets the call tried to get there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedBy {
    pub upstream: Arc<str>,
    pub attempts: u32,
}

/// A streamed answer that has begun, and which upstream is giving it.
pub struct Streamed {
    pub chunks: AnswerStream,
    pub served_by: Option<ServedBy>,
}

/// The embeddings the model made, as it sent them, and what they cost it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Embedding {
    pub body: Bytes,
    pub usage: Option<EmbeddingUsage>,
}

/// `usage` of an embeddings answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: i64,
    pub total_tokens: i64,
}

/// A streamed answer: chunks until the model finished (the stream ends) or failed (an
/// error, then nothing). Dropping it drops the upstream request, so the model stops.
pub type AnswerStream = Pin<Box<dyn Stream<Item = Result<Chunk, LlmError>> + Send>>;

/// One message of the conversation the model is asked to continue.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptMessage<'a> {
    pub role: Role,
    pub content: &'a str,
}

/// Who said a message in tokenchat's own conversations, by OpenAI's names for the roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
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
}

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One request to the model.
pub enum Ask<'a> {
    /// tokenchat's own conversation (`/chat`): the system prompt, the earlier turns and the
    /// new message, and the longest answer to ask for (a priced model's output cap).
    Turns {
        prompt: Vec<PromptMessage<'a>>,
        max_tokens: Option<u64>,
    },
    /// An OpenAI client's request, passed through as it sent it; `last_user_text` is its last
    /// user message's text, which the demo model answers.
    Forwarded {
        request: Forwarded,
        last_user_text: &'a str,
    },
}

impl Ask<'_> {
    /// Whether tokenchat writes its own output cap into the request: a priced model's, the
    /// client having set none.
    fn writes_cap(&self) -> bool {
        match self {
            Ask::Turns { max_tokens, .. } => max_tokens.is_some(),
            Ask::Forwarded { request, .. } => request.written_cap().is_some(),
        }
    }

    /// Whether only the answer's text reaches the client (`/chat`, which shows no tool calls
    /// or refusals): an answer without text is then no answer, never charged.
    fn wants_text_only(&self) -> bool {
        matches!(self, Ask::Turns { .. })
    }
}

impl LlmClient {
    pub fn new(config: &Config, metrics: Metrics) -> Result<Self, reqwest::Error> {
        let Some(routing) = &config.routing else {
            return Ok(Self {
                backend: Arc::new(demo::Demo),
                system_prompt: config.llm_system_prompt.as_str().into(),
                served: vec![demo::MODEL_NAME.to_string()].into(),
                since: crate::clock::unix_now(),
                upstream_urls: Arc::new([]),
            });
        };
        let served: Vec<String> = routing
            .models
            .iter()
            .map(|model| model.name.clone())
            .collect();
        let urls: Vec<(String, String)> = routing
            .upstreams
            .iter()
            .map(|upstream| (upstream.name.clone(), upstream.base_url.redacted()))
            .collect();
        Ok(Self {
            backend: Arc::new(routing::Router::new(routing, config, metrics)?),
            system_prompt: config.llm_system_prompt.as_str().into(),
            served: served.into(),
            since: crate::clock::unix_now(),
            upstream_urls: urls.into(),
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

    /// `LLM_SYSTEM_PROMPT`, which goes first in what the model is asked.
    pub fn system_prompt(&self) -> &str {
        &self.system_prompt
    }

    /// The default model's name: `LLM_MODEL`, or `demo`.
    pub fn model_name(&self) -> &str {
        &self.served[0]
    }

    /// Asks each upstream's `GET /models` whether it is reachable and serves its targets'
    /// models; the first answer is the default model's.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn probe(&self) -> (ModelProbe, Vec<UpstreamProbe>) {
        self.backend.probe().await
    }

    /// Every target of every served model, with its breaker's state now.
    pub fn targets(&self) -> Vec<TargetReport> {
        self.backend.targets()
    }

    /// Routes one call of `model` as a call that succeeds at once would be routed, without
    /// making it: chooses a target, books its success and counts it. What routing costs
    /// each call, for the routing benchmark (`benches/routing.rs`); the upstream chosen, or
    /// `None` when none is available (or the demo model answers).
    #[doc(hidden)]
    pub fn route_without_calling(&self, model: &str) -> Option<Arc<str>> {
        self.backend.route_without_calling(model)
    }

    /// Each upstream's name and base URL for logs: never its key, user info or query.
    pub fn upstreams(&self) -> &[(String, String)] {
        &self.upstream_urls
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

    /// Asks for a whole answer.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn complete(&self, ask: Ask<'_>) -> Result<Completion, LlmError> {
        self.backend.complete(ask).await
    }

    /// Asks for a streamed answer; resolves once the model has begun (its response head
    /// arrived with a success status), so that a model failing before that fails here.
    /// `LLM_TIMEOUT_SECS` bounds the wait for it to begin; past `LLM_STREAM_IDLE_SECS` of
    /// silence, or `LLM_STREAM_MAX_SECS` in all, the stream ends with `Timeout`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn stream(&self, ask: Ask<'_>) -> Result<Streamed, LlmError> {
        self.backend.stream(ask).await
    }

    /// Asks for the embeddings of an OpenAI client's request, within `LLM_TIMEOUT_SECS`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn embed(&self, request: Forwarded) -> Result<Embedding, LlmError> {
        self.backend.embed(request).await
    }
}
