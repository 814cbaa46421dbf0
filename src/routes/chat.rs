//! `/chat` and `/balance`.

use axum::{extract::State, http::HeaderName, response::IntoResponse, Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    error::ApiError,
    extract::{AuthUser, IdempotencyKey, Payload, TokensRemaining},
};
use crate::{domain::Message, services::billing, AppState};

const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

#[derive(Deserialize)]
pub struct ChatRequest {
    message: String,
}

pub async fn chat(
    State(state): State<AppState>,
    user: AuthUser,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    Payload(request): Payload<ChatRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let message = Message::parse(request.message, state.config.max_message_chars)?;
    let answer = billing::chat(&state, user.id, message, idempotency_key).await?;
    let body = Json(json!({
        "response": answer.response,
        "tokens": answer.balance,
        "tokens_charged": answer.charged,
        "chat_id": answer.chat_id,
    }));
    // A replayed answer's balance is from the first time; the header shows today's.
    let fresh_balance = (!answer.replayed).then_some(TokensRemaining(answer.balance));
    let replayed = answer.replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    Ok((fresh_balance.map(Extension), replayed, body))
}

/// The balance read with the token in this very request: one query for the whole answer.
pub async fn balance(user: AuthUser) -> Json<Value> {
    Json(json!({ "tokens": user.tokens }))
}
