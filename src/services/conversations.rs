//! Conversations: a user's threads of chats, and the earlier turns of one that the model is
//! sent with a new message.

use crate::{
    db::{self, Db},
    domain::PageRequest,
    services::{
        history::{paginate, ChatRecord, Page},
        ServiceError, ServiceResult,
    },
};

/// The most earlier turns read to fill the context, however short they are.
const MAX_TURNS_READ: i64 = 500;

/// A conversation as its owner sees it. Times are Unix seconds.
#[derive(Debug)]
pub struct Conversation {
    pub id: i64,
    pub title: String,
    pub created_at: i64,
}

impl From<db::conversations::Conversation> for Conversation {
    fn from(row: db::conversations::Conversation) -> Self {
        Self {
            id: row.id,
            title: row.title,
            created_at: row.created_at,
        }
    }
}

/// One earlier turn: the user's message and the model's answer.
pub type Turn = (String, String);

/// The earlier answered turns of one of the user's conversations that fit in
/// `max_chars` (`CONTEXT_MAX_CHARS`), oldest first: whole turns only, the newest kept first, counting
/// the characters of messages and answers. `NoSuchConversation` for an unknown id or
/// someone else's.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn context(
    db: &Db,
    user_id: i64,
    conversation_id: i64,
    max_chars: usize,
) -> ServiceResult<Vec<Turn>> {
    db::conversations::find(db, user_id, conversation_id)
        .await?
        .ok_or(ServiceError::NoSuchConversation)?;
    let newest_first =
        db::conversations::answered_turns(db, conversation_id, MAX_TURNS_READ).await?;
    Ok(fit(newest_first, max_chars))
}

/// The newest turns whose characters together fit in `budget`, oldest first.
fn fit(newest_first: Vec<(String, String)>, budget: usize) -> Vec<Turn> {
    let mut used = 0;
    let mut kept: Vec<Turn> = newest_first
        .into_iter()
        .map_while(|(message, answer)| {
            used += message.chars().count() + answer.chars().count();
            (used <= budget).then_some((message, answer))
        })
        .collect();
    kept.reverse();
    kept
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn list(db: &Db, user_id: i64, page: PageRequest) -> ServiceResult<Page<Conversation>> {
    let rows = db::conversations::page(db, user_id, page.and_one_more()).await?;
    Ok(paginate(rows, page.limit, |row| row.id))
}

/// One of the user's conversations and a page of its chats, oldest first (the page's
/// `before` read as "after": the cursor continues upwards).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn show(
    db: &Db,
    user_id: i64,
    conversation_id: i64,
    page: PageRequest,
) -> ServiceResult<(Conversation, Page<ChatRecord>)> {
    let conversation = db::conversations::find(db, user_id, conversation_id)
        .await?
        .ok_or(ServiceError::NoSuchConversation)?;
    let rows =
        db::conversations::chats(db, user_id, conversation_id, page.before, page.limit + 1).await?;
    Ok((
        conversation.into(),
        paginate(rows, page.limit, |chat| chat.id),
    ))
}

/// Deletes one of the user's conversations: its messages and answers are erased, its
/// chats' charges and ledger rows stay.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn delete(db: &Db, user_id: i64, conversation_id: i64) -> ServiceResult<()> {
    if db::conversations::delete(db, user_id, conversation_id).await? {
        Ok(())
    } else {
        Err(ServiceError::NoSuchConversation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(sizes: &[usize]) -> Vec<(String, String)> {
        sizes
            .iter()
            .enumerate()
            .map(|(n, size)| (n.to_string(), "x".repeat(size - 1)))
            .collect()
    }

    #[test]
    fn the_newest_whole_turns_that_fit_are_kept_oldest_first() {
        // Newest first: 10, 20, 30 characters.
        let kept = fit(turns(&[10, 20, 30]), 35);
        assert_eq!(kept.len(), 2);
        assert_eq!((kept[0].0.as_str(), kept[1].0.as_str()), ("1", "0"));
        assert_eq!(fit(turns(&[10, 20, 30]), 60).len(), 3);
        assert_eq!(fit(turns(&[10, 20, 30]), 9).len(), 0);
        // A turn that does not fit ends the context, even if an older one would.
        assert_eq!(fit(turns(&[10, 50, 5]), 30).len(), 1);
    }

    #[test]
    fn characters_are_counted_not_bytes() {
        let turn = vec![("é".repeat(5), "😀".repeat(5))];
        assert_eq!(fit(turn.clone(), 10).len(), 1);
        assert_eq!(fit(turn, 9).len(), 0);
    }
}
