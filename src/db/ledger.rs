//! The ledger: the one way a balance moves. Each move updates `users.tokens` and writes
//! its ledger row in the caller's transaction, so the two can never disagree.

use sqlx::{SqliteConnection, SqliteExecutor};

use super::unix_now;

/// Why a balance moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InitialGrant,
    ChatReservation,
    ChatRefund,
    Grant,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InitialGrant => "initial_grant",
            Self::ChatReservation => "chat_reservation",
            Self::ChatRefund => "chat_refund",
            Self::Grant => "grant",
        }
    }
}

/// One ledger row as the user sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct Entry {
    pub id: i64,
    pub amount: i64,
    pub reason: String,
    pub chat_id: Option<i64>,
    pub balance_after: i64,
    pub created_at: i64,
}

/// Adds `amount` (negative to take) to the user's balance and records it. Returns the
/// balance after, or `None`, changing nothing, when the balance would go below zero.
pub async fn apply(
    tx: &mut SqliteConnection,
    user_id: i64,
    amount: i64,
    reason: Reason,
    chat_id: Option<i64>,
) -> Result<Option<i64>, sqlx::Error> {
    let balance_after: Option<i64> = sqlx::query_scalar(
        "UPDATE users SET tokens = tokens + $1 WHERE id = $2 AND tokens + $1 >= 0 RETURNING tokens",
    )
    .bind(amount)
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(balance_after) = balance_after else {
        return Ok(None);
    };
    sqlx::query(
        "INSERT INTO ledger (user_id, amount, reason, chat_id, balance_after, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(user_id)
    .bind(amount)
    .bind(reason.as_str())
    .bind(chat_id)
    .bind(balance_after)
    .bind(unix_now())
    .execute(&mut *tx)
    .await?;
    Ok(Some(balance_after))
}

/// The user's rows with ids below `before` (all when `None`), newest first.
pub async fn page(
    db: impl SqliteExecutor<'_>,
    user_id: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, amount, reason, chat_id, balance_after, created_at FROM ledger
         WHERE user_id = $1 AND ($2 IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(user_id)
    .bind(before)
    .bind(limit)
    .fetch_all(db)
    .await
}
