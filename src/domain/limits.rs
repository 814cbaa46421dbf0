//! What an API key or a user may do: a budget of tokens a period, the served models it may
//! ask for, and requests and model tokens a minute. Every field is optional: `None` limits
//! nothing.

use std::sync::Arc;

use super::TokenBudget;

/// The limits of one API key or one user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub budget: Option<TokenBudget>,
    /// The served models it may ask for; `None`: every one.
    pub models: Option<Arc<[String]>>,
    /// Requests a minute at most.
    pub rpm: Option<i64>,
    /// Model tokens (prompt and completion) a minute at most.
    pub tpm: Option<i64>,
}

impl Limits {
    /// Whether these limit nothing at all.
    pub fn is_none(&self) -> bool {
        self.budget.is_none() && self.models.is_none() && self.rpm.is_none() && self.tpm.is_none()
    }

    /// Whether these limits let a call ask for the served model `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|allowed| allowed == model))
    }

    /// These limits, each one not set taken from `defaults`.
    pub fn or(self, defaults: &Limits) -> Limits {
        Limits {
            budget: self.budget.or(defaults.budget),
            models: self.models.or_else(|| defaults.models.clone()),
            rpm: self.rpm.or(defaults.rpm),
            tpm: self.tpm.or(defaults.tpm),
        }
    }

    /// The served models as stored: a JSON array of names.
    pub fn models_json(&self) -> Option<String> {
        self.models
            .as_ref()
            .map(|models| serde_json::Value::from(models.to_vec()).to_string())
    }

    /// Served models as stored back; anything but a JSON array of names allows none.
    pub fn models_from_json(stored: Option<&str>) -> Option<Arc<[String]>> {
        stored.map(|json| {
            serde_json::from_str::<Vec<String>>(json)
                .unwrap_or_default()
                .into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::BudgetPeriod;

    #[test]
    fn a_users_own_limit_wins_and_the_default_fills_what_is_not_set() {
        let defaults = Limits {
            budget: Some(TokenBudget {
                tokens: 1000,
                period: BudgetPeriod::Day,
            }),
            models: Some(vec!["a".to_string()].into()),
            rpm: Some(60),
            tpm: None,
        };
        let own = Limits {
            rpm: Some(5),
            ..Limits::default()
        };
        let merged = own.or(&defaults);
        assert_eq!(merged.rpm, Some(5));
        assert_eq!(merged.budget, defaults.budget);
        assert!(merged.allows_model("a") && !merged.allows_model("b"));
        assert_eq!(merged.tpm, None);
        assert!(Limits::default().allows_model("anything"));
    }
}
