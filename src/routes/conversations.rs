//! `/conversations` and `/conversations/{id}`: a user's own threads of chats.

use axum::{extract::State, http::StatusCode, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::{
    error::{ApiError, InvalidPage, NotFound, Unauthorised},
    extract::{AuthUser, PageParams, PageQuery, PathId},
    history::ChatRecord,
    rfc3339,
};
use crate::{services::conversations, state::AppState};

#[derive(Serialize, ToSchema)]
pub struct Conversation {
    created_at: String,
    id: i64,
    title: String,
}

impl From<conversations::Conversation> for Conversation {
    fn from(conversation: conversations::Conversation) -> Self {
        Self {
            created_at: rfc3339(conversation.created_at),
            id: conversation.id,
            title: conversation.title,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ConversationPage {
    conversations: Vec<Conversation>,
    next: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ConversationWithChats {
    /// Oldest first.
    chats: Vec<ChatRecord>,
    created_at: String,
    id: i64,
    next: Option<String>,
    title: String,
}

/// Newest first, a page at a time like `/chats`.
#[utoipa::path(
    operation_id = "list_conversations",
    get,
    path = "/conversations",
    tag = "history",
    security(("bearer" = []), ("token" = [])),
    params(PageParams),
    responses(
        (status = 200, body = ConversationPage, description = "Conversations, newest first"),
        InvalidPage,
        Unauthorised,
    )
)]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    PageQuery(page): PageQuery,
) -> Result<Json<ConversationPage>, ApiError> {
    let page = conversations::list(&state.db, user.id, page).await?;
    Ok(Json(ConversationPage {
        conversations: page.items.into_iter().map(Conversation::from).collect(),
        next: page.next.map(|id| id.to_string()),
    }))
}

/// The conversation and its chats, oldest first; `next` continues after the last one.
#[utoipa::path(
    operation_id = "show_conversation",
    get,
    path = "/conversations/{id}",
    tag = "history",
    security(("bearer" = []), ("token" = [])),
    params(
        ("id" = i64, Path, description = "A conversation id"),
        PageParams,
    ),
    responses(
        (
            status = 200,
            body = ConversationWithChats,
            description = "The conversation and its chats, oldest first"
        ),
        InvalidPage,
        Unauthorised,
        NotFound,
    )
)]
pub async fn show(
    State(state): State<AppState>,
    user: AuthUser,
    id: PathId,
    PageQuery(page): PageQuery,
) -> Result<Json<ConversationWithChats>, ApiError> {
    let id = id.get()?;
    let (conversation, chats) = conversations::show(&state.db, user.id, id, page).await?;
    let Conversation {
        created_at,
        id,
        title,
    } = conversation.into();
    Ok(Json(ConversationWithChats {
        chats: chats.items.into_iter().map(ChatRecord::from).collect(),
        created_at,
        id,
        next: chats.next.map(|id| id.to_string()),
        title,
    }))
}

/// Erases the conversation's messages and answers; its charges stay in the ledger.
#[utoipa::path(
    operation_id = "delete_conversation",
    delete,
    path = "/conversations/{id}",
    tag = "history",
    security(("bearer" = []), ("token" = [])),
    params(("id" = i64, Path, description = "A conversation id")),
    responses(
        (
            status = 204,
            description = "Its messages and answers are erased; the ledger keeps its charges"
        ),
        Unauthorised,
        NotFound,
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    user: AuthUser,
    id: PathId,
) -> Result<StatusCode, ApiError> {
    conversations::delete(&state.db, user.id, id.get()?).await?;
    Ok(StatusCode::NO_CONTENT)
}
