//! An upstream speaking OpenAI's Chat Completions protocol over one shared connection pool:
//! the wire types, the request, reading a streamed answer's server-sent events, and the
//! `GET /models` probe.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{future::BoxFuture, FutureExt, StreamExt};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{
    AnswerStream, Ask, Backend, Completion, LlmError, ModelProbe, Piece, PromptMessage, Usage,
};
use crate::config::{Config, UpstreamUrl};

/// How long the start-up and readiness probes wait for `GET /models`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Upstream {
    http: reqwest::Client,
    endpoint: Url,
    /// `{LLM_BASE_URL}/models`, asked at start-up and by `/ready`.
    models_endpoint: Url,
    /// `LLM_BASE_URL` as logs show it (see [`UpstreamUrl::redacted`]).
    shown_url: String,
    api_key: Option<SecretString>,
    model: String,
    timeout: Duration,
    stream_idle: Duration,
    stream_max: Duration,
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

impl Upstream {
    pub(super) fn new(base_url: &UpstreamUrl, config: &Config) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.llm_timeout)
            .build()?;
        Ok(Self {
            http,
            endpoint: base_url.join("chat/completions"),
            models_endpoint: base_url.join("models"),
            shown_url: base_url.redacted(),
            api_key: config.llm_api_key.clone(),
            model: config.llm_model.clone(),
            timeout: config.llm_timeout,
            stream_idle: config.llm_stream_idle,
            stream_max: config.llm_stream_max,
        })
    }

    async fn complete(&self, ask: &Ask<'_>) -> Result<Completion, LlmError> {
        let response = self.send(ask, false).await?;
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

    async fn stream(&self, ask: &Ask<'_>) -> Result<AnswerStream, LlmError> {
        let response = self.send(ask, true).await?;
        let idle = self.stream_idle;
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

    async fn probe(&self) -> ModelProbe {
        let mut request = self
            .http
            .get(self.models_endpoint.clone())
            .timeout(PROBE_TIMEOUT);
        if let Some(key) = &self.api_key {
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
            Ok(list) if list.data.iter().any(|model| model.id == self.model) => ModelProbe::Serving,
            Ok(_) => ModelProbe::ReachableWithoutModel,
            Err(err) => ModelProbe::Unreachable(err.to_string()),
        }
    }

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

impl Backend for Upstream {
    fn complete<'a>(&'a self, ask: &'a Ask<'a>) -> BoxFuture<'a, Result<Completion, LlmError>> {
        Upstream::complete(self, ask).boxed()
    }

    fn stream<'a>(&'a self, ask: &'a Ask<'a>) -> BoxFuture<'a, Result<AnswerStream, LlmError>> {
        Upstream::stream(self, ask).boxed()
    }

    fn probe(&self) -> BoxFuture<'_, ModelProbe> {
        Upstream::probe(self).boxed()
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    fn shown_url(&self) -> Option<&str> {
        Some(&self.shown_url)
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
