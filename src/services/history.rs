//! A user's own chats and ledger, newest first, a page at a time.

use crate::{
    db::{self, chats::Chat, ledger::Entry},
    error::Error,
    AppState,
};

/// One page and the cursor of the next (the id to continue below), if there is more.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<i64>,
}

pub async fn chats(
    state: &AppState,
    user_id: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Page<Chat>, Error> {
    let rows = db::chats::page(&state.db, user_id, before, limit + 1).await?;
    Ok(paginate(rows, limit, |chat| chat.id))
}

pub async fn chat(state: &AppState, user_id: i64, chat_id: i64) -> Result<Chat, Error> {
    db::chats::find(&state.db, user_id, chat_id)
        .await?
        .ok_or(Error::NotFound)
}

pub async fn transactions(
    state: &AppState,
    user_id: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Page<Entry>, Error> {
    let rows = db::ledger::page(&state.db, user_id, before, limit + 1).await?;
    Ok(paginate(rows, limit, |entry| entry.id))
}

/// `rows` holds up to `limit + 1` rows: the extra one only says there is a next page.
fn paginate<T>(mut rows: Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more { rows.last().map(id) } else { None };
    Page { items: rows, next }
}
