//! The model's answers passed on to an OpenAI client as the model gave them, but for what
//! tokenchat owns: `model`, set to the name the client asked for, and, in a stream, the
//! usage that tokenchat always asks for but the client may not have.

use crate::llm::raw::{json_string, write_object, Fields};

/// `answer` (a whole completion, a chunk, an embeddings list) with its `model` set to
/// `model` and, unless `keep_usage`, without `usage`; `None` when nothing is left to send
/// (a usage chunk the client did not ask for). An answer that is not a JSON object, which
/// the model layer has already refused, goes as it came.
pub(super) fn relay(answer: String, model: &str, keep_usage: bool) -> Option<String> {
    let Ok(fields) = Fields::parse(&answer) else {
        return Some(answer);
    };
    let has_usage = fields
        .get("usage")
        .is_some_and(|usage| usage.get() != "null");
    if !keep_usage && has_usage {
        let holds_choices = fields
            .get("choices")
            .is_some_and(|choices| !matches!(choices.get().trim(), "[]" | "null"));
        if !holds_choices {
            return None;
        }
    }
    let named = json_string(model);
    let model_unchanged = fields.get("model").is_some_and(|sent| sent.get() == named);
    if model_unchanged && (keep_usage || !has_usage) {
        drop(fields);
        return Some(answer);
    }
    let rewritten = write_object(fields.raw().filter_map(|(name, value)| match name {
        "model" => Some((name, named.as_str())),
        "usage" if !keep_usage => None,
        _ => Some((name, value.get())),
    }));
    Some(rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_the_model_asked_for_and_keeps_everything_else() {
        let answer = r#"{"id":"x","model":"gpt-4o-2024-08-06","choices":[{"index":0,"logprobs":{"content":[]}}],"system_fingerprint":"fp"}"#;
        assert_eq!(
            relay(answer.into(), "gpt-4o", true).unwrap(),
            r#"{"id":"x","model":"gpt-4o","choices":[{"index":0,"logprobs":{"content":[]}}],"system_fingerprint":"fp"}"#
        );
        let same = r#"{"model":"gpt-4o", "choices":[]}"#;
        assert_eq!(relay(same.into(), "gpt-4o", true).unwrap(), same);
    }

    #[test]
    fn usage_reaches_only_a_client_that_asked_for_it() {
        let usage_chunk = r#"{"model":"m","choices":[],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(relay(usage_chunk.into(), "m", false), None);
        assert_eq!(
            relay(usage_chunk.into(), "m", true).as_deref(),
            Some(usage_chunk)
        );
        let with_choice = r#"{"model":"m","choices":[{"index":0}],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(
            relay(with_choice.into(), "m", false).unwrap(),
            r#"{"model":"m","choices":[{"index":0}]}"#
        );
        let null_usage = r#"{"model":"m","choices":[{"index":0}],"usage":null}"#;
        assert_eq!(relay(null_usage.into(), "m", false).unwrap(), null_usage);
    }
}
