//! The fake model's answers that fail the same way whatever was asked: error statuses, a
//! rejection, a redirect, a busy model, a body that is not JSON.

use axum::{
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use super::{Reply, REJECTION};

/// The answer of a reply that fails the same way whatever was asked; `None` for the others.
pub(super) fn failure(reply: &Reply, headers: &HeaderMap, body: &Value) -> Option<Response> {
    Some(match reply {
        // A real upstream's 401 repeats the key it was given, which must go no further.
        Reply::Status(401) => (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": {
                "message": format!("Incorrect API key provided: {:?}", headers.get("authorization")),
                "type": "invalid_request_error", "param": null, "code": "invalid_api_key",
            } })),
        )
            .into_response(),
        Reply::Status(code) => (
            StatusCode::from_u16(*code).unwrap(),
            Json(json!({ "error": { "message": "the fake model is failing", "type": "server_error" } })),
        )
            .into_response(),
        Reply::Reject(code) => (
            StatusCode::from_u16(*code).unwrap(),
            Json(json!({ "error": {
                "message": REJECTION, "type": "invalid_request_error",
                "param": "tools[0].function.parameters", "code": "invalid_function_parameters",
            } })),
        )
            .into_response(),
        Reply::RejectRepeatingTheKey => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": {
                "message": format!(
                    "Unrecognized request argument; you sent {}",
                    headers.get("authorization").map_or("no key", |key| key.to_str().unwrap())
                ),
                "type": "invalid_request_error", "param": null, "code": null,
            } })),
        )
            .into_response(),
        Reply::RedirectTo(location) => (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location.clone())],
        )
            .into_response(),
        Reply::Busy {
            status,
            retry_after,
        } => {
            let mut response = (
                StatusCode::from_u16(*status).unwrap(),
                Json(json!({ "error": { "message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded" } })),
            )
                .into_response();
            if let Some(after) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, after.parse().unwrap());
            }
            response
        }
        Reply::Reasoning if body.get("max_tokens").is_some() => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter",
            } })),
        )
            .into_response(),
        Reply::Garbage => (StatusCode::OK, "<html>definitely not json</html>").into_response(),
        _ => return None,
    })
}
