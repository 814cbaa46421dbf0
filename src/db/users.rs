//! Queries on `users`: creation, credentials and balances.

use sqlx::SqliteExecutor;

use super::{unix_now, Db};

/// What login needs to check a password.
#[derive(Debug, sqlx::FromRow)]
pub struct Credentials {
    pub id: i64,
    pub password_hash: String,
}

/// Inserts a user; `None` when the username (compared by `username_key`) is taken.
pub async fn insert(
    db: &Db,
    username: &str,
    username_key: &str,
    password_hash: &str,
    tokens: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let inserted = sqlx::query_scalar(
        "INSERT INTO users (username, username_key, password_hash, tokens, created_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(username)
    .bind(username_key)
    .bind(password_hash)
    .bind(tokens)
    .bind(unix_now())
    .fetch_one(db)
    .await;
    match inserted {
        Ok(id) => Ok(Some(id)),
        Err(sqlx::Error::Database(err)) if err.is_unique_violation() => Ok(None),
        Err(err) => Err(err),
    }
}

pub async fn find_credentials(
    db: &Db,
    username_key: &str,
) -> Result<Option<Credentials>, sqlx::Error> {
    sqlx::query_as("SELECT id, password_hash FROM users WHERE username_key = $1")
        .bind(username_key)
        .fetch_optional(db)
        .await
}

pub async fn balance(db: impl SqliteExecutor<'_>, user_id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT tokens FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_one(db)
        .await
}
