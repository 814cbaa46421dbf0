//! Prices per model and per token, in the balance's own tokens: what a call may cost at
//! most (its reservation), how long an answer the balance covers, and what a call used
//! costs (its charge). Exact integer arithmetic with one rounding, up, per call; a figure
//! past [`MAX_BALANCE`] is refused rather than wrapped.
//!
//! [`tokens`] counts text the way a model does, or bounds it by its bytes.

pub mod tokens;

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

pub use self::tokens::Tokenizer;
use crate::domain::MAX_BALANCE;

/// Prices are per million tokens.
const PER: u128 = 1_000_000;

/// A model's prices: per million prompt tokens (those not cached), per million cached
/// prompt tokens, per million completion tokens (reasoning tokens among them), per call;
/// and the longest answer it is asked for when a client names no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Prices {
    pub prompt: u64,
    pub cached_prompt: u64,
    pub completion: u64,
    pub request: u64,
    pub max_output_tokens: u64,
}

/// A model's entry in the price book: its prices, how its text is counted, and what an
/// image, audio or file part of a prompt is reserved as.
#[derive(Debug, Clone, Copy)]
pub struct ModelPricing {
    pub prices: Prices,
    pub tokenizer: Tokenizer,
    /// Prompt tokens reserved for each part that is not text (an image by URL is a few
    /// bytes of request but hundreds of tokens of prompt).
    pub media_part_tokens: u64,
}

/// Every priced model by its served name. Empty: every chat costs `CHAT_COST`.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    models: BTreeMap<String, ModelPricing>,
}

impl PriceBook {
    pub fn new(models: BTreeMap<String, ModelPricing>) -> Self {
        Self { models }
    }

    /// The entry of the served model `name`, when it is priced.
    pub fn model(&self, name: &str) -> Option<&ModelPricing> {
        self.models.get(name)
    }

    /// Every priced model, by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelPricing)> {
        self.models
            .iter()
            .map(|(name, model)| (name.as_str(), model))
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// Tokens a call used, as the model reported them or as tokenchat counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Every prompt token, cached or not.
    pub prompt: u64,
    /// Of `prompt`, those the model read from its cache.
    pub cached: u64,
    /// Every completion token of every choice, reasoning tokens among them.
    pub completion: u64,
}

/// A figure past [`MAX_BALANCE`]: the call cannot be priced, so it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the price of this call is past the largest balance")]
pub struct Overflow;

impl Prices {
    /// What a call that used `used` costs: `request + ceil((prompt * (P - K) + cached_prompt
    /// * K + completion * C) / 1_000_000)`, K at most P. One rounding, up, per call.
    pub fn charge(&self, used: TokenCounts) -> Result<i64, Overflow> {
        let cached = used.cached.min(used.prompt);
        let per_token = sum_of_products([
            (self.prompt, used.prompt - cached),
            (self.cached_prompt, cached),
            (self.completion, used.completion),
        ])?;
        tokens(u128::from(self.request) + per_token.div_ceil(PER))
    }

    /// The most a call can cost whose prompt is at most `prompt_bound` tokens and whose
    /// answer at most `output_tokens` (all choices together): every prompt token at the
    /// dearer of the two prompt prices. Never below [`charge`](Self::charge) of any usage
    /// within those bounds.
    pub fn reservation(&self, prompt_bound: u64, output_tokens: u64) -> Result<i64, Overflow> {
        let prompt_price = self.prompt.max(self.cached_prompt);
        let per_token = sum_of_products([
            (prompt_price, prompt_bound),
            (self.completion, output_tokens),
        ])?;
        tokens(u128::from(self.request) + per_token.div_ceil(PER))
    }

    /// The longest answer, in tokens per choice, that `balance` covers with a prompt of at
    /// most `prompt_bound` tokens and `choices` choices; `None` when it covers not even the
    /// request and the prompt. At most `max_output_tokens`.
    pub fn affordable_output(&self, balance: i64, prompt_bound: u64, choices: u64) -> Option<u64> {
        let balance = u128::try_from(balance).ok()?;
        let left = balance.checked_sub(u128::from(self.request))? * PER;
        let prompt_price = self.prompt.max(self.cached_prompt);
        let left = left.checked_sub(u128::from(prompt_price) * u128::from(prompt_bound))?;
        let per_output_token = u128::from(self.completion) * u128::from(choices.max(1));
        // A free completion: as long as the model allows.
        let most = left
            .checked_div(per_output_token)
            .unwrap_or(u128::from(self.max_output_tokens));
        Some(most.min(u128::from(self.max_output_tokens)) as u64)
    }
}

/// Σ price × tokens, exact; past `u128` (prices and counts near `u64::MAX`), an overflow.
fn sum_of_products<const N: usize>(terms: [(u64, u64); N]) -> Result<u128, Overflow> {
    terms.into_iter().try_fold(0u128, |sum, (price, tokens)| {
        u128::from(price)
            .checked_mul(u128::from(tokens))
            .and_then(|product| sum.checked_add(product))
            .ok_or(Overflow)
    })
}

/// A whole number of tokens within the balance's range.
fn tokens(amount: u128) -> Result<i64, Overflow> {
    i64::try_from(amount)
        .ok()
        .filter(|amount| *amount <= MAX_BALANCE)
        .ok_or(Overflow)
}

#[cfg(test)]
mod tests;
