//! A user's own limits on `users` (set by the operator), read with every credential, and
//! what their budget's current period has spent.

use super::{db_execute, db_read, Db};

/// A user's own limits as stored, named as the credential look-ups select them (`user_`
/// before each column) so they sit beside a key's in one row.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredUserLimits {
    /// Tokens a period, and the period's name.
    pub user_budget_tokens: Option<i64>,
    pub user_budget_period: Option<String>,
    /// The served models, a JSON array; `None`: the configuration's default.
    pub user_models: Option<String>,
    pub user_rpm: Option<i64>,
    pub user_tpm: Option<i64>,
}

/// The columns of [`StoredUserLimits`] from `users u`, for a credential look-up.
pub const SELECTED: &str = "u.budget_tokens AS user_budget_tokens, \
     u.budget_period AS user_budget_period, u.models AS user_models, u.rpm AS user_rpm, \
     u.tpm AS user_tpm";

/// A user's limits and what the period that began at `budget_period_start` spent.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct UserLimitsRecord {
    #[sqlx(flatten)]
    pub limits: StoredUserLimits,
    pub budget_spent: i64,
    pub budget_period_start: Option<i64>,
}

/// Sets the user's own limits (by `username_key`) to `limits`; whether the user exists.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn set(
    db: &Db,
    username_key: &str,
    limits: &StoredUserLimits,
) -> Result<bool, sqlx::Error> {
    let changed = db_execute!(
        db,
        sqlx::query(
            "UPDATE users SET budget_tokens = $2, budget_period = $3, models = $4, rpm = $5,
                              tpm = $6
             WHERE username_key = $1",
        )
        .bind(username_key)
        .bind(limits.user_budget_tokens)
        .bind(&limits.user_budget_period)
        .bind(&limits.user_models)
        .bind(limits.user_rpm)
        .bind(limits.user_tpm)
    )?;
    Ok(changed == 1)
}

/// The user's own limits and budget use (by `username_key`); `None` for no such user.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn get(db: &Db, username_key: &str) -> Result<Option<UserLimitsRecord>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT budget_tokens AS user_budget_tokens, budget_period AS user_budget_period,
                models AS user_models, rpm AS user_rpm, tpm AS user_tpm,
                budget_spent, budget_period_start
         FROM users WHERE username_key = $1",
    )
    .bind(username_key)
    .fetch_optional(pool)
    .await)
}
