//! Read-only queries that check the ledger against balances and chats. Each streams what
//! it finds, so a database with many offences is not held in memory at once.

use std::sync::LazyLock;

use futures_util::stream::BoxStream;

use super::{
    budget_periods::{calls_hold, Spender},
    db_read, Db,
};
use crate::domain::ChatStatus;

/// The five counts of a call's ledger rows that the audit compares with its status, for
/// the calls' table as `c` joined to `ledger l`, whose rows carry the four reasons given:
/// `reservations` of exactly `-reserved`, `refunds` of exactly `+reserved`, `settlements` of
/// exactly `reserved - cost` (above zero), `charges` of exactly `-cost` (a held call's one
/// row), each for the call's own user, and `strays`, every other row that names the call.
/// A call from before prices has no `reserved`: its cost was its reservation.
#[rustfmt::skip]
macro_rules! ledger_row_counts {
    ($reservation:literal, $refund:literal, $settlement:literal, $charge:literal) => { concat!(
        "COALESCE(SUM(CASE WHEN l.reason = '", $reservation, "'
                           AND l.amount = -COALESCE(c.reserved, c.cost)
                           AND l.user_id = c.user_id THEN 1 ELSE 0 END), 0) AS reservations,
         COALESCE(SUM(CASE WHEN l.reason = '", $refund, "'
                           AND l.amount = COALESCE(c.reserved, c.cost)
                           AND l.user_id = c.user_id THEN 1 ELSE 0 END), 0) AS refunds,
         COALESCE(SUM(CASE WHEN l.reason = '", $settlement, "'
                           AND l.amount = COALESCE(c.reserved, c.cost) - c.cost
                           AND l.amount > 0
                           AND l.user_id = c.user_id THEN 1 ELSE 0 END), 0) AS settlements,
         COALESCE(SUM(CASE WHEN l.reason = '", $charge, "'
                           AND l.amount = -c.cost
                           AND l.user_id = c.user_id THEN 1 ELSE 0 END), 0) AS charges,
         COALESCE(SUM(CASE WHEN l.id IS NOT NULL AND l.user_id = c.user_id
                           AND ((l.reason = '", $reservation, "'
                                 AND l.amount = -COALESCE(c.reserved, c.cost))
                                OR (l.reason = '", $refund, "'
                                    AND l.amount = COALESCE(c.reserved, c.cost))
                                OR (l.reason = '", $settlement, "'
                                    AND l.amount = COALESCE(c.reserved, c.cost) - c.cost
                                    AND l.amount > 0)
                                OR (l.reason = '", $charge, "' AND l.amount = -c.cost))
                           THEN 0 WHEN l.id IS NOT NULL THEN 1 ELSE 0 END), 0) AS strays"
    ) };
}

/// A call's ledger rows as [`ledger_row_counts!`] counts them, for the call's own user:
/// what the audit compares with the call's status.
#[derive(Debug, sqlx::FromRow)]
pub struct LedgerRowCounts {
    /// Reservation rows of exactly `-reserved`.
    pub reservations: i64,
    /// Refund rows of exactly `+reserved`.
    pub refunds: i64,
    /// Settlement rows of exactly `reserved - cost`.
    pub settlements: i64,
    /// Charge rows of exactly `-cost`.
    pub charges: i64,
    /// Rows of any other kind, amount or user that name the call.
    pub strays: i64,
}

impl std::fmt::Display for LedgerRowCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} reservation(s), {} refund(s), {} settlement(s), {} charge(s), {} stray row(s)",
            self.reservations, self.refunds, self.settlements, self.charges, self.strays
        )
    }
}

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

/// A chat's ledger rows, counted (`chat_reservation`, `chat_refund`, `chat_settlement` and
/// `chat_charge`): what the audit compares with its status.
#[derive(Debug, sqlx::FromRow)]
pub struct ChatMoves {
    pub chat_id: i64,
    pub status: ChatStatus,
    /// The charge (a charged chat's), or what was reserved.
    pub cost: i64,
    /// What was reserved (the cost of a chat from before prices).
    pub reserved: i64,
    pub refunded: bool,
    pub has_response: bool,
    /// Its conversation was deleted, and with it the message and the answer.
    pub erased: bool,
    #[sqlx(flatten)]
    pub rows: LedgerRowCounts,
    /// Its reservation was held (a priced chat), not a ledger row.
    pub held: bool,
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

/// Chats whose ledger rows do not match their status. The rule for a chat reserved in the
/// ledger: exactly one reservation of `-reserved`; a failed chat also exactly one refund of
/// `+reserved`, an abandoned one exactly one if it was refunded and none if not; an answered
/// or pending chat none; a charged chat (answered, or abandoned and not refunded) charged
/// below its reservation exactly one settlement of `reserved - cost`, any other chat none.
/// For a held chat (a priced one): no reservation, refund or settlement, and exactly one
/// charge of `-cost` when it is charged, none otherwise. For both: an answered chat has its
/// response unless its conversation was deleted, and no other row names a chat.
pub fn chat_mismatches(db: &Db) -> BoxStream<'_, Result<ChatMoves, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(concat!(
        "SELECT * FROM (
             SELECT c.id AS chat_id, c.status, c.cost, COALESCE(c.reserved, c.cost) AS reserved,
                 c.refunded, c.response IS NOT NULL AS has_response,
                 c.erased_at IS NOT NULL AS erased, c.held,
                 ",
            ledger_row_counts!("chat_reservation", "chat_refund", "chat_settlement", "chat_charge"),
            "
             FROM chats c LEFT JOIN ledger l ON l.chat_id = c.id
             GROUP BY c.id, c.status, c.cost, c.reserved, c.refunded, c.response, c.erased_at,
                      c.held
         ) AS moves
         WHERE NOT (
             strays = 0 AND cost >= 0 AND cost <= reserved
             AND (status <> 'answered' OR has_response OR erased)
             AND (
                 (held AND reservations = 0 AND refunds = 0 AND settlements = 0
                  AND charges = CASE WHEN status = 'answered'
                                          OR (status = 'abandoned' AND NOT refunded)
                                     THEN 1 ELSE 0 END
                  AND (status = 'answered' OR cost = reserved
                       OR (status = 'abandoned' AND NOT refunded)))
                 OR (NOT held AND reservations = 1 AND charges = 0
                     AND settlements = CASE
                         WHEN cost < reserved AND (status = 'answered'
                                                   OR (status = 'abandoned' AND NOT refunded))
                         THEN 1 ELSE 0 END
                     AND (
                         (status = 'answered' AND refunds = 0)
                         OR (status = 'pending' AND refunds = 0 AND cost = reserved)
                         OR (status = 'failed' AND refunds = 1 AND cost = reserved)
                         OR (status = 'abandoned'
                             AND refunds = CASE WHEN refunded THEN 1 ELSE 0 END
                             AND (cost = reserved OR NOT refunded))
                     ))
             )
         )
         ORDER BY chat_id",
    ))
    .fetch(pool))
}

/// A priced, charged chat: its usage and the prices recorded with it, which its charge
/// must follow.
#[derive(Debug, sqlx::FromRow)]
pub struct PricedCharge {
    pub chat_id: i64,
    pub cost: i64,
    pub reserved: i64,
    pub prompt_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub price_prompt: i64,
    pub price_cached_prompt: i64,
    pub price_completion: i64,
    pub price_request: i64,
}

/// Every priced chat that kept a charge (answered, or abandoned and not refunded).
pub fn priced_charges(db: &Db) -> BoxStream<'_, Result<PricedCharge, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT id AS chat_id, cost, COALESCE(reserved, cost) AS reserved, prompt_tokens,
                cached_tokens, completion_tokens, price_prompt,
                COALESCE(price_cached_prompt, price_prompt) AS price_cached_prompt,
                COALESCE(price_completion, 0) AS price_completion,
                COALESCE(price_request, 0) AS price_request
         FROM chats
         WHERE price_prompt IS NOT NULL
           AND (status = 'answered' OR (status = 'abandoned' AND NOT refunded))
         ORDER BY id",
    )
    .fetch(pool))
}

/// An embeddings call's ledger rows, counted (`embedding`, `embedding_refund`,
/// `embedding_settlement` and `embedding_charge`): what the audit compares with its status.
#[derive(Debug, sqlx::FromRow)]
pub struct EmbeddingMoves {
    pub embedding_id: i64,
    /// pending, answered or failed
    pub status: String,
    pub cost: i64,
    pub reserved: i64,
    #[sqlx(flatten)]
    pub rows: LedgerRowCounts,
    /// Its reservation was held (a priced call), not a ledger row.
    pub held: bool,
}

/// Embeddings calls whose ledger rows do not match their status, by the chats' rules: for
/// a call reserved in the ledger, exactly one reservation of `-reserved`; a failed call also
/// exactly one refund of `+reserved`, a pending or answered one none; an answered one
/// charged below its reservation exactly one settlement of the rest. For a held call, only
/// exactly one charge of `-cost` once answered. No other row names a call.
pub fn embedding_mismatches(db: &Db) -> BoxStream<'_, Result<EmbeddingMoves, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(concat!(
        "SELECT * FROM (
             SELECT c.id AS embedding_id, c.status, c.cost,
                 COALESCE(c.reserved, c.cost) AS reserved, c.held,
                 ",
            ledger_row_counts!("embedding", "embedding_refund", "embedding_settlement",
                               "embedding_charge"),
            "
             FROM embeddings c LEFT JOIN ledger l ON l.embedding_id = c.id
             GROUP BY c.id, c.status, c.cost, c.reserved, c.held
         ) AS moves
         WHERE NOT (
             strays = 0 AND cost >= 0 AND cost <= reserved
             AND (
                 (held AND reservations = 0 AND refunds = 0 AND settlements = 0
                  AND charges = CASE WHEN status = 'answered' THEN 1 ELSE 0 END
                  AND (status = 'answered' OR cost = reserved))
                 OR (NOT held AND reservations = 1 AND charges = 0
                     AND settlements = CASE WHEN status = 'answered' AND cost < reserved
                                            THEN 1 ELSE 0 END
                     AND (
                         (status = 'answered' AND refunds = 0)
                         OR (status = 'pending' AND refunds = 0 AND cost = reserved)
                         OR (status = 'failed' AND refunds = 1 AND cost = reserved)
                     ))
             )
         )
         ORDER BY embedding_id",
    ))
    .fetch(pool))
}

/// A user whose `held` is not what their held calls still pending reserved.
#[derive(Debug, sqlx::FromRow)]
pub struct HeldMismatch {
    pub user_id: i64,
    pub username: String,
    pub held: i64,
    pub pending_held: i64,
}

/// Users whose `held` is not the sum of the reservations of their held chats and
/// embeddings calls still pending.
pub fn held_mismatches(db: &Db) -> BoxStream<'_, Result<HeldMismatch, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT * FROM (
             SELECT u.id AS user_id, u.username, u.held,
                    CAST(COALESCE((SELECT SUM(c.cost) FROM chats c
                                   WHERE c.user_id = u.id AND c.held
                                     AND c.status = 'pending'), 0)
                         + COALESCE((SELECT SUM(e.cost) FROM embeddings e
                                     WHERE e.user_id = u.id AND e.held
                                       AND e.status = 'pending'), 0)
                         AS BIGINT) AS pending_held
             FROM users u
         ) AS holds
         WHERE held <> pending_held
         ORDER BY user_id",
    )
    .fetch(pool))
}

/// A priced, answered embeddings call, whose charge must follow its prompt tokens at the
/// prices recorded with it.
#[derive(Debug, sqlx::FromRow)]
pub struct PricedEmbedding {
    pub embedding_id: i64,
    pub cost: i64,
    pub reserved: i64,
    pub prompt_tokens: Option<i64>,
    pub price_prompt: i64,
    pub price_request: i64,
}

pub fn priced_embeddings(db: &Db) -> BoxStream<'_, Result<PricedEmbedding, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT id AS embedding_id, cost, COALESCE(reserved, cost) AS reserved, prompt_tokens,
                price_prompt, COALESCE(price_request, 0) AS price_request
         FROM embeddings
         WHERE price_prompt IS NOT NULL AND status = 'answered'
         ORDER BY id",
    )
    .fetch(pool))
}

/// A key or a user whose recorded spending in its budget's current period is not what its
/// calls of that period hold: reserved while pending, charged once settled, nothing once
/// refunded.
#[derive(Debug, sqlx::FromRow)]
pub struct BudgetMismatch {
    /// The key's or the user's id.
    pub id: i64,
    pub budget_spent: i64,
    pub calls_hold: i64,
}

/// The owners (`api_keys` or `users`, as `o`) with a budget whose `budget_spent` is not
/// what their calls of the current period hold.
fn budget_mismatches_of(spender: Spender) -> String {
    let (owners, owner, period) = spender.columns();
    let holds = calls_hold(owner, period, "o.id", "o.budget_period_start");
    format!(
        "SELECT * FROM (
             SELECT o.id, o.budget_spent, {holds} AS calls_hold
             FROM {owners} o WHERE o.budget_period_start IS NOT NULL
         ) AS spending
         WHERE budget_spent <> calls_hold
         ORDER BY id"
    )
}

/// The keys' budgets: see [`BudgetMismatch`].
pub fn budget_mismatches(db: &Db) -> BoxStream<'_, Result<BudgetMismatch, sqlx::Error>> {
    static SQL: LazyLock<String> = LazyLock::new(|| budget_mismatches_of(Spender::Key));
    db_read!(db, pool => sqlx::query_as(SQL.as_str()).fetch(pool))
}

/// As [`budget_mismatches`], of the users' budgets.
pub fn user_budget_mismatches(db: &Db) -> BoxStream<'_, Result<BudgetMismatch, sqlx::Error>> {
    static SQL: LazyLock<String> = LazyLock::new(|| budget_mismatches_of(Spender::User));
    db_read!(db, pool => sqlx::query_as(SQL.as_str()).fetch(pool))
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
