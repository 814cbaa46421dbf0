//! What an upstream's error status stands for, by whose fault it is, and the error object
//! of a request it rejected as it is passed on to the client: with the upstream's own
//! credentials taken out, since an upstream may repeat what it was sent in its message.

use std::time::SystemTime;

use base64::Engine;
use reqwest::{header, Url};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::{
    config::names_a_credential,
    llm::{LlmError, Rejection},
};

/// The most of an error answer read for its message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// The most of the model's message a rejection passes on, in bytes.
const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
/// `Retry-After` of a busy model that did not say, and the most it may say.
const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
const MAX_RETRY_AFTER_SECS: u64 = 24 * 60 * 60;
/// Credentials shorter than this are not looked for: none is a secret anyone could keep.
const SHORTEST_CREDENTIAL: usize = 4;
/// A user name or query value that need not be a credential is looked for only from this
/// long: as likely a `user` or an `api-version=2024-10-21` as a secret, and taking it out
/// of every message would garble it.
const SHORTEST_OTHER_PART: usize = 12;

/// What tokenchat sends an upstream that may be a credential, as the upstream may repeat it:
/// its key, its base URL's password and user info (also in base64, as basic authentication
/// sends them) and its query's values (as written and percent-decoded); longest first, so
/// that one holding another is taken out whole.
pub(super) struct Credentials(Vec<SecretString>);

impl Credentials {
    pub(super) fn of(api_key: Option<&SecretString>, base_url: &Url) -> Self {
        let decoded = |part: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map_or_else(|_| part.to_owned(), |part| part.into_owned())
        };
        // (what may be repeated, whether it is surely a credential)
        let mut parts: Vec<(String, bool)> = Vec::new();
        if let Some(key) = api_key {
            parts.push((key.expose_secret().to_owned(), true));
        }
        let user = base_url.username();
        parts.push((user.to_owned(), false));
        parts.push((decoded(user), false));
        if let Some(password) = base_url.password() {
            parts.push((password.to_owned(), true));
            parts.push((decoded(password), true));
        }
        if !user.is_empty() || base_url.password().is_some() {
            let pair = format!(
                "{}:{}",
                decoded(user),
                decoded(base_url.password().unwrap_or(""))
            );
            parts.push((base64::engine::general_purpose::STANDARD.encode(pair), true));
        }
        let query = base_url.query().unwrap_or_default();
        for (name, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
            let credential = names_a_credential(&decoded(name));
            parts.push((value.to_owned(), credential));
            parts.push((decoded(&value.replace('+', " ")), credential));
        }
        let mut found: Vec<String> = parts
            .into_iter()
            .filter(|(part, credential)| {
                let shortest = if *credential {
                    SHORTEST_CREDENTIAL
                } else {
                    SHORTEST_OTHER_PART
                };
                part.chars().count() >= shortest
            })
            .map(|(part, _)| part)
            .collect();
        // Longest first; equal ones side by side, for `dedup`.
        found.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        found.dedup();
        Self(found.into_iter().map(SecretString::from).collect())
    }

    /// `text` with every credential in it replaced by `<redacted>`.
    pub(super) fn redact(&self, mut text: String) -> String {
        for credential in &self.0 {
            let credential = credential.expose_secret();
            if text.contains(credential) {
                text = text.replace(credential, "<redacted>");
            }
        }
        text
    }
}

/// What an error status from the model stands for, by whose fault it is.
pub(super) async fn refusal(
    response: reqwest::Response,
    credentials: &Credentials,
    upstream: &str,
) -> LlmError {
    let status = response.status().as_u16();
    match status {
        400 | 404 | 413 | 422 => {
            let rejection = rejection(status, response, credentials).await;
            tracing::info!(
                status,
                code = rejection.code.as_deref().unwrap_or_default(),
                "model rejected the request"
            );
            LlmError::Rejected(rejection)
        }
        401 | 403 => {
            // Its body may repeat the key; it is neither read nor passed on.
            tracing::error!(
                status,
                upstream,
                "model refused the credentials: check the upstream's key (LLM_API_KEY, or the \
                 variable its api_key_env names)"
            );
            LlmError::RefusedCredentials(status)
        }
        429 | 503 => {
            let retry_after_secs = retry_after_secs(response.headers(), SystemTime::now());
            tracing::warn!(status, retry_after_secs, "model is busy");
            LlmError::Busy {
                status,
                retry_after_secs,
                said: response.headers().contains_key(header::RETRY_AFTER),
            }
        }
        _ => {
            tracing::warn!(status, "model answered with an error status");
            LlmError::Status(status)
        }
    }
}

/// The model's error object for a request it rejected, read from at most
/// [`MAX_ERROR_BODY_BYTES`] of its answer.
async fn rejection(
    status: u16,
    mut response: reqwest::Response,
    credentials: &Credentials,
) -> Rejection {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    read_rejection(status, &body, credentials)
}

/// [`rejection`] from the body read: OpenAI's `{"error": {"message", "type", "param",
/// "code"}}`, the same fields at the top (vLLM's `{"object": "error", ...}`), or the
/// `{"error": "text"}` some servers send.
fn read_rejection(status: u16, body: &[u8], credentials: &Credentials) -> Rejection {
    let answer: Option<Value> = serde_json::from_slice(body).ok();
    let text = |value: Option<&Value>| match value {
        Some(Value::String(text)) if !text.is_empty() => Some(text.clone()),
        Some(Value::Number(number)) => Some(number.to_string()),
        _ => None,
    };
    let top = answer.as_ref().filter(|answer| answer.is_object());
    let error = top.and_then(|top| top.get("error"));
    let fields = error.filter(|error| error.is_object()).or(top);
    let field = |name: &str| text(fields.and_then(|fields| fields.get(name)));
    let message = field("message").or_else(|| text(error));
    let (kind, param, code) = (field("type"), field("param"), field("code"));
    let mut message = credentials.redact(
        message.unwrap_or_else(|| format!("the model rejected the request (status {status})")),
    );
    if message.len() > MAX_ERROR_MESSAGE_BYTES {
        let mut end = MAX_ERROR_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let redact = |field: Option<String>| field.map(|text| credentials.redact(text));
    Rejection {
        status,
        message,
        kind: redact(kind),
        param: redact(param),
        code: redact(code),
    }
}

/// `Retry-After` in seconds, given as seconds or as an HTTP date; 1 when absent or
/// unreadable, and within a day.
fn retry_after_secs(headers: &header::HeaderMap, now: SystemTime) -> u64 {
    let Some(value) = headers
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
    else {
        return DEFAULT_RETRY_AFTER_SECS;
    };
    let secs = match value.parse::<u64>() {
        Ok(secs) => secs,
        Err(_) => match httpdate::parse_http_date(value) {
            Ok(at) => at
                .duration_since(now)
                .map_or(0, |wait| wait.as_secs_f64().ceil() as u64),
            Err(_) => return DEFAULT_RETRY_AFTER_SECS,
        },
    };
    secs.clamp(DEFAULT_RETRY_AFTER_SECS, MAX_RETRY_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let of = |value: Option<&str>| {
            let mut headers = header::HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::RETRY_AFTER, value.parse().unwrap());
            }
            retry_after_secs(&headers, now)
        };
        assert_eq!(of(Some("7")), 7);
        assert_eq!(of(Some(" 0 ")), 1);
        assert_eq!(of(Some("999999999")), MAX_RETRY_AFTER_SECS);
        assert_eq!(of(None), 1);
        assert_eq!(of(Some("soon")), 1);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(of(Some(&later)), 30);
    }

    #[test]
    fn an_upstreams_key_and_url_credentials_are_taken_out_of_its_words() {
        let key = SecretString::from("sk-live-0123456789");
        let url = Url::parse(
            "https://bob:pa%24%24word@llm.example/v1?sig=Short99&api-version=2024-10-21&x=a-long-query-value",
        )
        .unwrap();
        let credentials = Credentials::of(Some(&key), &url);
        let basic = base64::engine::general_purpose::STANDARD.encode("bob:pa$$word");
        let said = format!(
            "bad request; you sent Bearer sk-live-0123456789 (Basic {basic}) as bob with \
             pa$$word (pa%24%24word) to ?sig=Short99&x=a-long-query-value in version 2024-10-21"
        );
        // Short parts that need not be credentials (a user name, an API version) could as
        // well be any word: left.
        assert_eq!(
            credentials.redact(said),
            "bad request; you sent Bearer <redacted> (Basic <redacted>) as bob with \
             <redacted> (<redacted>) to ?sig=<redacted>&x=<redacted> in version 2024-10-21"
        );
        let none = Credentials::of(None, &Url::parse("http://127.0.0.1:11434/v1").unwrap());
        assert_eq!(
            none.redact("model llama3.2 not found".into()),
            "model llama3.2 not found"
        );
    }

    #[test]
    fn a_rejection_is_read_from_openais_object_vllms_fields_at_the_top_or_a_bare_text() {
        let none = Credentials::of(None, &Url::parse("http://127.0.0.1:8000/v1").unwrap());
        let read = |body: &str| {
            let rejection = read_rejection(400, body.as_bytes(), &none);
            (rejection.message, rejection.param, rejection.code)
        };
        let said = |message: &str, param: &str, code: &str| {
            (
                message.to_owned(),
                Some(param.to_owned()),
                Some(code.to_owned()),
            )
        };
        let openai = r#"{"error": {"message": "no", "type": "invalid_request_error",
                        "param": "max_tokens", "code": "unsupported_parameter"}}"#;
        assert_eq!(
            read(openai),
            said("no", "max_tokens", "unsupported_parameter")
        );
        let vllm = r#"{"object": "error", "message": "no", "type": "BadRequestError",
                      "param": "max_tokens", "code": 400}"#;
        assert_eq!(read(vllm), said("no", "max_tokens", "400"));
        assert_eq!(read(r#"{"error": "no"}"#), ("no".to_owned(), None, None));
        let unread = "the model rejected the request (status 400)".to_owned();
        assert_eq!(read("<html>"), (unread, None, None));
    }
}
