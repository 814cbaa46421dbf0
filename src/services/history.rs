//! A user's own chats and ledger, newest first, a page at a time.

use crate::{
    db::{self, chats::Chat, ledger::Entry, Db},
    domain::{ChatStatus, PageRequest},
    llm::Usage,
    services::{ServiceError, ServiceResult},
};

/// One page and the cursor of the next (the id to continue below), if there is more.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<i64>,
}

/// A chat as its user sees it in their history. Times are Unix seconds.
#[derive(Debug)]
pub struct ChatRecord {
    pub id: i64,
    pub message: String,
    pub response: Option<String>,
    pub status: ChatStatus,
    /// What the chat costs its user now: nothing once it failed and was refunded.
    pub tokens_charged: i64,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// What the model said the chat cost it, when it said.
    pub usage: Option<Usage>,
    pub conversation_id: Option<i64>,
    /// The answer's tool calls, the JSON array the model gave.
    pub tool_calls: Option<String>,
    /// The upstream that answered (its name in the configuration); `None` for the demo
    /// model.
    pub upstream: Option<String>,
}

impl From<Chat> for ChatRecord {
    fn from(chat: Chat) -> Self {
        let usage = match (chat.prompt_tokens, chat.completion_tokens) {
            (Some(prompt_tokens), Some(completion_tokens)) => Some(Usage {
                prompt_tokens,
                completion_tokens: Some(completion_tokens),
                cached_tokens: chat.cached_tokens.unwrap_or(0),
            }),
            _ => None,
        };
        Self {
            id: chat.id,
            tokens_charged: chat.status.tokens_charged(chat.cost, chat.refunded),
            usage,
            conversation_id: chat.conversation_id,
            tool_calls: chat.tool_calls,
            upstream: chat.upstream,
            message: chat.message,
            response: chat.response,
            status: chat.status,
            created_at: chat.created_at,
            finished_at: chat.finished_at,
        }
    }
}

/// One move of a user's balance, as the ledger holds it. Times are Unix seconds.
pub type LedgerEntry = Entry;

#[tracing::instrument(level = "debug", skip_all)]
pub async fn chats(db: &Db, user_id: i64, page: PageRequest) -> ServiceResult<Page<ChatRecord>> {
    let rows = db::chats::page(db, user_id, page.and_one_more()).await?;
    Ok(paginate(rows, page.limit, |chat| chat.id))
}

/// One of the user's chats; `NoSuchChat` for an unknown id and for someone else's chat alike.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn chat(db: &Db, user_id: i64, chat_id: i64) -> ServiceResult<ChatRecord> {
    db::chats::find(db, user_id, chat_id)
        .await?
        .map(ChatRecord::from)
        .ok_or(ServiceError::NoSuchChat)
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn transactions(
    db: &Db,
    user_id: i64,
    page: PageRequest,
) -> ServiceResult<Page<LedgerEntry>> {
    let rows = db::ledger::page(db, user_id, page.and_one_more()).await?;
    Ok(paginate(rows, page.limit, |entry| entry.id))
}

/// `rows` holds up to `limit + 1` rows: the extra one only says there is a next page.
pub(super) fn paginate<Row, Item: From<Row>>(
    mut rows: Vec<Row>,
    limit: i64,
    id: impl Fn(&Row) -> i64,
) -> Page<Item> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more { rows.last().map(id) } else { None };
    Page {
        items: rows.into_iter().map(Item::from).collect(),
        next,
    }
}
