//! Queries on `chats` and the balance moves that go with them: reserve, settle, refund.
//!
//! Each move is one transaction whose conditional `UPDATE`s make it safe to race:
//! the balance never goes below zero and a chat is settled or refunded at most once.

use super::{unix_now, users, Db};

/// The outcome of trying to reserve the price of a chat.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The price was taken and a pending chat recorded.
    Reserved { chat_id: i64 },
    /// The balance was below the price; nothing changed.
    Insufficient { balance: i64 },
}

/// Takes `cost` from the user's balance and records the chat as pending, or changes nothing.
pub async fn reserve(
    db: &Db,
    user_id: i64,
    message: &str,
    cost: i64,
) -> Result<Reservation, sqlx::Error> {
    let mut tx = db.begin().await?;
    let charged =
        sqlx::query("UPDATE users SET tokens = tokens - $1 WHERE id = $2 AND tokens >= $1")
            .bind(cost)
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if charged == 0 {
        let balance = users::balance(&mut *tx, user_id).await?;
        tx.rollback().await?;
        return Ok(Reservation::Insufficient { balance });
    }
    let chat_id = sqlx::query_scalar(
        "INSERT INTO chats (user_id, message, status, cost, created_at)
         VALUES ($1, $2, 'pending', $3, $4) RETURNING id",
    )
    .bind(user_id)
    .bind(message)
    .bind(cost)
    .bind(unix_now())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Reservation::Reserved { chat_id })
}

/// Stores the answer of a pending chat, keeping its reservation as the charge.
/// Returns the user's balance afterwards, or `None` if the chat was no longer pending.
pub async fn settle_answered(
    db: &Db,
    chat_id: i64,
    user_id: i64,
    response: &str,
) -> Result<Option<i64>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let settled = sqlx::query(
        "UPDATE chats SET status = 'answered', response = $1, finished_at = $2
         WHERE id = $3 AND status = 'pending'",
    )
    .bind(response)
    .bind(unix_now())
    .bind(chat_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if settled == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    let balance = users::balance(&mut *tx, user_id).await?;
    tx.commit().await?;
    Ok(Some(balance))
}

/// Marks a pending chat failed and gives its reservation back; a no-op for a settled chat.
pub async fn refund(db: &Db, chat_id: i64) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin().await?;
    let refunded: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE chats SET status = 'failed', finished_at = $1
         WHERE id = $2 AND status = 'pending' RETURNING user_id, cost",
    )
    .bind(unix_now())
    .bind(chat_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((user_id, cost)) = refunded else {
        tx.rollback().await?;
        return Ok(false);
    };
    sqlx::query("UPDATE users SET tokens = tokens + $1 WHERE id = $2")
        .bind(cost)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}
