//! `/chat` and `/balance`.

use axum::{extract::State, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{AuthUser, Payload};
use crate::{error::Error, services::billing, AppState};

#[derive(Deserialize)]
pub struct ChatRequest {
    message: String,
}

pub async fn chat(
    State(state): State<AppState>,
    user: AuthUser,
    Payload(request): Payload<ChatRequest>,
) -> Result<Json<Value>, Error> {
    let max_chars = state.config.max_message_chars;
    if request.message.trim().is_empty() {
        return Err(Error::invalid_input("message", "message must not be empty"));
    }
    if request.message.chars().count() > max_chars {
        return Err(Error::invalid_input(
            "message",
            format!("message must be at most {max_chars} characters"),
        ));
    }
    let answer = billing::chat(&state, user.id, request.message).await?;
    Ok(Json(json!({
        "response": answer.response,
        "tokens": answer.balance,
        "tokens_charged": answer.charged,
        "chat_id": answer.chat_id,
    })))
}

pub async fn balance(State(state): State<AppState>, user: AuthUser) -> Result<Json<Value>, Error> {
    let tokens = billing::balance(&state, user.id).await?;
    Ok(Json(json!({ "tokens": tokens })))
}
