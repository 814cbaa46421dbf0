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
mod cors;
mod edge;
mod error;
mod extract;
mod history;
mod keys;
mod limits;
mod middleware;
mod openai;
mod openapi;
mod operations;
mod page;

use axum::{
    extract::DefaultBodyLimit,
    middleware::map_response,
    response::Response,
    routing::{get, post, MethodRouter},
    Router,
};
use tower::ServiceBuilder;

use self::edge::{Edge, Guard};
pub use self::error::ApiError;
use self::middleware::{around, Authorize, CheckBody};
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
        )
        .route(
            "/openapi.json/",
            with_body_limit(get(openapi::document), body_limit),
        );
    let edge_state = state.clone();
    api.merge(page)
        .fallback(unknown_route)
        // One layer, so that axum boxes it once per route: see `edge`.
        .layer(
            ServiceBuilder::new()
                .layer(around(Edge { state: edge_state }))
                .layer(around(Guard)),
        )
        .with_state(state)
}

/// The path of every API route the router serves (each also with a trailing slash): all
/// but the page at `/` and `/openapi.json`, which the OpenAPI document need not list. A
/// wildcard (`{*model}`) is as the router writes it; the document writes `{model}`.
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
    let authorised = [
        (
            "/chat",
            Layered::new(post(chat::chat), state.config.chat_body_limit()),
        ),
        (
            "/balance",
            Layered::new(get(chat::balance).post(chat::balance_by_post), body_limit),
        ),
        ("/chats", Layered::new(get(history::chats), body_limit)),
        ("/chats/{id}", Layered::new(get(history::chat), body_limit)),
        (
            "/conversations",
            Layered::new(get(conversations::list), body_limit),
        ),
        (
            "/conversations/{id}",
            Layered::new(
                get(conversations::show).delete(conversations::delete),
                body_limit,
            ),
        ),
        (
            "/keys",
            Layered::new(get(keys::list).post(keys::create), body_limit),
        ),
        (
            "/keys/{id}",
            Layered::new(
                axum::routing::delete(keys::revoke).patch(keys::change),
                body_limit,
            ),
        ),
        (
            "/transactions",
            Layered::new(get(history::transactions), body_limit),
        ),
        ("/logout", Layered::new(post(accounts::logout), body_limit)),
        (
            "/logout/all",
            Layered::new(post(accounts::logout_everywhere), body_limit),
        ),
        (
            "/password",
            Layered::new(post(accounts::change_password), body_limit),
        ),
    ]
    .map(|(path, handler)| (path, handler.authorised(state)));
    // OpenAI's SDKs read OpenAI's error object, so these answer errors in it. Their bodies
    // carry images: `V1_MAX_BODY_BYTES`.
    let v1_limit = state.config.v1_max_body_bytes;
    let openai = [
        (
            "/v1/chat/completions",
            Layered::new(post(openai::chat_completions), v1_limit),
        ),
        (
            "/v1/embeddings",
            Layered::new(post(openai::embeddings), v1_limit),
        ),
        ("/v1/models", Layered::new(get(openai::models), v1_limit)),
        // The rest of the path: a served name may hold `/` (`meta-llama/Llama-3.1-8B`),
        // and the SDKs put it in the path as it is.
        (
            "/v1/models/{*model}",
            Layered::new(get(openai::model), v1_limit),
        ),
    ]
    .map(|(path, handler)| {
        let handler = handler
            .authorised(state)
            .layer(map_response(openai::openai_errors));
        (path, handler)
    });
    public.into_iter().chain(authorised).chain(openai).collect()
}

/// `handler` reading bodies of at most `limit` bytes, and answering 415 or 413 to a body
/// it could not read (see [`CheckBody`]).
fn with_body_limit(handler: MethodRouter<AppState>, limit: usize) -> MethodRouter<AppState> {
    Layered::new(handler, limit).public()
}

/// A route's handlers and the body limit they read with, before their layers. Each route
/// gets its layers as one `route_layer`, because axum boxes every layer it is given once
/// more on every request (see `edge`).
struct Layered {
    handler: MethodRouter<AppState>,
    limit: usize,
}

impl Layered {
    fn new(handler: MethodRouter<AppState>, limit: usize) -> Self {
        Self { handler, limit }
    }

    /// Open to anyone: only the body limit and check.
    fn public(self) -> MethodRouter<AppState> {
        self.handler.route_layer(
            ServiceBuilder::new()
                .layer(DefaultBodyLimit::max(self.limit))
                .layer(around(CheckBody {
                    max_body_bytes: self.limit,
                })),
        )
    }

    /// A token or key first (401 before anything about the body), then the body limit and
    /// check. Layered per method router, so a wrong method is a 405 before any token is
    /// asked for.
    fn authorised(self, state: &AppState) -> MethodRouter<AppState> {
        let state = state.clone();
        self.handler.route_layer(
            ServiceBuilder::new()
                .layer(around(Authorize { state }))
                .layer(DefaultBodyLimit::max(self.limit))
                .layer(around(CheckBody {
                    max_body_bytes: self.limit,
                })),
        )
    }
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
/// `/chats` instead of a 404, which the hostile-request property test caught. A path ending
/// in a wildcard (`{*name}`) takes the slash into the wildcard; its handler trims it.
fn with_and_without_slash(routes: Vec<(&str, MethodRouter<AppState>)>) -> Router<AppState> {
    routes
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            if path.contains("{*") {
                return router.route(path, handler);
            }
            router
                .route(path, handler.clone())
                .route(&format!("{path}/"), handler)
        })
}
