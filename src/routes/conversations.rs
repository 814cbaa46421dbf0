//! `/conversations` and `/conversations/{id}`: a user's own threads of chats.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde_json::{json, Value};

use super::{
    error::ApiError,
    extract::{AuthUser, PageQuery},
    history::chat_json,
    rfc3339,
};
use crate::{
    services::conversations::{self, Conversation},
    AppState,
};

/// Newest first, a page at a time like `/chats`.
#[utoipa::path(operation_id = "list_conversations", get, path = "/conversations", tag = "history", security(("bearer" = []), ("token" = [])), params(("limit" = Option<u32>, Query, description = "1 to 100"), ("cursor" = Option<String>, Query, description = "`next` of the page before")), responses((status = 200, body = super::openapi::ConversationPage, description = "Conversations, newest first"), (status = 400, description = "invalid_input", body = super::openapi::Error), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error)))]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    PageQuery(page): PageQuery,
) -> Result<Json<Value>, ApiError> {
    let page = conversations::list(&state.db, user.id, page).await?;
    let items: Vec<Value> = page.items.iter().map(conversation_json).collect();
    Ok(Json(json!({
        "conversations": items,
        "next": page.next.map(|id| id.to_string()),
    })))
}

/// The conversation and its chats, oldest first; `next` continues after the last one.
#[utoipa::path(operation_id = "show_conversation", get, path = "/conversations/{id}", tag = "history", security(("bearer" = []), ("token" = [])), params(("id" = i64, Path, description = "A conversation id"), ("limit" = Option<u32>, Query, description = "1 to 100"), ("cursor" = Option<String>, Query, description = "`next` of the page before")), responses((status = 200, body = super::openapi::ConversationWithChats, description = "The conversation and its chats, oldest first"), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error), (status = 404, description = "not_found", body = super::openapi::Error)))]
pub async fn show(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    PageQuery(page): PageQuery,
) -> Result<Json<Value>, ApiError> {
    let id = conversation_id(&id)?;
    let (conversation, chats) = conversations::show(&state.db, user.id, id, page).await?;
    let mut body = conversation_json(&conversation);
    body["chats"] = chats.items.iter().map(chat_json).collect();
    body["next"] = json!(chats.next.map(|id| id.to_string()));
    Ok(Json(body))
}

/// Erases the conversation's messages and answers; its charges stay in the ledger.
#[utoipa::path(operation_id = "delete_conversation", delete, path = "/conversations/{id}", tag = "history", security(("bearer" = []), ("token" = [])), params(("id" = i64, Path, description = "A conversation id")), responses((status = 204, description = "Its messages and answers are erased; the ledger keeps its charges"), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error), (status = 404, description = "not_found", body = super::openapi::Error)))]
pub async fn delete(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    conversations::delete(&state.db, user.id, conversation_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Not a number, or someone else's: either way there is no such conversation for this user.
fn conversation_id(text: &str) -> Result<i64, ApiError> {
    text.parse().map_err(|_| ApiError::NotFound)
}

fn conversation_json(conversation: &Conversation) -> Value {
    json!({
        "id": conversation.id,
        "title": conversation.title,
        "created_at": rfc3339(conversation.created_at),
    })
}
