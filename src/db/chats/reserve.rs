//! Reserving a chat: the one statement that records it pending and takes its cost (a
//! `chat_reservation` ledger row) or, priced, holds it, chosen by whether the chat is
//! priced and counts against a budget.

use std::time::Duration;

use crate::{
    db::{budgets, unix_now, users, Db},
    domain::{BudgetOwner, Budgets},
    pricing::Prices,
};

/// The outcome of trying to reserve the price of a chat.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The price was taken and a pending chat recorded, in this conversation.
    Reserved { chat_id: i64, conversation_id: i64 },
    /// The balance was below the price; nothing changed.
    Insufficient { balance: i64 },
    /// The price would pass the budget of its key or its user; nothing changed.
    BudgetExceeded(BudgetOwner),
}

/// What a priced chat records when it is reserved: its model, the prices it will be
/// charged at (a snapshot: a later price change rewrites no history) and the output cap
/// sent upstream.
#[derive(Debug, Clone, Copy)]
pub struct PriceSnapshot<'a> {
    pub model: &'a str,
    pub prices: Prices,
    pub output_cap: u64,
}

/// A chat to reserve: whose, in which conversation, its message, what it reserves (a priced
/// chat's prices with it), the key's and the user's budgets it counts against, and how long
/// it may stay pending before recovery (in any process) judges it abandoned.
#[derive(Debug, Clone, Copy)]
pub struct NewChat<'a> {
    pub user_id: i64,
    pub conversation_id: Option<i64>,
    pub message: &'a str,
    pub cost: i64,
    pub priced: Option<PriceSnapshot<'a>>,
    pub budgets: Budgets,
    pub settle_within: Duration,
}

/// Records the chat as pending, in `conversation_id` (one of the user's, checked before) or
/// a new conversation started by the database (the trigger `chat_starts_a_conversation`),
/// if the user's balance (less what their priced calls in flight hold) covers `cost`, which
/// takes the cost (a `chat_reservation` ledger row); otherwise changes nothing. A priced
/// chat records its prices (`priced`), `cost` is the most it can cost, and it holds it
/// (`users.held`) instead of writing a ledger row.
/// `settle_within` is how long the chat may stay pending before recovery (in any
/// process) judges it abandoned.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn reserve(db: &Db, chat: NewChat<'_>) -> Result<Reservation, sqlx::Error> {
    let NewChat {
        user_id,
        conversation_id,
        message,
        cost,
        priced,
        budgets,
        settle_within,
    } = chat;
    let now = unix_now();
    let budget = budgets::BudgetColumns::of(budgets);
    let deadline_at = now.saturating_add_unsigned(settle_within.as_secs());
    // A flat chat writes none of the price columns (`reserved` NULL means its cost): the
    // statement of before prices, which costs the hot path nothing more (BENCHMARKS.md).
    let budgeted = budgets != Budgets::default();
    let sql = match priced {
        Some(_) if budgeted => by_backend!(db, priced_chat!("$13", "$14", "$16")),
        Some(_) => by_backend!(db, priced_chat!()),
        // A budget: the key and the periods recorded, which the triggers
        // `chat_counts_against_its_{key,user}_budget` count, refusing the insert past one.
        None if budgeted => by_backend!(db, budgeted_chat!("$7", "$8", "$10")),
        None => by_backend!(db, flat_chat!()),
    };
    let chat_id: Result<Option<i64>, _> = reserved_id!(db, sql, |query| {
        let query = query
            .bind(user_id)
            .bind(message)
            .bind(cost)
            .bind(now)
            .bind(deadline_at)
            .bind(conversation_id);
        let query = match priced {
            Some(priced) => query
                .bind(priced.model)
                .bind(priced.output_cap as i64)
                .bind(priced.prices.prompt as i64)
                .bind(priced.prices.cached_prompt as i64)
                .bind(priced.prices.completion as i64)
                .bind(priced.prices.request as i64),
            None => query,
        };
        // With a budget, the budget columns.
        if budgeted {
            query
                .bind(budget.key)
                .bind(budget.key_period)
                .bind(budget.user_tokens)
                .bind(budget.user_period)
        } else {
            query
        }
    });
    let chat_id = match chat_id {
        Ok(chat_id) => chat_id,
        Err(sqlx::Error::Database(err)) => match budgets::budget_exceeded(err.as_ref()) {
            Some(owner) => return Ok(Reservation::BudgetExceeded(owner)),
            None => return Err(sqlx::Error::Database(err)),
        },
        Err(err) => return Err(err),
    };
    Ok(match chat_id {
        Some(chat_id) => Reservation::Reserved {
            chat_id,
            // A chat without a conversation started one under its own id.
            conversation_id: conversation_id.unwrap_or(chat_id),
        },
        None => Reservation::Insufficient {
            balance: users::balance(db, user_id).await?,
        },
    })
}

/// A flat chat's reservation without budgets: the statement of before prices, its row as
/// `$row` (`budgets::sqlite_row!` or `postgres_row!`) writes it, `cost` first.
macro_rules! flat_chat {
    ($row:ident) => {
        concat!(
            "INSERT INTO chats (cost, user_id, message, status, created_at, deadline_at,
                                conversation_id) ",
            $row!("$1, $2, 'pending', $4, $5, $6")
        )
    };
}
use flat_chat;

/// A flat chat's reservation with a budget: the key's period and the user's as given.
macro_rules! budgeted_chat {
    ($row:ident, $key_period:expr, $user_period:expr) => {
        concat!(
            "INSERT INTO chats (cost, user_id, message, status, created_at, deadline_at,
                                conversation_id, api_key_id, budget_period_start,
                                user_budget_tokens, user_budget_period_start) ",
            $row!(concat!(
                "$1, $2, 'pending', $4, $5, $6, $7, ",
                $key_period,
                ", $9, ",
                $user_period
            ))
        )
    };
}
use budgeted_chat;

/// A priced chat's reservation, with a budget: the key's period and the user's as given
/// (without one, none of the budget columns: the period look-ups cost every chat a seek).
/// Its reservation is held (`held`: the trigger `chat_holds_its_reservation` adds it to
/// `users.held`), and settling it writes its one ledger row, the charge.
macro_rules! priced_chat {
    ($row:ident) => {
        concat!(
            "INSERT INTO chats (cost, reserved, user_id, message, status, created_at,
                                deadline_at, conversation_id, model, output_cap, price_prompt,
                                price_cached_prompt, price_completion, price_request, held) ",
            $row!("$3, $1, $2, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, TRUE")
        )
    };
    ($row:ident, $key_period:expr, $user_period:expr) => {
        concat!(
            "INSERT INTO chats (cost, reserved, user_id, message, status, created_at,
                                deadline_at, conversation_id, model, output_cap, price_prompt,
                                price_cached_prompt, price_completion, price_request,
                                api_key_id, budget_period_start, user_budget_tokens,
                                user_budget_period_start, held) ",
            $row!(concat!(
                "$3, $1, $2, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, ",
                $key_period,
                ", $15, ",
                $user_period,
                ", TRUE"
            ))
        )
    };
}
use priced_chat;
