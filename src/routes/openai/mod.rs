//! The OpenAI-compatible routes: `POST /v1/chat/completions` and `GET /v1/models`, metered
//! exactly like `/chat`, and answering errors with OpenAI's error object.

mod chunks;
mod completion;
mod errors;
mod request;

use axum::{
    extract::State,
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde::Serialize;
use utoipa::ToSchema;

pub use self::errors::{openai_errors, OpenAiError};
use self::{
    chunks::chunk_stream,
    completion::Completion,
    errors::OpenAiUnauthorised,
    request::{parse, CompletionRequest},
};
use super::{
    chat::IDEMPOTENT_REPLAYED,
    error::ApiError,
    extract::{AuthUser, IdempotencyKey, Payload, TokensRemaining},
};
use crate::{
    domain::Message,
    services::chat::{self, Question},
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
pub async fn models(State(state): State<AppState>, _user: AuthUser) -> Json<ModelList> {
    let (names, since) = state.llm.served_models();
    let data = names
        .iter()
        .map(|name| Model {
            created: since,
            id: name.clone(),
            object: "model",
            owned_by: "tokenchat",
        })
        .collect();
    Json(ModelList {
        data,
        object: "list",
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
            description = "A chat.completion (or, streamed, chat.completion.chunk events and [DONE])",
            body = Completion
        ),
        (status = 400, description = "invalid_request_error", body = OpenAiError),
        OpenAiUnauthorised,
        (status = 402, description = "insufficient_quota", body = OpenAiError),
        (status = 404, description = "model_not_found", body = OpenAiError),
        (status = 429, description = "rate_limit_exceeded", body = OpenAiError),
        (status = 502, description = "upstream_error", body = OpenAiError),
        (status = 504, description = "upstream_timeout", body = OpenAiError),
    )
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    Payload(request): Payload<CompletionRequest>,
) -> Result<Response, ApiError> {
    let request = parse(&state, request)?;
    // The stored chat is the last user message and the answer, by the same rules as /chat.
    let message = Message::parse(request.last_user_message, state.config.max_message_chars)
        .map_err(|mut err| {
            err.field = "messages";
            err
        })?;
    let model = request.prompt.model.clone();
    let question = Question {
        message,
        conversation_id: None,
        idempotency_key,
        client_prompt: Some(request.prompt),
    };
    if request.stream {
        let started = chat::chat_streamed(&state.chats, user.id, question).await?;
        return Ok(chunk_stream(started, model, request.include_usage));
    }
    let answer = chat::chat(&state.chats, user.id, question).await?;
    let body = Json(Completion::new(
        answer.chat_id,
        model,
        answer.response,
        answer.usage,
    ));
    let fresh_balance = (!answer.replayed).then_some(TokensRemaining(answer.balance));
    let replayed = answer.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    Ok((fresh_balance.map(Extension), replayed, body).into_response())
}
