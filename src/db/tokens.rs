//! Queries on `login_tokens`, which hold only SHA-256 hashes of the tokens handed out.

use super::{db_execute, db_read, db_run, unix_now, Db};

#[tracing::instrument(level = "debug", skip_all)]
pub async fn insert(
    db: &Db,
    token_hash: &str,
    user_id: i64,
    expires_at: Option<i64>,
) -> Result<(), sqlx::Error> {
    db_execute!(
        db,
        sqlx::query(
            "INSERT INTO login_tokens (token_hash, user_id, issued_at, expires_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(unix_now())
        .bind(expires_at)
    )?;
    Ok(())
}

/// The owner of a live token, with their balance as this read found it.
#[derive(Debug, sqlx::FromRow)]
pub struct TokenOwner {
    pub user_id: i64,
    pub tokens: i64,
    /// The owner's account was disabled by an operator.
    pub disabled: bool,
    #[sqlx(flatten)]
    pub user_limits: super::user_limits::StoredUserLimits,
}

/// The user a live (unexpired) token hash belongs to, read with their balance in one query.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn find_owner(db: &Db, token_hash: &str) -> Result<Option<TokenOwner>, sqlx::Error> {
    // Built once: the user's limit columns are named in one place (`user_limits`).
    static QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT t.user_id, u.tokens - u.held AS tokens, u.disabled_at IS NOT NULL AS disabled, {}
             FROM login_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_hash = $1 AND (t.expires_at IS NULL OR t.expires_at > $2)",
            super::user_limits::SELECTED
        )
    });
    db_read!(db, pool => {
        sqlx::query_as(QUERY.as_str())
        .bind(token_hash)
        .bind(unix_now())
        .fetch_optional(pool)
        .await
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn revoke(db: &Db, token_hash: &str) -> Result<(), sqlx::Error> {
    db_execute!(
        db,
        sqlx::query("DELETE FROM login_tokens WHERE token_hash = $1").bind(token_hash)
    )?;
    Ok(())
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn revoke_all(db: &Db, user_id: i64) -> Result<(), sqlx::Error> {
    db_execute!(
        db,
        sqlx::query("DELETE FROM login_tokens WHERE user_id = $1").bind(user_id)
    )?;
    Ok(())
}

/// Deletes tokens that expired before `now`, at most `limit` of them; how many went.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn delete_expired(db: &Db, now: i64, limit: i64) -> Result<u64, sqlx::Error> {
    let deleted = db_run!(db, pool => {
        sqlx::query(
            "DELETE FROM login_tokens WHERE token_hash IN (
                 SELECT token_hash FROM login_tokens WHERE expires_at <= $1 LIMIT $2)",
        )
        .bind(now)
        .bind(limit)
        .execute(pool)
        .await?
        .rows_affected()
    });
    Ok(deleted)
}
