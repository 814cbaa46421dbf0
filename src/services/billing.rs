//! Chat accounting, reserve-then-settle: take the price first, ask the model with no
//! transaction open, then keep the charge for a stored answer or refund it. Optional
//! idempotency keys make a retried chat return the first answer instead of paying twice.

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    db::{self, chats::Reservation, idempotency::Claim},
    domain::{ChatStatus, IdempotencyKey, Message},
    services::{recovery, sha256_hex, ServiceError, ServiceResult},
    AppState,
};

/// A stored, charged answer: just now, or replayed for a repeated idempotency key.
#[derive(Debug)]
pub struct ChatAnswer {
    pub chat_id: i64,
    pub response: String,
    /// The balance right after this chat's charge.
    pub balance: i64,
    pub charged: i64,
    pub replayed: bool,
}

/// Answers one chat for `user_id`, charging `CHAT_COST` only when the answer is stored.
///
/// The work runs in a tracked task, so it settles even when the caller's future is
/// dropped (the client went away) and graceful shutdown waits for it. A client that
/// goes away before the answer is stored is not charged: the upstream call is abandoned
/// and the reservation refunded. Past the user's chat rate nothing is tried.
#[tracing::instrument(skip_all)]
pub async fn chat(
    state: &AppState,
    user_id: i64,
    message: Message,
    idempotency_key: Option<IdempotencyKey>,
) -> ServiceResult<ChatAnswer> {
    state.throttle.chat(user_id)?;
    let client_gone = CancellationToken::new();
    let _cancel_when_dropped = client_gone.clone().drop_guard();
    let request = ChatRequest {
        state: state.clone(),
        user_id,
        message,
        idempotency_key,
        client_gone,
    };
    // The span goes along, so the chat's work shows in the request's trace.
    state.tasks.spawn(request.run().in_current_span()).await?
}

struct ChatRequest {
    state: AppState,
    user_id: i64,
    message: Message,
    idempotency_key: Option<IdempotencyKey>,
    client_gone: CancellationToken,
}

impl ChatRequest {
    async fn run(self) -> ServiceResult<ChatAnswer> {
        if let Some(key) = &self.idempotency_key {
            if let Some(earlier) = self.claim(key).await? {
                return Ok(earlier);
            }
        }
        let cost = self.state.config.chat_cost;
        let settle_within = recovery::abandoned_after(&self.state);
        let reserved = db::chats::reserve(
            &self.state.db,
            self.user_id,
            self.message.as_str(),
            cost,
            settle_within,
        )
        .await;
        let chat_id = match reserved {
            Ok(Reservation::Reserved { chat_id }) => chat_id,
            Ok(Reservation::Insufficient { balance }) => {
                self.release_key().await;
                return Err(ServiceError::OutOfTokens { balance });
            }
            Err(err) => {
                self.release_key().await;
                return Err(err.into());
            }
        };
        if let Some(key) = &self.idempotency_key {
            let attached =
                db::idempotency::attach(&self.state.db, self.user_id, key.as_str(), chat_id);
            if let Err(err) = attached.await {
                // An answer bought under a key that does not lead to it could be bought
                // twice by a retry: give the reservation back instead.
                self.refund(chat_id).await;
                self.release_key().await;
                return Err(err.into());
            }
        }
        self.answer_and_settle(chat_id).await
    }

    /// Claims the key; `Some` with the earlier answer when it already bought one.
    async fn claim(&self, key: &IdempotencyKey) -> ServiceResult<Option<ChatAnswer>> {
        let db = &self.state.db;
        let request_hash = sha256_hex(self.message.as_str().as_bytes());
        let lifetime = self.state.config.idempotency_key_lifetime;
        let expired_before = db::unix_now() - lifetime.as_secs() as i64;
        let claim = db::idempotency::claim(
            db,
            self.user_id,
            key.as_str(),
            &request_hash,
            expired_before,
        );
        let chat_id = match claim.await? {
            Claim::Claimed => return Ok(None),
            Claim::Held {
                request_hash: held, ..
            } if held != request_hash => return Err(ServiceError::IdempotencyKeyReused),
            Claim::Held {
                chat_id: Some(chat_id),
                chat_status: Some(ChatStatus::Answered),
                ..
            } => chat_id,
            Claim::Held { .. } => return Err(ServiceError::RequestInProgress),
        };
        let stored = db::chats::stored_answer(db, chat_id)
            .await?
            .ok_or_else(|| {
                ServiceError::Inconsistent(format!("chat {chat_id} has no stored answer"))
            })?;
        Ok(Some(ChatAnswer {
            chat_id: stored.chat_id,
            response: stored.response,
            balance: stored.balance_after,
            charged: stored.cost,
            replayed: true,
        }))
    }

    async fn refund(&self, chat_id: i64) {
        if let Err(err) = db::chats::refund(&self.state.db, chat_id).await {
            tracing::error!(chat_id, error = %err, "refund failed; recovery will redo it");
        }
    }

    async fn release_key(&self) {
        if let Some(key) = &self.idempotency_key {
            let released = db::idempotency::release(&self.state.db, self.user_id, key.as_str());
            if let Err(err) = released.await {
                tracing::error!(error = %err, "could not release an idempotency key");
            }
        }
    }

    async fn answer_and_settle(&self, chat_id: i64) -> ServiceResult<ChatAnswer> {
        let state = &self.state;
        let answer = tokio::select! {
            biased;
            _ = self.client_gone.cancelled() => None,
            _ = state.cancel_chats.cancelled() => {
                tracing::warn!(chat_id, "shutdown grace is over: refunding a chat in flight");
                self.refund(chat_id).await;
                return Err(ServiceError::ShuttingDown);
            }
            answer = state.llm.complete(self.message.as_str()) => Some(answer),
        };
        let failure = match answer {
            Some(Ok(response)) if !self.client_gone.is_cancelled() => {
                match db::chats::settle_answered(&state.db, chat_id, &response).await {
                    Ok(Some(balance_after)) => {
                        return Ok(ChatAnswer {
                            chat_id,
                            response,
                            balance: balance_after,
                            charged: state.config.chat_cost,
                            replayed: false,
                        })
                    }
                    // Recovery judged it abandoned and refunded it: not stored, not charged.
                    Ok(None) => ServiceError::ChatExpired,
                    Err(err) => err.into(),
                }
            }
            Some(Err(err)) => err.into(),
            Some(Ok(_)) | None => {
                tracing::info!(chat_id, "client went away before the answer was stored");
                ServiceError::ClientGone
            }
        };
        self.refund(chat_id).await;
        Err(failure)
    }
}
