//! Read-only queries that check the ledger against balances and chats. Each streams what
//! it finds, so a database with many offences is not held in memory at once.

use futures_util::stream::BoxStream;

use super::{db_read, Db};
use crate::domain::ChatStatus;

/// A user whose balance is not the sum of their ledger rows.
#[derive(Debug, sqlx::FromRow)]
pub struct BalanceMismatch {
    pub user_id: i64,
    pub username: String,
    pub tokens: i64,
    pub ledger_sum: i64,
}

/// A ledger row whose `balance_after` is not the running sum of the user's rows up to it.
#[derive(Debug, sqlx::FromRow)]
pub struct RunningMismatch {
    pub entry_id: i64,
    pub user_id: i64,
    pub balance_after: i64,
    pub running_sum: i64,
}

/// A chat's ledger rows, counted: what the audit compares with its status.
#[derive(Debug, sqlx::FromRow)]
pub struct ChatMoves {
    pub chat_id: i64,
    pub status: ChatStatus,
    pub cost: i64,
    pub refunded: bool,
    pub has_response: bool,
    /// Its conversation was deleted, and with it the message and the answer.
    pub erased: bool,
    /// Reservation rows of exactly `-cost` for the chat's own user.
    pub reservations: i64,
    /// Refund rows of exactly `+cost` for the chat's own user.
    pub refunds: i64,
    /// Rows of any other kind, amount or user that name the chat.
    pub strays: i64,
}

pub fn balance_mismatches(db: &Db) -> BoxStream<'_, Result<BalanceMismatch, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT u.id AS user_id, u.username, u.tokens, CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) AS ledger_sum
         FROM users u LEFT JOIN ledger l ON l.user_id = u.id
         GROUP BY u.id, u.username, u.tokens
         HAVING u.tokens <> CAST(COALESCE(SUM(l.amount), 0) AS BIGINT)
         ORDER BY u.id",
    )
    .fetch(pool))
}

pub fn running_mismatches(db: &Db) -> BoxStream<'_, Result<RunningMismatch, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT entry_id, user_id, balance_after, running_sum FROM (
             SELECT id AS entry_id, user_id, balance_after,
                    CAST(SUM(amount) OVER (PARTITION BY user_id ORDER BY id) AS BIGINT) AS running_sum
             FROM ledger
         ) AS running
         WHERE balance_after <> running_sum
         ORDER BY entry_id",
    )
    .fetch(pool))
}

/// Chats whose ledger rows do not match their status. The rule: every chat has exactly one
/// reservation of `-cost`; a failed chat also exactly one refund of `+cost`, an abandoned
/// one exactly one if it was refunded and none if not; an answered or pending chat none,
/// and an answered chat has its response unless its conversation was deleted; no other
/// row names a chat.
pub fn chat_mismatches(db: &Db) -> BoxStream<'_, Result<ChatMoves, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT * FROM (
             SELECT c.id AS chat_id, c.status, c.cost, c.refunded,
                 c.response IS NOT NULL AS has_response, c.erased_at IS NOT NULL AS erased,
                 COALESCE(SUM(CASE WHEN l.reason = 'chat_reservation' AND l.amount = -c.cost
                                   AND l.user_id = c.user_id THEN 1 ELSE 0 END), 0) AS reservations,
                 COALESCE(SUM(CASE WHEN l.reason = 'chat_refund' AND l.amount = c.cost
                                   AND l.user_id = c.user_id THEN 1 ELSE 0 END), 0) AS refunds,
                 COALESCE(SUM(CASE WHEN l.id IS NOT NULL AND l.user_id = c.user_id
                                   AND ((l.reason = 'chat_reservation' AND l.amount = -c.cost)
                                        OR (l.reason = 'chat_refund' AND l.amount = c.cost))
                                   THEN 0 WHEN l.id IS NOT NULL THEN 1 ELSE 0 END), 0) AS strays
             FROM chats c LEFT JOIN ledger l ON l.chat_id = c.id
             GROUP BY c.id, c.status, c.cost, c.refunded, c.response, c.erased_at
         ) AS moves
         WHERE NOT (
             reservations = 1 AND strays = 0 AND (
                 (status = 'answered' AND refunds = 0 AND (has_response OR erased))
                 OR (status = 'pending' AND refunds = 0)
                 OR (status = 'failed' AND refunds = 1)
                 OR (status = 'abandoned' AND refunds = CASE WHEN refunded THEN 1 ELSE 0 END)
             )
         )
         ORDER BY chat_id",
    )
    .fetch(pool))
}

/// An embeddings call's ledger rows, counted: what the audit compares with its status.
#[derive(Debug, sqlx::FromRow)]
pub struct EmbeddingMoves {
    pub embedding_id: i64,
    /// pending, answered or failed
    pub status: String,
    pub cost: i64,
    /// `embedding` rows of exactly `-cost` for the call's own user.
    pub reservations: i64,
    /// `embedding_refund` rows of exactly `+cost` for the call's own user.
    pub refunds: i64,
    /// Rows of any other kind, amount or user that name the call.
    pub strays: i64,
}

/// Embeddings calls whose ledger rows do not match their status, by the chats' rule:
/// exactly one reservation of `-cost`; a failed call also exactly one refund of `+cost`, a
/// pending or answered one none; no other row names a call.
pub fn embedding_mismatches(db: &Db) -> BoxStream<'_, Result<EmbeddingMoves, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT * FROM (
             SELECT e.id AS embedding_id, e.status, e.cost,
                 COALESCE(SUM(CASE WHEN l.reason = 'embedding' AND l.amount = -e.cost
                                   AND l.user_id = e.user_id THEN 1 ELSE 0 END), 0) AS reservations,
                 COALESCE(SUM(CASE WHEN l.reason = 'embedding_refund' AND l.amount = e.cost
                                   AND l.user_id = e.user_id THEN 1 ELSE 0 END), 0) AS refunds,
                 COALESCE(SUM(CASE WHEN l.id IS NOT NULL AND l.user_id = e.user_id
                                   AND ((l.reason = 'embedding' AND l.amount = -e.cost)
                                        OR (l.reason = 'embedding_refund' AND l.amount = e.cost))
                                   THEN 0 WHEN l.id IS NOT NULL THEN 1 ELSE 0 END), 0) AS strays
             FROM embeddings e LEFT JOIN ledger l ON l.embedding_id = e.id
             GROUP BY e.id, e.status, e.cost
         ) AS moves
         WHERE NOT (
             reservations = 1 AND strays = 0 AND (
                 (status IN ('pending', 'answered') AND refunds = 0)
                 OR (status = 'failed' AND refunds = 1)
             )
         )
         ORDER BY embedding_id",
    )
    .fetch(pool))
}

/// How many users, chats and ledger rows the audit looked at.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn totals(db: &Db) -> Result<(i64, i64, i64), sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM chats), (SELECT COUNT(*) FROM ledger)",
    )
    .fetch_one(pool)
    .await)
}
