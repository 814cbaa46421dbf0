//! An embeddings call (`/v1/embeddings`), metered like a chat: its price (`EMBEDDING_COST`)
//! reserved first, the model asked with no transaction open, then the charge kept for an
//! answer or refunded when there is none (the model failed, the client went away, the
//! shutdown's grace ran out), in a tracked task, so it settles whatever becomes of the
//! request and shutdown waits for it.

use std::sync::Arc;

use axum::body::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Chats;
use crate::{
    db::{self, chats::UsageSource, embeddings::Reservation},
    domain::Budgets,
    llm::{EmbeddingUsage, Forwarded},
    pricing::TokenCounts,
    services::{limits::TokenMeters, ServiceError, ServiceResult},
};

/// An answered, charged embeddings call.
#[derive(Debug)]
pub struct Embedded {
    /// The answer as the model sent it.
    pub body: Bytes,
    /// The balance right after the charge.
    pub balance: i64,
    pub charged: i64,
    pub usage: Option<EmbeddingUsage>,
}

/// Makes the embeddings of an OpenAI client's `request` for `user_id`, charging
/// `EMBEDDING_COST` only when they are ready. Counts against the user's chat rate.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn embed(
    chats: &Arc<Chats>,
    user_id: i64,
    request: Forwarded,
    budgets: Budgets,
    token_meters: TokenMeters,
) -> ServiceResult<Embedded> {
    chats.throttle.chat(user_id).await?;
    let client_gone = CancellationToken::new();
    let _cancel_when_dropped = client_gone.clone().drop_guard();
    let limits = (budgets, token_meters);
    let call = run(chats.clone(), user_id, request, limits, client_gone);
    chats.in_flight.tasks.spawn(call.in_current_span()).await?
}

async fn run(
    chats: Arc<Chats>,
    user_id: i64,
    request: Forwarded,
    // The budgets it counts against and the rates its model tokens are counted in.
    (budgets, token_meters): (Budgets, TokenMeters),
    client_gone: CancellationToken,
) -> ServiceResult<Embedded> {
    // Priced by its prompt, bounded by the request's bytes (each token at least one byte).
    let pricing = chats.config.price_book.model(&request.model).copied();
    let prompt_bound = request.body_bytes;
    let cost = match &pricing {
        None => chats.config.embedding_cost,
        Some(pricing) => pricing
            .prices
            .reservation(prompt_bound, 0)
            .unwrap_or(i64::MAX),
    };
    let (settle_within, _) = chats.settle_within;
    let prices = pricing.map(|pricing| pricing.prices);
    let reserved = db::embeddings::reserve(
        &chats.db,
        user_id,
        &request.model,
        cost,
        prices,
        budgets,
        settle_within,
    );
    let embedding_id = match reserved.await? {
        Reservation::Reserved { embedding_id } => embedding_id,
        Reservation::Insufficient { balance } => {
            return Err(ServiceError::OutOfTokens {
                balance,
                required: cost,
            })
        }
        Reservation::BudgetExceeded(owner) => {
            return Err(ServiceError::BudgetExceeded {
                owner,
                resets_at: budgets.resets_at(owner),
            })
        }
    };
    let answer = tokio::select! {
        biased;
        _ = client_gone.cancelled() => Err(ServiceError::ClientGone),
        _ = chats.in_flight.cut_short.cancelled() => Err(ServiceError::ShuttingDown),
        answer = chats.llm.embed(request) => answer.map_err(ServiceError::from),
    };
    let failure = match answer {
        Ok(embedding) if !client_gone.is_cancelled() => {
            let mut usage = embedding.usage;
            let (source, charge) = match prices {
                None => (None, None),
                Some(prices) => {
                    let (source, prompt) = match embedding.usage {
                        Some(usage) => (
                            UsageSource::Model,
                            u64::try_from(usage.prompt_tokens).unwrap_or(0),
                        ),
                        None => (UsageSource::Counted, prompt_bound),
                    };
                    // What it is charged for is what it keeps.
                    usage = Some(EmbeddingUsage {
                        prompt_tokens: prompt as i64,
                        total_tokens: embedding
                            .usage
                            .map_or(prompt as i64, |usage| usage.total_tokens),
                    });
                    let used = TokenCounts {
                        prompt,
                        ..TokenCounts::default()
                    };
                    let charge = prices.charge(used).unwrap_or(i64::MAX);
                    if charge > cost {
                        tracing::warn!(
                            embedding_id,
                            prompt,
                            "the model reported more than was reserved: charged the reservation"
                        );
                        chats.metrics.usage_overrun();
                    }
                    (Some(source), Some(charge.min(cost)))
                }
            };
            let settled =
                db::embeddings::settle_answered(&chats.db, embedding_id, usage, source, charge);
            match settled.await {
                Ok(Some((balance, charged))) => {
                    chats.alerts.charged(user_id, budgets.key_id());
                    // The tokens a minute count what the model reported, never the bound
                    // a priced call was charged by when it reported nothing.
                    let tokens = embedding.usage.map_or(0, |usage| usage.total_tokens);
                    let now_ms = chats.config.clock.now_ms();
                    token_meters.count_in_background(
                        &chats.in_flight.tasks,
                        &chats.db,
                        tokens,
                        now_ms,
                    );
                    return Ok(Embedded {
                        body: embedding.body,
                        balance,
                        charged,
                        usage: embedding.usage,
                    });
                }
                // Recovery judged it abandoned and refunded it: not charged, not answered.
                Ok(None) => return Err(ServiceError::ChatExpired),
                Err(err) => err.into(),
            }
        }
        Ok(_) => ServiceError::ClientGone,
        Err(err) => err,
    };
    if let Err(err) = db::embeddings::refund(&chats.db, embedding_id).await {
        tracing::error!(embedding_id, error = %err, "refund failed; recovery will redo it");
    }
    Err(failure)
}
