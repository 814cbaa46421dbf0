//! What a chat costs. A model the price book does not price costs `CHAT_COST`, reserved and
//! kept or refunded whole. A priced one reserves the most it can cost (the request price,
//! the prompt's upper bound, the output cap at the completion price) and settles to what it
//! used, never above the reservation; the cap is sent upstream so the model cannot use more.

use crate::{
    db::chats::{PriceSnapshot, TokenUsage, UsageSource},
    llm::{answer::tool_call_text, Forwarded, PromptMessage, Usage},
    pricing::{
        tokens::{CALL_OVERHEAD_TOKENS, MESSAGE_OVERHEAD_TOKENS},
        ModelPricing, TokenCounts,
    },
};

/// How a chat is charged.
pub(super) enum Metering {
    /// `CHAT_COST`, kept for an answer.
    Flat { cost: i64 },
    /// By the price book.
    Priced(Priced),
}

/// A priced chat's bounds, its output cap and what they reserve.
pub(super) struct Priced {
    pub model: String,
    pub pricing: ModelPricing,
    /// At least as many tokens as the model will count in the prompt.
    pub prompt_bound: u64,
    /// The prompt as tokenchat counts it, for a model that reports no usage: the text's
    /// tokens by the model's tokenizer where tokenchat has the text (`/chat`), else the
    /// bound.
    pub prompt_counted: u64,
    /// Choices asked for: the output cap holds for each.
    pub choices: u64,
    /// The client's own cap, which is never lowered.
    pub client_cap: Option<u64>,
    /// The cap sent upstream, per choice.
    pub output_cap: u64,
    /// What the bounds and the cap reserve; past the largest balance, `i64::MAX`, which no
    /// balance covers.
    pub reserved: i64,
    /// The cap was lowered to what the balance covers (`X-Max-Tokens-Applied`).
    pub lowered: bool,
}

impl Metering {
    /// How a `/chat` chat to `model` is charged whose prompt is a system prompt of
    /// `system_prompt` tokens and `turns` (the earlier turns and the message).
    pub fn of_turns(
        pricing: &ModelPricing,
        model: &str,
        system_prompt: u64,
        turns: &[PromptMessage<'_>],
    ) -> Self {
        let counted: u64 = system_prompt
            + turns
                .iter()
                .map(|message| pricing.tokenizer.count(message.content))
                .sum::<u64>();
        let messages = 1 + turns.len() as u64;
        let overhead = MESSAGE_OVERHEAD_TOKENS * messages + CALL_OVERHEAD_TOKENS;
        Self::Priced(Priced::new(
            model,
            *pricing,
            counted + overhead,
            // OpenAI's chat format: 3 tokens around each message and 3 to prime the reply.
            counted + 3 * messages + 3,
            1,
            None,
        ))
    }

    /// How an OpenAI client's request is charged: its prompt bounded by its body's bytes,
    /// the system prompt tokenchat adds, and each media part's allowance.
    pub fn of_request(
        pricing: Option<&ModelPricing>,
        request: &Forwarded,
        system_prompt: &str,
        flat: i64,
    ) -> Self {
        let Some(pricing) = pricing else {
            return Self::Flat { cost: flat };
        };
        let system = if request.wants_system_prompt {
            system_prompt.len() as u64 + MESSAGE_OVERHEAD_TOKENS
        } else {
            0
        };
        let bound = request
            .body_bytes
            .saturating_add(system)
            .saturating_add(
                request
                    .media_parts
                    .saturating_mul(pricing.media_part_tokens),
            )
            .saturating_add(CALL_OVERHEAD_TOKENS);
        Self::Priced(Priced::new(
            &request.model,
            *pricing,
            bound,
            bound,
            request.choices,
            request.client_cap,
        ))
    }

    /// What is reserved.
    pub fn reserved(&self) -> i64 {
        match self {
            Self::Flat { cost } => *cost,
            Self::Priced(priced) => priced.reserved,
        }
    }

    /// The prices recorded with the chat, for a priced one.
    pub fn snapshot(&self) -> Option<PriceSnapshot<'_>> {
        match self {
            Self::Flat { .. } => None,
            Self::Priced(priced) => Some(PriceSnapshot {
                model: &priced.model,
                prices: priced.pricing.prices,
                output_cap: priced.output_cap,
            }),
        }
    }

    /// The cap to send upstream, for a priced chat.
    pub fn output_cap(&self) -> Option<u64> {
        match self {
            Self::Flat { .. } => None,
            Self::Priced(priced) => Some(priced.output_cap),
        }
    }

    /// How a chat settles once its model gave `given`: whole, by the `usage` it reported
    /// or, when it reported none, by what it gave counted; cut short after that much was
    /// delivered and charged (`ABANDONED_STREAM_CHARGE=delivered`), a flat chat keeps its
    /// cost and a priced one pays for its prompt and what was delivered.
    pub fn settlement(
        &self,
        delivery: Delivery,
        usage: Option<Usage>,
        given: Given<'_>,
    ) -> Settlement {
        match (self, delivery) {
            (Self::Flat { .. }, _) => flat(usage),
            (Self::Priced(priced), Delivery::Whole) => priced.settle(usage, given),
            (Self::Priced(priced), Delivery::CutShort) => priced.settle_delivered(usage, given),
        }
    }

    /// The cap a low balance lowered the answer to, to tell the client.
    pub fn lowered_cap(&self) -> Option<u64> {
        match self {
            Self::Priced(priced) if priced.lowered => Some(priced.output_cap),
            _ => None,
        }
    }

    /// The same chat with its cap lowered to what `balance` covers, when the client set no
    /// cap and the balance covers at least `min_output_tokens`; `None` otherwise.
    pub fn lowered_for(&self, balance: i64, min_output_tokens: u64) -> Option<Self> {
        let Self::Priced(priced) = self else {
            return None;
        };
        if priced.client_cap.is_some() {
            return None;
        }
        let prices = &priced.pricing.prices;
        let covered = prices.affordable_output(balance, priced.prompt_bound, priced.choices)?;
        let cap = covered.min(priced.output_cap);
        (cap >= min_output_tokens).then(|| {
            let mut lowered = priced.clone_with_cap(cap);
            lowered.lowered = true;
            Self::Priced(lowered)
        })
    }

    /// What a refused chat needed reserved: for a priced chat whose cap could be lowered,
    /// its reservation at the shortest answer it may be given.
    pub fn required(&self, min_output_tokens: u64) -> i64 {
        match self {
            Self::Flat { cost } => *cost,
            Self::Priced(priced) if priced.client_cap.is_none() => {
                priced
                    .clone_with_cap(min_output_tokens.min(priced.output_cap))
                    .reserved
            }
            Self::Priced(priced) => priced.reserved,
        }
    }
}

impl Priced {
    fn new(
        model: &str,
        pricing: ModelPricing,
        prompt_bound: u64,
        prompt_counted: u64,
        choices: u64,
        client_cap: Option<u64>,
    ) -> Self {
        let priced = Self {
            model: model.to_string(),
            pricing,
            prompt_bound,
            prompt_counted: prompt_counted.min(prompt_bound),
            choices: choices.max(1),
            client_cap,
            output_cap: client_cap.unwrap_or(pricing.prices.max_output_tokens),
            reserved: 0,
            lowered: false,
        };
        priced.clone_with_cap(priced.output_cap)
    }

    fn clone_with_cap(&self, output_cap: u64) -> Self {
        let output = output_cap.saturating_mul(self.choices);
        let reserved = self
            .pricing
            .prices
            .reservation(self.prompt_bound, output)
            .unwrap_or(i64::MAX);
        Self {
            model: self.model.clone(),
            output_cap,
            reserved,
            ..*self
        }
    }

    /// The charge of an answer whose model reported `usage`; of what it did not report (the
    /// answer's count, or all of it) as counted: the prompt and what it gave; and whether
    /// the usage cost more than the reservation (an overrun, charged the reservation).
    pub fn settle(&self, usage: Option<Usage>, given: Given<'_>) -> Settlement {
        match usage {
            Some(usage) if usage.completion_tokens.is_some() => {
                self.charge(reported(usage), UsageSource::Model)
            }
            _ => self.settle_delivered(usage, given),
        }
    }

    /// The charge of an answer cut short after `given` reached the client: the prompt (as
    /// reported, when the model got to say) and the completion delivered, counted.
    pub fn settle_delivered(&self, usage: Option<Usage>, given: Given<'_>) -> Settlement {
        let (prompt, cached) = match usage.map(reported) {
            Some(counts) => (counts.prompt, counts.cached),
            None => (self.prompt_counted, 0),
        };
        let counts = TokenCounts {
            prompt,
            cached,
            completion: self.completion_counted(given),
        };
        self.charge(counts, UsageSource::Counted)
    }

    fn completion_counted(&self, given: Given<'_>) -> u64 {
        let tokenizer = self.pricing.tokenizer;
        let tool_calls = given
            .tool_calls
            .map_or(0, |calls| tokenizer.count(&tool_call_text(calls)));
        tokenizer.count(given.text) + tool_calls + tokenizer.count(given.unstored)
    }

    fn charge(&self, counts: TokenCounts, source: UsageSource) -> Settlement {
        let priced = self.pricing.prices.charge(counts).unwrap_or(i64::MAX);
        let overrun = priced > self.reserved;
        Settlement {
            charge: Some(priced.min(self.reserved)),
            overrun,
            usage: TokenUsage {
                prompt_tokens: Some(counts.prompt as i64),
                completion_tokens: Some(counts.completion as i64),
                cached_tokens: Some(counts.cached as i64),
                source: Some(source),
            },
        }
    }
}

/// A reported usage as counts, a negative figure (a broken upstream) as 0.
fn reported(usage: Usage) -> TokenCounts {
    let count = |figure: i64| u64::try_from(figure).unwrap_or(0);
    TokenCounts {
        prompt: count(usage.prompt_tokens),
        cached: count(usage.cached_tokens),
        completion: usage.completion_tokens.map_or(0, count),
    }
}

/// What a model gave: the first choice's text and tool calls (what a chat stores), and the
/// rest of what the client was sent (see [`crate::llm::answer::Read::unstored`]).
#[derive(Debug, Clone, Copy)]
pub struct Given<'a> {
    pub text: &'a str,
    pub tool_calls: Option<&'a str>,
    pub unstored: &'a str,
}

/// How much of its answer a chat delivered.
#[derive(Debug, Clone, Copy)]
pub(super) enum Delivery {
    /// All of it: the model finished.
    Whole,
    /// Some, before the chat was cut short.
    CutShort,
}

/// How a chat settles: the usage it records, and its charge (`None`: the reservation, a flat
/// chat's); `overrun` when the usage cost more than was reserved.
pub(super) struct Settlement {
    pub usage: TokenUsage,
    pub charge: Option<i64>,
    pub overrun: bool,
}

/// A flat chat's settlement: the reservation kept, the usage as reported.
fn flat(usage: Option<Usage>) -> Settlement {
    Settlement {
        usage: as_reported(usage),
        charge: None,
        overrun: false,
    }
}

/// The usage a client is shown: the model's, its answer's count filled in from the
/// settlement when the model left it out (as the chat records it).
pub(super) fn shown(usage: Option<Usage>, settled: &TokenUsage) -> Option<Usage> {
    usage.map(|usage| Usage {
        completion_tokens: usage.completion_tokens.or(settled.completion_tokens),
        ..usage
    })
}

/// The usage tokenchat counted and charged for, when it counted (`usage_source =
/// counted`): what a client is shown when the model reported none it could read.
pub(super) fn counted(settled: &TokenUsage) -> Option<Usage> {
    (settled.source == Some(UsageSource::Counted)).then(|| Usage {
        prompt_tokens: settled.prompt_tokens.unwrap_or(0),
        completion_tokens: settled.completion_tokens,
        cached_tokens: settled.cached_tokens.unwrap_or(0),
    })
}

/// The model tokens a settled call used, as its tokens a minute count them: what the model
/// reported; its completion, when it reported none, as tokenchat counted it to charge it (a
/// count of what was written), never a prompt's bound.
pub(super) fn used(reported: Option<Usage>, settled: &TokenUsage) -> TokenUsage {
    TokenUsage {
        prompt_tokens: reported.map(|usage| usage.prompt_tokens),
        completion_tokens: reported
            .and_then(|usage| usage.completion_tokens)
            .or(settled.completion_tokens),
        cached_tokens: None,
        source: None,
    }
}

/// A usage as the model reported it, if it did.
pub(super) fn as_reported(usage: Option<Usage>) -> TokenUsage {
    TokenUsage {
        prompt_tokens: usage.map(|usage| usage.prompt_tokens),
        completion_tokens: usage.and_then(|usage| usage.completion_tokens),
        cached_tokens: usage.map(|usage| usage.cached_tokens),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_shown_the_answers_count_the_chat_was_charged_for_when_the_model_left_it_out() {
        let settled = TokenUsage {
            prompt_tokens: Some(30),
            completion_tokens: Some(12),
            cached_tokens: Some(0),
            source: Some(UsageSource::Counted),
        };
        let left_out = Usage {
            prompt_tokens: 30,
            completion_tokens: None,
            cached_tokens: 0,
        };
        let shown_usage = shown(Some(left_out), &settled).unwrap();
        assert_eq!(shown_usage.completion_tokens, Some(12));
        let reported = Usage {
            completion_tokens: Some(7),
            ..left_out
        };
        assert_eq!(shown(Some(reported), &settled), Some(reported));
        assert_eq!(shown(None, &settled), None);
        assert_eq!(
            counted(&settled),
            Some(Usage {
                completion_tokens: Some(12),
                ..left_out
            })
        );
        let from_the_model = TokenUsage {
            source: Some(UsageSource::Model),
            ..settled
        };
        assert_eq!(counted(&from_the_model), None);
    }
}
