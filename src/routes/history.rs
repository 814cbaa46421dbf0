//! `/chats`, `/chats/{id}` and `/transactions`: a user's own history, newest first.

use axum::{extract::State, Json};
use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::{
    error::{ApiError, InvalidPage, NotFound, Unauthorised},
    extract::{AuthUser, PageParams, PageQuery, PathId},
    rfc3339,
};
use crate::{
    llm,
    services::history::{self, LedgerEntry as Entry},
    state::AppState,
};

// A chat as its user sees it, in `/chats`, `/chats/{id}` and `/conversations/{id}`.
#[derive(Serialize, ToSchema)]
pub struct ChatRecord {
    conversation_id: Option<i64>,
    created_at: String,
    finished_at: Option<String>,
    id: i64,
    message: String,
    response: Option<String>,
    /// pending, answered, failed or abandoned
    status: &'static str,
    tokens_charged: i64,
    /// The answer's tool calls, as the model gave them (a `/v1` chat), or null.
    #[schema(value_type = Option<Vec<Object>>)]
    tool_calls: Option<Box<RawValue>>,
    /// The upstream that answered (its name in the configuration file, `default` for
    /// `LLM_BASE_URL`'s), or null (the demo model, or no answer).
    upstream: Option<String>,
    usage: Option<Usage>,
}

impl From<history::ChatRecord> for ChatRecord {
    fn from(chat: history::ChatRecord) -> Self {
        Self {
            conversation_id: chat.conversation_id,
            created_at: rfc3339(chat.created_at),
            finished_at: chat.finished_at.map(rfc3339),
            id: chat.id,
            message: chat.message,
            response: chat.response,
            status: chat.status.as_str(),
            tokens_charged: chat.tokens_charged,
            // Stored as the JSON it was; a row that is not JSON shows none.
            tool_calls: chat
                .tool_calls
                .and_then(|calls| RawValue::from_string(calls).ok()),
            upstream: chat.upstream,
            usage: chat.usage.map(Usage::from),
        }
    }
}

// `{"prompt_tokens", "completion_tokens"}`, as the model reported them.
#[derive(Serialize, ToSchema)]
pub struct Usage {
    completion_tokens: i64,
    prompt_tokens: i64,
}

impl From<llm::Usage> for Usage {
    fn from(usage: llm::Usage) -> Self {
        Self {
            completion_tokens: usage.completion_tokens.unwrap_or(0),
            prompt_tokens: usage.prompt_tokens,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ChatPage {
    chats: Vec<ChatRecord>,
    /// The cursor of the next page; null on the last.
    next: Option<String>,
}

// One move of the user's balance.
#[derive(Serialize, ToSchema)]
pub struct LedgerEntry {
    amount: i64,
    balance_after: i64,
    chat_id: Option<i64>,
    created_at: String,
    /// The embeddings call (`/v1/embeddings`) of an `embedding`, `embedding_refund`,
    /// `embedding_settlement` or `embedding_charge` row.
    embedding_id: Option<i64>,
    id: i64,
    /// The model an embeddings call asked for.
    model: Option<String>,
    /// initial_grant, grant, chat_reservation, chat_refund, chat_charge (a priced chat's
    /// charge: its reservation was held, not a row), embedding, embedding_refund,
    /// embedding_charge, or (a priced call reserved before holds) chat_settlement or
    /// embedding_settlement, its reservation beyond its charge given back
    reason: &'static str,
    /// An embeddings call's usage as the model reported it.
    usage: Option<EmbeddingUsage>,
}

// `{"prompt_tokens", "total_tokens"}` of an embeddings call, as the model reported them.
#[derive(Serialize, ToSchema)]
pub struct EmbeddingUsage {
    prompt_tokens: i64,
    total_tokens: i64,
}

impl From<Entry> for LedgerEntry {
    fn from(entry: Entry) -> Self {
        let usage = match (entry.prompt_tokens, entry.total_tokens) {
            (Some(prompt_tokens), Some(total_tokens)) => Some(EmbeddingUsage {
                prompt_tokens,
                total_tokens,
            }),
            _ => None,
        };
        Self {
            amount: entry.amount,
            balance_after: entry.balance_after,
            chat_id: entry.chat_id,
            created_at: rfc3339(entry.created_at),
            embedding_id: entry.embedding_id,
            id: entry.id,
            model: entry.model,
            reason: entry.reason.as_str(),
            usage,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TransactionPage {
    next: Option<String>,
    transactions: Vec<LedgerEntry>,
}

#[utoipa::path(
    operation_id = "list_chats",
    get,
    path = "/chats",
    tag = "history",
    security(("bearer" = []), ("token" = [])),
    params(PageParams),
    responses(
        (status = 200, body = ChatPage, description = "Chats, newest first"),
        InvalidPage,
        Unauthorised,
    )
)]
pub async fn chats(
    State(state): State<AppState>,
    user: AuthUser,
    PageQuery(page): PageQuery,
) -> Result<Json<ChatPage>, ApiError> {
    let page = history::chats(&state.db, user.id, page).await?;
    Ok(Json(ChatPage {
        chats: page.items.into_iter().map(ChatRecord::from).collect(),
        next: page.next.map(|id| id.to_string()),
    }))
}

#[utoipa::path(
    operation_id = "show_chat",
    get,
    path = "/chats/{id}",
    tag = "history",
    security(("bearer" = []), ("token" = [])),
    params(("id" = i64, Path, description = "A chat id")),
    responses(
        (status = 200, body = ChatRecord, description = "One chat"),
        Unauthorised,
        NotFound,
    )
)]
pub async fn chat(
    State(state): State<AppState>,
    user: AuthUser,
    id: PathId,
) -> Result<Json<ChatRecord>, ApiError> {
    let chat = history::chat(&state.db, user.id, id.get()?).await?;
    Ok(Json(chat.into()))
}

#[utoipa::path(
    operation_id = "list_transactions",
    get,
    path = "/transactions",
    tag = "history",
    security(("bearer" = []), ("token" = [])),
    params(PageParams),
    responses(
        (status = 200, body = TransactionPage, description = "Ledger rows, newest first"),
        InvalidPage,
        Unauthorised,
    )
)]
pub async fn transactions(
    State(state): State<AppState>,
    user: AuthUser,
    PageQuery(page): PageQuery,
) -> Result<Json<TransactionPage>, ApiError> {
    let page = history::transactions(&state.db, user.id, page).await?;
    Ok(Json(TransactionPage {
        next: page.next.map(|id| id.to_string()),
        transactions: page.items.into_iter().map(LedgerEntry::from).collect(),
    }))
}
