//! The charge formula at its edges, the reservation against every usage within its bounds,
//! and the prompt bound against the model's own encoding on adversarial text.

use proptest::prelude::*;

use super::*;

fn book_prices() -> Prices {
    Prices {
        prompt: 150,
        cached_prompt: 75,
        completion: 600,
        request: 1,
        max_output_tokens: 4096,
    }
}

fn used(prompt: u64, cached: u64, completion: u64) -> TokenCounts {
    TokenCounts {
        prompt,
        cached,
        completion,
    }
}

#[test]
fn zero_usage_costs_the_request_price_alone() {
    assert_eq!(book_prices().charge(TokenCounts::default()), Ok(1));
    let free = Prices {
        request: 0,
        ..book_prices()
    };
    assert_eq!(free.charge(TokenCounts::default()), Ok(0));
}

#[test]
fn the_per_token_part_is_rounded_up_once_per_call() {
    // 150 + 600 = 750 millionths of a token: one token, plus the request.
    assert_eq!(book_prices().charge(used(1, 0, 1)), Ok(2));
    // 1,000,000 * 150 = exactly 150 tokens: no rounding.
    assert_eq!(book_prices().charge(used(1_000_000, 0, 0)), Ok(151));
    // One millionth more rounds up to the next token.
    let exact = Prices {
        prompt: 1,
        ..book_prices()
    };
    assert_eq!(exact.charge(used(1_000_001, 0, 0)), Ok(3));
}

#[test]
fn cached_tokens_are_priced_once_at_their_own_price() {
    // 1,000,000 prompt tokens of which 400,000 cached: 600,000 * 150 + 400,000 * 75.
    let charge = book_prices().charge(used(1_000_000, 400_000, 0));
    assert_eq!(charge, Ok(1 + 90 + 30));
    // Only cached.
    assert_eq!(book_prices().charge(used(2_000_000, 2_000_000, 0)), Ok(151));
    // A model that reports more cached tokens than prompt tokens gets them counted as
    // prompt tokens, never as more.
    assert_eq!(
        book_prices().charge(used(1_000_000, 5_000_000, 0)),
        book_prices().charge(used(1_000_000, 1_000_000, 0))
    );
}

#[test]
fn the_largest_values_are_exact_and_past_the_ceiling_is_refused() {
    let dear = Prices {
        prompt: u64::MAX,
        cached_prompt: u64::MAX,
        completion: u64::MAX,
        request: 0,
        max_output_tokens: u64::MAX,
    };
    assert_eq!(dear.charge(used(u64::MAX, 0, u64::MAX)), Err(Overflow));
    assert_eq!(dear.reservation(u64::MAX, u64::MAX), Err(Overflow));
    // Right at the ceiling: MAX_BALANCE tokens exactly.
    let at_ceiling = Prices {
        prompt: 1_000_000,
        ..book_prices()
    };
    let tokens = (MAX_BALANCE - 1) as u64;
    assert_eq!(at_ceiling.charge(used(tokens, 0, 0)), Ok(MAX_BALANCE));
    assert_eq!(at_ceiling.charge(used(tokens + 1, 0, 0)), Err(Overflow));
}

#[test]
fn the_balance_covers_the_longest_answer_it_can_pay_for() {
    let prices = book_prices();
    // 10 tokens: 1 for the request, 9,000,000 millionths left; a 1,000-token prompt at 150
    // takes 150,000; 8,850,000 / 600 = 14,750 tokens, capped at 4,096.
    assert_eq!(prices.affordable_output(10, 1_000, 1), Some(4_096));
    // 2 tokens: 1,000,000 - 150,000 = 850,000 / 600 = 1,416.
    assert_eq!(prices.affordable_output(2, 1_000, 1), Some(1_416));
    assert_eq!(prices.reservation(1_000, 1_416), Ok(2));
    assert_eq!(prices.reservation(1_000, 1_417), Ok(3));
    // Two choices share it.
    assert_eq!(prices.affordable_output(2, 1_000, 2), Some(708));
    // Not even the request.
    assert_eq!(prices.affordable_output(0, 0, 1), None);
    // The prompt alone is past it.
    assert_eq!(prices.affordable_output(1, 1, 1), None);
}

#[test]
fn a_model_whose_encoding_is_known_is_counted_with_it_and_any_other_by_bytes() {
    assert_eq!(Tokenizer::for_model("gpt-4o-mini"), Tokenizer::O200kBase);
    assert_eq!(Tokenizer::for_model("gpt-4"), Tokenizer::Cl100kBase);
    assert_eq!(Tokenizer::for_model("llama3.2"), Tokenizer::Bytes);
    assert_eq!(Tokenizer::O200kBase.count("hello world"), 2);
    assert_eq!(Tokenizer::Bytes.count("héllo"), 6);
}

/// Text that a tokenizer finds hardest to compress: lone bytes of every script, emoji with
/// joiners, combining marks, control characters, runs of digits and of spaces.
fn adversarial_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            any::<char>().prop_map(String::from),
            Just("\u{200d}".to_string()),
            Just("👩‍👩‍👧‍👦".to_string()),
            Just("e\u{301}\u{302}\u{303}".to_string()),
            "[0-9]{1,12}",
            " {1,40}",
            "[\\x00-\\x1f]{1,4}",
            "[a-zA-Z]{1,20}",
            Just("<|endoftext|>".to_string()),
        ],
        0..64,
    )
    .prop_map(|pieces| pieces.concat())
}

/// `text` counted by `tiktoken-rs`, OpenAI's own algorithm, which tokenchat's faster
/// counting must agree with.
fn reference_count(tokenizer: Tokenizer, text: &str) -> u64 {
    let reference = match tokenizer {
        Tokenizer::O200kBase => tiktoken_rs::o200k_base_singleton(),
        Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        Tokenizer::Bytes => return text.len() as u64,
    };
    reference.count_ordinary(text) as u64
}

proptest! {
    #[test]
    fn the_count_is_tiktokens_on_any_text(text in adversarial_text()) {
        for tokenizer in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
            prop_assert_eq!(tokenizer.count(&text), reference_count(tokenizer, &text));
        }
    }

    #[test]
    fn a_prompt_never_holds_more_tokens_than_its_bound(
        messages in prop::collection::vec(adversarial_text(), 1..6),
    ) {
        for tokenizer in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
            let bound = Tokenizer::Bytes.prompt_bound(messages.iter().map(String::as_str));
            let counted = tokenizer.prompt_bound(messages.iter().map(String::as_str));
            // The model's own count (tiktoken's, the reference implementation), the way
            // OpenAI's chat format adds 3 per message and 3 per reply: within both bounds.
            let actual: u64 = messages.iter().map(|text| reference_count(tokenizer, text) + 3).sum::<u64>() + 3;
            prop_assert!(actual <= counted, "{actual} > {counted}");
            prop_assert!(actual <= bound, "{actual} > {bound}");
        }
    }

    #[test]
    fn no_usage_within_the_bounds_costs_more_than_the_reservation(
        prompt in 0u64..1_000_000, cached_prompt in 0u64..1_000_000,
        completion in 0u64..1_000_000, request in 0u64..1_000,
        prompt_bound in 0u64..10_000_000, output in 0u64..1_000_000,
        used_prompt_share in 0u64..=100, cached_share in 0u64..=100, used_output_share in 0u64..=100,
    ) {
        let prices = Prices { prompt, cached_prompt, completion, request, max_output_tokens: output };
        let reserved = prices.reservation(prompt_bound, output).unwrap();
        let used_prompt = prompt_bound * used_prompt_share / 100;
        let used = TokenCounts {
            prompt: used_prompt,
            cached: used_prompt * cached_share / 100,
            completion: output * used_output_share / 100,
        };
        prop_assert!(prices.charge(used).unwrap() <= reserved);
    }

    #[test]
    fn the_affordable_answer_is_the_longest_the_balance_covers(
        prompt in 0u64..1_000_000, completion in 1u64..1_000_000, request in 0u64..100,
        balance in 0i64..1_000_000, prompt_bound in 0u64..100_000, choices in 1u64..4,
    ) {
        let prices = Prices { prompt, cached_prompt: prompt, completion, request, max_output_tokens: 1 << 40 };
        match prices.affordable_output(balance, prompt_bound, choices) {
            Some(cap) => {
                prop_assert!(prices.reservation(prompt_bound, cap * choices).unwrap() <= balance);
                prop_assert!(prices.reservation(prompt_bound, (cap + 1) * choices).unwrap() > balance);
            }
            None => prop_assert!(prices.reservation(prompt_bound, 0).unwrap() > balance),
        }
    }
}
