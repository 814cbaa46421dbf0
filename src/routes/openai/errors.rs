//! OpenAI's error object, which the `/v1` routes answer every error in, and the middleware
//! that puts the contract's envelope into it.

use axum::{
    body::{to_bytes, Body},
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::routes::error::error_responses;

/// OpenAI's error object, which the `/v1` routes answer errors in.
#[derive(Serialize, ToSchema)]
pub struct OpenAiError<'a> {
    #[schema(value_type = Object)]
    error: OpenAiErrorDetail<'a>,
}

#[derive(Serialize)]
struct OpenAiErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    param: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
}

error_responses! { OpenAiError =>
    /// What a `/v1` route answers before its handler runs.
    OpenAiUnauthorised {
        401: "invalid_api_key",
        403: "permission_error",
    }
}

/// Middleware of the `/v1` routes: every error answer, from a handler or a layer, in
/// OpenAI's error object instead of the contract's envelope, so the SDKs raise the right
/// exception with the right message.
pub async fn openai_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, 64 * 1024).await else {
        return (parts.status, parts.headers, Body::empty()).into_response();
    };
    let envelope: Received = serde_json::from_slice(&bytes).unwrap_or_default();
    let error = openai_error(
        envelope.error.as_deref().unwrap_or("the request failed"),
        envelope.code.as_deref().unwrap_or("internal"),
        envelope.field.as_deref(),
        status.as_u16(),
    );
    let body = serde_json::to_string(&error).expect("an error object serialises");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (parts.status, parts.headers, body).into_response()
}

/// What [`openai_errors`] reads of an error answer: the contract's envelope, or nothing of
/// it from a body that is not one.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Received {
    code: Option<String>,
    error: Option<String>,
    field: Option<String>,
}

/// `{"error": {"message", "type", "param", "code"}}` for the contract's envelope, typed as
/// OpenAI types its errors of that status.
pub(super) fn openai_error<'a>(
    message: &'a str,
    our_code: &'a str,
    field: Option<&'a str>,
    status: u16,
) -> OpenAiError<'a> {
    let (kind, code) = match (status, our_code) {
        (401, _) => ("invalid_request_error", "invalid_api_key"),
        (402, _) => ("insufficient_quota", "insufficient_quota"),
        (403, _) => ("permission_error", our_code),
        (429, _) => ("requests", "rate_limit_exceeded"),
        (status, _) if status >= 500 => ("api_error", our_code),
        // A streamed failure is reported as the server's, whatever its code.
        (_, "upstream_error" | "upstream_timeout" | "shutting_down" | "internal") => {
            ("api_error", our_code)
        }
        _ => ("invalid_request_error", our_code),
    };
    OpenAiError {
        error: OpenAiErrorDetail {
            code,
            message,
            param: field,
            kind,
        },
    }
}
