//! The model: an upstream speaking OpenAI's Chat Completions protocol over one shared
//! connection pool, streamed or not, or the built-in demo model when no upstream is set.

use std::{pin::Pin, sync::Arc, time::Duration};

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::{config::Config, services::demo};

/// Cheap to clone: every clone shares one `reqwest::Client` and its connections.
#[derive(Clone)]
pub struct LlmClient {
    model: Arc<Model>,
    system_prompt: Arc<str>,
    /// Every model name clients may ask for: `LLM_MODEL` and `LLM_MODELS`, or `demo`.
    served: Arc<[String]>,
    /// When this client was made (Unix seconds): the `created` of the models it serves.
    since: i64,
}

enum Model {
    Upstream(Box<Upstream>),
    Demo,
}

struct Upstream {
    http: reqwest::Client,
    endpoint: Url,
    /// `{LLM_BASE_URL}/models`, asked at start-up and by `/ready`.
    models_endpoint: Url,
    /// `LLM_BASE_URL` as logs show it (see [`crate::config::UpstreamUrl::redacted`]).
    shown_url: String,
    api_key: Option<SecretString>,
    model: String,
    timeout: Duration,
    stream_idle: Duration,
    stream_max: Duration,
}

/// How long the start-up and readiness probes wait for `GET /models`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What asking the model's `GET /models` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelProbe {
    /// The built-in demo model: nothing to reach.
    BuiltIn,
    /// Reachable, and `LLM_MODEL` is among its models.
    Serving,
    /// Reachable, but `LLM_MODEL` is not among its models.
    ReachableWithoutModel,
    /// Not reachable, or its answer was not a model list; why, in words.
    Unreachable(String),
}

impl ModelProbe {
    /// The stable word `/ready` reports it with.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::BuiltIn => "built_in",
            Self::Serving => "reachable",
            Self::ReachableWithoutModel => "model_missing",
            Self::Unreachable(_) => "unreachable",
        }
    }
}

/// `GET /models`: `{"data": [{"id": ...}, ...]}`.
#[derive(Deserialize)]
struct ModelList {
    data: Vec<ListedModel>,
}

#[derive(Deserialize)]
struct ListedModel {
    id: String,
}

/// Why the model gave no usable answer.
#[derive(Debug, thiserror::Error)]
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
        match self {
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Status(_) => "status",
            Self::Unusable(_) => "unusable",
            Self::BrokeOff => "broke_off",
        }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The name OpenAI's protocol gives the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::System, Self::User, Self::Assistant]
            .into_iter()
            .find(|role| role.as_str() == text)
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

#[derive(Serialize)]
struct CompletionRequest<'a> {
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    extra: Option<&'a serde_json::Map<String, serde_json::Value>>,
    model: &'a str,
    messages: &'a [PromptMessage<'a>],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
struct CompletionResponse {
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: AnswerMessage,
}

#[derive(Deserialize)]
struct AnswerMessage {
    content: Option<String>,
}

/// A `chat.completion.chunk`, or the error object some servers send mid-stream.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
}

/// How long the demo model takes per word, so that it streams as a model would.
const DEMO_WORD_DELAY: Duration = Duration::from_millis(15);

impl LlmClient {
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        let model = match &config.llm_base_url {
            None => Model::Demo,
            Some(base_url) => {
                let endpoint = base_url.join("chat/completions");
                let models_endpoint = base_url.join("models");
                let http = reqwest::Client::builder()
                    .connect_timeout(config.llm_timeout)
                    .build()?;
                Model::Upstream(Box::new(Upstream {
                    http,
                    endpoint,
                    models_endpoint,
                    shown_url: base_url.redacted(),
                    api_key: config.llm_api_key.clone(),
                    model: config.llm_model.clone(),
                    timeout: config.llm_timeout,
                    stream_idle: config.llm_stream_idle,
                    stream_max: config.llm_stream_max,
                }))
            }
        };
        let served: Vec<String> = match model {
            Model::Demo => vec![demo::MODEL_NAME.to_string()],
            Model::Upstream(_) => std::iter::once(&config.llm_model)
                .chain(&config.llm_models)
                .fold(Vec::new(), |mut names, name| {
                    if !names.contains(name) {
                        names.push(name.clone());
                    }
                    names
                }),
        };
        Ok(Self {
            model: Arc::new(model),
            system_prompt: config.llm_system_prompt.as_str().into(),
            served: served.into(),
            since: crate::db::unix_now(),
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
        match &*self.model {
            Model::Upstream(upstream) => &upstream.model,
            Model::Demo => demo::MODEL_NAME,
        }
    }

    /// Asks the upstream's `GET /models` whether it is reachable and serves `LLM_MODEL`,
    /// waiting at most `PROBE_TIMEOUT`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn probe(&self) -> ModelProbe {
        let upstream = match &*self.model {
            Model::Demo => return ModelProbe::BuiltIn,
            Model::Upstream(upstream) => upstream,
        };
        let mut request = upstream
            .http
            .get(upstream.models_endpoint.clone())
            .timeout(PROBE_TIMEOUT);
        if let Some(key) = &upstream.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let listed = async {
            let response = request.send().await.map_err(classify)?;
            if !response.status().is_success() {
                return Err(LlmError::Status(response.status().as_u16()));
            }
            response.json::<ModelList>().await.map_err(classify)
        };
        match listed.await {
            Ok(list) if list.data.iter().any(|model| model.id == upstream.model) => {
                ModelProbe::Serving
            }
            Ok(_) => ModelProbe::ReachableWithoutModel,
            Err(err) => ModelProbe::Unreachable(err.to_string()),
        }
    }

    /// The upstream's base URL for logs: never its key, user info or query.
    pub fn base_url(&self) -> Option<&str> {
        match &*self.model {
            Model::Upstream(upstream) => Some(&upstream.shown_url),
            Model::Demo => None,
        }
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
        let upstream = match &*self.model {
            Model::Demo => {
                return Ok(Completion {
                    content: demo::answer(last_user_message(ask.messages)),
                    usage: None,
                })
            }
            Model::Upstream(upstream) => upstream,
        };
        let response = upstream.send(ask, false).await?;
        let completion: CompletionResponse = response.json().await.map_err(classify)?;
        let content = completion
            .choices
            .into_iter()
            .next()
            .ok_or(LlmError::Unusable("no choices"))?
            .message
            .content
            .unwrap_or_default();
        if content.trim().is_empty() {
            return Err(LlmError::Unusable("empty answer"));
        }
        Ok(Completion {
            content,
            usage: completion.usage,
        })
    }

    /// Asks for a streamed answer; resolves once the model has begun (its response head
    /// arrived with a success status), so that a model failing before that fails here.
    /// `LLM_TIMEOUT_SECS` bounds the wait for it to begin; past `LLM_STREAM_IDLE_SECS` of
    /// silence, or `LLM_STREAM_MAX_SECS` in all, the stream ends with `Timeout`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn stream(&self, ask: &Ask<'_>) -> Result<AnswerStream, LlmError> {
        let upstream = match &*self.model {
            Model::Demo => return Ok(demo_stream(demo::answer(last_user_message(ask.messages)))),
            Model::Upstream(upstream) => upstream,
        };
        let response = upstream.send(ask, true).await?;
        let idle = upstream.stream_idle;
        let events = response.bytes_stream().eventsource();
        let pieces = futures_util::stream::unfold(
            (Box::pin(events), false),
            move |(mut events, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let event = match tokio::time::timeout(idle, events.next()).await {
                        Err(_) => return Some((Err(LlmError::Timeout), (events, true))),
                        // The body ended without `[DONE]`: the model was cut off.
                        Ok(None) => return Some((Err(LlmError::BrokeOff), (events, true))),
                        Ok(Some(Err(err))) => {
                            let err = match err {
                                eventsource_stream::EventStreamError::Transport(err) => {
                                    classify(err)
                                }
                                _ => LlmError::Unusable("not server-sent events"),
                            };
                            return Some((Err(err), (events, true)));
                        }
                        Ok(Some(Ok(event))) => event,
                    };
                    if event.data.trim() == "[DONE]" {
                        return None;
                    }
                    match read_chunk(&event.data) {
                        Ok(Some(piece)) => return Some((Ok(piece), (events, false))),
                        Ok(None) => continue,
                        Err(err) => return Some((Err(err), (events, true))),
                    }
                }
            },
        );
        Ok(Box::pin(pieces))
    }
}

impl Upstream {
    /// Posts the request; the response once its head says success.
    async fn send(&self, ask: &Ask<'_>, stream: bool) -> Result<reqwest::Response, LlmError> {
        let body = CompletionRequest {
            extra: ask.extra,
            model: ask.model.unwrap_or(&self.model),
            messages: ask.messages,
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        // Bounds the whole answer, body included: `LLM_TIMEOUT_SECS`, or for a stream, which
        // may rightly write for minutes, `LLM_STREAM_MAX_SECS` (issue 21).
        let whole_answer = if stream {
            self.stream_max
        } else {
            self.timeout
        };
        let mut request = self
            .http
            .post(self.endpoint.clone())
            .timeout(whole_answer)
            .json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        // `LLM_TIMEOUT_SECS` bounds the wait for the response head either way.
        let response = tokio::time::timeout(self.timeout, request.send())
            .await
            .map_err(|_| LlmError::Timeout)?
            .map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            tracing::warn!(
                status = status.as_u16(),
                "model answered with an error status"
            );
            return Err(LlmError::Status(status.as_u16()));
        }
        Ok(response)
    }
}

/// The piece one streamed chunk carries: text, usage, or nothing (a role-only first delta,
/// a last chunk with only `finish_reason`).
fn read_chunk(data: &str) -> Result<Option<Piece>, LlmError> {
    let chunk: Chunk = serde_json::from_str(data).map_err(|err| {
        tracing::warn!(error = %err, "a streamed chunk was not the expected JSON");
        LlmError::Unusable("a chunk was not the expected JSON")
    })?;
    if chunk.error.is_some() {
        tracing::warn!("model sent an error in the middle of its answer");
        return Err(LlmError::BrokeOff);
    }
    let text = chunk
        .choices
        .into_iter()
        .filter_map(|choice| choice.delta.content)
        .collect::<String>();
    if !text.is_empty() {
        return Ok(Some(Piece::Text(text)));
    }
    Ok(chunk.usage.map(Piece::Usage))
}

/// The demo model's answer, a word at a time.
fn demo_stream(answer: String) -> AnswerStream {
    let words = demo::pieces(&answer);
    Box::pin(futures_util::stream::iter(words).then(|word| async move {
        tokio::time::sleep(DEMO_WORD_DELAY).await;
        Ok(Piece::Text(word))
    }))
}

fn last_user_message<'a>(turns: &[PromptMessage<'a>]) -> &'a str {
    turns
        .iter()
        .rev()
        .find(|turn| turn.role == Role::User)
        .map_or("", |turn| turn.content)
}

/// Sorts a transport error; its text goes to the log only, without the URL (which may
/// carry credentials in its user info or query).
fn classify(err: reqwest::Error) -> LlmError {
    let err = err.without_url();
    if err.is_timeout() {
        LlmError::Timeout
    } else if err.is_decode() {
        tracing::warn!(error = %err, "model answer was not the expected JSON");
        LlmError::Unusable("not the expected JSON")
    } else if err.is_body() {
        tracing::warn!(error = %err, "model broke off its answer");
        LlmError::BrokeOff
    } else {
        tracing::warn!(error = %err, "model could not be reached");
        LlmError::Unreachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_yields_its_text_its_usage_or_nothing() {
        let text = r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        assert_eq!(read_chunk(text).unwrap(), Some(Piece::Text("Hel".into())));
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(read_chunk(role).unwrap(), None);
        let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        assert_eq!(read_chunk(finish).unwrap(), None);
        let usage =
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        assert_eq!(
            read_chunk(usage).unwrap(),
            Some(Piece::Usage(Usage {
                prompt_tokens: 3,
                completion_tokens: 5
            }))
        );
        assert!(matches!(
            read_chunk(r#"{"error":{"message":"overloaded"}}"#),
            Err(LlmError::BrokeOff)
        ));
        assert!(read_chunk("not json").is_err());
    }
}
