//! The upstream model client: OpenAI's Chat Completions protocol over one shared connection pool.

use std::{sync::Arc, time::Duration};

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Cheap to clone: every clone shares one `reqwest::Client` and its connections.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    settings: Arc<Settings>,
}

struct Settings {
    endpoint: Url,
    api_key: Option<SecretString>,
    model: String,
    system_prompt: String,
    timeout: Duration,
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
}

#[derive(Serialize)]
struct CompletionRequest<'a> {
    model: &'a str,
    messages: [Message<'a>; 2],
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Deserialize)]
struct CompletionResponse {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: AnswerMessage,
}

#[derive(Deserialize)]
struct AnswerMessage {
    content: Option<String>,
}

impl LlmClient {
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        let base = config.llm_base_url.as_str().trim_end_matches('/');
        let endpoint = Url::parse(&format!("{base}/chat/completions"))
            .expect("a valid base URL stays valid with a path appended");
        let http = reqwest::Client::builder()
            .connect_timeout(config.llm_timeout)
            .build()?;
        Ok(Self {
            http,
            settings: Arc::new(Settings {
                endpoint,
                api_key: config.llm_api_key.clone(),
                model: config.llm_model.clone(),
                system_prompt: config.llm_system_prompt.clone(),
                timeout: config.llm_timeout,
            }),
        })
    }

    /// Asks the model one question; the answer is `choices[0].message.content`.
    #[tracing::instrument(skip_all)]
    pub async fn complete(&self, user_message: &str) -> Result<String, LlmError> {
        let settings = &*self.settings;
        let body = CompletionRequest {
            model: &settings.model,
            messages: [
                Message {
                    role: "system",
                    content: &settings.system_prompt,
                },
                Message {
                    role: "user",
                    content: user_message,
                },
            ],
        };
        let mut request = self
            .http
            .post(settings.endpoint.clone())
            .timeout(settings.timeout)
            .json(&body);
        if let Some(key) = &settings.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request.send().await.map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            tracing::warn!(
                status = status.as_u16(),
                "model answered with an error status"
            );
            return Err(LlmError::Status(status.as_u16()));
        }
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
        Ok(content)
    }
}

/// Sorts a transport error; its text (which names the URL) goes to the log only.
fn classify(err: reqwest::Error) -> LlmError {
    if err.is_timeout() {
        LlmError::Timeout
    } else if err.is_decode() {
        tracing::warn!(error = %err, "model answer was not the expected JSON");
        LlmError::Unusable("not the expected JSON")
    } else {
        tracing::warn!(error = %err, "model could not be reached");
        LlmError::Unreachable
    }
}
