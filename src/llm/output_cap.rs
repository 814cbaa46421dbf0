//! The field that carries tokenchat's own output cap upstream: `max_tokens`, as the contract
//! says, or `max_completion_tokens` for a model that refuses `max_tokens` as unsupported
//! (OpenAI's reasoning models), learnt from its first refusal.

use std::{
    collections::HashSet,
    sync::{PoisonError, RwLock},
};

use super::error::Rejection;

/// Which field carries tokenchat's output cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapField {
    MaxTokens,
    MaxCompletionTokens,
}

impl CapField {
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// The models of one upstream that refused `max_tokens` as unsupported. Bounded: the
/// models an upstream is asked for are those its targets name in the configuration.
#[derive(Default)]
pub struct CapFields {
    refusing_max_tokens: RwLock<HashSet<Box<str>>>,
}

impl CapFields {
    /// The field in which `model` takes the cap.
    pub fn of(&self, model: &str) -> CapField {
        let refusing = self
            .refusing_max_tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if refusing.contains(model) {
            CapField::MaxCompletionTokens
        } else {
            CapField::MaxTokens
        }
    }

    /// Whether `rejection` refuses `max_tokens` as unsupported, as OpenAI's reasoning
    /// models do (`"param": "max_tokens"`, `"code": "unsupported_parameter"`, a message
    /// naming `max_completion_tokens`); if it does, `model` takes `max_completion_tokens`
    /// from now on. A `max_tokens` refused for its value (too large) is not this.
    pub fn learn(&self, model: &str, rejection: &Rejection) -> bool {
        let refuses = rejection.param.as_deref() == Some("max_tokens")
            && (rejection.code.as_deref() == Some("unsupported_parameter")
                || rejection.message.contains("max_completion_tokens"));
        if refuses {
            self.refusing_max_tokens
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(model.into());
        }
        refuses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(param: &str, code: Option<&str>, message: &str) -> Rejection {
        Rejection {
            status: 400,
            message: message.to_owned(),
            kind: Some("invalid_request_error".to_owned()),
            param: Some(param.to_owned()),
            code: code.map(str::to_owned),
        }
    }

    #[test]
    fn only_max_tokens_refused_as_unsupported_moves_the_cap_to_max_completion_tokens() {
        let fields = CapFields::default();
        let too_large = rejection(
            "max_tokens",
            Some("invalid_value"),
            "max_tokens is too large: 99999. This model supports at most 4096 tokens.",
        );
        assert!(!fields.learn("gpt-4o", &too_large));
        let other = rejection("temperature", Some("unsupported_parameter"), "no");
        assert!(!fields.learn("o3", &other));
        assert_eq!(fields.of("o3"), CapField::MaxTokens);
        let unsupported = rejection("max_tokens", None, "Use 'max_completion_tokens' instead.");
        assert!(fields.learn("o3", &unsupported));
        assert_eq!(fields.of("o3"), CapField::MaxCompletionTokens);
        assert_eq!(fields.of("gpt-4o"), CapField::MaxTokens);
    }
}
