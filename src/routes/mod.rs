//! The HTTP surface: the route table and the layers that give every answer the contract's shape.

mod accounts;
mod chat;
mod extract;
mod history;

use std::{any::Any, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, MatchedPath, Request},
    http::{header, Method, Response as HttpResponse},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, MethodRouter},
    Json, Router,
};
use serde_json::{json, Value};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};
use tower_http::{catch_panic::CatchPanicLayer, cors::CorsLayer, trace::TraceLayer};
use tracing::Span;

use crate::{error::Error, AppState};

/// The whole application: every route, with and without its trailing slash.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    let public = [
        ("/health", get(health)),
        ("/register", post(accounts::register)),
        ("/login", post(accounts::login)),
    ]
    .map(|(path, handler)| (path, with_body_limit(handler, body_limit)));
    // Layered per method router, so a wrong method is a 405 before any token is asked for.
    let authorised = [
        (
            "/chat",
            with_body_limit(post(chat::chat), state.config.chat_body_limit()),
        ),
        (
            "/balance",
            with_body_limit(get(chat::balance).post(chat::balance), body_limit),
        ),
        ("/chats", with_body_limit(get(history::chats), body_limit)),
        (
            "/chats/{id}",
            with_body_limit(get(history::chat), body_limit),
        ),
        (
            "/transactions",
            with_body_limit(get(history::transactions), body_limit),
        ),
        (
            "/logout",
            with_body_limit(post(accounts::logout), body_limit),
        ),
        (
            "/logout/all",
            with_body_limit(post(accounts::logout_everywhere), body_limit),
        ),
        (
            "/password",
            with_body_limit(post(accounts::change_password), body_limit),
        ),
    ]
    .map(|(path, handler)| {
        let authorize = middleware::from_fn_with_state(state.clone(), extract::authorize);
        (path, handler.route_layer(authorize))
    });
    let public = with_and_without_slash(public);
    let authorised = with_and_without_slash(authorised);
    public
        .merge(authorised)
        .fallback(|| async { Error::NotFound })
        .layer(middleware::map_response(envelope_bare_errors))
        .layer(CatchPanicLayer::custom(panic_response))
        // Browsers may call the API from any origin: it authenticates by header, never by
        // cookie, so there are no ambient credentials for another site to use.
        .layer(CorsLayer::permissive())
        .layer(middleware::from_fn(route_options_unless_preflight))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(log_response)
                .on_failure(()),
        )
        .with_state(state)
}

/// `handler` reading bodies of at most `limit` bytes, and answering 415 or 413 to a body
/// it could not read (see [`extract::check_body`]).
fn with_body_limit(handler: MethodRouter<AppState>, limit: usize) -> MethodRouter<AppState> {
    handler
        .route_layer(middleware::from_fn_with_state(limit, extract::check_body))
        .layer(DefaultBodyLimit::max(limit))
}

/// Liveness: answers without touching the database (also the benchmark's static route).
async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

fn with_and_without_slash<const N: usize>(
    routes: [(&str, MethodRouter<AppState>); N],
) -> Router<AppState> {
    routes
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router
                .route(path, handler.clone())
                .route(&format!("{path}/"), handler)
        })
}

/// tower-http's CORS layer answers every OPTIONS request as a preflight (200, no body), on
/// any path. Only a preflight (`Origin` and `Access-Control-Request-Method`) gets that;
/// any other OPTIONS is answered like any method without a handler: 405 (the method
/// router adds `Allow`) on a route, 404 elsewhere.
async fn route_options_unless_preflight(request: Request, next: Next) -> Response {
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

/// A Unix time as RFC 3339 UTC, the form of every time in a response.
fn rfc3339(unix_secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix_secs)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        // Unreachable for times this service writes (years 1970 to 9999).
        .unwrap_or_else(|| unix_secs.to_string())
}

/// Gives the envelope to error responses built outside our handlers (axum's 405, a body
/// limit hit inside a layer): anything that is an error and not already JSON.
async fn envelope_bare_errors(response: Response) -> Response {
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

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> HttpResponse<axum::body::Body> {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a non-string panic");
    Error::internal(format!("handler panicked: {detail}")).into_response()
}

/// The span of one request: method and matched route, never headers (they hold tokens).
fn request_span(request: &Request) -> Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("<unmatched>", MatchedPath::as_str);
    tracing::info_span!("request", method = %request.method(), route)
}

fn log_response(response: &Response, latency: Duration, _span: &Span) {
    tracing::info!(
        status = response.status().as_u16(),
        latency_us = latency.as_micros() as u64,
        "answered"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{body::to_bytes, http::StatusCode};

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
