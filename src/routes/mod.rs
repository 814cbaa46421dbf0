//! The HTTP surface: the route table and the layers that give every answer the contract's shape.
//!
//! Each handler reads and answers bodies of its own types (`Deserialize`/`Serialize` and
//! `ToSchema`), defined beside it; the OpenAPI document is generated from those same types.
//! The fields of an answer are declared in alphabetical order, the order in which the
//! `serde_json` maps that came before them wrote them; those of a request in the order
//! serde names the first missing one in.

mod accounts;
mod chat;
mod conversations;
mod error;
mod extract;
mod history;
mod keys;
mod middleware;
mod openai;
mod openapi;
mod operations;
mod page;

use std::time::Duration;

use axum::{
    extract::{DefaultBodyLimit, MatchedPath, Request},
    middleware::{from_fn, from_fn_with_state, map_response},
    response::Response,
    routing::{get, post, MethodRouter},
    Router,
};
use tower_http::{catch_panic::CatchPanicLayer, cors::CorsLayer, trace::TraceLayer};
use tracing::Span;

pub use self::error::ApiError;
use crate::{clock::rfc3339, state::AppState};

/// The whole application: every route, with and without its trailing slash.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    let api = with_and_without_slash(api_routes(&state));
    let page = Router::new()
        .route("/", with_body_limit(get(page::page), body_limit))
        .route(
            "/openapi.json",
            with_body_limit(get(openapi::document), body_limit),
        );
    api.merge(page)
        .fallback(unknown_route)
        .layer(map_response(middleware::envelope_bare_errors))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        // Browsers may call the API from any origin: it authenticates by header, never by
        // cookie, so there are no ambient credentials for another site to use.
        .layer(CorsLayer::permissive())
        .layer(from_fn(middleware::route_options_unless_preflight))
        .layer(from_fn_with_state(
            state.metrics.clone(),
            middleware::count_request,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(log_response)
                .on_failure(()),
        )
        .layer(from_fn(middleware::request_id))
        .with_state(state)
}

/// The path of every API route the router serves (each also with a trailing slash): all
/// but the page at `/` and `/openapi.json`, which the OpenAPI document need not list.
pub fn api_paths(state: &AppState) -> Vec<&'static str> {
    api_routes(state)
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

/// The OpenAPI 3.1 document `GET /openapi.json` serves.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    <openapi::ApiDoc as utoipa::OpenApi>::openapi()
}

/// Every API route with its handlers and their layers: the one table [`router`] serves
/// and [`api_paths`] lists.
fn api_routes(state: &AppState) -> Vec<(&'static str, MethodRouter<AppState>)> {
    let body_limit = state.config.max_body_bytes;
    let public = [
        ("/health", get(operations::health)),
        ("/ready", get(operations::ready)),
        ("/metrics", get(operations::metrics)),
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
            with_body_limit(get(chat::balance).post(chat::balance_by_post), body_limit),
        ),
        ("/chats", with_body_limit(get(history::chats), body_limit)),
        (
            "/chats/{id}",
            with_body_limit(get(history::chat), body_limit),
        ),
        (
            "/conversations",
            with_body_limit(get(conversations::list), body_limit),
        ),
        (
            "/conversations/{id}",
            with_body_limit(
                get(conversations::show).delete(conversations::delete),
                body_limit,
            ),
        ),
        (
            "/keys",
            with_body_limit(get(keys::list).post(keys::create), body_limit),
        ),
        (
            "/keys/{id}",
            with_body_limit(axum::routing::delete(keys::revoke), body_limit),
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
        let authorize = from_fn_with_state(state.clone(), middleware::authorize);
        (path, handler.route_layer(authorize))
    });
    // OpenAI's SDKs read OpenAI's error object, so these answer errors in it. Their bodies
    // carry images: `V1_MAX_BODY_BYTES`.
    let v1_limit = state.config.v1_max_body_bytes;
    let openai = [
        (
            "/v1/chat/completions",
            with_body_limit(post(openai::chat_completions), v1_limit),
        ),
        (
            "/v1/embeddings",
            with_body_limit(post(openai::embeddings), v1_limit),
        ),
        ("/v1/models", with_body_limit(get(openai::models), v1_limit)),
    ]
    .map(|(path, handler)| {
        let authorize = from_fn_with_state(state.clone(), middleware::authorize);
        let handler = handler
            .route_layer(authorize)
            .layer(map_response(openai::openai_errors));
        (path, handler)
    });
    public.into_iter().chain(authorised).chain(openai).collect()
}

/// `handler` reading bodies of at most `limit` bytes, and answering 415 or 413 to a body
/// it could not read (see [`middleware::check_body`]).
fn with_body_limit(handler: MethodRouter<AppState>, limit: usize) -> MethodRouter<AppState> {
    handler
        .route_layer(from_fn_with_state(limit, middleware::check_body))
        .layer(DefaultBodyLimit::max(limit))
}

/// What a path no route serves answers: under `/v1`, OpenAI's error object, as the SDKs
/// read it (`/v1/responses`, which the OpenAI Agents SDK asks by default, among them);
/// elsewhere the contract's 404.
async fn unknown_route(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    if path == "/v1" || path.starts_with("/v1/") {
        return openai::unknown_route(method, uri).await;
    }
    axum::response::IntoResponse::into_response(ApiError::NotFound)
}

/// Registers each route at its path and at its path with one trailing slash. Not
/// tower-http's `NormalizePathLayer`: it trims every trailing slash, so `/chats//` would be
/// `/chats` instead of a 404, which the hostile-request property test caught.
fn with_and_without_slash(routes: Vec<(&str, MethodRouter<AppState>)>) -> Router<AppState> {
    routes
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router
                .route(path, handler.clone())
                .route(&format!("{path}/"), handler)
        })
}

/// The span of one request: method and matched route, never headers (they hold tokens).
fn request_span(request: &Request) -> Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("<unmatched>", MatchedPath::as_str);
    let request_id = request
        .headers()
        .get(middleware::X_REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!("request", request_id, method = %request.method(), route)
}

fn log_response(response: &Response, latency: Duration, _span: &Span) {
    tracing::info!(
        status = response.status().as_u16(),
        latency_us = latency.as_micros() as u64,
        "answered"
    );
}
