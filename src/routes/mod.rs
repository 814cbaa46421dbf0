//! The HTTP surface: the route table and the layers that give every answer the contract's shape.

mod accounts;
mod chat;
mod extract;

use std::{any::Any, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, MatchedPath, Request},
    http::{header, Response as HttpResponse},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post, MethodRouter},
    Router,
};
use tower_http::{catch_panic::CatchPanicLayer, trace::TraceLayer};
use tracing::Span;

use crate::{error::Error, AppState};

/// The whole application: every route, with and without its trailing slash.
pub fn router(state: AppState) -> Router {
    let routes: [(&str, MethodRouter<AppState>); 4] = [
        ("/register", post(accounts::register)),
        ("/login", post(accounts::login)),
        ("/chat", post(chat::chat)),
        ("/balance", get(chat::balance).post(chat::balance)),
    ];
    let router = routes
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router
                .route(path, handler.clone())
                .route(&format!("{path}/"), handler)
        });
    router
        .fallback(|| async { Error::NotFound })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::map_response(envelope_bare_errors))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(log_response)
                .on_failure(()),
        )
        .with_state(state)
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
