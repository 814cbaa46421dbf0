//! Crash recovery: refunds chats and embeddings calls left pending by a process that died
//! between reservation and settlement, at start-up and then periodically. Every step is a conditional update,
//! so any number of processes may sweep one database at once.

use std::{sync::Arc, time::Duration};

use crate::{
    config::Config,
    db::{self, Db},
    domain::IdBatch,
    llm,
    services::ServiceResult,
    telemetry::{ChatOutcome, Metrics, TokenMove},
};

/// Beyond the model's time-out, how long a chat may take to reserve and settle before a
/// pending one is judged abandoned.
pub const SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// Chats or embeddings calls refunded per query, so one sweep never holds a long transaction.
const BATCH: i64 = 100;

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub refunded_chats: usize,
    /// Chats past their deadline whose refund failed this time (logged, each).
    pub unsettled_chats: usize,
    /// Embeddings calls refunded, and those whose refund failed this time.
    pub refunded_embeddings: usize,
    pub unsettled_embeddings: usize,
    pub forgotten_keys: u64,
    pub expired_tokens: u64,
}

/// How long this process's chats may stay pending before they count as abandoned: the
/// longest its call to the model may take, every target it may fall back to included, and
/// a margin. It is the deadline each records in its row, so every process judges a chat by
/// the limits of the one that reserved it.
pub fn abandoned_after(config: &Config) -> Duration {
    llm::longest_call(config, false) + SETTLE_MARGIN
}

/// The same for a streamed chat, which may take `LLM_STREAM_MAX_SECS` once it began.
pub fn stream_abandoned_after(config: &Config) -> Duration {
    llm::longest_call(config, true) + SETTLE_MARGIN
}

/// What a sweep needs, built once at start: the database, the time limits and the
/// idempotency key lifetime that say what is abandoned, and the metrics it counts into.
#[derive(Clone)]
pub struct Recovery {
    db: Db,
    config: Arc<Config>,
    metrics: Metrics,
}

impl Recovery {
    pub fn new(db: Db, config: Arc<Config>, metrics: Metrics) -> Self {
        Self {
            db,
            config,
            metrics,
        }
    }

    /// As of `now` (Unix seconds): refunds every chat pending past its deadline, forgets
    /// idempotency keys that expired or were abandoned before they reserved a chat, and
    /// deletes expired login tokens.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn sweep(&self, now: i64) -> ServiceResult<Sweep> {
        let db = &self.db;
        let abandoned_before = now - abandoned_after(&self.config).as_secs() as i64;
        let mut report = Sweep::default();
        // Chats whose refund failed stay pending and would be found again: the next batch
        // starts after the last chat this sweep looked at, so one chat that cannot be settled
        // holds back no other (issue 21).
        let mut batch = Some(IdBatch::first(BATCH));
        while let Some(this) = batch {
            let stale = db::chats::stale_pending(db, now, abandoned_before, this).await?;
            for &chat_id in &stale {
                // Another process may win the race for a chat; then this refund is a no-op.
                match db::chats::refund(db, chat_id).await {
                    Ok(true) => {
                        tracing::warn!(chat_id, "refunded a chat abandoned while pending");
                        report.refunded_chats += 1;
                        let cost = TokenMove::Refunded(self.config.chat_cost);
                        self.metrics.chat_ended(ChatOutcome::Refunded, cost);
                    }
                    Ok(false) => {}
                    Err(err) => {
                        tracing::error!(chat_id, error = %err, "could not refund an abandoned chat; the next sweep tries again");
                        report.unsettled_chats += 1;
                    }
                }
            }
            batch = this.next(&stale);
        }
        self.refund_stale_embeddings(now, &mut report).await?;
        let expired_before = now - self.config.idempotency_key_lifetime.as_secs() as i64;
        report.forgotten_keys =
            db::idempotency::sweep(db, expired_before, abandoned_before).await?;
        loop {
            let deleted = db::tokens::delete_expired(db, now, BATCH).await?;
            report.expired_tokens += deleted;
            if deleted < BATCH as u64 {
                break;
            }
        }
        Ok(report)
    }

    /// Refunds every embeddings call pending past its deadline, as chats are.
    async fn refund_stale_embeddings(&self, now: i64, report: &mut Sweep) -> ServiceResult<()> {
        let mut batch = Some(IdBatch::first(BATCH));
        while let Some(this) = batch {
            let stale = db::embeddings::stale_pending(&self.db, now, this).await?;
            for &embedding_id in &stale {
                match db::embeddings::refund(&self.db, embedding_id).await {
                    Ok(true) => {
                        tracing::warn!(
                            embedding_id,
                            "refunded an embeddings call abandoned while pending"
                        );
                        report.refunded_embeddings += 1;
                    }
                    Ok(false) => {}
                    Err(err) => {
                        tracing::error!(embedding_id, error = %err, "could not refund an abandoned embeddings call; the next sweep tries again");
                        report.unsettled_embeddings += 1;
                    }
                }
            }
            batch = this.next(&stale);
        }
        Ok(())
    }

    /// Sweeps now, then every quarter of `abandoned_after` (at least each second), forever.
    pub async fn run_periodically(self) {
        let abandoned_after = abandoned_after(&self.config);
        let period = (abandoned_after / 4).max(Duration::from_secs(1));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match self.sweep(db::unix_now()).await {
                Ok(report) if report != Sweep::default() => {
                    tracing::info!(?report, "recovery sweep")
                }
                Ok(_) => {}
                Err(err) => tracing::error!(error = %err, "recovery sweep failed"),
            }
        }
    }
}
