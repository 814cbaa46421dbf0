//! A chat, reserve-then-settle: take the price first, ask the model with no transaction
//! open, then keep the charge for a stored answer or refund it. Optional idempotency keys
//! make a retried chat return the first answer instead of paying twice ([`idempotency`]).
//! A streamed chat is settled by how its stream ended ([`stream`]); an embeddings call is
//! metered the same way ([`embeddings`]).

mod counting;
mod embeddings;
mod idempotency;
mod metering;
mod stream;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

pub use embeddings::{embed, Embedded};
use metering::{Delivery, Given, Metering};
pub use stream::{chat_streamed, ChatEvents, StreamEvent, StreamedChat};

use crate::{
    config::Config,
    db::{
        self,
        chats::{Answer, NewChat, Reservation},
        Db,
    },
    domain::{Budgets, IdempotencyKey, Message},
    in_flight::WorkInFlight,
    llm::{Ask, Forwarded, LlmClient, Usage},
    services::{
        alerts::Alerts,
        conversations::{self, Turn},
        limits::TokenMeters,
        recovery,
        throttle::Throttle,
        ServiceError, ServiceResult,
    },
    telemetry::{ChatOutcome, Metrics, TokenMove},
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
    /// What tokenchat counted and charged for, when the model said nothing it could read.
    pub counted: Option<Usage>,
    /// `None` only for a replayed chat whose conversation was deleted since.
    pub conversation_id: Option<i64>,
    /// The first choice's tool calls, the JSON array the model gave.
    pub tool_calls: Option<String>,
    /// The answer as the model sent it, for a client of `/v1`; `None` when replayed.
    pub body: Option<axum::body::Bytes>,
    /// The output cap a low balance lowered the answer to (`X-Max-Tokens-Applied`).
    pub max_tokens_applied: Option<u64>,
}

/// What a client asks: a message, in one of its conversations or a new one, with an
/// optional idempotency key.
pub struct Question {
    /// Who asks, and pays.
    pub user_id: i64,
    pub message: Message,
    /// `None`: a new conversation, titled with the message.
    pub conversation_id: Option<i64>,
    pub idempotency_key: Option<IdempotencyKey>,
    /// The request of an OpenAI client (`message` is its last user message's text): sent
    /// upstream as given, instead of a stored conversation's turns.
    pub forwarded: Option<Forwarded>,
    /// The budgets of its API key and its user it counts against, and the token rates its
    /// model tokens are counted in ([`crate::services::limits::admit`]).
    pub budgets: Budgets,
    pub token_meters: TokenMeters,
}

/// Answers one chat for its user, charging `CHAT_COST` only when the answer is stored.
///
/// The work runs in a tracked task, so it settles even when the caller's future is
/// dropped (the client went away) and graceful shutdown waits for it. A client that
/// goes away before the answer is stored is not charged: the upstream call is abandoned
/// and the reservation refunded. Past the user's chat rate nothing is tried.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn chat(chats: &Arc<Chats>, question: Question) -> ServiceResult<ChatAnswer> {
    let (request, _cancel_when_dropped) = ChatInFlight::admit(chats, question, false).await?;
    // The span goes along, so the chat's work shows in the request's trace.
    chats
        .in_flight
        .tasks
        .spawn(request.run().in_current_span())
        .await?
}

/// What answering and settling chats needs, built once at start: the database, the model
/// clients, the metrics, the chat rate, the chats in progress and the cost rules.
pub struct Chats {
    db: Db,
    llm: LlmClient,
    metrics: Metrics,
    throttle: Arc<Throttle>,
    /// The chats and embeddings calls in progress, each in a task of its own.
    in_flight: WorkInFlight,
    /// The cost rules (`CHAT_COST`, `ABANDONED_STREAM_CHARGE`, the price book), the time
    /// limits and the context and idempotency settings.
    config: Arc<Config>,
    /// `LLM_SYSTEM_PROMPT` in tokens of `LLM_MODEL`'s tokenizer, when the book prices it:
    /// counted once here rather than in every `/chat`.
    system_prompt_tokens: Option<u64>,
    /// How long a call's reservation may stay pending, whole and streamed (see
    /// `recovery::abandoned_after`): worked out once from the upstreams, not per chat.
    settle_within: (Duration, Duration),
    /// Told of every charge made final, to check it against the alert thresholds.
    alerts: Alerts,
}

impl Chats {
    pub fn new(
        db: Db,
        llm: LlmClient,
        metrics: Metrics,
        throttle: Arc<Throttle>,
        config: Arc<Config>,
    ) -> Self {
        let system_prompt_tokens = config
            .price_book
            .model(llm.model_name())
            .map(|pricing| pricing.tokenizer.count(llm.system_prompt()));
        let settle_within = (
            recovery::abandoned_after(&config),
            recovery::stream_abandoned_after(&config),
        );
        Self {
            db,
            llm,
            metrics,
            throttle,
            in_flight: WorkInFlight::default(),
            config,
            system_prompt_tokens,
            settle_within,
            alerts: Alerts::default(),
        }
    }

    /// The calls in progress: what shutdown waits for, and cuts short after its grace.
    pub fn in_flight(&self) -> &WorkInFlight {
        &self.in_flight
    }

    /// `Chats` telling `alerts` of every charge made final (off by default).
    pub fn with_alerts(mut self, alerts: Alerts) -> Self {
        self.alerts = alerts;
        self
    }
}

/// One chat being answered, in a task of its own.
struct ChatInFlight {
    chats: Arc<Chats>,
    user_id: i64,
    message: Message,
    conversation_id: Option<i64>,
    idempotency_key: Option<IdempotencyKey>,
    /// An OpenAI client's request, until it is sent.
    forwarded: Option<Forwarded>,
    /// What makes the request the same for an idempotency key, when it is an OpenAI
    /// client's (see [`Forwarded::fingerprint`]).
    fingerprint: Option<String>,
    client_gone: CancellationToken,
    /// Answered as a stream, which may take `LLM_STREAM_MAX_SECS` rather than
    /// `LLM_TIMEOUT_SECS`.
    streamed: bool,
    budgets: Budgets,
    token_meters: TokenMeters,
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
    metering: Metering,
}

impl ChatInFlight {
    /// The request, once the user's chat rate lets it in, and the guard that tells it
    /// its client went away when dropped (disarmed, the request goes on alone).
    async fn admit(
        chats: &Arc<Chats>,
        question: Question,
        streamed: bool,
    ) -> ServiceResult<(Self, DropGuard)> {
        chats.throttle.chat(question.user_id).await?;
        let client_gone = CancellationToken::new();
        let request = Self {
            chats: chats.clone(),
            user_id: question.user_id,
            message: question.message,
            conversation_id: question.conversation_id,
            fingerprint: question
                .forwarded
                .as_ref()
                .filter(|_| question.idempotency_key.is_some())
                .map(Forwarded::fingerprint),
            idempotency_key: question.idempotency_key,
            forwarded: question.forwarded,
            client_gone: client_gone.clone(),
            streamed,
            budgets: question.budgets,
            token_meters: question.token_meters,
        };
        Ok((request, client_gone.drop_guard()))
    }

    async fn run(mut self) -> ServiceResult<ChatAnswer> {
        let _in_flight = self.chats.metrics.chat_begun();
        match self.begin().await? {
            Begun::Reserved(reserved) => {
                let forwarded = self.forwarded.take();
                self.answer_and_settle(reserved, forwarded).await
            }
            Begun::Replayed(earlier) => Ok(earlier),
        }
    }

    /// What the model is asked: the OpenAI client's request as it sent it, or the system
    /// prompt, the `earlier` turns and the message; a priced chat's output cap with it.
    fn ask<'a>(
        &'a self,
        earlier: &'a [Turn],
        forwarded: Option<Forwarded>,
        metering: &Metering,
    ) -> Ask<'a> {
        match forwarded {
            Some(mut request) => {
                request.output_cap = metering.output_cap();
                Ask::Forwarded {
                    request,
                    last_user_text: self.message.as_str(),
                }
            }
            None => Ask::Turns {
                prompt: self.chats.llm.prompt(earlier, self.message.as_str()),
                max_tokens: metering.output_cap(),
            },
        }
    }

    /// How this chat is charged: by the price book's entry for its model, or `CHAT_COST`.
    fn metering(&self, earlier: &[Turn]) -> Metering {
        let chats = &self.chats;
        let book = &chats.config.price_book;
        let flat = chats.config.chat_cost;
        match &self.forwarded {
            Some(request) => Metering::of_request(
                book.model(&request.model),
                request,
                chats.llm.system_prompt(),
                flat,
            ),
            None => {
                let model = chats.llm.model_name();
                match (book.model(model), chats.system_prompt_tokens) {
                    (Some(pricing), Some(system_prompt)) => {
                        let prompt = chats.llm.prompt(earlier, self.message.as_str());
                        // The system prompt comes first, counted once at start.
                        let turns = prompt.get(1..).unwrap_or_default();
                        Metering::of_turns(pricing, model, system_prompt, turns)
                    }
                    _ => Metering::Flat { cost: flat },
                }
            }
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
            _ if self.forwarded.is_some() => Vec::new(),
            None => Vec::new(),
            Some(id) => match conversations::context(
                &self.chats.db,
                self.user_id,
                id,
                self.chats.config.context_max_chars,
            )
            .await
            {
                Ok(earlier) => earlier,
                Err(err) => {
                    self.release_key().await;
                    return Err(err);
                }
            },
        };
        let (whole, streamed) = self.chats.settle_within;
        let settle_within = if self.streamed { streamed } else { whole };
        let mut metering = self.metering(&earlier);
        let mut lowered_once = false;
        let (chat_id, conversation_id) = loop {
            let new_chat = NewChat {
                user_id: self.user_id,
                conversation_id: self.conversation_id,
                message: self.message.as_str(),
                cost: metering.reserved(),
                priced: metering.snapshot(),
                budgets: self.budgets,
                settle_within,
            };
            let reserved = db::chats::reserve(&self.chats.db, new_chat).await;
            match reserved {
                Ok(Reservation::Reserved {
                    chat_id,
                    conversation_id,
                }) => break (chat_id, conversation_id),
                Ok(Reservation::Insufficient { balance }) => {
                    // A low balance gets a shorter answer, once: a balance that moved in
                    // between is refused as any short balance is.
                    let min_output = self.chats.config.min_output_tokens;
                    if !lowered_once {
                        if let Some(lowered) = metering.lowered_for(balance, min_output) {
                            metering = lowered;
                            lowered_once = true;
                            continue;
                        }
                    }
                    self.release_key().await;
                    let metrics = &self.chats.metrics;
                    metrics.chat_ended(ChatOutcome::OutOfTokens, TokenMove::None);
                    let required = metering.required(min_output);
                    return Err(ServiceError::OutOfTokens { balance, required });
                }
                Ok(Reservation::BudgetExceeded(owner)) => {
                    self.release_key().await;
                    let metrics = &self.chats.metrics;
                    metrics.chat_ended(ChatOutcome::OutOfTokens, TokenMove::None);
                    let resets_at = self.budgets.resets_at(owner);
                    return Err(ServiceError::BudgetExceeded { owner, resets_at });
                }
                Err(err) => {
                    self.release_key().await;
                    return Err(err.into());
                }
            }
        };
        if let Some(key) = &self.idempotency_key {
            let attached =
                db::idempotency::attach(&self.chats.db, self.user_id, key.as_str(), chat_id);
            if let Err(err) = attached.await {
                // An answer bought under a key that does not lead to it could be bought
                // twice by a retry: give the reservation back instead.
                self.refund(chat_id).await;
                self.release_key().await;
                let err = ServiceError::from(err);
                self.count_failed(&err, &metering);
                return Err(err);
            }
        }
        Ok(Begun::Reserved(Reserved {
            chat_id,
            conversation_id,
            earlier,
            metering,
        }))
    }

    async fn answer_and_settle(
        &self,
        reserved: Reserved,
        forwarded: Option<Forwarded>,
    ) -> ServiceResult<ChatAnswer> {
        let chats = &self.chats;
        let chat_id = reserved.chat_id;
        let metering = &reserved.metering;
        let ask = self.ask(&reserved.earlier, forwarded, metering);
        let asked = Instant::now();
        let answer = tokio::select! {
            biased;
            _ = self.client_gone.cancelled() => None,
            _ = chats.in_flight.cut_short.cancelled() => {
                tracing::warn!(chat_id, "shutdown grace is over: refunding a chat in flight");
                self.refund(chat_id).await;
                self.count_failed(&ServiceError::ShuttingDown, metering);
                return Err(ServiceError::ShuttingDown);
            }
            answer = chats.llm.complete(ask) => {
                let failure = answer.as_ref().err().map(|err| err.kind());
                chats.metrics.upstream(false, asked.elapsed(), failure);
                Some(answer)
            }
        };
        let failure = match answer {
            Some(Ok(completion)) if !self.client_gone.is_cancelled() => {
                let tool_calls = completion.tool_calls.as_deref();
                let given = Given {
                    text: &completion.content,
                    tool_calls,
                    unstored: &completion.unstored,
                };
                let settlement = metering.settlement(Delivery::Whole, completion.usage, given);
                self.count_overrun(chat_id, &settlement);
                let served_by = completion.served_by.as_ref();
                let answer = Answer {
                    text: &completion.content,
                    tool_calls,
                    usage: settlement.usage,
                    charge: settlement.charge,
                    upstream: served_by.map(|served| &*served.upstream),
                    attempts: served_by.map(|served| i64::from(served.attempts)),
                };
                let settled = db::chats::settle_answered(&chats.db, chat_id, answer);
                match settled.await {
                    Ok(Some(settled)) => {
                        self.count_answered(settled.charged, metering);
                        self.count_model_tokens(&metering::used(
                            completion.usage,
                            &settlement.usage,
                        ));
                        chats.alerts.charged(self.user_id, self.budgets.key_id());
                        return Ok(ChatAnswer {
                            chat_id,
                            response: completion.content,
                            balance: settled.balance_after,
                            charged: settled.charged,
                            replayed: false,
                            usage: metering::shown(completion.usage, &settlement.usage),
                            counted: metering::counted(&settlement.usage),
                            conversation_id: Some(reserved.conversation_id),
                            tool_calls: completion.tool_calls,
                            body: completion.body,
                            max_tokens_applied: metering.lowered_cap(),
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
        self.count_failed(&failure, metering);
        Err(failure)
    }

    async fn refund(&self, chat_id: i64) {
        if let Err(err) = db::chats::refund(&self.chats.db, chat_id).await {
            tracing::error!(chat_id, error = %err, "refund failed; recovery will redo it");
        }
    }
}
