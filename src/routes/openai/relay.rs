//! The model's answers passed on to an OpenAI client as the model gave them, but for what
//! tokenchat owns: `model`, set to the name the client asked for; in a stream, the usage
//! that tokenchat always asks for but the client may not have; and `usage.cost`, what the
//! call was charged.

use crate::llm::raw::{json_string, write_object, Fields, NotAnObject};

/// What tokenchat writes in an answer's `usage`.
#[derive(Clone, Copy)]
pub(super) enum Charge<'a> {
    /// Nothing: the model's usage goes as it came (less a `cost` of the upstream's own).
    None,
    /// The charge, as `cost`, beside the model's counts (a usage of it alone when the
    /// answer has none).
    Cost(i64),
    /// This usage object (the charge and what it was worked out from) in place of the
    /// model's, which it did not send, tokenchat could not read, or left a count out of.
    Usage(&'a str),
}

/// `answer` (a whole completion, a chunk, an embeddings list) with its `model` set to
/// `model`, its `usage` as `charge` says and, unless `keep_usage`, without `usage`; `None`
/// when nothing is left to send (a usage chunk the client did not ask for). A field the
/// model gave twice is passed on once, at its last value (as most readers take it); an
/// answer that is not a JSON object, which the model layer has already refused, goes as it
/// came.
pub(super) fn relay(
    answer: String,
    model: &str,
    keep_usage: bool,
    charge: Charge<'_>,
) -> Option<String> {
    let parsed = match Fields::parse(&answer) {
        Err(NotAnObject::Duplicate(_)) => Fields::parse_last_wins(&answer),
        parsed => parsed,
    };
    let Ok(fields) = parsed else {
        return Some(answer);
    };
    let has_usage = carries_usage(&fields);
    if !keep_usage && has_usage && !holds_choices(&fields) {
        return None;
    }
    let named = json_string(model);
    let model_unchanged = fields.get("model").is_some_and(|sent| sent.get() == named);
    // The usage to send, when it is not the model's as it came: with the charge as its
    // `cost`, or without a `cost` of the upstream's own (`usage.cost` is tokenchat's word).
    let usage = match (keep_usage, charge) {
        (false, _) => None,
        (true, Charge::Cost(cost)) => {
            let usage = fields.get("usage").map_or("null", |usage| usage.get());
            Some(with_cost(usage, cost))
        }
        (true, Charge::Usage(usage)) => Some(usage.to_string()),
        (true, Charge::None) => fields
            .get("usage")
            .and_then(|usage| without_cost(usage.get())),
    };
    if model_unchanged && (keep_usage || !has_usage) && usage.is_none() {
        drop(fields);
        return Some(answer);
    }
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

/// Whether a chunk of a stream is a usage chunk: a usage, readable or not, and no choice.
/// (Some servers put the usage so far in every chunk, vLLM's `continuous_usage_stats`:
/// those hold choices.)
pub(super) fn is_usage_chunk(chunk: &str) -> bool {
    // Most chunks name no usage: they are not read field by field.
    if !chunk.contains(r#""usage""#) {
        return false;
    }
    Fields::parse(chunk).is_ok_and(|fields| carries_usage(&fields) && !holds_choices(&fields))
}

/// Whether an answer or a chunk carries a usage, readable or not (`null` is none).
fn carries_usage(fields: &Fields<'_>) -> bool {
    let usage = fields.get("usage").map(|usage| usage.get().trim());
    usage.is_some_and(|usage| usage != "null")
}

/// A chunk that carries a usage (readable or not) beside its choices, as a usage chunk of
/// its own: the same fields, its choices none. `None` when it carries no usage.
pub(super) fn usage_apart(chunk: &str) -> Option<String> {
    if !chunk.contains(r#""usage""#) {
        return None;
    }
    let fields = Fields::parse(chunk).ok().filter(carries_usage)?;
    Some(write_object(fields.raw().map(|(name, value)| match name {
        "choices" => (name, "[]"),
        _ => (name, value.get()),
    })))
}

fn holds_choices(fields: &Fields<'_>) -> bool {
    fields.get("choices").is_some_and(|choices| {
        let choices = choices.get().trim();
        let empty = choices
            .strip_prefix('[')
            .and_then(|inside| inside.strip_suffix(']'))
            .is_some_and(|inside| inside.trim().is_empty());
        !(empty || choices == "null")
    })
}

/// A usage object (its raw JSON; `null` or anything but an object counts as none) with
/// `"cost"` first, the charge: a `cost` of the upstream's own (OpenRouter's, in dollars)
/// gives way to it rather than stand twice in one object.
fn with_cost(usage: &str, cost: i64) -> String {
    let cost = cost.to_string();
    match Fields::parse(usage) {
        Ok(fields) => {
            let rest = fields
                .raw()
                .filter(|(name, _)| *name != "cost")
                .map(|(name, value)| (name, value.get()));
            write_object(std::iter::once(("cost", cost.as_str())).chain(rest))
        }
        // An object it cannot read field by field (a field twice, too many): the charge
        // put first, the rest kept as it came.
        Err(_) => {
            let usage = usage.trim();
            let rest = usage
                .strip_prefix('{')
                .map(str::trim_start)
                .filter(|_| usage.ends_with('}'));
            match rest {
                Some("}") | None => format!(r#"{{"cost":{cost}}}"#),
                Some(rest) => format!(r#"{{"cost":{cost},{rest}"#),
            }
        }
    }
}

/// A usage object without a `cost` of the upstream's own, when it has one (`None`: as it
/// came). Cheap for the usual usage, which never names one.
fn without_cost(usage: &str) -> Option<String> {
    if !usage.contains("cost") {
        return None;
    }
    let fields = Fields::parse(usage).ok()?;
    fields.get("cost")?;
    let rest = fields
        .raw()
        .filter(|(name, _)| *name != "cost")
        .map(|(name, value)| (name, value.get()));
    Some(write_object(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_the_model_asked_for_and_keeps_everything_else() {
        let answer = r#"{"id":"x","model":"gpt-4o-2024-08-06","choices":[{"index":0,"logprobs":{"content":[]}}],"system_fingerprint":"fp"}"#;
        assert_eq!(
            relay(answer.into(), "gpt-4o", true, Charge::None).unwrap(),
            r#"{"id":"x","model":"gpt-4o","choices":[{"index":0,"logprobs":{"content":[]}}],"system_fingerprint":"fp"}"#
        );
        let same = r#"{"model":"gpt-4o", "choices":[]}"#;
        assert_eq!(
            relay(same.into(), "gpt-4o", true, Charge::None).unwrap(),
            same
        );
    }

    #[test]
    fn usage_reaches_only_a_client_that_asked_for_it() {
        let usage_chunk = r#"{"model":"m","choices":[],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(relay(usage_chunk.into(), "m", false, Charge::None), None);
        assert_eq!(
            relay(usage_chunk.into(), "m", true, Charge::None).as_deref(),
            Some(usage_chunk)
        );
        let with_choice = r#"{"model":"m","choices":[{"index":0}],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(
            relay(with_choice.into(), "m", false, Charge::None).unwrap(),
            r#"{"model":"m","choices":[{"index":0}]}"#
        );
        let null_usage = r#"{"model":"m","choices":[{"index":0}],"usage":null}"#;
        assert_eq!(
            relay(null_usage.into(), "m", false, Charge::None).unwrap(),
            null_usage
        );
    }

    #[test]
    fn the_charge_goes_into_the_usage_or_a_usage_of_its_own() {
        let answer =
            r#"{"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert_eq!(
            relay(answer.into(), "m", true, Charge::Cost(7)).unwrap(),
            r#"{"model":"m","choices":[],"usage":{"cost":7,"prompt_tokens":1,"completion_tokens":2}}"#
        );
        let without = r#"{"model":"m","choices":[]}"#;
        assert_eq!(
            relay(without.into(), "m", true, Charge::Cost(7)).unwrap(),
            r#"{"model":"m","choices":[],"usage":{"cost":7}}"#
        );
        let null_usage = r#"{"model":"m","usage":null}"#;
        assert_eq!(
            relay(null_usage.into(), "m", true, Charge::Cost(0)).unwrap(),
            r#"{"model":"m","usage":{"cost":0}}"#
        );
        let empty = r#"{"usage":{ }}"#;
        assert_eq!(
            relay(empty.into(), "m", true, Charge::Cost(3)).unwrap(),
            r#"{"usage":{"cost":3}}"#
        );
        // The upstream's own cost gives way to the charge: one `cost`, tokenchat's; and
        // where the charge is not known yet (a chunk mid-stream), none.
        let priced_upstream = r#"{"usage":{"prompt_tokens":1,"cost":0.00123}}"#;
        assert_eq!(
            relay(priced_upstream.into(), "m", true, Charge::Cost(5)).unwrap(),
            r#"{"usage":{"cost":5,"prompt_tokens":1}}"#
        );
        assert_eq!(
            relay(priced_upstream.into(), "m", true, Charge::None).unwrap(),
            r#"{"usage":{"prompt_tokens":1}}"#
        );
        // A usage that cannot be read field by field keeps its fields, the charge first.
        let twice = r#"{"usage":{"prompt_tokens":1,"prompt_tokens":1}}"#;
        assert_eq!(
            relay(twice.into(), "m", true, Charge::Cost(5)).unwrap(),
            r#"{"usage":{"cost":5,"prompt_tokens":1,"prompt_tokens":1}}"#
        );
    }

    #[test]
    fn a_field_the_model_gave_twice_is_passed_on_once_at_its_last_value() {
        let twice = r#"{"model":"vendor/internal","id":"a","model":"x","id":"b","usage":{"prompt_tokens":1}}"#;
        assert_eq!(
            relay(twice.into(), "m", true, Charge::Cost(5)).unwrap(),
            r#"{"model":"m","id":"b","usage":{"cost":5,"prompt_tokens":1}}"#
        );
    }

    #[test]
    fn a_usage_of_tokenchats_own_takes_the_place_of_one_it_could_not_read_or_was_not_sent() {
        let ours = r#"{"cost":9,"prompt_tokens":3,"completion_tokens":2}"#;
        for (answer, relayed) in [
            (
                r#"{"model":"m","usage":"lots"}"#,
                r#"{"model":"m","usage":{"cost":9,"prompt_tokens":3,"completion_tokens":2}}"#,
            ),
            (
                r#"{"model":"m","usage":null}"#,
                r#"{"model":"m","usage":{"cost":9,"prompt_tokens":3,"completion_tokens":2}}"#,
            ),
            (
                r#"{"model":"m"}"#,
                r#"{"model":"m","usage":{"cost":9,"prompt_tokens":3,"completion_tokens":2}}"#,
            ),
        ] {
            let charge = Charge::Usage(ours);
            assert_eq!(relay(answer.into(), "m", true, charge).unwrap(), relayed);
        }
    }

    #[test]
    fn a_usage_chunk_is_one_without_choices_however_its_empty_list_is_written() {
        for chunk in [
            r#"{"choices":[],"usage":{}}"#,
            r#"{"choices":[ ],"usage":{}}"#,
            "{\"choices\":[\n  ],\"usage\":{}}",
            r#"{"choices":null,"usage":{}}"#,
            r#"{"usage":{}}"#,
        ] {
            assert!(is_usage_chunk(chunk), "{chunk}");
        }
        assert!(!is_usage_chunk(r#"{"choices":[{"index":0}],"usage":{}}"#));
    }
}
