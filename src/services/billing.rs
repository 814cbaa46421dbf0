//! Chat accounting, reserve-then-settle: take the price first, ask the model with no
//! transaction open, then keep the charge for a stored answer or refund it.

use tokio_util::sync::CancellationToken;

use crate::{
    db::{self, chats::Reservation},
    error::Error,
    AppState,
};

/// A stored, charged answer.
#[derive(Debug)]
pub struct ChatAnswer {
    pub chat_id: i64,
    pub response: String,
    pub balance: i64,
    pub charged: i64,
}

pub async fn balance(state: &AppState, user_id: i64) -> Result<i64, Error> {
    Ok(db::users::balance(&state.db, user_id).await?)
}

/// Answers one chat for `user_id`, charging `CHAT_COST` only when the answer is stored.
///
/// The work runs in a tracked task, so it settles even when the caller's future is
/// dropped (the client went away) and graceful shutdown waits for it. A client that
/// goes away before the answer is stored is not charged: the upstream call is abandoned
/// and the reservation refunded.
pub async fn chat(state: &AppState, user_id: i64, message: String) -> Result<ChatAnswer, Error> {
    let client_gone = CancellationToken::new();
    let _cancel_when_dropped = client_gone.clone().drop_guard();
    let task = state.tasks.spawn(answer_and_settle(
        state.clone(),
        user_id,
        message,
        client_gone,
    ));
    task.await?
}

async fn answer_and_settle(
    state: AppState,
    user_id: i64,
    message: String,
    client_gone: CancellationToken,
) -> Result<ChatAnswer, Error> {
    let cost = state.config.chat_cost;
    let chat_id = match db::chats::reserve(&state.db, user_id, &message, cost).await? {
        Reservation::Reserved { chat_id } => chat_id,
        Reservation::Insufficient { balance } => {
            return Err(Error::OutOfTokens { tokens: balance })
        }
    };

    let answer = tokio::select! {
        biased;
        _ = client_gone.cancelled() => None,
        answer = state.llm.complete(&message) => Some(answer),
    };
    let failure = match answer {
        Some(Ok(response)) if !client_gone.is_cancelled() => {
            match db::chats::settle_answered(&state.db, chat_id, user_id, &response).await {
                Ok(Some(balance)) => {
                    return Ok(ChatAnswer {
                        chat_id,
                        response,
                        balance,
                        charged: cost,
                    })
                }
                Ok(None) => Error::internal(format!("chat {chat_id} was no longer pending")),
                Err(err) => err.into(),
            }
        }
        Some(Err(err)) => err.into(),
        Some(Ok(_)) | None => {
            tracing::info!(chat_id, "client went away before the answer was stored");
            Error::internal("client went away")
        }
    };
    if let Err(err) = db::chats::refund(&state.db, chat_id).await {
        tracing::error!(chat_id, error = %err, "refund failed; the chat stays pending");
    }
    Err(failure)
}
