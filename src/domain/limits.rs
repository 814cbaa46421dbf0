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

    /// These limits as stored for a user: a JSON object of those set; `None` when none is.
    pub fn to_json(&self) -> Option<String> {
        if self.is_none() {
            return None;
        }
        let stored = StoredLimits {
            budget: self.budget.map(|budget| StoredBudget {
                tokens: budget.tokens,
                period: budget.period.as_str().to_string(),
            }),
            models: self.models.as_deref().map(<[String]>::to_vec),
            rpm: self.rpm,
            tpm: self.tpm,
        };
        serde_json::to_string(&stored).ok()
    }

    /// Limits as [`Self::to_json`] stored them; what does not read back limits nothing, but
    /// an unreadable list of models allows none.
    pub fn from_json(stored: &str) -> Limits {
        let Ok(stored) = serde_json::from_str::<StoredLimits>(stored) else {
            return Limits {
                models: Some(Vec::new().into()),
                ..Limits::default()
            };
        };
        Limits {
            budget: stored.budget.and_then(|budget| {
                Some(TokenBudget {
                    tokens: budget.tokens,
                    period: budget.period.parse().ok()?,
                })
            }),
            models: stored.models.map(Into::into),
            rpm: stored.rpm,
            tpm: stored.tpm,
        }
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

/// [`Limits`] as a user's row keeps them.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget: Option<StoredBudget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rpm: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tpm: Option<i64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredBudget {
    tokens: i64,
    period: String,
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

    #[test]
    fn limits_read_back_as_they_were_stored_and_none_store_nothing() {
        let limits = Limits {
            budget: Some(TokenBudget {
                tokens: 5000,
                period: BudgetPeriod::Week,
            }),
            models: Some(vec!["a".to_string(), "b".to_string()].into()),
            rpm: None,
            tpm: Some(900),
        };
        let stored = limits.to_json().unwrap();
        assert_eq!(Limits::from_json(&stored), limits);
        assert_eq!(Limits::default().to_json(), None);
        assert!(!Limits::from_json("not json").allows_model("a"));
    }
}
