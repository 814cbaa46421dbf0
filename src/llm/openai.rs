//! An upstream speaking OpenAI's protocol over one shared connection pool: the request
//! (tokenchat's own, or a client's passed through), reading a streamed answer's server-sent
//! events, embeddings, each error status sorted by whose fault it is, and the
//! `GET /models` probe.

use std::time::Duration;

use axum::body::Bytes;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::{header, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

mod refusal;
mod unstreamed;

use self::refusal::{refusal, Credentials};
use super::{
    answer::{holds_nothing, read_chunk, read_completion, readable, token_count, Choices},
    output_cap::{CapField, CapFields},
    AnswerStream, Ask, Completion, Embedding, EmbeddingUsage, LlmError, PromptMessage,
};
use crate::config::{routing::UpstreamConfig, Config};

/// How long the start-up and readiness probes wait for `GET /models`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a whole completion may be: far past what any model writes in one answer (its
/// output cap is some hundreds of KiB of text), so that a broken upstream sending without
/// end cannot hold the memory of a call without bound.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// The same for embeddings, whose size the client sets: 2,048 inputs of 3,072 numbers
/// written as floats are some 130 MiB.
const MAX_EMBEDDINGS_BYTES: usize = 512 * 1024 * 1024;

/// What reading a whole answer found: `Err`, no answer (cut short, stalled, too large, not
/// the expected JSON), the target's failure; `Ok(Err)`, an answer that holds nothing, which
/// the request made so (see [`super::answer::holds_nothing`]): final, and not the
/// target's fault.
pub(super) type ReadWhole<T> = Result<Result<T, LlmError>, LlmError>;

/// One upstream: where it is, its key, its limits; the connection pool is the process's.
pub(super) struct Upstream {
    /// Its name in the configuration file (`default` for `LLM_BASE_URL`'s).
    name: std::sync::Arc<str>,
    http: reqwest::Client,
    endpoint: Url,
    embeddings_endpoint: Url,
    /// `{base_url}/models`, asked at start-up and by `/ready`.
    models_endpoint: Url,
    /// Its base URL as logs show it (see [`crate::config::UpstreamUrl::redacted`]).
    shown_url: String,
    api_key: Option<SecretString>,
    /// What of the above it may repeat in a rejection's message, to be taken out.
    credentials: Credentials,
    headers: header::HeaderMap,
    system_prompt: std::sync::Arc<str>,
    timeout: Duration,
    stream_max: Duration,
    /// Requests in flight to it at most (`max_concurrent`), when limited.
    slots: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    /// The field each of its models takes tokenchat's output cap in.
    cap_fields: CapFields,
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

/// tokenchat's own request (`/chat`).
#[derive(Serialize)]
struct CompletionRequest<'a> {
    model: &'a str,
    messages: &'a [PromptMessage<'a>],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    /// A priced model's output cap: the model cannot use more than was reserved. One of
    /// the two, as the model takes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u64>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// What is read of an embeddings answer: that it holds embeddings, and its usage.
#[derive(Deserialize)]
struct EmbeddingsView {
    /// Only counted: an answer without any holds no embeddings.
    data: Vec<serde::de::IgnoredAny>,
    #[serde(default, deserialize_with = "readable")]
    usage: Option<EmbeddingUsageView>,
}

#[derive(Deserialize)]
struct EmbeddingUsageView {
    #[serde(default, deserialize_with = "token_count")]
    prompt_tokens: Option<i64>,
    #[serde(default, deserialize_with = "token_count")]
    total_tokens: Option<i64>,
}

/// The process's one HTTP client (connection pool), shared by every upstream.
pub(super) fn http_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(config.llm_timeout)
        // A redirect would take the prompt, the URL's query and the upstream's headers to a
        // host the operator did not name: answered as the error status it is.
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// A slot of an upstream with `max_concurrent`, held while a call to it is in flight.
pub(super) type Slot = Option<tokio::sync::OwnedSemaphorePermit>;

impl Upstream {
    pub(super) fn new(upstream: &UpstreamConfig, http: reqwest::Client, config: &Config) -> Self {
        let base_url = &upstream.base_url;
        let endpoint = base_url.join("chat/completions");
        Self {
            name: upstream.name.as_str().into(),
            http,
            credentials: Credentials::of(upstream.api_key.as_ref(), &endpoint),
            endpoint,
            embeddings_endpoint: base_url.join("embeddings"),
            models_endpoint: base_url.join("models"),
            shown_url: base_url.redacted(),
            api_key: upstream.api_key.clone(),
            headers: upstream.headers.iter().cloned().collect(),
            system_prompt: config.llm_system_prompt.as_str().into(),
            timeout: upstream.timeout.unwrap_or(config.llm_timeout),
            stream_max: config.llm_stream_max,
            slots: upstream
                .max_concurrent
                .map(|most| std::sync::Arc::new(tokio::sync::Semaphore::new(most))),
            cap_fields: CapFields::default(),
        }
    }

    pub(super) fn name(&self) -> &std::sync::Arc<str> {
        &self.name
    }

    pub(super) fn shown_url(&self) -> &str {
        &self.shown_url
    }

    /// Whether a call could take a slot now (always, without `max_concurrent`).
    pub(super) fn has_free_slot(&self) -> bool {
        self.slots
            .as_ref()
            .is_none_or(|slots| slots.available_permits() > 0)
    }

    /// A slot for one more call, if it has `max_concurrent` and one is free; `None` when
    /// all are taken.
    pub(super) fn slot(&self) -> Option<Slot> {
        match &self.slots {
            None => Some(None),
            Some(slots) => slots.clone().try_acquire_owned().ok().map(Some),
        }
    }

    /// Asks for the embeddings of `request` from `model`; the response once its head says
    /// success.
    pub(super) async fn ask_embeddings(
        &self,
        model: &str,
        request: &super::Forwarded,
    ) -> Result<reqwest::Response, LlmError> {
        let body = request.body(model, &self.system_prompt, CapField::MaxTokens);
        let length = body.len();
        let request = self
            .http
            .post(self.embeddings_endpoint.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, length)
            .body(reqwest::Body::wrap(body));
        self.answer_head(request, self.timeout, self.timeout).await
    }

    /// The models its `GET /models` lists, or why it could not be asked.
    pub(super) async fn listed_models(&self) -> Result<Vec<String>, LlmError> {
        let mut request = self
            .http
            .get(self.models_endpoint.clone())
            .headers(self.headers.clone())
            .timeout(PROBE_TIMEOUT);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request.send().await.map_err(classify)?;
        if !response.status().is_success() {
            return Err(LlmError::Status(response.status().as_u16()));
        }
        let list = response.json::<ModelList>().await.map_err(classify)?;
        Ok(list.data.into_iter().map(|model| model.id).collect())
    }

    /// Posts a chat completion request for `model`; the response once its head says
    /// success. A model that refuses tokenchat's output cap in `max_tokens` as unsupported
    /// is asked again at once with it in `max_completion_tokens`, within the same time
    /// limits, and from then on asked so.
    pub(super) async fn ask(
        &self,
        model: &str,
        ask: &Ask<'_>,
        stream: bool,
    ) -> Result<reqwest::Response, LlmError> {
        // Bounds the whole answer, body included: the upstream's time-out, or for a stream,
        // which may rightly write for minutes, `LLM_STREAM_MAX_SECS` (issue 21).
        let whole_answer = if stream {
            self.stream_max
        } else {
            self.timeout
        };
        let began = std::time::Instant::now();
        let field = self.cap_fields.of(model);
        let limits = (self.timeout, whole_answer);
        match self.post_chat(model, ask, stream, field, limits).await {
            Err(LlmError::Rejected(ref refused))
                if field == CapField::MaxTokens
                    && ask.writes_cap()
                    && self.cap_fields.learn(model, refused) =>
            {
                tracing::info!(
                    upstream = &*self.name,
                    model,
                    "the model refuses max_tokens: its output cap goes as max_completion_tokens"
                );
                let spent = began.elapsed();
                let limits = (
                    self.timeout.saturating_sub(spent),
                    whole_answer.saturating_sub(spent),
                );
                let field = CapField::MaxCompletionTokens;
                self.post_chat(model, ask, stream, field, limits).await
            }
            asked => asked,
        }
    }

    /// [`Self::ask`]'s one request, with the output cap in `field`; `(head, whole)` bound
    /// the wait for the response head and the whole answer.
    async fn post_chat(
        &self,
        model: &str,
        ask: &Ask<'_>,
        stream: bool,
        field: CapField,
        (head, whole): (Duration, Duration),
    ) -> Result<reqwest::Response, LlmError> {
        let request = self.http.post(self.endpoint.clone());
        let request = match ask {
            Ask::Turns {
                prompt: messages,
                max_tokens,
            } => request.json(&CompletionRequest {
                model,
                messages,
                max_tokens: max_tokens.filter(|_| field == CapField::MaxTokens),
                max_completion_tokens: max_tokens
                    .filter(|_| field == CapField::MaxCompletionTokens),
                stream,
                stream_options: stream.then_some(StreamOptions {
                    include_usage: true,
                }),
            }),
            Ask::Forwarded {
                request: forwarded, ..
            } => {
                let body = forwarded.body(model, &self.system_prompt, field);
                request
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::CONTENT_LENGTH, body.len())
                    .body(reqwest::Body::wrap(body))
            }
        };
        self.answer_head(request, head, whole).await
    }

    /// Sends `request`, bounding the wait for the response head by `head` (the upstream's
    /// time-out, or what is left of it) and the whole answer by `whole_answer`; the
    /// response once its head says
    /// success, else the error its status stands for.
    async fn answer_head(
        &self,
        mut request: reqwest::RequestBuilder,
        head: Duration,
        whole_answer: Duration,
    ) -> Result<reqwest::Response, LlmError> {
        request = request.timeout(whole_answer);
        if !self.headers.is_empty() {
            request = request.headers(self.headers.clone());
        }
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = tokio::time::timeout(head, request.send())
            .await
            .map_err(|_| LlmError::Timeout)?
            .map_err(classify)?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(refusal(response, &self.credentials, &self.name).await)
    }
}

/// A whole body, read to its end within `most` bytes.
async fn whole_body(mut response: reqwest::Response, most: usize) -> Result<Bytes, LlmError> {
    const TOO_LARGE: LlmError = LlmError::Unusable("an answer too large");
    if response.content_length().unwrap_or(0) > most as u64 {
        return Err(TOO_LARGE);
    }
    // The usual answer comes in one piece, kept as it came; more are joined.
    let Some(first) = response.chunk().await.map_err(classify)? else {
        return Ok(Bytes::new());
    };
    let Some(second) = response.chunk().await.map_err(classify)? else {
        return Ok(first);
    };
    let mut body = Vec::with_capacity(first.len() + second.len());
    let mut next = Some(second);
    body.extend_from_slice(&first);
    while let Some(chunk) = next {
        if body.len() + chunk.len() > most {
            return Err(TOO_LARGE);
        }
        body.extend_from_slice(&chunk);
        next = response.chunk().await.map_err(classify)?;
    }
    Ok(Bytes::from(body))
}

/// A whole answer, read from a response whose head said success.
pub(super) async fn read_answer(response: reqwest::Response) -> ReadWhole<Completion> {
    let body = whole_body(response, MAX_ANSWER_BYTES).await?;
    let text = std::str::from_utf8(&body).map_err(|_| LlmError::Unusable("not UTF-8"))?;
    let read = match read_completion(text) {
        Ok(read) => read,
        Err(err) if holds_nothing(&err) => return Ok(Err(err)),
        Err(err) => return Err(err),
    };
    Ok(Ok(Completion {
        content: read.text,
        tool_calls: read.tool_calls,
        unstored: read.unstored,
        usage: read.usage,
        body: Some(body),
        served_by: None,
    }))
}

/// A streamed answer's chunks, read from a response whose head said success; past `idle`
/// of silence the stream ends with `Timeout`, unless every choice had finished. A whole
/// answer (JSON, from a server that does not stream) is read as the one chunk that says the
/// same (see [`unstreamed`]).
pub(super) fn read_stream(response: reqwest::Response, idle: Duration) -> AnswerStream {
    if !says_json(&response) {
        return chunks_of(response.bytes_stream(), idle);
    }
    let answer = unstreamed::whole_or_events(response.bytes_stream(), idle);
    Box::pin(futures_util::stream::once(answer).flatten())
}

/// Whether a response's `Content-Type` names JSON.
fn says_json(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"))
}

/// The chunks of the server-sent events in `body`, as [`read_stream`] reads them.
fn chunks_of<S>(body: S, idle: Duration) -> AnswerStream
where
    S: futures_util::Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static,
{
    let events = body.eventsource();
    let chunks = futures_util::stream::unfold(
        (Box::pin(events), Choices::default(), false),
        move |(mut events, mut seen, done)| async move {
            if done {
                return None;
            }
            let event = match tokio::time::timeout(idle, events.next()).await {
                // The body ended, or fell silent, without `[DONE]`: whole if every choice
                // finished (some servers never send it, some keep the connection open
                // after their last chunk), else the model was cut off or stalled.
                Err(_) | Ok(None) if seen.all_finished() => return None,
                Err(_) => return Some((Err(LlmError::Timeout), (events, seen, true))),
                Ok(None) => return Some((Err(LlmError::BrokeOff), (events, seen, true))),
                Ok(Some(Err(err))) => {
                    let err = match err {
                        eventsource_stream::EventStreamError::Transport(err) => classify(err),
                        _ => LlmError::Unusable("not server-sent events"),
                    };
                    return Some((Err(err), (events, seen, true)));
                }
                Ok(Some(Ok(event))) => event,
            };
            if event.data.trim() == "[DONE]" {
                return None;
            }
            match read_chunk(event.data) {
                Ok(chunk) => {
                    seen.merge(chunk.choices);
                    Some((Ok(chunk), (events, seen, false)))
                }
                Err(err) => Some((Err(err), (events, seen, true))),
            }
        },
    );
    Box::pin(chunks)
}

/// Embeddings, read from a response whose head said success.
pub(super) async fn read_embeddings(response: reqwest::Response) -> ReadWhole<Embedding> {
    let body = whole_body(response, MAX_EMBEDDINGS_BYTES).await?;
    let view: EmbeddingsView = serde_json::from_slice(&body).map_err(|err| {
        tracing::warn!(error = %err, "embeddings answer was not the expected JSON");
        LlmError::Unusable("not the expected JSON")
    })?;
    if view.data.is_empty() {
        return Ok(Err(LlmError::Unusable("no embeddings")));
    }
    let usage = view.usage.and_then(|usage| {
        let prompt_tokens = usage.prompt_tokens?;
        Some(EmbeddingUsage {
            prompt_tokens,
            total_tokens: usage.total_tokens.unwrap_or(prompt_tokens),
        })
    });
    Ok(Ok(Embedding { body, usage }))
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
        tracing::warn!(
            error = &err as &dyn std::error::Error,
            "model broke off its answer"
        );
        LlmError::BrokeOff
    } else {
        // As an error, so the log line has its causes too (`error.sources`): a refused
        // connection and a failed TLS handshake read alike at the top.
        tracing::warn!(
            error = &err as &dyn std::error::Error,
            "model could not be reached"
        );
        LlmError::Unreachable
    }
}
