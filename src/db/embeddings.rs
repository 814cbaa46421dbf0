//! Queries on `embeddings` and the balance moves that go with them, as for chats: each is
//! reserved when created (the trigger `embedding_reserves_its_cost` writes its `embedding`
//! ledger row; a priced call's is held instead), then answered, keeping the charge, or
//! failed, refunded by the trigger `failed_embedding_is_refunded` (a held call's hold let
//! go of); each move one conditional statement.

use std::time::Duration;

use super::{
    chats::UsageSource,
    db_execute, db_read, db_run,
    ledger::{self, returning_settling, Settling},
    unix_now, users, Db,
};
use crate::{
    domain::{BudgetOwner, Budgets, IdBatch},
    llm::EmbeddingUsage,
    pricing::Prices,
};

/// An embeddings call's reservation: the key's period and the user's as given
/// (`budgets::by_backend!`).
macro_rules! embedding {
    ($row:ident, $key_period:expr, $user_period:expr) => {
        concat!(
            "INSERT INTO embeddings (cost, reserved, user_id, model, status, created_at,
                                     deadline_at, price_prompt, price_request, api_key_id,
                                     budget_period_start, user_budget_tokens,
                                     user_budget_period_start, held) ",
            $row!(concat!(
                "$3, $1, $2, 'pending', $4, $5, $6, $7, $8, ",
                $key_period,
                ", $10, ",
                $user_period,
                ", $12"
            ))
        )
    };
}

/// The outcome of trying to reserve the price of an embeddings call.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    Reserved {
        embedding_id: i64,
    },
    /// The balance was below the price; nothing changed.
    Insufficient {
        balance: i64,
    },
    /// The price would pass the budget of its key or its user; nothing changed.
    BudgetExceeded(BudgetOwner),
}

/// Records the call as pending for `model` if the user's balance covers `cost`, which takes
/// the cost; otherwise changes nothing. A priced call records its `prices`, `cost` is the
/// most it can cost, and it holds it (`users.held`) instead of writing a ledger row.
/// `settle_within` is how long it may stay pending before recovery judges it abandoned.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn reserve(
    db: &Db,
    user_id: i64,
    model: &str,
    cost: i64,
    prices: Option<Prices>,
    budgets: Budgets,
    settle_within: Duration,
) -> Result<Reservation, sqlx::Error> {
    let budget = super::budgets::BudgetColumns::of(budgets);
    let now = unix_now();
    let deadline_at = now.saturating_add_unsigned(settle_within.as_secs());
    // With a budget, the triggers `embedding_counts_against_its_{key,user}_budget` count it.
    let id: Result<Option<i64>, _> = reserved_id!(
        db,
        by_backend!(db, embedding!("$8", "$9", "$11")),
        |query| query
            .bind(user_id)
            .bind(model)
            .bind(cost)
            .bind(now)
            .bind(deadline_at)
            .bind(prices.map(|prices| prices.prompt as i64))
            .bind(prices.map(|prices| prices.request as i64))
            .bind(budget.key)
            .bind(budget.key_period)
            .bind(budget.user_tokens)
            .bind(budget.user_period)
            .bind(prices.is_some())
    );
    let id = match id {
        Ok(id) => id,
        Err(sqlx::Error::Database(err)) => match super::budgets::budget_exceeded(err.as_ref()) {
            Some(owner) => return Ok(Reservation::BudgetExceeded(owner)),
            None => return Err(sqlx::Error::Database(err)),
        },
        Err(err) => return Err(err),
    };
    Ok(match id {
        Some(embedding_id) => Reservation::Reserved { embedding_id },
        None => Reservation::Insufficient {
            balance: users::balance(db, user_id).await?,
        },
    })
}

/// Marks a pending call answered with its usage, charging `charge` (an `embedding_charge`
/// row; for a call reserved in the ledger before holds, the rest goes back, an
/// `embedding_settlement` row) or, when `None`, keeping the reservation. Returns the
/// balance the settlement left and the charge, or `None` if it was no longer pending
/// (recovery refunded it first).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn settle_answered(
    db: &Db,
    embedding_id: i64,
    usage: Option<EmbeddingUsage>,
    source: Option<UsageSource>,
    charge: Option<i64>,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    let settled: Option<Settling> = db_run!(db, pool => sqlx::query_as(concat!(
        "UPDATE embeddings SET status = 'answered', finished_at = $2, prompt_tokens = $3,
                               total_tokens = $4, usage_source = $5,
                               cost = CASE WHEN $6 < cost THEN $6 ELSE cost END
         WHERE id = $1 AND status = 'pending'",
        returning_settling!("embeddings", "embedding_id", "embedding"),
    ))
    .bind(embedding_id)
    .bind(unix_now())
    .bind(usage.map(|usage| usage.prompt_tokens))
    .bind(usage.map(|usage| usage.total_tokens))
    .bind(source.map(UsageSource::as_str))
    .bind(charge)
    .fetch_optional(pool)
    .await)?;
    let Some(settling) = settled else {
        return Ok(None);
    };
    let settled = ledger::Settled::Embedding(embedding_id);
    let balance_after = ledger::balance_after_settling(db, settling, settled).await;
    Ok(Some((balance_after, settling.0)))
}

/// Marks a pending call failed, which refunds its reservation; `false`, changing nothing,
/// when it was not pending.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn refund(db: &Db, embedding_id: i64) -> Result<bool, sqlx::Error> {
    let refunded = db_execute!(
        db,
        sqlx::query(
            "UPDATE embeddings SET status = 'failed', finished_at = $2
             WHERE id = $1 AND status = 'pending'",
        )
        .bind(embedding_id)
        .bind(unix_now())
    )?;
    Ok(refunded == 1)
}

/// The `batch` of ids of calls still pending past their deadline at `now`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn stale_pending(db: &Db, now: i64, batch: IdBatch) -> Result<Vec<i64>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_scalar(
        "SELECT id FROM embeddings
         WHERE status = 'pending' AND id > $2 AND deadline_at < $1
         ORDER BY id LIMIT $3",
    )
    .bind(now)
    .bind(batch.after)
    .bind(batch.limit)
    .fetch_all(pool)
    .await)
}
