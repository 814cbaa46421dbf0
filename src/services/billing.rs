//! Chat accounting, reserve-then-settle: take the price first, ask the model with no
//! transaction open, then keep the charge for a stored answer or refund it. Optional
//! idempotency keys make a retried chat return the first answer instead of paying twice.
//! A streamed chat is settled by how its stream ended (see [`chat_streamed`]).

use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    config::AbandonedStreamCharge,
    db::{
        self,
        chats::{Reservation, TokenUsage, Unanswered},
        idempotency::Claim,
    },
    domain::{ChatStatus, IdempotencyKey, Message},
    llm::{AnswerStream, Ask, LlmError, Piece, PromptMessage, Role, Usage},
    services::{
        conversations::{self, Turn},
        recovery, sha256_hex, ServiceError, ServiceResult,
    },
    telemetry::{ChatOutcome, TokenMove},
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
    /// What the model said the answer cost it, when it said.
    pub usage: Option<Usage>,
    /// `None` only for a replayed chat whose conversation was deleted since.
    pub conversation_id: Option<i64>,
}

/// A streamed chat once the model has begun to answer.
pub enum StreamedChat {
    /// The chat is under way: its events follow, the last a `Done` or a `Failed`.
    Live {
        chat_id: i64,
        conversation_id: i64,
        events: mpsc::Receiver<StreamEvent>,
    },
    /// A repeated idempotency key: the first answer, whole.
    Replayed(ChatAnswer),
}

/// A streamed chat read to its end, live or replayed.
pub struct ChatEvents {
    pub chat_id: i64,
    /// `None` only for a replayed chat whose conversation was deleted since.
    pub conversation_id: Option<i64>,
    pub replayed: bool,
    pub events: futures_util::stream::BoxStream<'static, StreamEvent>,
}

impl StreamedChat {
    /// Its events as one stream: a live chat's as they come; a replayed one's stored answer,
    /// whole, then `Done`, as the first time ended.
    pub fn into_events(self) -> ChatEvents {
        match self {
            Self::Live {
                chat_id,
                conversation_id,
                events,
            } => ChatEvents {
                chat_id,
                conversation_id: Some(conversation_id),
                replayed: false,
                events: futures_util::stream::unfold(events, |mut events| async move {
                    events.recv().await.map(|event| (event, events))
                })
                .boxed(),
            },
            Self::Replayed(answer) => ChatEvents {
                chat_id: answer.chat_id,
                conversation_id: answer.conversation_id,
                replayed: true,
                events: futures_util::stream::iter([
                    StreamEvent::Text(answer.response),
                    StreamEvent::Done {
                        balance: answer.balance,
                        charged: answer.charged,
                        usage: answer.usage,
                    },
                ])
                .boxed(),
            },
        }
    }
}

/// What a streamed chat tells its client, in order.
#[derive(Debug)]
pub enum StreamEvent {
    /// More of the answer.
    Text(String),
    /// The whole answer is stored and charged: the balance after the charge.
    Done {
        balance: i64,
        charged: i64,
        usage: Option<Usage>,
    },
    /// The chat ended without a whole answer; nothing follows. `charged` is 0 when it was
    /// refunded, else what the text already delivered cost (see `ABANDONED_STREAM_CHARGE`).
    Failed { error: ServiceError, charged: i64 },
}

/// What a client asks: a message, in one of its conversations or a new one, with an
/// optional idempotency key.
pub struct Question {
    pub message: Message,
    /// `None`: a new conversation, titled with the message.
    pub conversation_id: Option<i64>,
    pub idempotency_key: Option<IdempotencyKey>,
    /// The whole conversation as an OpenAI client sends it (`message` is its last user
    /// message): sent upstream as given, instead of a stored conversation's turns.
    pub client_prompt: Option<ClientPrompt>,
}

/// What a client of the OpenAI-compatible route asks the model, as it sent it.
#[derive(Debug, Clone)]
pub struct ClientPrompt {
    pub messages: Vec<(Role, String)>,
    /// One of the served models.
    pub model: String,
    /// Sampling fields, passed upstream as given.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Pieces of answer that may wait for a slow client before the model is read no further.
const STREAM_BUFFER: usize = 16;

/// Answers one chat for `user_id`, charging `CHAT_COST` only when the answer is stored.
///
/// The work runs in a tracked task, so it settles even when the caller's future is
/// dropped (the client went away) and graceful shutdown waits for it. A client that
/// goes away before the answer is stored is not charged: the upstream call is abandoned
/// and the reservation refunded. Past the user's chat rate nothing is tried.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn chat(state: &AppState, user_id: i64, question: Question) -> ServiceResult<ChatAnswer> {
    state.throttle.chat(user_id)?;
    let (request, client_gone) = ChatRequest::new(state, user_id, question, false);
    let _cancel_when_dropped = client_gone.drop_guard();
    // The span goes along, so the chat's work shows in the request's trace.
    state.tasks.spawn(request.run().in_current_span()).await?
}

/// Starts a streamed chat for `user_id`; resolves once the model has begun to answer, so
/// that everything refused before (out of tokens, a model that fails at once) is refused
/// here, charging nothing. Its events then come as the model writes.
///
/// Every ending settles the chat: the model finished and the answer was stored, charged
/// (whether or not the client read the last event); the model failed or went silent,
/// refunded and `failed`, keeping the partial text; the client went away first, the
/// upstream request is dropped at once, the partial text kept, and the chat `abandoned`,
/// charged or refunded by `ABANDONED_STREAM_CHARGE`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn chat_streamed(
    state: &AppState,
    user_id: i64,
    question: Question,
) -> ServiceResult<StreamedChat> {
    state.throttle.chat(user_id)?;
    let (request, client_gone) = ChatRequest::new(state, user_id, question, true);
    let cancel_when_dropped = client_gone.drop_guard();
    let (started, start) = oneshot::channel();
    state
        .tasks
        .spawn(request.run_streamed(started).in_current_span());
    let started = start
        .await
        .map_err(|_| ServiceError::Inconsistent("a streamed chat ended unannounced".into()))?;
    // From here on the stream's own channel tells the chat whether the client is there.
    cancel_when_dropped.disarm();
    started
}

/// How a stream ended, before it is settled.
enum Ending {
    Finished,
    ModelFailed(LlmError),
    ClientGone,
    ShuttingDown,
}

struct ChatRequest {
    state: AppState,
    user_id: i64,
    message: Message,
    conversation_id: Option<i64>,
    idempotency_key: Option<IdempotencyKey>,
    client_prompt: Option<ClientPrompt>,
    client_gone: CancellationToken,
    /// Answered as a stream, which may take `LLM_STREAM_MAX_SECS` rather than
    /// `LLM_TIMEOUT_SECS`.
    streamed: bool,
}

/// How a chat began: with its reservation, or with the answer a repeated key bought.
enum Begun {
    Reserved(Reserved),
    Replayed(ChatAnswer),
}

/// A chat whose price is reserved, with what the model will be sent before its message.
struct Reserved {
    chat_id: i64,
    conversation_id: i64,
    earlier: Vec<Turn>,
}

impl ChatRequest {
    /// The request, and the token that tells it its client went away (cancel it then).
    fn new(
        state: &AppState,
        user_id: i64,
        question: Question,
        streamed: bool,
    ) -> (Self, CancellationToken) {
        let client_gone = CancellationToken::new();
        let request = Self {
            state: state.clone(),
            user_id,
            message: question.message,
            conversation_id: question.conversation_id,
            idempotency_key: question.idempotency_key,
            client_prompt: question.client_prompt,
            client_gone: client_gone.clone(),
            streamed,
        };
        (request, client_gone)
    }

    async fn run(self) -> ServiceResult<ChatAnswer> {
        let _in_flight = self.state.metrics.chat_begun();
        match self.begin().await? {
            Begun::Reserved(reserved) => self.answer_and_settle(reserved).await,
            Begun::Replayed(earlier) => Ok(earlier),
        }
    }

    /// What the model is sent: the client's own conversation, or the system prompt, the
    /// stored conversation's earlier turns and the new message.
    fn prompt<'a>(&'a self, earlier: &'a [Turn]) -> Vec<PromptMessage<'a>> {
        match &self.client_prompt {
            Some(client) => self.state.llm.prompt_as_given(&client.messages),
            None => self.state.llm.prompt(earlier, self.message.as_str()),
        }
    }

    fn ask<'a>(&'a self, prompt: &'a [PromptMessage<'a>]) -> Ask<'a> {
        Ask {
            messages: prompt,
            model: self
                .client_prompt
                .as_ref()
                .map(|client| client.model.as_str()),
            extra: self.client_prompt.as_ref().map(|client| &client.extra),
        }
    }

    /// Claims the idempotency key, if any, and reserves the price.
    async fn begin(&self) -> ServiceResult<Begun> {
        if let Some(key) = &self.idempotency_key {
            if let Some(earlier) = self.claim(key).await? {
                return Ok(Begun::Replayed(earlier));
            }
        }
        let earlier = match self.conversation_id {
            // A client that sends its own conversation gets no stored turns.
            _ if self.client_prompt.is_some() => Vec::new(),
            None => Vec::new(),
            Some(id) => match conversations::context(&self.state, self.user_id, id).await {
                Ok(earlier) => earlier,
                Err(err) => {
                    self.release_key().await;
                    return Err(err);
                }
            },
        };
        let cost = self.state.config.chat_cost;
        let settle_within = if self.streamed {
            recovery::stream_abandoned_after(&self.state)
        } else {
            recovery::abandoned_after(&self.state)
        };
        let reserved = db::chats::reserve(
            &self.state.db,
            self.user_id,
            self.conversation_id,
            self.message.as_str(),
            cost,
            settle_within,
        )
        .await;
        let (chat_id, conversation_id) = match reserved {
            Ok(Reservation::Reserved {
                chat_id,
                conversation_id,
            }) => (chat_id, conversation_id),
            Ok(Reservation::Insufficient { balance }) => {
                self.release_key().await;
                let metrics = &self.state.metrics;
                metrics.chat_ended(ChatOutcome::OutOfTokens, TokenMove::None);
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
                let err = ServiceError::from(err);
                self.count_failed(&err);
                return Err(err);
            }
        }
        Ok(Begun::Reserved(Reserved {
            chat_id,
            conversation_id,
            earlier,
        }))
    }

    async fn run_streamed(self, started: oneshot::Sender<ServiceResult<StreamedChat>>) {
        let _in_flight = self.state.metrics.chat_begun();
        let reserved = match self.begin().await {
            Ok(Begun::Reserved(reserved)) => reserved,
            Ok(Begun::Replayed(earlier)) => {
                let _ = started.send(Ok(StreamedChat::Replayed(earlier)));
                return;
            }
            Err(err) => {
                let _ = started.send(Err(err));
                return;
            }
        };
        let state = &self.state;
        let chat_id = reserved.chat_id;
        let prompt = self.prompt(&reserved.earlier);
        let ask = self.ask(&prompt);
        let asked = Instant::now();
        let upstream = tokio::select! {
            biased;
            _ = self.client_gone.cancelled() => Err(ServiceError::ClientGone),
            _ = state.cancel_chats.cancelled() => Err(ServiceError::ShuttingDown),
            upstream = state.llm.stream(&ask) => {
                let upstream = upstream.map_err(ServiceError::from);
                // A stream that begins is counted once, when it ends (`pump_and_settle`).
                if let Err(failure) = &upstream {
                    self.count_upstream(true, asked, Some(failure));
                }
                upstream
            }
        };
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(err) => {
                self.refund(chat_id).await;
                self.count_failed(&err);
                let _ = started.send(Err(err));
                return;
            }
        };
        let (events, receiver) = mpsc::channel(STREAM_BUFFER);
        let live = StreamedChat::Live {
            chat_id,
            conversation_id: reserved.conversation_id,
            events: receiver,
        };
        // A client gone before it got the start hears nothing more: the pump sees the
        // channel closed at once.
        let _ = started.send(Ok(live));
        self.pump_and_settle(chat_id, upstream, events, asked).await;
    }

    /// Passes the model's pieces on to the client as they come, then settles the chat by
    /// how the stream ended and tells the client, if it is still there.
    async fn pump_and_settle(
        &self,
        chat_id: i64,
        mut upstream: AnswerStream,
        events: mpsc::Sender<StreamEvent>,
        asked: Instant,
    ) {
        let state = &self.state;
        let mut answer = String::new();
        let mut usage = None;
        let mut delivered_any = false;
        let ending = loop {
            tokio::select! {
                biased;
                _ = events.closed() => break Ending::ClientGone,
                _ = state.cancel_chats.cancelled() => break Ending::ShuttingDown,
                piece = upstream.next() => match piece {
                    None => break Ending::Finished,
                    Some(Ok(Piece::Usage(reported))) => usage = Some(reported),
                    Some(Ok(Piece::Text(text))) => {
                        answer.push_str(&text);
                        if events.send(StreamEvent::Text(text)).await.is_err() {
                            break Ending::ClientGone;
                        }
                        delivered_any = true;
                    }
                    Some(Err(err)) => break Ending::ModelFailed(err),
                },
            }
        };
        // The model stops writing (and the operator stops paying) at once.
        drop(upstream);
        let model_error = match &ending {
            Ending::ModelFailed(err) => Some(err.kind()),
            _ => None,
        };
        state.metrics.upstream(true, asked.elapsed(), model_error);
        let stored_usage = TokenUsage {
            prompt_tokens: usage.map(|usage| usage.prompt_tokens),
            completion_tokens: usage.map(|usage| usage.completion_tokens),
        };
        let partial = (!answer.is_empty()).then_some(answer.as_str());
        let ending = match ending {
            Ending::Finished if answer.trim().is_empty() => {
                Ending::ModelFailed(LlmError::Unusable("empty answer"))
            }
            other => other,
        };
        let failure = match ending {
            Ending::Finished => {
                match db::chats::settle_answered(&state.db, chat_id, &answer, stored_usage).await {
                    Ok(Some(balance)) => {
                        let done = StreamEvent::Done {
                            balance,
                            charged: state.config.chat_cost,
                            usage,
                        };
                        // Charged whether or not the client is still there to read it.
                        let _ = events.send(done).await;
                        self.count_answered();
                        return;
                    }
                    Ok(None) => ServiceError::ChatExpired,
                    Err(err) => {
                        self.refund(chat_id).await;
                        ServiceError::from(err)
                    }
                }
            }
            Ending::ClientGone => {
                let refund = !(delivered_any && self.charges_for_delivered_text());
                tracing::info!(chat_id, refund, "client went away mid-stream");
                let how = Unanswered::Abandoned { refund };
                self.settle_unanswered(chat_id, how, partial, stored_usage)
                    .await;
                let cost = state.config.chat_cost;
                let tokens = if refund {
                    TokenMove::Refunded(cost)
                } else {
                    TokenMove::Charged(cost)
                };
                state.metrics.chat_ended(ChatOutcome::Abandoned, tokens);
                return;
            }
            // Text the client already has is paid for as an abandoned stream's would be:
            // otherwise a long answer cut by the model, or by `LLM_STREAM_MAX_SECS`, would
            // be free however much of it arrived (issue 21).
            Ending::ModelFailed(err) if delivered_any && self.charges_for_delivered_text() => {
                tracing::info!(chat_id, error = %err, "the model failed after text was delivered: charged");
                let how = Unanswered::Abandoned { refund: false };
                let settled = self
                    .settle_unanswered(chat_id, how, partial, stored_usage)
                    .await;
                let error = ServiceError::from(err);
                let cost = state.config.chat_cost;
                // Not settled here: recovery refunds it (or already did), and counts it.
                let charged = if settled { cost } else { 0 };
                if settled {
                    let outcome = failure_outcome(&error);
                    state.metrics.chat_ended(outcome, TokenMove::Charged(cost));
                }
                let failed = StreamEvent::Failed { error, charged };
                let _ = events.send(failed).await;
                return;
            }
            Ending::ModelFailed(err) => {
                self.settle_unanswered(chat_id, Unanswered::Failed, partial, stored_usage)
                    .await;
                err.into()
            }
            Ending::ShuttingDown => {
                tracing::warn!(
                    chat_id,
                    "shutdown grace is over: refunding a stream in flight"
                );
                self.settle_unanswered(chat_id, Unanswered::Failed, partial, stored_usage)
                    .await;
                ServiceError::ShuttingDown
            }
        };
        self.count_failed(&failure);
        let failed = StreamEvent::Failed {
            error: failure,
            charged: 0,
        };
        let _ = events.send(failed).await;
    }

    /// Whether a stream that ends early is charged once some of its text was delivered.
    fn charges_for_delivered_text(&self) -> bool {
        match self.state.config.abandoned_stream_charge {
            AbandonedStreamCharge::Delivered => true,
            AbandonedStreamCharge::Never => false,
        }
    }

    fn count_answered(&self) {
        let cost = self.state.config.chat_cost;
        let metrics = &self.state.metrics;
        metrics.chat_ended(ChatOutcome::Answered, TokenMove::Charged(cost));
    }

    /// Counts a reserved chat that ended in `failure`, refunded.
    fn count_failed(&self, failure: &ServiceError) {
        // Recovery refunded it first, and counted it then.
        if let ServiceError::ChatExpired = failure {
            return;
        }
        let outcome = failure_outcome(failure);
        let cost = self.state.config.chat_cost;
        self.state
            .metrics
            .chat_ended(outcome, TokenMove::Refunded(cost));
    }

    /// Counts one answer of the model asked at `asked`, or its failure.
    fn count_upstream(&self, streamed: bool, asked: Instant, failure: Option<&ServiceError>) {
        let kind = match failure {
            Some(ServiceError::Model(err)) => Some(err.kind()),
            _ => None,
        };
        self.state.metrics.upstream(streamed, asked.elapsed(), kind);
    }

    /// Settles a stream that got no whole answer; `false` when it was not (recovery had
    /// refunded it, or the write failed and recovery will).
    async fn settle_unanswered(
        &self,
        chat_id: i64,
        how: Unanswered,
        partial: Option<&str>,
        usage: TokenUsage,
    ) -> bool {
        let settled = db::chats::settle_unanswered(&self.state.db, chat_id, how, partial, usage);
        match settled.await {
            Ok(settled) => settled,
            Err(err) => {
                tracing::error!(chat_id, error = %err, "settling a stream failed; recovery will refund it");
                false
            }
        }
    }

    /// Claims the key; `Some` with the earlier answer when it already bought one.
    async fn claim(&self, key: &IdempotencyKey) -> ServiceResult<Option<ChatAnswer>> {
        let db = &self.state.db;
        // The conversation is part of the request: the same key in another is a reuse.
        let request_hash = match (&self.client_prompt, self.conversation_id) {
            (Some(client), _) => {
                let messages: Vec<(&str, &str)> = client
                    .messages
                    .iter()
                    .map(|(role, content)| (role.as_str(), content.as_str()))
                    .collect();
                // Every field sent upstream is part of the request: the same key with
                // another `max_tokens` is a reuse, not a replay (issue 21). How the answer
                // is delivered (`stream`, `stream_options`) is not.
                let request = serde_json::json!([client.model, messages, client.extra]);
                sha256_hex(request.to_string().as_bytes())
            }
            (None, None) => sha256_hex(self.message.as_str().as_bytes()),
            (None, Some(id)) => sha256_hex(format!("{id}\0{}", self.message.as_str()).as_bytes()),
        };
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
            conversation_id: stored.conversation_id,
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

    async fn answer_and_settle(&self, reserved: Reserved) -> ServiceResult<ChatAnswer> {
        let state = &self.state;
        let chat_id = reserved.chat_id;
        let prompt = self.prompt(&reserved.earlier);
        let ask = self.ask(&prompt);
        let asked = Instant::now();
        let answer = tokio::select! {
            biased;
            _ = self.client_gone.cancelled() => None,
            _ = state.cancel_chats.cancelled() => {
                tracing::warn!(chat_id, "shutdown grace is over: refunding a chat in flight");
                self.refund(chat_id).await;
                self.count_failed(&ServiceError::ShuttingDown);
                return Err(ServiceError::ShuttingDown);
            }
            answer = state.llm.complete(&ask) => {
                let failure = answer.as_ref().err().map(|err| err.kind());
                state.metrics.upstream(false, asked.elapsed(), failure);
                Some(answer)
            }
        };
        let failure = match answer {
            Some(Ok(completion)) if !self.client_gone.is_cancelled() => {
                let usage = TokenUsage {
                    prompt_tokens: completion.usage.map(|usage| usage.prompt_tokens),
                    completion_tokens: completion.usage.map(|usage| usage.completion_tokens),
                };
                let settled =
                    db::chats::settle_answered(&state.db, chat_id, &completion.content, usage);
                match settled.await {
                    Ok(Some(balance_after)) => {
                        self.count_answered();
                        return Ok(ChatAnswer {
                            chat_id,
                            response: completion.content,
                            balance: balance_after,
                            charged: state.config.chat_cost,
                            replayed: false,
                            usage: completion.usage,
                            conversation_id: Some(reserved.conversation_id),
                        });
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
        self.count_failed(&failure);
        Err(failure)
    }
}

/// How a chat that ended in `failure` is counted.
fn failure_outcome(failure: &ServiceError) -> ChatOutcome {
    match failure {
        ServiceError::Model(LlmError::Timeout) => ChatOutcome::UpstreamTimeout,
        ServiceError::Model(_) => ChatOutcome::UpstreamError,
        ServiceError::ClientGone => ChatOutcome::Abandoned,
        _ => ChatOutcome::Refunded,
    }
}
