//! The ledger: every balance move is a row here, and inserting the row is what moves the
//! balance (the `ledger_moves_balance` trigger), so the two can never disagree. Chat
//! reservations and refunds are written by triggers on `chats` (see `chats.rs`).

use sqlx::SqliteExecutor;

use super::unix_now;

/// Why a balance moved, for the moves made here; chat moves are `chat_reservation`
/// and `chat_refund`, written by the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InitialGrant,
    Grant,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InitialGrant => "initial_grant",
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

/// Records a move of `amount` (negative to take) for the user, which moves the balance.
/// Returns the balance after, or `None`, changing nothing, when the user does not exist
/// or the balance would go below zero. One statement: atomic on its own.
pub async fn record(
    db: impl SqliteExecutor<'_>,
    user_id: i64,
    amount: i64,
    reason: Reason,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO ledger (user_id, amount, reason, balance_after, created_at)
         SELECT id, $2, $3, tokens + $2, $4 FROM users WHERE id = $1 AND tokens + $2 >= 0
         RETURNING balance_after",
    )
    .bind(user_id)
    .bind(amount)
    .bind(reason.as_str())
    .bind(unix_now())
    .fetch_optional(db)
    .await
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
