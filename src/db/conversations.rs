//! Queries on `conversations`, and on the chats of one.

use super::{chats::Chat, db_page, db_read, db_run, unix_now, Db};
use crate::domain::PageRequest;

/// A conversation as its owner sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct Conversation {
    pub id: i64,
    pub title: String,
    pub created_at: i64,
}

/// One of the user's conversations; `None` for an unknown id or someone else's.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn find(db: &Db, user_id: i64, id: i64) -> Result<Option<Conversation>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT id, title, created_at FROM conversations WHERE id = $1 AND user_id = $2",
    )
    .bind(id)
    .bind(user_id)
    .fetch_optional(pool)
    .await)
}

/// The user's conversations below `page.before`, newest first, at most `page.limit`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn page(
    db: &Db,
    user_id: i64,
    page: PageRequest,
) -> Result<Vec<Conversation>, sqlx::Error> {
    db_page!(db, user_id, page =>
        "SELECT id, title, created_at FROM conversations
         WHERE user_id = $1 AND id < $2
         ORDER BY id DESC LIMIT $3"
    )
}

/// The answered turns of a conversation (message, answer), newest first, at most `limit`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn answered_turns(
    db: &Db,
    conversation_id: i64,
    limit: i64,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT message, response FROM chats
         WHERE conversation_id = $1 AND status = 'answered' AND erased_at IS NULL
           AND response IS NOT NULL
         ORDER BY id DESC LIMIT $2",
    )
    .bind(conversation_id)
    .bind(limit)
    .fetch_all(pool)
    .await)
}

/// The chats of one of the user's conversations with ids above `after`, oldest first.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn chats(
    db: &Db,
    user_id: i64,
    conversation_id: i64,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<Chat>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(concat!(
        "SELECT ", chat_columns!(), " FROM chats
         WHERE conversation_id = $1 AND user_id = $2 AND erased_at IS NULL
           AND (CAST($3 AS BIGINT) IS NULL OR id > $3)
         ORDER BY id LIMIT $4"
    ))
    .bind(conversation_id)
    .bind(user_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await)
}

/// Deletes one of the user's conversations and erases its chats' messages and answers,
/// keeping the chats (and so their ledger rows), in one transaction. `false` when the
/// user has no such conversation.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn delete(db: &Db, user_id: i64, id: i64) -> Result<bool, sqlx::Error> {
    let deleted = db_run!(db, pool => {
        let mut tx = pool.begin().await?;
        sqlx::query(
            "UPDATE chats SET message = '', response = NULL, tool_calls = NULL,
                              conversation_id = NULL, erased_at = $3
             WHERE conversation_id = $1 AND user_id = $2",
        )
        .bind(id)
        .bind(user_id)
        .bind(unix_now())
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query("DELETE FROM conversations WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok::<_, sqlx::Error>(deleted == 1)
    })?;
    if deleted {
        erase_from_the_log(db).await;
    }
    Ok(deleted)
}

/// On SQLite, copies the log into the file (where `secure_delete` has zeroed the erased
/// text) and cuts the log to nothing, so the page images written before the erasure do not
/// stay in it until they happen to be overwritten. Best effort: a checkpoint that finds
/// readers in the way leaves the rest to the next one, and the erasure itself has happened.
async fn erase_from_the_log(db: &Db) {
    let Db::Sqlite(sqlite) = db else {
        return;
    };
    let checkpoint = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
        .fetch_one(&sqlite.writer)
        .await;
    match checkpoint {
        Ok((0, _, _)) => {}
        Ok(_) => tracing::info!("the log still holds erased text until the next checkpoint"),
        Err(err) => tracing::warn!(error = %err, "checkpoint after an erasure failed"),
    }
}
