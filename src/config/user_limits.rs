//! The limits every user has unless the operator set their own (`tokenchat user limits`):
//! `USER_BUDGET_TOKENS` with `USER_BUDGET_PERIOD`, `USER_MODELS`, `USER_RPM`, `USER_TPM`.
//! Unset, each limits nothing.

use super::{vars::Vars, ConfigError};
use crate::domain::{BudgetPeriod, Limits, TokenBudget, MAX_BALANCE};

/// The largest requests a minute of a user or key: a thousand a second.
pub const MAX_RPM: i64 = 60_000;
/// The largest model tokens a minute of a user or key: beyond any model's.
pub const MAX_TPM: i64 = 10_000_000_000;

/// The configuration's default limits of a user; `served` names the models served.
pub(super) fn default_user_limits(vars: &Vars, served: &[String]) -> Result<Limits, ConfigError> {
    let budget = match vars.optional("USER_BUDGET_TOKENS") {
        None => {
            if vars.optional("USER_BUDGET_PERIOD").is_some() {
                return Err(ConfigError::new(
                    "USER_BUDGET_PERIOD",
                    "is set without USER_BUDGET_TOKENS".to_string(),
                ));
            }
            None
        }
        Some(_) => Some(TokenBudget {
            tokens: vars.between("USER_BUDGET_TOKENS", "", 1, MAX_BALANCE)?,
            period: budget_period(vars)?,
        }),
    };
    let models = match vars.optional("USER_MODELS") {
        None => None,
        Some(list) => Some(
            served_models(&list, served)
                .map_err(|reason| ConfigError::new("USER_MODELS", reason))?,
        ),
    };
    let per_minute = |name: &'static str, maximum: i64| match vars.optional(name) {
        None => Ok(None),
        Some(_) => vars.between(name, "", 1, maximum).map(Some),
    };
    Ok(Limits {
        budget,
        models,
        rpm: per_minute("USER_RPM", MAX_RPM)?,
        tpm: per_minute("USER_TPM", MAX_TPM)?,
    })
}

/// `USER_BUDGET_PERIOD`: day, week, month (the default) or total.
fn budget_period(vars: &Vars) -> Result<BudgetPeriod, ConfigError> {
    let raw = vars.string("USER_BUDGET_PERIOD", "month");
    raw.trim().parse().map_err(|_| {
        ConfigError::new(
            "USER_BUDGET_PERIOD",
            format!("{raw:?} (use day, week, month or total)"),
        )
    })
}

/// A comma-separated list of served models, each checked: at least one, each served.
pub fn served_models(list: &str, served: &[String]) -> Result<std::sync::Arc<[String]>, String> {
    let mut names: Vec<String> = Vec::new();
    for name in list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        if !served.iter().any(|served| served == name) {
            return Err(format!(
                "{name:?} is not a served model (served: {})",
                served.join(", ")
            ));
        }
        if !names.iter().any(|known| known == name) {
            names.push(name.to_string());
        }
    }
    if names.is_empty() {
        return Err("names no model".to_string());
    }
    Ok(names.into())
}
