//! `tokenchat user limits NAME [--budget TOKENS/PERIOD] [--models A,B] [--rpm N] [--tpm N]`:
//! shows a user's limits, or changes those given (`none`: back to the configuration's
//! default), and prints them in one line.

use std::process::ExitCode;

use anyhow::{anyhow, bail};

use super::{existing_username, open_database};
use crate::{
    clock::rfc3339,
    config::{
        user_limits::{served_models, MAX_RPM, MAX_TPM},
        Config,
    },
    db,
    domain::{TokenBudget, MAX_BALANCE},
    services::user_limits::{self, UserLimits, UserLimitsChange},
};

/// The options as given, each `None` when absent.
pub(super) struct LimitsArgs {
    pub budget: Option<String>,
    pub models: Option<String>,
    pub rpm: Option<String>,
    pub tpm: Option<String>,
}

pub(super) async fn run(
    config: Config,
    username: &str,
    args: LimitsArgs,
) -> anyhow::Result<ExitCode> {
    let change = UserLimitsChange {
        budget: args.budget.as_deref().map(budget).transpose()?,
        models: args
            .models
            .as_deref()
            .map(|list| models(list, &config.served_models()))
            .transpose()?,
        rpm: args
            .rpm
            .as_deref()
            .map(|value| per_minute("--rpm", value, MAX_RPM))
            .transpose()?,
        tpm: args
            .tpm
            .as_deref()
            .map(|value| per_minute("--tpm", value, MAX_TPM))
            .transpose()?,
    };
    let username = existing_username(username)?;
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    let (defaults, now) = (&config.user_limits, config.clock.now());
    let limits = if change == UserLimitsChange::default() {
        user_limits::show(&database, &username, defaults, now).await?
    } else {
        user_limits::change(&database, &username, &change, defaults, now).await?
    };
    println!("limits of {}: {}", username.as_str(), described(&limits));
    Ok(ExitCode::SUCCESS)
}

fn budget(value: &str) -> anyhow::Result<Option<TokenBudget>> {
    if value == "none" {
        return Ok(None);
    }
    let bad = || anyhow!("--budget {value:?}: use TOKENS/PERIOD, e.g. 50000/day, or none");
    let (tokens, period) = value.split_once('/').ok_or_else(bad)?;
    let tokens: i64 = tokens.trim().parse().map_err(|_| bad())?;
    if !(1..=MAX_BALANCE).contains(&tokens) {
        bail!("--budget: tokens must be from 1 to {MAX_BALANCE}");
    }
    let period = period
        .trim()
        .parse()
        .map_err(|_| anyhow!("--budget: the period must be day, week, month or total"))?;
    Ok(Some(TokenBudget { tokens, period }))
}

fn models(list: &str, served: &[String]) -> anyhow::Result<Option<Vec<String>>> {
    if list == "none" {
        return Ok(None);
    }
    let names = served_models(list, served).map_err(|reason| anyhow!("--models: {reason}"))?;
    Ok(Some(names.to_vec()))
}

fn per_minute(option: &str, value: &str, maximum: i64) -> anyhow::Result<Option<i64>> {
    if value == "none" {
        return Ok(None);
    }
    match value.parse::<i64>() {
        Ok(n) if (1..=maximum).contains(&n) => Ok(Some(n)),
        _ => bail!("{option} {value:?}: use a whole number from 1 to {maximum}, or none"),
    }
}

/// The limits in one line, each marked `(default)` where the configuration's holds.
fn described(limits: &UserLimits) -> String {
    let (own, effective) = (&limits.own, &limits.effective);
    // Said of a limit that holds: whose it is.
    let from = |own_set: bool| if own_set { "" } else { " (default)" };
    let budget = match effective.budget {
        None => "budget none".to_string(),
        Some(budget) => {
            let spent = limits.spent.unwrap_or(0);
            let resets = limits.resets_at.map_or_else(
                || "never resets".to_string(),
                |at| format!("resets {}", rfc3339(at)),
            );
            format!(
                "budget {}/{}{} (spent {spent}, {resets})",
                budget.tokens,
                budget.period.as_str(),
                from(own.budget.is_some())
            )
        }
    };
    let models = match &effective.models {
        None => "models every one".to_string(),
        Some(models) => format!("models {}{}", models.join(","), from(own.models.is_some())),
    };
    let rate = |name: &str, own: Option<i64>, effective: Option<i64>| match effective {
        None => format!("{name} none"),
        Some(n) => format!("{name} {n}{}", from(own.is_some())),
    };
    format!(
        "{budget}, {models}, {}, {}",
        rate("rpm", own.rpm, effective.rpm),
        rate("tpm", own.tpm, effective.tpm)
    )
}
