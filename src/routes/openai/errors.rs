//! OpenAI's error object, which the `/v1` routes answer every error in: the middleware that
//! puts the contract's envelope into it, a request the model rejected passed on in the
//! model's own words, and an unknown `/v1` route.

use axum::{
    body::{to_bytes, Body},
    http::{header, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    llm::{LlmError, Rejection},
    routes::error::{error_responses, ApiError},
    services::ServiceError,
};

/// OpenAI's error object, which the `/v1` routes answer errors in.
#[derive(Serialize, ToSchema)]
pub struct OpenAiError<'a> {
    #[schema(value_type = Object)]
    error: OpenAiErrorDetail<'a>,
}

#[derive(Serialize)]
struct OpenAiErrorDetail<'a> {
    code: Option<&'a str>,
    message: &'a str,
    param: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'a str,
    /// The balance and what the call needs reserved, for `insufficient_quota`.
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    required: Option<i64>,
    /// When a key's budget starts again, for `budget_exceeded` (null: a total budget).
    #[serde(skip_serializing_if = "Option::is_none")]
    resets_at: Option<Option<String>>,
}

error_responses! { OpenAiError =>
    /// What a `/v1` route answers before its handler runs.
    OpenAiUnauthorised {
        401: "invalid_api_key",
        403: "permission_error",
        429: "rate_limit_exceeded: the key's or the user's requests a minute (rpm)",
    }
    /// What a `/v1` call to the model (a completion, embeddings) can fail with.
    OpenAiCallErrors {
        400: "invalid_request_error: ours, or the model's own",
        402: "insufficient_quota",
        403: "permission_error: model_not_allowed (an API key limited to other models)",
        404: "model_not_found (or the model's own 404)",
        429: "rate_limit_exceeded",
        502: "upstream_error",
        503: "upstream_busy, with Retry-After",
        504: "upstream_timeout",
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
    let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    if json.as_ref().is_some_and(|json| json["error"].is_object()) {
        // Already OpenAI's object (a rejection in the model's words): as it is.
        return Response::from_parts(parts, Body::from(bytes));
    }
    let envelope: Received = json
        .and_then(|json| serde_json::from_value(json).ok())
        .unwrap_or_default();
    let (mut message, code) = match (envelope.error, envelope.code) {
        (Some(message), Some(code)) => (message, code),
        // A bare status from a layer (axum's 405): the error that stands for it.
        _ => {
            let bare = ApiError::from_status(status).envelope();
            (bare.error, bare.code.to_string())
        }
    };
    if message == ApiError::UnsupportedMediaType.to_string() {
        // The contract's words name form data too, which `/v1` does not read.
        message = "request body must be JSON (Content-Type: application/json)".to_string();
    }
    let mut error = openai_error(&message, &code, envelope.field.as_deref(), status.as_u16());
    error.error.tokens = envelope.tokens;
    error.error.required = envelope.required;
    error.error.resets_at = envelope.resets_at;
    let body = serde_json::to_string(&error).expect("an error object serialises");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (parts.status, parts.headers, body).into_response()
}

/// What [`openai_errors`] reads of an error answer: the contract's envelope, or nothing of
/// it from a body that is not one; not OpenAI's object, whose `error` is no string.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Received {
    code: Option<String>,
    error: Option<String>,
    field: Option<String>,
    tokens: Option<i64>,
    required: Option<i64>,
    #[serde(deserialize_with = "present")]
    resets_at: Option<Option<String>>,
}

/// A field that is present, as `Some` of its value (which may be null).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

/// How a `/v1` route answers a failed chat or embeddings call: a request the model
/// rejected as invalid, with the model's status and its error object's words (the
/// client's fault, refunded); anything else as the contract's error, which
/// [`openai_errors`] puts in OpenAI's object.
pub(super) fn v1_error(err: ServiceError) -> Response {
    match err {
        ServiceError::Model(LlmError::Rejected(rejection)) => rejected(&rejection),
        other => ApiError::from(other).into_response(),
    }
}

/// The model's rejection, as the model put it.
fn rejected(rejection: &Rejection) -> Response {
    let status = StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::BAD_REQUEST);
    let error = OpenAiError {
        error: OpenAiErrorDetail {
            code: rejection.code.as_deref(),
            message: &rejection.message,
            param: rejection.param.as_deref(),
            kind: rejection.kind.as_deref().unwrap_or("invalid_request_error"),
            tokens: None,
            required: None,
            resets_at: None,
        },
    };
    (status, Json(error)).into_response()
}

/// An unknown route under `/v1` (`/v1/responses`, say), as OpenAI answers one: a 404 in its
/// error object, so an SDK shows why.
pub async fn unknown_route(method: Method, uri: Uri) -> Response {
    not_served(&method, &uri)
}

fn not_served(method: &Method, uri: &Uri) -> Response {
    let message = format!(
        "Invalid URL ({method} {}): this server serves /v1/chat/completions, \
         /v1/embeddings and /v1/models",
        uri.path()
    );
    let error = openai_error(&message, "not_found", None, 404);
    (StatusCode::NOT_FOUND, Json(error)).into_response()
}

/// An OPTIONS request under `/v1` that is not a CORS preflight, which the edge answers
/// before the `/v1` routes' middleware could: as any method without a handler is answered
/// there, 405 on a route (`routed`), else 404, in OpenAI's object.
pub fn options_answer(routed: bool, uri: &Uri) -> Response {
    if !routed {
        return not_served(&Method::OPTIONS, uri);
    }
    error_answer(ApiError::MethodNotAllowed)
}

/// `refused` in OpenAI's error object, for an answer given before the `/v1` routes.
pub fn error_answer(refused: ApiError) -> Response {
    let envelope = refused.envelope();
    let status = refused.status();
    let error = openai_error(
        &envelope.error,
        envelope.code,
        envelope.field,
        status.as_u16(),
    );
    (status, Json(error)).into_response()
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
        (402, "budget_exceeded") => ("insufficient_quota", "budget_exceeded"),
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
            code: Some(code),
            message,
            param: field,
            kind,
            tokens: None,
            required: None,
            resets_at: None,
        },
    }
}
