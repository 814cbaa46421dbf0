//! Crash recovery: refunds chats left pending by a process that died between reservation
//! and settlement, at start-up and then periodically. Every step is a conditional update,
//! so any number of processes may sweep one database at once.

use std::time::Duration;

use crate::{
    db,
    services::ServiceResult,
    telemetry::{ChatOutcome, TokenMove},
    AppState,
};

/// Beyond the model's time-out, how long a chat may take to reserve and settle before a
/// pending one is judged abandoned.
pub const SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// Chats refunded per query, so one sweep never holds a long transaction.
const BATCH: i64 = 100;

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub refunded_chats: usize,
    /// Chats past their deadline whose refund failed this time (logged, each).
    pub unsettled_chats: usize,
    pub forgotten_keys: u64,
    pub expired_tokens: u64,
}

/// How long this process's chats may stay pending before they count as abandoned: the
/// deadline each records in its row, so every process judges a chat by its own limit.
pub fn abandoned_after(state: &AppState) -> Duration {
    state.config.llm_timeout + SETTLE_MARGIN
}

/// The same for a streamed chat, which may take `LLM_STREAM_MAX_SECS` once it began.
pub fn stream_abandoned_after(state: &AppState) -> Duration {
    state.config.llm_timeout.max(state.config.llm_stream_max) + SETTLE_MARGIN
}

/// As of `now` (Unix seconds): refunds every chat pending past its deadline, forgets
/// idempotency keys that expired or were abandoned before they reserved a chat, and
/// deletes expired login tokens.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn sweep(state: &AppState, now: i64) -> ServiceResult<Sweep> {
    let db = &state.db;
    let abandoned_before = now - abandoned_after(state).as_secs() as i64;
    let mut report = Sweep::default();
    // Chats whose refund failed stay pending and would be found again: the next batch
    // starts after the last chat this sweep looked at, so one chat that cannot be settled
    // holds back no other (issue 21).
    let mut after = 0;
    loop {
        let stale = db::chats::stale_pending(db, now, abandoned_before, after, BATCH).await?;
        for &chat_id in &stale {
            // Another process may win the race for a chat; then this refund is a no-op.
            match db::chats::refund(db, chat_id).await {
                Ok(true) => {
                    tracing::warn!(chat_id, "refunded a chat abandoned while pending");
                    report.refunded_chats += 1;
                    let cost = TokenMove::Refunded(state.config.chat_cost);
                    state.metrics.chat_ended(ChatOutcome::Refunded, cost);
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::error!(chat_id, error = %err, "could not refund an abandoned chat; the next sweep tries again");
                    report.unsettled_chats += 1;
                }
            }
        }
        match stale.last() {
            Some(&last) if (stale.len() as i64) == BATCH => after = last,
            _ => break,
        }
    }
    let expired_before = now - state.config.idempotency_key_lifetime.as_secs() as i64;
    report.forgotten_keys = db::idempotency::sweep(db, expired_before, abandoned_before).await?;
    loop {
        let deleted = db::tokens::delete_expired(db, now, BATCH).await?;
        report.expired_tokens += deleted;
        if deleted < BATCH as u64 {
            break;
        }
    }
    Ok(report)
}

/// Sweeps now, then every quarter of `abandoned_after` (at least each second), forever.
pub async fn run_periodically(state: AppState) {
    let abandoned_after = abandoned_after(&state);
    let period = (abandoned_after / 4).max(Duration::from_secs(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match sweep(&state, db::unix_now()).await {
            Ok(report) if report != Sweep::default() => tracing::info!(?report, "recovery sweep"),
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "recovery sweep failed"),
        }
    }
}
