//! `/chats`, `/chats/{id}` and `/transactions`: a user's own history, newest first.

use axum::{
    extract::{Path, State},
    Json,
};
use serde_json::{json, Value};

use super::{
    error::ApiError,
    extract::{AuthUser, PageQuery},
    rfc3339,
};
use crate::{
    llm::Usage,
    services::history::{self, ChatRecord, LedgerEntry},
    AppState,
};

#[utoipa::path(operation_id = "list_chats", get, path = "/chats", tag = "history", security(("bearer" = []), ("token" = [])), params(("limit" = Option<u32>, Query, description = "1 to 100"), ("cursor" = Option<String>, Query, description = "`next` of the page before")), responses((status = 200, body = super::openapi::ChatPage, description = "Chats, newest first"), (status = 400, description = "invalid_input", body = super::openapi::Error), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error)))]
pub async fn chats(
    State(state): State<AppState>,
    user: AuthUser,
    PageQuery(page): PageQuery,
) -> Result<Json<Value>, ApiError> {
    let page = history::chats(&state.db, user.id, page).await?;
    let chats: Vec<Value> = page.items.iter().map(chat_json).collect();
    Ok(Json(
        json!({ "chats": chats, "next": page.next.map(|id| id.to_string()) }),
    ))
}

#[utoipa::path(operation_id = "show_chat", get, path = "/chats/{id}", tag = "history", security(("bearer" = []), ("token" = [])), params(("id" = i64, Path, description = "A chat id")), responses((status = 200, body = super::openapi::ChatRecord, description = "One chat"), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error), (status = 404, description = "not_found", body = super::openapi::Error)))]
pub async fn chat(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // Not a number, or someone else's: either way there is no such chat for this user.
    let chat_id: i64 = id.parse().map_err(|_| ApiError::NotFound)?;
    let chat = history::chat(&state.db, user.id, chat_id).await?;
    Ok(Json(chat_json(&chat)))
}

#[utoipa::path(operation_id = "list_transactions", get, path = "/transactions", tag = "history", security(("bearer" = []), ("token" = [])), params(("limit" = Option<u32>, Query, description = "1 to 100"), ("cursor" = Option<String>, Query, description = "`next` of the page before")), responses((status = 200, body = super::openapi::TransactionPage, description = "Ledger rows, newest first"), (status = 400, description = "invalid_input", body = super::openapi::Error), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error)))]
pub async fn transactions(
    State(state): State<AppState>,
    user: AuthUser,
    PageQuery(page): PageQuery,
) -> Result<Json<Value>, ApiError> {
    let page = history::transactions(&state.db, user.id, page).await?;
    let transactions: Vec<Value> = page.items.iter().map(entry_json).collect();
    Ok(Json(json!({
        "transactions": transactions,
        "next": page.next.map(|id| id.to_string()),
    })))
}

pub(super) fn chat_json(chat: &ChatRecord) -> Value {
    json!({
        "id": chat.id,
        "message": chat.message,
        "response": chat.response,
        "status": chat.status.as_str(),
        "tokens_charged": chat.tokens_charged,
        "usage": chat.usage.map(usage_json),
        "conversation_id": chat.conversation_id,
        "created_at": rfc3339(chat.created_at),
        "finished_at": chat.finished_at.map(rfc3339),
    })
}

fn entry_json(entry: &LedgerEntry) -> Value {
    json!({
        "id": entry.id,
        "amount": entry.amount,
        "reason": entry.reason.as_str(),
        "chat_id": entry.chat_id,
        "balance_after": entry.balance_after,
        "created_at": rfc3339(entry.created_at),
    })
}

/// `{"prompt_tokens", "completion_tokens"}`, as the model reported them.
pub(super) fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    })
}
