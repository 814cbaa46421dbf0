//! Queries behind alerts: what a key's budget and a user's balance stand at, read after a
//! charge settled, and the claim on a crossing that makes one instance, and one only, send it.

use super::{db_read, db_run, unix_now, Db};

/// A key's budget as it stands, with the names an alert shows.
#[derive(Debug, sqlx::FromRow)]
pub struct KeyBudgetState {
    pub key_name: String,
    pub username: String,
    pub budget_tokens: i64,
    pub budget_period: String,
    /// What the period that began at `budget_period_start` spent, reservations included.
    pub budget_spent: i64,
    pub budget_period_start: i64,
}

/// A user's balance and the credit that began its current cycle: their registration or their
/// latest positive grant, and the balance that credit left.
#[derive(Debug, sqlx::FromRow)]
pub struct BalanceState {
    pub username: String,
    pub tokens: i64,
    /// The ledger id of that credit; `None` for a user with none (a database of before the
    /// ledger had them).
    pub credit_id: Option<i64>,
    pub credited_balance: Option<i64>,
    pub credited_at: Option<i64>,
}

/// A crossing to claim: which subject, at which threshold, in which cycle, of what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Crossing {
    pub kind: &'static str,
    pub subject_id: i64,
    pub threshold_ppm: i64,
    pub cycle: i64,
    pub of_tokens: i64,
}

/// The budget of the key `key_id`, if it has one.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn key_budget(db: &Db, key_id: i64) -> Result<Option<KeyBudgetState>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT k.name AS key_name, u.username, k.budget_tokens, k.budget_period,
                k.budget_spent, k.budget_period_start
         FROM api_keys k JOIN users u ON u.id = k.user_id
         WHERE k.id = $1 AND k.budget_tokens IS NOT NULL AND k.budget_period IS NOT NULL
           AND k.budget_period_start IS NOT NULL",
    )
    .bind(key_id)
    .fetch_optional(pool)
    .await)
}

/// The balance of the user `user_id` and the credit that began its cycle. The subquery's
/// terms are the partial index `ledger_credits`'s, word for word, so both databases use it.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn balance(db: &Db, user_id: i64) -> Result<Option<BalanceState>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT u.username, u.tokens, c.id AS credit_id, c.balance_after AS credited_balance,
                c.created_at AS credited_at
         FROM users u LEFT JOIN ledger c ON c.id = (
             SELECT id FROM ledger
             WHERE user_id = u.id AND reason IN ('initial_grant', 'grant') AND amount > 0
             ORDER BY id DESC LIMIT 1)
         WHERE u.id = $1",
    )
    .bind(user_id)
    .fetch_optional(pool)
    .await)
}

/// Claims `crossing` for this instance: its alert's id when this call recorded it, `None`
/// when it was claimed before (here or by another instance). One statement; the unique key
/// decides a race.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn claim(db: &Db, crossing: Crossing) -> Result<Option<i64>, sqlx::Error> {
    db_run!(db, pool => sqlx::query_scalar(
        "INSERT INTO alerts (kind, subject_id, threshold_ppm, cycle, of_tokens, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (kind, subject_id, threshold_ppm, cycle, of_tokens) DO NOTHING
         RETURNING id",
    )
    .bind(crossing.kind)
    .bind(crossing.subject_id)
    .bind(crossing.threshold_ppm)
    .bind(crossing.cycle)
    .bind(crossing.of_tokens)
    .bind(unix_now())
    .fetch_optional(pool)
    .await)
}
