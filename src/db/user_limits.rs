//! A user's own limits on `users` (set by the operator), read with every credential, and
//! what their budget's current period has spent.

use super::{budget_periods::Spender, db_read, db_run, Db};

/// A user's own limits as stored: one JSON object (`None`: none of their own), named as the
/// credential look-ups select it (`user_limits`) so it sits beside a key's in one row.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredUserLimits {
    pub user_limits: Option<String>,
}

/// The column of [`StoredUserLimits`] from `users u`, for a credential look-up.
pub const SELECTED: &str = "u.limits AS user_limits";

/// A user's limits and what the period that began at `budget_period_start` spent.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct UserLimitsRecord {
    #[sqlx(flatten)]
    pub limits: StoredUserLimits,
    pub budget_spent: i64,
    pub budget_period_start: Option<i64>,
}

/// Sets the user's own limits (by `username_key`) to `limits`, their budget's period
/// started over at `start_over` when given (`budget_periods`); the user's id, `None` when
/// there is no such user.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn set(
    db: &Db,
    username_key: &str,
    limits: &StoredUserLimits,
    start_over: Option<i64>,
) -> Result<Option<i64>, sqlx::Error> {
    super::budget_periods::retried(|| set_once(db, username_key, limits, start_over)).await
}

async fn set_once(
    db: &Db,
    username_key: &str,
    limits: &StoredUserLimits,
    start_over: Option<i64>,
) -> Result<Option<i64>, sqlx::Error> {
    let locks_rows = matches!(db, Db::Postgres(_));
    db_run!(db, pool => {
        let mut tx = pool.begin().await?;
        // The calls a new period takes first, then the user's row, so no reservation
        // comes between (`budget_periods`).
        if let Some(start) = start_over.filter(|_| locks_rows) {
            sqlx::query(super::budget_periods::SHORT_LOCK_WAIT).execute(&mut *tx).await?;
            let id: Option<i64> =
                sqlx::query_scalar("SELECT id FROM users WHERE username_key = $1")
                    .bind(username_key)
                    .fetch_optional(&mut *tx)
                    .await?;
            for statement in Spender::User.locks() {
                sqlx::query(&statement)
                    .bind(id)
                    .bind(start)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let id: Option<i64> =
            sqlx::query_scalar("UPDATE users SET limits = $2 WHERE username_key = $1 RETURNING id")
                .bind(username_key)
                .bind(&limits.user_limits)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(id) = id else {
            return Ok(None);
        };
        if let Some(start) = start_over {
            for statement in Spender::User.start_over() {
                sqlx::query(&statement)
                    .bind(id)
                    .bind(start)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(Some(id))
    })
}

/// The user's own limits and budget use (by `username_key`); `None` for no such user.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn get(db: &Db, username_key: &str) -> Result<Option<UserLimitsRecord>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT limits AS user_limits, budget_spent, budget_period_start
         FROM users WHERE username_key = $1",
    )
    .bind(username_key)
    .fetch_optional(pool)
    .await)
}
