//! Idempotency keys on a chat: claiming one (or finding the answer it already bought),
//! and letting it go when the chat was not charged. What a request is, for the key: its
//! fingerprint covers everything sent to the model.

use super::{ChatAnswer, ChatInFlight};
use crate::{
    db::{self, idempotency::Claim},
    domain::{ChatStatus, IdempotencyKey},
    services::{sha256_hex, ServiceError, ServiceResult},
};

impl ChatInFlight {
    /// Claims the key; `Some` with the earlier answer when it already bought one.
    pub(super) async fn claim(&self, key: &IdempotencyKey) -> ServiceResult<Option<ChatAnswer>> {
        let db = &self.chats.db;
        // The conversation is part of the request: the same key in another is a reuse.
        let request_hash = match (&self.fingerprint, self.conversation_id) {
            // Every field sent upstream is part of the request: the same key with another
            // `max_tokens` is a reuse, not a replay (issue 21). How the answer is delivered
            // (`stream`, `stream_options`) is not.
            (Some(fingerprint), _) => fingerprint.clone(),
            (None, None) => sha256_hex(self.message.as_str().as_bytes()),
            (None, Some(id)) => sha256_hex(format!("{id}\0{}", self.message.as_str()).as_bytes()),
        };
        let lifetime = self.chats.config.idempotency_key_lifetime;
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
            // A charged chat's key replays what it bought; a refunded chat let go of its
            // key when it was refunded (the trigger `failed_chat_is_refunded`).
            Claim::Held {
                chat_id: Some(chat_id),
                chat_status: Some(ChatStatus::Answered | ChatStatus::Abandoned),
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
            usage: None,
            counted: None,
            conversation_id: stored.conversation_id,
            tool_calls: stored.tool_calls,
            body: None,
            max_tokens_applied: None,
        }))
    }

    pub(super) async fn release_key(&self) {
        if let Some(key) = &self.idempotency_key {
            let released = db::idempotency::release(&self.chats.db, self.user_id, key.as_str());
            if let Err(err) = released.await {
                tracing::error!(error = %err, "could not release an idempotency key");
            }
        }
    }
}
