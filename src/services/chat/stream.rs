//! A streamed chat: the pump that passes the model's pieces on to the client as they come,
//! and the settlement of every way a stream can end (finished, the model failing or going
//! silent, the client going away, shutdown).

use std::{sync::Arc, time::Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{
    counting::failure_outcome,
    metering::{self, Delivery, Given, Metering},
    Begun, ChatAnswer, ChatInFlight, Chats, Question,
};
use crate::{
    config::AbandonedStreamCharge,
    db::{
        self,
        chats::{Answer, Unanswered},
    },
    llm::{AnswerStream, Chunk, LlmError, ServedBy, ToolCalls, Usage},
    services::{ServiceError, ServiceResult},
    telemetry::{ChatOutcome, TokenMove},
};

/// A streamed chat once the model has begun to answer.
pub enum StreamedChat {
    /// The chat is under way: its events follow, the last a `Done` or a `Failed`.
    Live {
        chat_id: i64,
        conversation_id: i64,
        /// The output cap a low balance lowered the answer to (`X-Max-Tokens-Applied`).
        max_tokens_applied: Option<u64>,
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
    /// The output cap a low balance lowered the answer to (`X-Max-Tokens-Applied`).
    pub max_tokens_applied: Option<u64>,
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
                max_tokens_applied,
                events,
            } => ChatEvents {
                chat_id,
                conversation_id: Some(conversation_id),
                replayed: false,
                max_tokens_applied,
                events: futures_util::stream::unfold(events, |mut events| async move {
                    events.recv().await.map(|event| (event, events))
                })
                .boxed(),
            },
            Self::Replayed(answer) => ChatEvents {
                chat_id: answer.chat_id,
                conversation_id: answer.conversation_id,
                replayed: true,
                max_tokens_applied: None,
                events: futures_util::stream::iter([
                    StreamEvent::Replayed {
                        text: answer.response,
                        tool_calls: answer.tool_calls,
                    },
                    StreamEvent::Done {
                        balance: answer.balance,
                        charged: answer.charged,
                        usage: answer.usage,
                        counted: answer.counted,
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
    /// A replayed answer, whole: its text and its tool calls (the JSON array).
    Replayed {
        text: String,
        tool_calls: Option<String>,
    },
    /// The next chunk of the answer, as the model sent it and as tokenchat read it.
    Chunk(Chunk),
    /// The whole answer is stored and charged: the balance after the charge, the model's
    /// usage, and what tokenchat counted when the model reported none it could read.
    Done {
        balance: i64,
        charged: i64,
        usage: Option<Usage>,
        counted: Option<Usage>,
    },
    /// The chat ended without a whole answer; nothing follows. `charged` is 0 when it was
    /// refunded, else what the text already delivered cost (see `ABANDONED_STREAM_CHARGE`).
    Failed { error: ServiceError, charged: i64 },
}

/// Pieces of answer that may wait for a slow client before the model is read no further.
const STREAM_BUFFER: usize = 16;

/// Starts a streamed chat for `user_id`; resolves once the model has begun to answer, so
/// that everything refused before (out of tokens, a model that fails at once) is refused
/// here, charging nothing. Its events then come as the model writes.
///
/// Every ending settles the chat: the model finished and the answer was stored, charged
/// (whether or not the client read the last event); the model failed, went silent or ran
/// past `LLM_STREAM_MAX_SECS` before any text was delivered, refunded and `failed`; after
/// text was delivered, settled as if the client had left; the client went away first, the
/// upstream request is dropped at once and the chat `abandoned`, charged or refunded by
/// `ABANDONED_STREAM_CHARGE`. The partial text is kept in every case.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn chat_streamed(chats: &Arc<Chats>, question: Question) -> ServiceResult<StreamedChat> {
    let (request, cancel_when_dropped) = ChatInFlight::admit(chats, question, true).await?;
    let (started, start) = oneshot::channel();
    chats
        .in_flight
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

impl ChatInFlight {
    async fn run_streamed(mut self, started: oneshot::Sender<ServiceResult<StreamedChat>>) {
        let _in_flight = self.chats.metrics.chat_begun();
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
        let forwarded = self.forwarded.take();
        let chats = &self.chats;
        let chat_id = reserved.chat_id;
        let metering = &reserved.metering;
        let ask = self.ask(&reserved.earlier, forwarded, metering);
        let asked = Instant::now();
        let upstream = tokio::select! {
            biased;
            _ = self.client_gone.cancelled() => Err(ServiceError::ClientGone),
            _ = chats.in_flight.cut_short.cancelled() => Err(ServiceError::ShuttingDown),
            upstream = chats.llm.stream(ask) => {
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
                self.count_failed(&err, metering);
                let _ = started.send(Err(err));
                return;
            }
        };
        let (events, receiver) = mpsc::channel(STREAM_BUFFER);
        let live = StreamedChat::Live {
            chat_id,
            conversation_id: reserved.conversation_id,
            max_tokens_applied: metering.lowered_cap(),
            events: receiver,
        };
        // A client gone before it got the start hears nothing more: the pump sees the
        // channel closed at once.
        let _ = started.send(Ok(live));
        let served_by = upstream.served_by;
        let upstream = upstream.chunks;
        self.pump_and_settle(chat_id, metering, upstream, served_by, events, asked)
            .await;
    }

    /// Passes the model's pieces on to the client as they come, then settles the chat by
    /// how the stream ended and tells the client, if it is still there.
    async fn pump_and_settle(
        &self,
        chat_id: i64,
        metering: &Metering,
        mut upstream: AnswerStream,
        served_by: Option<ServedBy>,
        events: mpsc::Sender<StreamEvent>,
        asked: Instant,
    ) {
        let chats = &self.chats;
        let mut answer = String::new();
        let mut tool_calls = ToolCalls::default();
        let mut unstored = String::new();
        let mut usage = None;
        // Any of the answer sent (text, even blank, or anything else): a client that leaves
        // after it is charged by `ABANDONED_STREAM_CHARGE`.
        let mut delivered_any = false;
        // Something more than blanks or a role sent: text, a refusal, a tool call. A model
        // that fails after it is charged the same way; before it, refunded (issue 21).
        let mut delivered_substance = false;
        // The model's side is bounded by its time limits; a client that reads too slowly
        // is bounded here, so the chat is settled by this task before its recorded deadline
        // (else recovery refunds it as abandoned while the client still reads the answer).
        let out_of_time =
            tokio::time::Instant::from_std(asked) + crate::llm::longest_call(&chats.config, true);
        let mut client_too_slow = false;
        let ending = loop {
            tokio::select! {
                biased;
                _ = events.closed() => break Ending::ClientGone,
                _ = chats.in_flight.cut_short.cancelled() => break Ending::ShuttingDown,
                chunk = upstream.next() => match chunk {
                    None => break Ending::Finished,
                    Some(Ok(chunk)) => {
                        // Room for it first: a chunk never handed over is neither kept nor
                        // charged.
                        let room = tokio::select! {
                            biased;
                            room = events.reserve() => room,
                            _ = chats.in_flight.cut_short.cancelled() => break Ending::ShuttingDown,
                            _ = tokio::time::sleep_until(out_of_time) => {
                                // The client's slowness, not the model's: settled as a
                                // stream past its time is, the model not counted as failed.
                                tracing::info!(chat_id, "the client read too slowly: the stream is out of time");
                                client_too_slow = true;
                                break Ending::ModelFailed(LlmError::Timeout);
                            }
                        };
                        let Ok(room) = room else {
                            break Ending::ClientGone;
                        };
                        answer.push_str(&chunk.text);
                        tool_calls.add(&chunk.tool_calls);
                        unstored.push_str(&chunk.unstored);
                        if let Some(reported) = chunk.usage {
                            usage = Some(reported);
                        }
                        let (text, substantial) = (!chunk.text.is_empty(), chunk.substantial);
                        room.send(StreamEvent::Chunk(chunk));
                        delivered_any |= text || substantial;
                        delivered_substance |= substantial;
                    }
                    Some(Err(err)) => break Ending::ModelFailed(err),
                },
            }
        };
        // The model stops writing (and the operator stops paying) at once.
        drop(upstream);
        let model_error = match &ending {
            Ending::ModelFailed(err) if !client_too_slow => Some(err.kind()),
            _ => None,
        };
        chats.metrics.upstream(true, asked.elapsed(), model_error);
        let tool_calls = tool_calls.to_json();
        let given = Given {
            text: &answer,
            tool_calls: tool_calls.as_deref(),
            unstored: &unstored,
        };
        // Kept by a refunded chat: what it got, the usage as reported.
        let partial = Answer {
            text: &answer,
            tool_calls: tool_calls.as_deref(),
            usage: metering::as_reported(usage),
            charge: None,
            upstream: served_by.as_ref().map(|served| &*served.upstream),
            attempts: served_by.as_ref().map(|served| i64::from(served.attempts)),
        };
        // Kept by a chat charged for the text it delivered.
        let delivered = || {
            let settlement = metering.settlement(Delivery::CutShort, usage, given);
            let charged = settlement.charge.unwrap_or(metering.reserved());
            let answer = Answer {
                usage: settlement.usage,
                charge: settlement.charge,
                ..partial
            };
            (answer, charged)
        };
        let ending = match ending {
            Ending::Finished if !delivered_substance => {
                Ending::ModelFailed(LlmError::Unusable(crate::llm::answer::EMPTY_ANSWER))
            }
            other => other,
        };
        let failure = match ending {
            Ending::Finished => {
                let settlement = metering.settlement(Delivery::Whole, usage, given);
                self.count_overrun(chat_id, &settlement);
                let whole = Answer {
                    usage: settlement.usage,
                    charge: settlement.charge,
                    ..partial
                };
                match db::chats::settle_answered(&chats.db, chat_id, whole).await {
                    Ok(Some(settled)) => {
                        self.count_model_tokens(&metering::used(usage, &settlement.usage));
                        let done = StreamEvent::Done {
                            balance: settled.balance_after,
                            charged: settled.charged,
                            usage: metering::shown(usage, &settlement.usage),
                            counted: metering::counted(&settlement.usage),
                        };
                        // Charged whether or not the client is still there to read it.
                        let _ = events.send(done).await;
                        self.count_answered(settled.charged, metering);
                        chats.alerts.charged(self.user_id, self.budgets.key_id());
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
                if refund {
                    self.settle_unanswered(chat_id, how, partial).await;
                    let tokens = TokenMove::Refunded(metering.reserved());
                    chats.metrics.chat_ended(ChatOutcome::Abandoned, tokens);
                } else {
                    let (kept, charged) = delivered();
                    let used = metering::used(usage, &kept.usage);
                    if self.settle_unanswered(chat_id, how, kept).await {
                        chats.alerts.charged(self.user_id, self.budgets.key_id());
                        self.count_model_tokens(&used);
                    }
                    self.count_charged(ChatOutcome::Abandoned, charged, metering);
                }
                return;
            }
            // Text the client already has is paid for as an abandoned stream's would be:
            // otherwise a long answer cut by the model, or by `LLM_STREAM_MAX_SECS`, would
            // be free however much of it arrived (issue 21).
            // Only text or tool calls: an answer of white space alone is unusable, and never
            // charged.
            Ending::ModelFailed(err)
                if delivered_substance && self.charges_for_delivered_text() =>
            {
                tracing::info!(chat_id, error = %err, "the model failed after text was delivered: charged");
                let how = Unanswered::Abandoned { refund: false };
                let (kept, charged) = delivered();
                let used = metering::used(usage, &kept.usage);
                let settled = self.settle_unanswered(chat_id, how, kept).await;
                let error = ServiceError::from(err);
                // Not settled here: recovery refunds it (or already did), and counts it.
                let charged = if settled { charged } else { 0 };
                if settled {
                    self.count_charged(failure_outcome(&error), charged, metering);
                    chats.alerts.charged(self.user_id, self.budgets.key_id());
                    self.count_model_tokens(&used);
                }
                let failed = StreamEvent::Failed { error, charged };
                let _ = events.send(failed).await;
                return;
            }
            Ending::ModelFailed(err) => {
                self.settle_unanswered(chat_id, Unanswered::Failed, partial)
                    .await;
                err.into()
            }
            Ending::ShuttingDown => {
                tracing::warn!(
                    chat_id,
                    "shutdown grace is over: refunding a stream in flight"
                );
                self.settle_unanswered(chat_id, Unanswered::Failed, partial)
                    .await;
                ServiceError::ShuttingDown
            }
        };
        self.count_failed(&failure, metering);
        let failed = StreamEvent::Failed {
            error: failure,
            charged: 0,
        };
        let _ = events.send(failed).await;
    }

    /// Whether a stream that ends early is charged once some of its text was delivered.
    fn charges_for_delivered_text(&self) -> bool {
        match self.chats.config.abandoned_stream_charge {
            AbandonedStreamCharge::Delivered => true,
            AbandonedStreamCharge::Never => false,
        }
    }

    /// Settles a stream that got no whole answer, keeping what it got; `false` when it was
    /// not (recovery had refunded it, or the write failed and recovery will).
    async fn settle_unanswered(&self, chat_id: i64, how: Unanswered, partial: Answer<'_>) -> bool {
        let settled = db::chats::settle_unanswered(&self.chats.db, chat_id, how, partial);
        match settled.await {
            Ok(settled) => settled,
            Err(err) => {
                tracing::error!(chat_id, error = %err, "settling a stream failed; recovery will refund it");
                false
            }
        }
    }
}
