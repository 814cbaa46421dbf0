//! Crash recovery: refunds chats left pending by a process that died between reservation
//! and settlement, at start-up and then periodically. Every step is a conditional update,
//! so any number of processes may sweep one database at once.

use std::time::Duration;

use crate::{db, error::Error, services::billing::IDEMPOTENCY_KEY_LIFETIME, AppState};

/// Beyond the model's time-out, how long a chat may take to reserve and settle before a
/// pending one is judged abandoned.
pub const SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// Chats refunded per query, so one sweep never holds a long transaction.
const BATCH: i64 = 100;

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub refunded_chats: usize,
    pub forgotten_keys: u64,
}

/// How old a pending chat must be to be judged abandoned.
pub fn abandoned_after(state: &AppState) -> Duration {
    state.config.llm_timeout + SETTLE_MARGIN
}

/// Refunds every chat pending for longer than `abandoned_after`, and forgets idempotency
/// keys that expired or were abandoned before they reserved a chat.
pub async fn sweep(state: &AppState, abandoned_after: Duration) -> Result<Sweep, Error> {
    let db = &state.db;
    let now = db::unix_now();
    let abandoned_before = now - abandoned_after.as_secs() as i64;
    let mut report = Sweep::default();
    loop {
        let stale = db::chats::stale_pending(db, abandoned_before, BATCH).await?;
        for &chat_id in &stale {
            // Another process may win the race for a chat; then this refund is a no-op.
            if db::chats::refund(db, chat_id).await? {
                tracing::warn!(chat_id, "refunded a chat abandoned while pending");
                report.refunded_chats += 1;
            }
        }
        if (stale.len() as i64) < BATCH {
            break;
        }
    }
    let expired_before = now - IDEMPOTENCY_KEY_LIFETIME.as_secs() as i64;
    report.forgotten_keys = db::idempotency::sweep(db, expired_before, abandoned_before).await?;
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
        match sweep(&state, abandoned_after).await {
            Ok(report) if report != Sweep::default() => tracing::info!(?report, "recovery sweep"),
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "recovery sweep failed"),
        }
    }
}
