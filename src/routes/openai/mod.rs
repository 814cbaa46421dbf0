//! The OpenAI-compatible routes: `POST /v1/chat/completions`, `POST /v1/embeddings` and
//! `GET /v1/models`, metered like `/chat`, passing each request to the model as the client
//! sent it and the answer back as the model gave it, and answering errors with OpenAI's
//! error object.

mod chunks;
mod completion;
mod errors;
mod relay;
mod request;

use axum::{
    extract::{rejection::PathRejection, Path, State},
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde::Serialize;
use utoipa::ToSchema;

pub use self::errors::{error_answer, openai_errors, options_answer, unknown_route, OpenAiError};
use self::{
    chunks::chunk_stream,
    completion::{stored_tool_calls, Completion, CompletionUsage},
    errors::{v1_error, OpenAiCallErrors, OpenAiUnauthorised},
    relay::{relay, Charge},
    request::{CompletionRequest, EmbeddingRequest},
};
use super::{
    chat::{max_tokens_applied, IDEMPOTENT_REPLAYED},
    error::ApiError,
    extract::{AuthUser, IdempotencyKey, NoIdempotencyKey, RawJson, TokensRemaining},
    limits,
};
use crate::{
    pricing::Prices,
    services::{
        chat::{self, Question},
        limits::Admitted,
    },
    state::AppState,
};

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    data: Vec<Model>,
    object: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Model {
    created: i64,
    id: String,
    object: &'static str,
    owned_by: &'static str,
    /// A priced model's prices, in the balance's tokens: per million prompt, cached prompt
    /// and completion tokens, per request, and its longest answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pricing: Option<Prices>,
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    security(("bearer" = []), ("token" = [])),
    responses(
        (status = 200, body = ModelList, description = "The models served"),
        OpenAiUnauthorised,
    )
)]
pub async fn models(State(state): State<AppState>, user: AuthUser) -> Json<ModelList> {
    Json(ModelList {
        data: visible_models(&state, &user).collect(),
        object: "list",
    })
}

/// OpenAI's "retrieve model": one of the models `GET /v1/models` lists.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "openai",
    security(("bearer" = []), ("token" = [])),
    params(("model" = String, Path, description = "A served model's name")),
    responses(
        (status = 200, body = Model, description = "The model, as the list gives it"),
        OpenAiUnauthorised,
        (status = 404, description = "model_not_found", body = OpenAiError),
    )
)]
pub async fn model(
    State(state): State<AppState>,
    user: AuthUser,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Model>, ApiError> {
    // A name that is not text once percent-decoded names no model either. The route's
    // wildcard holds the one trailing slash every route may end with.
    let mut name = name.map(|Path(name)| name).unwrap_or_default();
    if name.ends_with('/') {
        name.pop();
    }
    let found = visible_models(&state, &user).find(|model| model.id == name);
    found.map(Json).ok_or(ApiError::ModelNotFound(name))
}

/// The models served that `user` may ask for: an API key sees only those it may.
fn visible_models<'a>(state: &'a AppState, user: &'a AuthUser) -> impl Iterator<Item = Model> + 'a {
    let (names, since) = state.llm.served_models();
    let key = user.credential.key_limits();
    names
        .iter()
        .filter(move |name| {
            user.limits.allows_model(name) && key.is_none_or(|(_, key)| key.allows_model(name))
        })
        .map(move |name| Model {
            created: since,
            id: name.clone(),
            object: "model",
            owned_by: "tokenchat",
            pricing: state
                .config
                .price_book
                .model(name)
                .map(|pricing| pricing.prices),
        })
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    security(("bearer" = []), ("token" = [])),
    params((
        "Idempotency-Key" = Option<String>,
        Header,
        description = "Makes a retried request return the first answer"
    )),
    request_body(content = CompletionRequest, content_type = "application/json"),
    responses(
        (
            status = 200,
            description = "The model's chat.completion (or, streamed, its chat.completion.chunk \
                           events, then [DONE]) as it gave it, `model` the name asked for",
            content((Completion = "application/json"), (String = "text/event-stream"))
        ),
        OpenAiUnauthorised,
        OpenAiCallErrors,
        (status = 409, description = "request_in_progress", body = OpenAiError),
        (status = 413, description = "payload_too_large (or the model's own 413)", body = OpenAiError),
        (status = 422, description = "idempotency_key_reused (or the model's own 422)", body = OpenAiError),
    )
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    body: RawJson,
) -> Result<Response, ApiError> {
    let request = request::completion(&state, body)?;
    let admitted = match limits::admit_v1(&state, &user, &request.forwarded.model).await {
        Ok(admitted) => admitted,
        Err(refused) => return Ok(refused),
    };
    let headers = (admitted.requests, admitted.tokens);
    let answered = complete(&state, &user, idempotency_key, request, admitted).await?;
    Ok(limits::with_rate_headers(answered, headers.0, headers.1))
}

/// A completion for `user`, whole or streamed, metered like a chat.
async fn complete(
    state: &AppState,
    user: &AuthUser,
    idempotency_key: Option<crate::domain::IdempotencyKey>,
    request: request::Checked,
    admitted: Admitted,
) -> Result<Response, ApiError> {
    let (model, stream, include_usage) = (
        request.forwarded.model.clone(),
        request.forwarded.stream,
        request.forwarded.include_usage,
    );
    let question = Question {
        user_id: user.id,
        message: request.message,
        conversation_id: None,
        idempotency_key,
        forwarded: Some(request.forwarded),
        budgets: admitted.budgets,
        token_meters: admitted.token_meters,
    };
    if stream {
        return match chat::chat_streamed(&state.chats, question).await {
            Ok(started) => Ok(chunk_stream(started, model, include_usage)),
            Err(err) => Ok(v1_error(err)),
        };
    }
    let answer = match chat::chat(&state.chats, question).await {
        Ok(answer) => answer,
        Err(err) => return Ok(v1_error(err)),
    };
    let body = match answer.body {
        // The model's own answer, `model` as asked, with the charge.
        Some(body) => {
            // The model's usage with the charge; or, when it sent none tokenchat could
            // read or left a count out, one of tokenchat's own: the counts it charged for
            // (zeros for a flat chat's), with the charge.
            let ours = (answer.usage.is_none() || answer.counted.is_some()).then(|| {
                let usage = CompletionUsage::charged(answer.counted, answer.charged);
                serde_json::to_string(&usage).expect("a usage serialises")
            });
            let charge = ours
                .as_deref()
                .map_or(Charge::Cost(answer.charged), Charge::Usage);
            json_answer(body, &model, charge)
        }
        None => {
            let tool_calls = stored_tool_calls(answer.tool_calls);
            let replayed = Completion::replayed(
                answer.chat_id,
                model,
                answer.response,
                tool_calls,
                answer.charged,
            );
            Json(replayed).into_response()
        }
    };
    let fresh_balance = (!answer.replayed).then_some(TokensRemaining(answer.balance));
    let replayed = answer.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    let applied = answer.max_tokens_applied.map(max_tokens_applied);
    Ok((fresh_balance.map(Extension), replayed, applied, body).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "openai",
    security(("bearer" = []), ("token" = [])),
    request_body(content = EmbeddingRequest, content_type = "application/json"),
    responses(
        (
            status = 200,
            description = "The model's embeddings list as it gave it, `model` the name asked for; \
                           EMBEDDING_COST tokens charged",
            body = Object
        ),
        OpenAiUnauthorised,
        OpenAiCallErrors,
        (status = 413, description = "payload_too_large (or the model's own 413)", body = OpenAiError),
        (status = 422, description = "the model's own 422", body = OpenAiError),
    )
)]
pub async fn embeddings(
    State(state): State<AppState>,
    user: AuthUser,
    _: NoIdempotencyKey,
    body: RawJson,
) -> Result<Response, ApiError> {
    let request = request::embeddings(&state, body)?;
    let admitted = match limits::admit_v1(&state, &user, &request.model).await {
        Ok(admitted) => admitted,
        Err(refused) => return Ok(refused),
    };
    let model = request.model.clone();
    let meters = admitted.token_meters.clone();
    let embedded = chat::embed(&state.chats, user.id, request, admitted.budgets, meters).await;
    let answered = match embedded {
        Ok(embedded) => {
            let body = json_answer(embedded.body, &model, Charge::Cost(embedded.charged));
            (Extension(TokensRemaining(embedded.balance)), body).into_response()
        }
        Err(err) => v1_error(err),
    };
    Ok(limits::with_rates(answered, &admitted))
}

/// The model's JSON answer, `model` set to the name the client asked for, `usage.cost` the
/// charge.
fn json_answer(body: axum::body::Bytes, model: &str, charge: Charge<'_>) -> Response {
    let text = match String::from_utf8(body.to_vec()) {
        Ok(text) => text,
        Err(_) => return ApiError::Upstream("its answer was not UTF-8".into()).into_response(),
    };
    let body = relay(text, model, true, charge).unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}
