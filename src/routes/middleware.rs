//! The middlewares: what runs around the handlers, on every route or on the authorised
//! ones: body checks, authorisation, the envelope for errors made outside our handlers.

use std::any::Any;

use axum::{
    body::HttpBody,
    extract::{MatchedPath, Request, State},
    http::{header, HeaderName, HeaderValue, Method, Response as HttpResponse, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{
    error::ApiError as Error,
    extract::{body_format, AuthUser, TokensRemaining, X_TOKENS_REMAINING},
};
use crate::{services::auth, state::AppState, telemetry::Metrics};

/// Middleware of every route: a body in a format we do not read is 415, and one declared
/// longer than the route's limit is 413, even on a route that reads no body (`POST
/// /balance`), as the contract says of any body. (A body that only turns out too long as
/// it is read is caught where it is read.)
pub async fn check_body(
    State(max_body_bytes): State<usize>,
    request: Request,
    next: Next,
) -> Result<Response, Error> {
    let body = request.body();
    if !body.is_end_stream() {
        body_format(request.headers())?;
        if body.size_hint().lower() > max_body_bytes as u64 {
            return Err(Error::PayloadTooLarge);
        }
    }
    Ok(next.run(request).await)
}

/// Middleware of the authorised routes: answers 401 without a live token, and stamps
/// every answer to an authorised request with `X-Tokens-Remaining`.
pub async fn authorize(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, Error> {
    let mut headers = request.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(header), None) = (headers.next(), headers.next()) else {
        // None, or two: which one would be meant is anyone's guess.
        return Err(Error::Unauthorized);
    };
    let credential = header
        .to_str()
        .ok()
        .and_then(credential_from_header)
        .ok_or(Error::Unauthorized)?;
    let owner = auth::authenticate(&state.db, credential).await?;
    let balance = owner.tokens;
    request.extensions_mut().insert(AuthUser {
        id: owner.user_id,
        tokens: owner.tokens,
        credential: owner.credential,
    });
    let mut response = next.run(request).await;
    // A handler that moved the balance says what it left; any other answer leaves the
    // balance read with the token, in this same request.
    let remaining = response
        .extensions()
        .get::<TokensRemaining>()
        .map_or(balance, |known| known.0);
    response
        .headers_mut()
        .insert(X_TOKENS_REMAINING, HeaderValue::from(remaining));
    Ok(response)
}

/// The header that names a request in the logs and in its answer.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Outermost middleware: every request has an id, the client's `X-Request-Id` when it is
/// 1 to 128 of `[A-Za-z0-9._-]` (anything else could forge or flood log lines), otherwise
/// 16 random hex digits; it is on the request's log lines and on its answer.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(X_REQUEST_ID)
        .filter(|value| {
            (1..=128).contains(&value.len())
                && value
                    .as_bytes()
                    .iter()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(byte))
        })
        .cloned();
    let id = given.unwrap_or_else(|| {
        let random: u64 = rand::Rng::gen(&mut rand::rngs::OsRng);
        HeaderValue::from_str(&format!("{random:016x}")).expect("hex is a valid header value")
    });
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    let mut response = next.run(request).await;
    if response.status() == StatusCode::INTERNAL_SERVER_ERROR {
        response = with_request_id_in_body(response, &id).await;
    }
    response.headers_mut().insert(X_REQUEST_ID, id);
    response
}

/// A 500's JSON body with `"request_id"` added, so that a user can quote it and an
/// operator find the request's log lines (where the error is logged whole).
async fn with_request_id_in_body(response: Response, id: &HeaderValue) -> Response {
    let (mut parts, body) = response.into_parts();
    // Our 500 bodies are a few hundred bytes; anything else is passed on as it was.
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return Error::internal("an unreadable 500 body").into_response();
    };
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let id = id.to_str().unwrap_or_default();
    object.insert("request_id".into(), id.into());
    let body = serde_json::Value::Object(object).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Counts every answer in the metrics, by matched route, method and status, with the time
/// to its head.
pub async fn count_request(
    State(metrics): State<Metrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    // A matched path is shared, not copied: cloning it costs a reference count.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let route = route.as_ref().map(MatchedPath::as_str);
    metrics.request(route, &method, status, started.elapsed());
    response
}

/// The credential in an `Authorization` header value, in any of the three accepted forms:
/// `Token <t>`, `Bearer <t>` (either scheme in any letter case) or a bare `<t>`.
pub(super) fn credential_from_header(value: &str) -> Option<&str> {
    let value = value.trim();
    match value.split_once(' ') {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") =>
        {
            Some(rest.trim())
        }
        Some(_) => None,
        None => Some(value),
    }
}

/// tower-http's CORS layer answers every OPTIONS request as a preflight (200, no body), on
/// any path. Only a preflight (`Origin` and `Access-Control-Request-Method`) gets that;
/// any other OPTIONS is answered like any method without a handler: 405 (the method
/// router adds `Allow`) on a route, 404 elsewhere.
pub async fn route_options_unless_preflight(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let preflight = headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if request.method() != Method::OPTIONS || preflight {
        return next.run(request).await;
    }
    if request.extensions().get::<MatchedPath>().is_some() {
        Error::MethodNotAllowed.into_response()
    } else {
        Error::NotFound.into_response()
    }
}

/// Gives the envelope to error responses built outside our handlers (axum's 405, a body
/// limit hit inside a layer): anything that is an error and not already JSON.
pub async fn envelope_bare_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let mut enveloped = Error::from_status(status).into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        enveloped.headers_mut().insert(header::ALLOW, allow.clone());
    }
    enveloped
}

/// What a handler that panicked answers: a 500 envelope, the panic's text only in the log.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> HttpResponse<axum::body::Body> {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a non-string panic");
    Error::internal(format!("handler panicked: {detail}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;
    use serde_json::Value;

    const TOKEN: &str = "abcdefghijklmnopqrstuvwxyzABCDE1";

    #[test]
    fn all_three_header_forms_yield_the_token() {
        for header in [
            TOKEN.to_string(),
            format!("Token {TOKEN}"),
            format!("Bearer {TOKEN}"),
            format!("bearer  {TOKEN} "),
        ] {
            assert_eq!(credential_from_header(&header), Some(TOKEN), "{header}");
        }
    }

    #[test]
    fn other_schemes_yield_nothing() {
        for header in [
            "Basic dXNlcjpwYXNz",
            &format!("Basic {TOKEN}"),
            "Digest a b",
        ] {
            assert_eq!(credential_from_header(header), None, "{header}");
        }
    }

    #[tokio::test]
    async fn every_answer_names_its_request_keeping_a_sane_id_from_the_client() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(request_id));
        let id_of = |given: Option<&'static str>| {
            let app = app.clone();
            async move {
                let mut request = Request::builder().uri("/");
                if let Some(given) = given {
                    request = request.header("x-request-id", given);
                }
                let response = app
                    .oneshot(request.body(axum::body::Body::empty()).unwrap())
                    .await
                    .unwrap();
                response.headers()[X_REQUEST_ID]
                    .to_str()
                    .unwrap()
                    .to_string()
            }
        };
        assert_eq!(id_of(Some("trace-42.a_b")).await, "trace-42.a_b");
        for bad in [None, Some("has space"), Some("new\\nline"), Some("")] {
            let id = id_of(bad).await;
            assert_eq!(id.len(), 16, "{bad:?}: {id}");
            assert!(id.bytes().all(|byte| byte.is_ascii_hexdigit()));
        }
        assert_ne!(id_of(None).await, id_of(None).await);
    }

    #[tokio::test]
    async fn a_panic_becomes_a_500_envelope_without_its_detail() {
        let response = panic_response(Box::new("secret detail".to_string()));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = to_bytes(response.into_body(), 1024).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "internal");
        assert!(!body.to_string().contains("secret detail"));
    }

    #[tokio::test]
    async fn a_bare_error_status_gets_the_envelope_and_keeps_allow() {
        let bare = Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "POST")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = envelope_bare_errors(bare).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "POST");
        let body = to_bytes(response.into_body(), 1024).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "method_not_allowed");
    }
}
