//! A user's own limits, set by the operator (`tokenchat user limits`): each one given
//! replaces theirs, `None` gives them the configuration's default again; shown with what
//! their budget's current period has spent.

use crate::{
    db::{self, user_limits::StoredUserLimits, Db},
    domain::{Limits, TokenBudget, Username},
    services::{auth, rates, ServiceError, ServiceResult},
};

/// A change of a user's own limits: each kept (`None`) or set (`Some(None)`: back to the
/// configuration's default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserLimitsChange {
    pub budget: Option<Option<TokenBudget>>,
    pub models: Option<Option<Vec<String>>>,
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
}

/// A user's limits as the operator sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserLimits {
    /// Their own.
    pub own: Limits,
    /// What holds: their own, each one not set taken from the configuration.
    pub effective: Limits,
    /// With a budget: what its current period has spent (reservations in flight
    /// included), and when the next begins (`None`: a total budget).
    pub spent: Option<i64>,
    pub resets_at: Option<i64>,
}

/// Changes the own limits of `username` as `change` says; their limits as they are now.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn change(
    db: &Db,
    username: &Username,
    change: &UserLimitsChange,
    defaults: &Limits,
    now: i64,
) -> ServiceResult<UserLimits> {
    let key = username.key();
    let record = db::user_limits::get(db, &key)
        .await?
        .ok_or_else(|| ServiceError::NoSuchUser(username.as_str().into()))?;
    let mut own = auth::user_limits(&record.limits);
    let before = own.clone().or(defaults);
    if let Some(budget) = change.budget {
        own.budget = budget;
    }
    if let Some(models) = &change.models {
        own.models = models.clone().map(Into::into);
    }
    if let Some(rpm) = change.rpm {
        own.rpm = rpm;
    }
    if let Some(tpm) = change.tpm {
        own.tpm = tpm;
    }
    let stored = StoredUserLimits {
        user_limits: own.to_json(),
    };
    // A budget set anew or with another period starts its period over, with what the
    // user's calls of the new period hold; one whose period stays keeps its spending.
    let after = own.clone().or(defaults);
    let period_before = before.budget.map(|budget| budget.period);
    let start_over = after
        .budget
        .filter(|budget| period_before != Some(budget.period))
        .map(|budget| budget.use_at(now).period_start);
    // An operator's command, one at a time: the read and the write need no lock.
    let Some(user_id) = db::user_limits::set(db, &key, &stored, start_over).await? else {
        return Err(ServiceError::NoSuchUser(username.as_str().into()));
    };
    // What the user's rates counted stands, in their new units.
    let now_ms = now.saturating_mul(1000);
    let requests = rates::user_requests(user_id);
    let rpm = (before.rpm, after.rpm);
    db::rates::rescale(db, &requests, now_ms, rpm, rates::MINUTE_MS).await?;
    let tokens = rates::user_tokens(user_id);
    let tpm = (before.tpm, after.tpm);
    db::rates::rescale(db, &tokens, now_ms, tpm, db::rates::ADD_HORIZON_MS).await?;
    show(db, username, defaults, now).await
}

/// The limits of `username` at `now`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn show(
    db: &Db,
    username: &Username,
    defaults: &Limits,
    now: i64,
) -> ServiceResult<UserLimits> {
    let record = db::user_limits::get(db, &username.key())
        .await?
        .ok_or_else(|| ServiceError::NoSuchUser(username.as_str().into()))?;
    let own = auth::user_limits(&record.limits);
    let effective = own.clone().or(defaults);
    let current = effective.budget.map(|budget| budget.use_at(now));
    let spent = current.map(|period| period.spent(record.budget_period_start, record.budget_spent));
    Ok(UserLimits {
        own,
        effective,
        spent,
        resets_at: current.and_then(|period| period.resets_at),
    })
}
