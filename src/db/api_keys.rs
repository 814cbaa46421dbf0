//! Queries on `api_keys`, which hold only SHA-256 hashes of the keys handed out.

use super::{budget_periods::Spender, db_execute, db_read, db_run, unix_now, Db};

/// A live key as its owner sees it in a list.
#[derive(Debug, sqlx::FromRow)]
pub struct ApiKey {
    pub id: i64,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    /// The served models it may ask for, a JSON array; `None`: every one.
    pub models: Option<String>,
    /// When it stops working (Unix seconds); `None`: never, until revoked.
    pub expires_at: Option<i64>,
    /// Its budget: tokens a period (`budget_period`: day, week, month or total).
    pub budget_tokens: Option<i64>,
    pub budget_period: Option<String>,
    /// What the period that began at `budget_period_start` spent, reservations included.
    pub budget_spent: i64,
    pub budget_period_start: Option<i64>,
    /// Requests a minute at most.
    pub rpm: Option<i64>,
    /// Model tokens a minute at most.
    pub tpm: Option<i64>,
}

/// A key's limits as stored: the models it may ask for (a JSON array) and its expiry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredLimits {
    pub models: Option<String>,
    pub expires_at: Option<i64>,
    /// Tokens a period, and the period's name.
    pub budget: Option<(i64, &'static str)>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
}

/// A change of a key's limits: each field kept (`None`), or set to the value given (which
/// may be `None`: the limit removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsChange {
    pub models: Option<Option<String>>,
    pub expires_at: Option<Option<i64>>,
    pub budget: Option<Option<(i64, &'static str)>>,
    /// When a budget is set: when its period's current one began. A budget set anew or
    /// with another period starts its period over there (`budget_periods`).
    pub budget_period_start: Option<i64>,
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
}

/// A key as a change of its limits left it, and its rates a minute before the change.
#[derive(Debug)]
pub struct Changed {
    pub key: ApiKey,
    pub rpm_before: Option<i64>,
    pub tpm_before: Option<i64>,
}

/// The owner of a live key, with their balance as this read found it, and the key's id
/// and when it was last used (to refresh that only now and then).
#[derive(Debug, sqlx::FromRow)]
pub struct KeyOwner {
    pub key_id: i64,
    pub user_id: i64,
    pub tokens: i64,
    pub last_used_at: Option<i64>,
    /// The owner's account was disabled by an operator.
    pub disabled: bool,
    /// The served models the key may ask for, a JSON array; `None`: every one.
    pub models: Option<String>,
    /// Its budget: tokens a period, and the period's name.
    pub budget_tokens: Option<i64>,
    pub budget_period: Option<String>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    /// The owner's own limits.
    #[sqlx(flatten)]
    pub user_limits: super::user_limits::StoredUserLimits,
}

/// Stores a new key of the user unless they already hold `max_live` live ones; its id, or
/// `None` at the limit.
///
/// On PostgreSQL the count and the insert run under the user's row lock: at READ COMMITTED
/// two inserts from two processes would each count the other's key as not there yet and
/// both pass the cap (issue 21). The lock is the one a chat's reservation takes, so key
/// creations of one user queue behind each other and see each other's keys. SQLite's one
/// writer already runs them one at a time.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn insert(
    db: &Db,
    user_id: i64,
    name: &str,
    key_hash: &str,
    prefix: &str,
    limits: &StoredLimits,
    max_live: i64,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    let now = unix_now();
    let locks_rows = matches!(db, Db::Postgres(_));
    db_run!(db, pool => {
        let mut tx = pool.begin().await?;
        if locks_rows {
            sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        let inserted = sqlx::query_as(
            "INSERT INTO api_keys (user_id, name, key_hash, prefix, created_at, models, expires_at,
                                   budget_tokens, budget_period, rpm, tpm)
             SELECT $1, $2, $3, $4, $5, $7, $8, $9, $10, $11, $12
             WHERE (SELECT COUNT(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL) < $6
             RETURNING id, created_at",
        )
        .bind(user_id)
        .bind(name)
        .bind(key_hash)
        .bind(prefix)
        .bind(now)
        .bind(max_live)
        .bind(limits.models.as_deref())
        .bind(limits.expires_at)
        .bind(limits.budget.map(|(tokens, _)| tokens))
        .bind(limits.budget.map(|(_, period)| period))
        .bind(limits.rpm)
        .bind(limits.tpm)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted)
    })
}

/// The user's live keys, oldest first.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn live(db: &Db, user_id: i64) -> Result<Vec<ApiKey>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT id, name, prefix, created_at, last_used_at, models, expires_at, budget_tokens,
                budget_period, budget_spent, budget_period_start, rpm, tpm
         FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL ORDER BY id",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await)
}

/// Revokes one of the user's live keys; `false` when they have no such live key.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn revoke(db: &Db, user_id: i64, id: i64) -> Result<bool, sqlx::Error> {
    let revoked = db_execute!(
        db,
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $3
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(user_id)
        .bind(unix_now())
    )?;
    Ok(revoked == 1)
}

/// Changes the limits of one of the user's live keys; the key as it is now, or `None`
/// when they have no such live key.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn change_limits(
    db: &Db,
    user_id: i64,
    id: i64,
    change: &LimitsChange,
) -> Result<Option<Changed>, sqlx::Error> {
    super::budget_periods::retried(|| change_limits_once(db, user_id, id, change)).await
}

async fn change_limits_once(
    db: &Db,
    user_id: i64,
    id: i64,
    change: &LimitsChange,
) -> Result<Option<Changed>, sqlx::Error> {
    let period = change.budget.flatten().map(|(_, period)| period);
    let start = change.budget_period_start.filter(|_| period.is_some());
    let locks_rows = matches!(db, Db::Postgres(_));
    db_run!(db, pool => {
        let mut tx = pool.begin().await?;
        // The calls a new period may take first, then the key's row (written as it is: a
        // lock, on both backends), so no reservation comes between the change and its
        // period's new start (`budget_periods`).
        if let Some(start) = start.filter(|_| locks_rows) {
            sqlx::query(super::budget_periods::SHORT_LOCK_WAIT).execute(&mut *tx).await?;
            for statement in Spender::Key.locks() {
                sqlx::query(&statement)
                    .bind(id)
                    .bind(start)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let before: Option<(Option<String>, Option<i64>, Option<i64>)> = sqlx::query_as(
            "UPDATE api_keys SET budget_period = budget_period
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL
             RETURNING budget_period, rpm, tpm",
        )
        .bind(id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((period_before, rpm_before, tpm_before)) = before else {
            return Ok(None);
        };
        let start = start.filter(|_| period_before.as_deref() != period);
        let changed: Option<ApiKey> = sqlx::query_as(
            "UPDATE api_keys SET models = CASE WHEN $3 THEN $4 ELSE models END,
                                 expires_at = CASE WHEN $5 THEN $6 ELSE expires_at END,
                                 budget_tokens = CASE WHEN $7 THEN $8 ELSE budget_tokens END,
                                 budget_period = CASE WHEN $7 THEN $9 ELSE budget_period END,
                                 rpm = CASE WHEN $10 THEN $11 ELSE rpm END,
                                 tpm = CASE WHEN $12 THEN $13 ELSE tpm END
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL
             RETURNING id, name, prefix, created_at, last_used_at, models, expires_at,
                       budget_tokens, budget_period, budget_spent, budget_period_start, rpm,
                       tpm",
        )
        .bind(id)
        .bind(user_id)
        .bind(change.models.is_some())
        .bind(change.models.clone().flatten())
        .bind(change.expires_at.is_some())
        .bind(change.expires_at.flatten())
        .bind(change.budget.is_some())
        .bind(change.budget.flatten().map(|(tokens, _)| tokens))
        .bind(period)
        .bind(change.rpm.is_some())
        .bind(change.rpm.flatten())
        .bind(change.tpm.is_some())
        .bind(change.tpm.flatten())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(mut key) = changed else {
            return Ok(None);
        };
        // Set anew or given another period: started over.
        if let Some(start) = start {
            for statement in Spender::Key.start_over() {
                sqlx::query(&statement)
                    .bind(id)
                    .bind(start)
                    .execute(&mut *tx)
                    .await?;
            }
            let (spent, stamp): (i64, Option<i64>) = sqlx::query_as(
                "SELECT budget_spent, budget_period_start FROM api_keys WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            (key.budget_spent, key.budget_period_start) = (spent, stamp);
        }
        tx.commit().await?;
        Ok(Some(Changed {
            key,
            rpm_before,
            tpm_before,
        }))
    })
}

/// The look-up of a live key's owner ([`KeyOwner`]) by `$1` (the key's hash) at `$2` (now),
/// built once: the user's limit columns are named in one place (`user_limits`).
static OWNER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT k.id AS key_id, k.user_id, u.tokens - u.held AS tokens, k.last_used_at,
                u.disabled_at IS NOT NULL AS disabled, k.models, k.budget_tokens,
                k.budget_period, k.rpm, k.tpm, {}
         FROM api_keys k JOIN users u ON u.id = k.user_id
         WHERE k.key_hash = $1 AND k.revoked_at IS NULL
           AND (k.expires_at IS NULL OR k.expires_at > $2)",
        super::user_limits::SELECTED
    )
});

/// The owner of a live, unexpired key hash at `now`, read with their balance in one query.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn find_owner(
    db: &Db,
    key_hash: &str,
    now: i64,
) -> Result<Option<KeyOwner>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_as(OWNER.as_str())
    .bind(key_hash)
    .bind(now)
    .fetch_optional(pool)
    .await)
}

/// How [`find_owner_counting`] counted the request in its key's requests a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Not in the look-up (SQLite, or a key without `rpm`): the caller counts it.
    NotHere,
    /// Counted; the theoretical arrival time it left (milliseconds).
    Admitted { tat_ms: i64 },
    /// Refused by the rate: nothing counted.
    Refused,
}

/// A key's owner as the counting look-up reads them, with the time its count left.
#[derive(Debug, sqlx::FromRow)]
struct CountedOwner {
    #[sqlx(flatten)]
    owner: KeyOwner,
    rate_tat_ms: Option<i64>,
}

/// As [`find_owner`] at `now` (Unix seconds), and on PostgreSQL with the request counted in
/// the key's requests a minute (`key:<id>` in `rate_limits`, the upsert of
/// [`super::rates::admit`]) by the same statement, at `now_ms`: for a key with `rpm`, that
/// saves a round trip and a commit of its own on every request (BENCHMARKS.md, issue 27).
/// SQLite, which has no insert inside a `WITH`, answers [`Counted::NotHere`].
#[tracing::instrument(level = "debug", skip_all)]
pub async fn find_owner_counting(
    db: &Db,
    key_hash: &str,
    now: i64,
    now_ms: i64,
) -> Result<Option<(KeyOwner, Counted)>, sqlx::Error> {
    let pool = match db {
        Db::Sqlite(_) => {
            let owner = find_owner(db, key_hash, now).await?;
            return Ok(owner.map(|owner| (owner, Counted::NotHere)));
        }
        Db::Postgres(pool) => pool,
    };
    // [`OWNER`] with the count beside it, built once. The rate's conflict clause is the same as `rates::admit`'s, its interval 60,000 / rpm; like that
    // upsert, it commits without waiting for the WAL flush (a count is not money).
    static QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH owner AS ({}), counted AS (
                 INSERT INTO rate_limits (name, tat_ms)
                 SELECT 'key:' || key_id, $3 + 60000 / rpm
                 FROM owner, (SELECT set_config('synchronous_commit', 'off', true))
                     AS without_waiting_for_the_disk
                 WHERE rpm IS NOT NULL AND NOT disabled
                 ON CONFLICT (name) DO UPDATE
                 SET tat_ms = CASE WHEN rate_limits.tat_ms > $3 THEN rate_limits.tat_ms
                                   ELSE $3 END + (EXCLUDED.tat_ms - $3)
                 WHERE CASE WHEN rate_limits.tat_ms > $3 THEN rate_limits.tat_ms
                            ELSE $3 END + (EXCLUDED.tat_ms - $3) - $3 <= 60000
                 RETURNING tat_ms
             )
             SELECT owner.*, (SELECT tat_ms FROM counted) AS rate_tat_ms FROM owner",
            OWNER.as_str()
        )
    });
    let found: Option<CountedOwner> = sqlx::query_as(QUERY.as_str())
        .bind(key_hash)
        .bind(now)
        .bind(now_ms)
        .fetch_optional(pool)
        .await?;
    Ok(found.map(|found| {
        let counted = match (found.owner.rpm, found.rate_tat_ms) {
            (None, _) => Counted::NotHere,
            (Some(_), Some(tat_ms)) => Counted::Admitted { tat_ms },
            (Some(_), None) => Counted::Refused,
        };
        (found.owner, counted)
    }))
}

/// Records that a key was used now.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn touch(db: &Db, key_id: i64) -> Result<(), sqlx::Error> {
    db_run!(db, pool => sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
        .bind(key_id)
        .bind(unix_now())
        .execute(pool)
        .await
        .map(|_| ()))
}
