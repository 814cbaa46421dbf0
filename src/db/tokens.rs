//! Queries on `login_tokens`, which hold only SHA-256 hashes of the tokens handed out.

use super::{unix_now, Db};

pub async fn insert(
    db: &Db,
    token_hash: &str,
    user_id: i64,
    expires_at: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO login_tokens (token_hash, user_id, issued_at, expires_at)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(token_hash)
    .bind(user_id)
    .bind(unix_now())
    .bind(expires_at)
    .execute(db)
    .await?;
    Ok(())
}

/// The user a live (unexpired) token hash belongs to.
pub async fn find_user(db: &Db, token_hash: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT user_id FROM login_tokens
         WHERE token_hash = $1 AND (expires_at IS NULL OR expires_at > $2)",
    )
    .bind(token_hash)
    .bind(unix_now())
    .fetch_optional(db)
    .await
}
