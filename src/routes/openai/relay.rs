//! The model's answers passed on to an OpenAI client as the model gave them, but for what
//! tokenchat owns: `model`, set to the name the client asked for; in a stream, the usage
//! that tokenchat always asks for but the client may not have; and `usage.cost`, what the
//! call was charged.

use crate::llm::raw::{json_string, write_object, Fields};

/// `answer` (a whole completion, a chunk, an embeddings list) with its `model` set to
/// `model`, `cost` (when given) added to its `usage` (one is added when it has none) and,
/// unless `keep_usage`, without `usage`; `None` when nothing is left to send (a usage
/// chunk the client did not ask for). An answer that is not a JSON object, which the model
/// layer has already refused, goes as it came.
pub(super) fn relay(
    answer: String,
    model: &str,
    keep_usage: bool,
    cost: Option<i64>,
) -> Option<String> {
    let Ok(fields) = Fields::parse(&answer) else {
        return Some(answer);
    };
    let has_usage = fields
        .get("usage")
        .is_some_and(|usage| usage.get() != "null");
    if !keep_usage && has_usage && !holds_choices(&fields) {
        return None;
    }
    let named = json_string(model);
    let model_unchanged = fields.get("model").is_some_and(|sent| sent.get() == named);
    let cost = cost.filter(|_| keep_usage);
    if model_unchanged && (keep_usage || !has_usage) && cost.is_none() {
        drop(fields);
        return Some(answer);
    }
    let usage = cost.map(|cost| {
        let usage = fields.get("usage").map_or("null", |usage| usage.get());
        with_cost(usage, cost)
    });
    let mut rewritten = write_object(fields.raw().filter_map(|(name, value)| match name {
        "model" => Some((name, named.as_str())),
        "usage" if !keep_usage => None,
        "usage" => Some((name, usage.as_deref().unwrap_or(value.get()))),
        _ => Some((name, value.get())),
    }));
    if let (Some(usage), None) = (&usage, fields.get("usage")) {
        rewritten.pop();
        if rewritten.len() > 1 {
            rewritten.push(',');
        }
        rewritten.push_str(r#""usage":"#);
        rewritten.push_str(usage);
        rewritten.push('}');
    }
    Some(rewritten)
}

/// Whether a chunk of a stream holds any choice: a usage chunk has none. (Some servers put
/// the usage so far in every chunk, vLLM's `continuous_usage_stats`: those hold choices.)
pub(super) fn is_usage_chunk(chunk: &str) -> bool {
    Fields::parse(chunk).is_ok_and(|fields| !holds_choices(&fields))
}

fn holds_choices(fields: &Fields<'_>) -> bool {
    fields
        .get("choices")
        .is_some_and(|choices| !matches!(choices.get().trim(), "[]" | "null"))
}

/// A usage object (its raw JSON; `null` or anything but an object counts as none) with
/// `"cost"` first, the charge: a `cost` of the upstream's own (OpenRouter's, in dollars)
/// gives way to it rather than stand twice in one object.
fn with_cost(usage: &str, cost: i64) -> String {
    let cost = cost.to_string();
    let Ok(fields) = Fields::parse(usage) else {
        return format!(r#"{{"cost":{cost}}}"#);
    };
    let rest = fields
        .raw()
        .filter(|(name, _)| *name != "cost")
        .map(|(name, value)| (name, value.get()));
    write_object(std::iter::once(("cost", cost.as_str())).chain(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_the_model_asked_for_and_keeps_everything_else() {
        let answer = r#"{"id":"x","model":"gpt-4o-2024-08-06","choices":[{"index":0,"logprobs":{"content":[]}}],"system_fingerprint":"fp"}"#;
        assert_eq!(
            relay(answer.into(), "gpt-4o", true, None).unwrap(),
            r#"{"id":"x","model":"gpt-4o","choices":[{"index":0,"logprobs":{"content":[]}}],"system_fingerprint":"fp"}"#
        );
        let same = r#"{"model":"gpt-4o", "choices":[]}"#;
        assert_eq!(relay(same.into(), "gpt-4o", true, None).unwrap(), same);
    }

    #[test]
    fn usage_reaches_only_a_client_that_asked_for_it() {
        let usage_chunk = r#"{"model":"m","choices":[],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(relay(usage_chunk.into(), "m", false, None), None);
        assert_eq!(
            relay(usage_chunk.into(), "m", true, None).as_deref(),
            Some(usage_chunk)
        );
        let with_choice = r#"{"model":"m","choices":[{"index":0}],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(
            relay(with_choice.into(), "m", false, None).unwrap(),
            r#"{"model":"m","choices":[{"index":0}]}"#
        );
        let null_usage = r#"{"model":"m","choices":[{"index":0}],"usage":null}"#;
        assert_eq!(
            relay(null_usage.into(), "m", false, None).unwrap(),
            null_usage
        );
    }

    #[test]
    fn the_charge_goes_into_the_usage_or_a_usage_of_its_own() {
        let answer =
            r#"{"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert_eq!(
            relay(answer.into(), "m", true, Some(7)).unwrap(),
            r#"{"model":"m","choices":[],"usage":{"cost":7,"prompt_tokens":1,"completion_tokens":2}}"#
        );
        let without = r#"{"model":"m","choices":[]}"#;
        assert_eq!(
            relay(without.into(), "m", true, Some(7)).unwrap(),
            r#"{"model":"m","choices":[],"usage":{"cost":7}}"#
        );
        let null_usage = r#"{"model":"m","usage":null}"#;
        assert_eq!(
            relay(null_usage.into(), "m", true, Some(0)).unwrap(),
            r#"{"model":"m","usage":{"cost":0}}"#
        );
        let empty = r#"{"usage":{ }}"#;
        assert_eq!(
            relay(empty.into(), "m", true, Some(3)).unwrap(),
            r#"{"usage":{"cost":3}}"#
        );
        // The upstream's own cost gives way to the charge: one `cost`, tokenchat's.
        let priced_upstream = r#"{"usage":{"prompt_tokens":1,"cost":0.00123}}"#;
        assert_eq!(
            relay(priced_upstream.into(), "m", true, Some(5)).unwrap(),
            r#"{"usage":{"cost":5,"prompt_tokens":1}}"#
        );
    }
}
