//! Queries on `chats` and the balance moves that go with them: reserve, settle, refund.
//!
//! Each move is one conditional statement, so it is atomic and safe to race across tasks
//! and processes: the balance never goes below zero and a chat is settled or refunded at
//! most once. The ledger rows (and so the balance) move with the chat, written by the
//! triggers `chat_reserves_its_cost`, `failed_chat_is_refunded` and
//! `settled_chat_returns_the_rest` in the same statement.
//!
//! A settlement stores the answer only in a chat whose conversation was not deleted while
//! it was being answered (`erased_at`): what a deletion erased stays erased.

mod reserve;

use super::{
    db_execute, db_page, db_read, db_run,
    ledger::{self, returning_settling, Settling},
    unix_now, Db,
};
use crate::domain::{ChatStatus, IdBatch, PageRequest};

pub use reserve::{reserve, NewChat, PriceSnapshot, Reservation};

/// A stored chat.
#[derive(Debug, sqlx::FromRow)]
pub struct Chat {
    pub id: i64,
    pub message: String,
    pub response: Option<String>,
    pub status: ChatStatus,
    pub cost: i64,
    pub refunded: bool,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    /// `None` only for chats from before conversations, or erased with theirs.
    pub conversation_id: Option<i64>,
    /// The answer's tool calls, the JSON array the model gave (or a stream's, assembled).
    pub tool_calls: Option<String>,
    /// Of the prompt tokens, those the model read from its cache.
    pub cached_tokens: Option<i64>,
    /// The upstream that answered (its name in the configuration).
    pub upstream: Option<String>,
    /// How many targets the call tried to get its answer.
    pub attempts: Option<i64>,
}

/// The columns of [`Chat`], for `concat!` into its queries.
macro_rules! chat_columns {
    () => {
        "id, message, response, status, cost, refunded, created_at, finished_at, \
         prompt_tokens, completion_tokens, conversation_id, tool_calls, cached_tokens, \
         upstream, attempts"
    };
}

/// The usage stored with a chat: as the model reported it, or as tokenchat counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    /// Of the prompt tokens, those the model read from its cache.
    pub cached_tokens: Option<i64>,
    /// Where the usage came from; `None` for a flat chat's (kept as reported, if at all).
    pub source: Option<UsageSource>,
}

/// Where a priced chat's usage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum UsageSource {
    /// The model reported it.
    Model,
    /// The model reported none (or the chat ended before it could): tokenchat counted it.
    Counted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What a chat keeps of its answer, whole or as far as it got: the first choice's text, its
/// tool calls, the usage, and what it is charged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answer<'a> {
    pub text: &'a str,
    /// The JSON array of the tool calls.
    pub tool_calls: Option<&'a str>,
    pub usage: TokenUsage,
    /// What a priced chat is charged, never above its reservation (a higher figure keeps
    /// the reservation); `None` keeps the reservation as the charge (a flat chat's).
    pub charge: Option<i64>,
    /// The upstream that answered, and how many targets the call tried.
    pub upstream: Option<&'a str>,
    pub attempts: Option<i64>,
}

/// A settled answer: the balance its settlement left and what it was charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub balance_after: i64,
    pub charged: i64,
}

/// How a chat that got no whole answer is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The model failed or the chat was cut short: refunded.
    Failed,
    /// A stream whose client went away; `refund` or keep the charge.
    Abandoned { refund: bool },
}

/// An answered chat as its first response reported it.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredAnswer {
    pub chat_id: i64,
    pub response: String,
    pub cost: i64,
    pub balance_after: i64,
    pub conversation_id: Option<i64>,
    pub tool_calls: Option<String>,
}

/// Binds what both settling statements number last, in their order: the usage, the tool
/// calls, the charge (`$charge`) and the upstream that answered, from the [`Answer`].
macro_rules! bind_outcome {
    ($query:expr, $answer:expr, $charge:expr) => {
        $query
            .bind($answer.usage.prompt_tokens)
            .bind($answer.usage.completion_tokens)
            .bind($answer.tool_calls)
            .bind($answer.usage.cached_tokens)
            .bind($answer.usage.source.map(UsageSource::as_str))
            .bind($charge)
            .bind($answer.upstream)
            .bind($answer.attempts)
    };
}

/// Stores the answer of a pending chat, charging `answer.charge` (a held reservation: a
/// `chat_charge` row; one from before holds: the rest goes back, a `chat_settlement` row) or
/// keeping the reservation. Returns the
/// balance the settlement left and the charge, or `None` if the chat was no longer pending
/// (recovery refunded it first).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn settle_answered(
    db: &Db,
    chat_id: i64,
    answer: Answer<'_>,
) -> Result<Option<Settled>, sqlx::Error> {
    if answer.charge.is_none() {
        return settle_answered_flat(db, chat_id, answer).await;
    }
    let settled: Option<Settling> = db_run!(db, pool => bind_outcome!(sqlx::query_as(concat!(
        "UPDATE chats SET status = 'answered', response = CASE WHEN erased_at IS NULL THEN $1 END,
                          finished_at = $2, prompt_tokens = $4, completion_tokens = $5,
                          tool_calls = CASE WHEN erased_at IS NULL THEN $6 END,
                          cached_tokens = $7, usage_source = $8,
                          cost = CASE WHEN $9 < cost THEN $9 ELSE cost END,
                          upstream = $10, attempts = $11
         WHERE id = $3 AND status = 'pending'",
        returning_settling!("chats", "chat_id", "chat_reservation"),
    ))
    .bind(answer.text)
    .bind(unix_now())
    .bind(chat_id), answer, answer.charge)
    .fetch_optional(pool)
    .await)?;
    let Some(settling) = settled else {
        return Ok(None);
    };
    let balance_after =
        ledger::balance_after_settling(db, settling, ledger::Settled::Chat(chat_id)).await;
    Ok(Some(Settled {
        balance_after,
        charged: settling.0,
    }))
}

/// [`settle_answered`] for a flat chat, which keeps its reservation: the statement of before
/// prices, no price columns written (BENCHMARKS.md).
async fn settle_answered_flat(
    db: &Db,
    chat_id: i64,
    answer: Answer<'_>,
) -> Result<Option<Settled>, sqlx::Error> {
    let settled: Option<(i64, i64)> = db_run!(db, pool => sqlx::query_as(
        "UPDATE chats SET status = 'answered', response = CASE WHEN erased_at IS NULL THEN $1 END,
                          finished_at = $2, prompt_tokens = $4, completion_tokens = $5,
                          tool_calls = CASE WHEN erased_at IS NULL THEN $6 END,
                          upstream = $7, attempts = $8
         WHERE id = $3 AND status = 'pending'
         RETURNING cost, (SELECT balance_after FROM ledger
                          WHERE ledger.chat_id = chats.id AND reason = 'chat_reservation')",
    )
    .bind(answer.text)
    .bind(unix_now())
    .bind(chat_id)
    .bind(answer.usage.prompt_tokens)
    .bind(answer.usage.completion_tokens)
    .bind(answer.tool_calls)
    .bind(answer.upstream)
    .bind(answer.attempts)
    .fetch_optional(pool)
    .await)?;
    Ok(settled.map(|(charged, balance_after)| Settled {
        balance_after,
        charged,
    }))
}

/// Marks a pending chat failed, which refunds its reservation and releases its
/// idempotency key; `false`, changing nothing, when the chat was not pending.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn refund(db: &Db, chat_id: i64) -> Result<bool, sqlx::Error> {
    settle_unanswered(db, chat_id, Unanswered::Failed, Answer::default()).await
}

/// Settles a pending chat that got no whole answer, keeping what it got (`partial`; its
/// response is null when it got no text): failed (refunded, by the trigger
/// `failed_chat_is_refunded`) or abandoned (refunded or charged). `false`, changing
/// nothing, when the chat was not pending.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn settle_unanswered(
    db: &Db,
    chat_id: i64,
    how: Unanswered,
    partial: Answer<'_>,
) -> Result<bool, sqlx::Error> {
    let (status, refunded) = match how {
        Unanswered::Failed => (ChatStatus::Failed, true),
        Unanswered::Abandoned { refund } => (ChatStatus::Abandoned, refund),
    };
    let text = (!partial.text.is_empty()).then_some(partial.text);
    // Only a kept charge is settled below the reservation; a refund gives it all back.
    let charge = partial.charge.filter(|_| !refunded);
    let settled = db_execute!(
        db,
        bind_outcome!(
            sqlx::query(
                "UPDATE chats SET status = $1, refunded = $2,
                          response = CASE WHEN erased_at IS NULL THEN $3 END, finished_at = $4,
                          prompt_tokens = $6, completion_tokens = $7,
                          tool_calls = CASE WHEN erased_at IS NULL THEN $8 END,
                          cached_tokens = $9, usage_source = $10,
                          cost = CASE WHEN $11 < cost THEN $11 ELSE cost END,
                          upstream = $12, attempts = $13
         WHERE id = $5 AND status = 'pending'",
            )
            .bind(status)
            .bind(refunded)
            .bind(text)
            .bind(unix_now())
            .bind(chat_id),
            partial,
            charge
        )
    )?;
    Ok(settled == 1)
}

/// The `batch` of ids of chats still pending past their deadline at `now`. A chat from
/// before deadlines were recorded is past it once created before `legacy_created_before`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn stale_pending(
    db: &Db,
    now: i64,
    legacy_created_before: i64,
    batch: IdBatch,
) -> Result<Vec<i64>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_scalar(
        "SELECT id FROM chats
         WHERE status = 'pending' AND id > $3
           AND (deadline_at < $1 OR (deadline_at IS NULL AND created_at < $2))
         ORDER BY id LIMIT $4",
    )
    .bind(now)
    .bind(legacy_created_before)
    .bind(batch.after)
    .bind(batch.limit)
    .fetch_all(pool)
    .await)
}

/// One of the user's chats; `None` for a chat of someone else's.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn find(db: &Db, user_id: i64, chat_id: i64) -> Result<Option<Chat>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(concat!(
        "SELECT ", chat_columns!(), " FROM chats
         WHERE id = $1 AND user_id = $2 AND erased_at IS NULL"
    ))
    .bind(chat_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await)
}

/// The user's chats below `page.before`, newest first, at most `page.limit`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn page(db: &Db, user_id: i64, page: PageRequest) -> Result<Vec<Chat>, sqlx::Error> {
    db_page!(db, user_id, page => concat!(
        "SELECT ", chat_columns!(), " FROM chats
         WHERE user_id = $1 AND erased_at IS NULL AND id < $2
         ORDER BY id DESC LIMIT $3"
    ))
}

/// A charged chat (answered, or an abandoned stream that kept its charge, with the text it
/// got) with the balance its charge left, as its first response reported: its last ledger
/// row's (the reservation a flat chat keeps, a held chat's charge, or the settlement of a
/// chat reserved in the ledger).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn stored_answer(db: &Db, chat_id: i64) -> Result<Option<StoredAnswer>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT c.id AS chat_id, COALESCE(c.response, '') AS response, c.cost,
                l.balance_after, c.conversation_id, c.tool_calls
         FROM chats c JOIN ledger l ON l.id = (SELECT MAX(m.id) FROM ledger m
                                               WHERE m.chat_id = c.id)
         WHERE c.id = $1
           AND (c.status = 'answered' OR (c.status = 'abandoned' AND NOT c.refunded))",
    )
    .bind(chat_id)
    .fetch_optional(pool)
    .await)
}
