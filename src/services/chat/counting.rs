//! What a chat's ending counts: its metrics (charged, refunded, the model's answer or
//! failure, an overrun) and its model tokens in the rates that limit them.

use std::time::Instant;

use super::{metering::Metering, metering::Settlement, ChatInFlight};
use crate::{
    db,
    llm::LlmError,
    services::ServiceError,
    telemetry::{ChatOutcome, TokenMove},
};

impl ChatInFlight {
    /// Counts a chat that ended as `outcome`, charged `charged` of what `metering` reserved.
    pub(super) fn count_charged(&self, outcome: ChatOutcome, charged: i64, metering: &Metering) {
        let returned = metering.reserved() - charged;
        let tokens = if returned > 0 {
            TokenMove::Settled { charged, returned }
        } else {
            TokenMove::Charged(charged)
        };
        self.chats.metrics.chat_ended(outcome, tokens);
    }

    pub(super) fn count_answered(&self, charged: i64, metering: &Metering) {
        self.count_charged(ChatOutcome::Answered, charged, metering);
    }

    /// Counts the model tokens a settled answer used (see `metering::used`) in its key's
    /// and user's tokens a minute, in a tracked task of its own: the answer does not wait
    /// for it.
    pub(super) fn count_model_tokens(&self, usage: &db::chats::TokenUsage) {
        // A broken upstream's counts may be negative or near i64::MAX.
        let count = |tokens: Option<i64>| tokens.unwrap_or(0).max(0);
        let tokens = count(usage.prompt_tokens).saturating_add(count(usage.completion_tokens));
        let chats = &self.chats;
        let now_ms = chats.config.clock.now_ms();
        (self.token_meters).count_in_background(&chats.in_flight.tasks, &chats.db, tokens, now_ms);
    }

    /// A priced model whose usage cost more than was reserved: charged the reservation,
    /// and the overrun counted and logged.
    pub(super) fn count_overrun(&self, chat_id: i64, settlement: &Settlement) {
        if settlement.overrun {
            let usage = &settlement.usage;
            tracing::warn!(
                chat_id,
                prompt_tokens = usage.prompt_tokens,
                completion_tokens = usage.completion_tokens,
                "the model used more than its cap allowed: charged the reservation"
            );
            self.chats.metrics.usage_overrun();
        }
    }

    /// Counts a reserved chat that ended in `failure`, refunded.
    pub(super) fn count_failed(&self, failure: &ServiceError, metering: &Metering) {
        // Recovery refunded it first, and counted it then.
        if let ServiceError::ChatExpired = failure {
            return;
        }
        let outcome = failure_outcome(failure);
        let reserved = metering.reserved();
        self.chats
            .metrics
            .chat_ended(outcome, TokenMove::Refunded(reserved));
    }

    /// Counts one answer of the model asked at `asked`, or its failure.
    pub(super) fn count_upstream(
        &self,
        streamed: bool,
        asked: Instant,
        failure: Option<&ServiceError>,
    ) {
        let kind = match failure {
            Some(ServiceError::Model(err)) => Some(err.kind()),
            _ => None,
        };
        self.chats.metrics.upstream(streamed, asked.elapsed(), kind);
    }
}

/// How a chat that ended in `failure` is counted.
pub(super) fn failure_outcome(failure: &ServiceError) -> ChatOutcome {
    match failure {
        ServiceError::Model(LlmError::Timeout) => ChatOutcome::UpstreamTimeout,
        ServiceError::Model(_) => ChatOutcome::UpstreamError,
        ServiceError::ClientGone => ChatOutcome::Abandoned,
        _ => ChatOutcome::Refunded,
    }
}
