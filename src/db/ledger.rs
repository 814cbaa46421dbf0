//! The ledger: every balance move is a row here, and inserting the row is what moves the
//! balance (the `ledger_moves_balance` trigger), so the two can never disagree. Chat
//! reservations, refunds and charges are written by triggers on `chats` (see `chats.rs`). A
//! priced call's reservation is no row but a hold, `users.held`, which the balance a call
//! may spend leaves out.

use super::{db_page, db_run, Db};
use crate::domain::{LedgerReason, PageRequest};

/// One ledger row as the user sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct Entry {
    pub id: i64,
    pub amount: i64,
    pub reason: LedgerReason,
    pub chat_id: Option<i64>,
    pub balance_after: i64,
    pub created_at: i64,
    pub embedding_id: Option<i64>,
    /// An embeddings call's model and the usage the model reported.
    pub model: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
}

/// The statement behind [`record`]. On SQLite it computes the balance after from its own
/// read, which the single writer makes exact; on PostgreSQL the `ledger_moves_balance`
/// trigger overwrites it with the balance it leaves under the row lock. A move may not
/// take what the user's priced calls in flight hold.
pub(super) const RECORD: &str =
    "INSERT INTO ledger (user_id, amount, reason, balance_after, created_at)
     SELECT id, $2, $3, tokens + $2, $4 FROM users WHERE id = $1 AND tokens + $2 >= held
     RETURNING balance_after";

/// [`RECORD`] on any executor of either backend (a pool or a transaction): a future of the
/// balance after, or `None` when the user does not exist or the balance would go below zero.
macro_rules! record_move {
    ($executor:expr, $user_id:expr, $amount:expr, $reason:expr) => {
        sqlx::query_scalar::<_, i64>($crate::db::ledger::RECORD)
            .bind($user_id)
            .bind($amount)
            .bind($reason)
            .bind($crate::db::unix_now())
            .fetch_optional($executor)
    };
}
pub(super) use record_move;

/// Records a move of `amount` (negative to take) for the user, which moves the balance.
/// Returns the balance after, or `None`, changing nothing, when the user does not exist
/// or the balance would go below zero. One statement: atomic on its own.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn record(
    db: &Db,
    user_id: i64,
    amount: i64,
    reason: LedgerReason,
) -> Result<Option<i64>, sqlx::Error> {
    db_run!(db, pool => record_move!(pool, user_id, amount, reason).await)
}

/// The user's rows below `page.before`, newest first, at most `page.limit`; an embeddings
/// call's with its model and usage.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn page(db: &Db, user_id: i64, page: PageRequest) -> Result<Vec<Entry>, sqlx::Error> {
    db_page!(db, user_id, page =>
        "SELECT l.id, l.amount, l.reason, l.chat_id, l.balance_after, l.created_at,
                l.embedding_id, e.model, e.prompt_tokens, e.total_tokens
         FROM ledger l LEFT JOIN embeddings e ON e.id = l.embedding_id
         WHERE l.user_id = $1 AND l.id < $2
         ORDER BY l.id DESC LIMIT $3"
    )
}

/// What a statement that settles a priced call returns: its charge, its reservation,
/// whether that was held, the balance its reservation left (a reservation in the ledger's),
/// and the user's balance before the statement's triggers (the charge or the settlement row
/// among them) ran.
pub(super) type Settling = (i64, i64, bool, Option<i64>, i64);

/// The `RETURNING` clause that reads a [`Settling`] from the settled row of `$table`,
/// whose reservation row names it in `ledger.$column` with reason `$reservation`. A held
/// call has no such row, and is not looked for.
macro_rules! returning_settling {
    ($table:literal, $column:literal, $reservation:literal) => {
        concat!(
            " RETURNING cost, COALESCE(reserved, cost), held,
                        CASE WHEN held THEN NULL
                             ELSE (SELECT balance_after FROM ledger
                                   WHERE ledger.",
            $column,
            " = ",
            $table,
            ".id
                                     AND reason = '",
            $reservation,
            "') END,
                        (SELECT tokens FROM users WHERE users.id = ",
            $table,
            ".user_id)"
        )
    };
}
pub(super) use returning_settling;

/// What a settlement names: a chat, or an embeddings call.
pub(super) enum Settled {
    Chat(i64),
    Embedding(i64),
}

/// The balance right after a settlement: the row it wrote's (a held call's charge, or the
/// rest given back of one reserved in the ledger), or the reservation's when nothing came
/// back. Never an error: the settlement is committed, so the call is answered and paid
/// whatever this read meets; on PostgreSQL a failed read gives the statement's own figure.
pub(super) async fn balance_after_settling(
    db: &Db,
    (charged, reserved, held, reservation_balance, tokens_before): Settling,
    settled: Settled,
) -> i64 {
    // The balance the settlement left as its statement saw it.
    let as_seen = if held {
        tokens_before - charged
    } else {
        tokens_before + (reserved - charged)
    };
    match db {
        _ if !held && charged == reserved => reservation_balance.unwrap_or(tokens_before),
        // SQLite computes `RETURNING` before the statement's AFTER triggers run, and its one
        // writer lets nothing move the balance in between: the row's balance is the balance
        // before it less the charge, or plus what it gave back. (Checked by the tests, which
        // compare it with the row's `balance_after`.)
        Db::Sqlite(_) => as_seen,
        // PostgreSQL's `RETURNING` reads the statement's snapshot, which a concurrent commit
        // may have moved past; nor can it see a row its trigger wrote: the row is read.
        Db::Postgres(pool) => {
            let sql = match (&settled, held) {
                (Settled::Chat(_), true) => {
                    "SELECT balance_after FROM ledger WHERE chat_id = $1 AND reason = 'chat_charge'"
                }
                (Settled::Chat(_), false) => {
                    "SELECT balance_after FROM ledger
                     WHERE chat_id = $1 AND reason = 'chat_settlement'"
                }
                (Settled::Embedding(_), true) => {
                    "SELECT balance_after FROM ledger
                     WHERE embedding_id = $1 AND reason = 'embedding_charge'"
                }
                (Settled::Embedding(_), false) => {
                    "SELECT balance_after FROM ledger
                     WHERE embedding_id = $1 AND reason = 'embedding_settlement'"
                }
            };
            let (Settled::Chat(id) | Settled::Embedding(id)) = settled;
            match sqlx::query_scalar(sql).bind(id).fetch_one(pool).await {
                Ok(balance_after) => balance_after,
                // The database away for a moment, or (an error) a row the settlement's
                // trigger did not write: answered all the same, the charge is committed.
                Err(err) => {
                    const SAID: &str = "the balance after a committed settlement could not \
                                        be read: answering with the figure its statement saw";
                    if super::is_unreachable(&err) {
                        tracing::warn!(error = %err, "{SAID}");
                    } else {
                        tracing::error!(error = %err, "{SAID}");
                    }
                    as_seen
                }
            }
        }
    }
}
