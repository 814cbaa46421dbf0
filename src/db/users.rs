//! Queries on `users`: creation with its starting grant, credentials and balances.

use sqlx::SqliteExecutor;

use super::{
    ledger::{self, Reason},
    unix_now, Db,
};

/// What login needs to check a password.
#[derive(Debug, sqlx::FromRow)]
pub struct Credentials {
    pub id: i64,
    pub password_hash: String,
}

/// Inserts a user with a zero balance and grants the starting one through the ledger,
/// in one transaction.
/// `None` when the username (compared by `username_key`) is taken.
pub async fn insert(
    db: &Db,
    username: &str,
    username_key: &str,
    password_hash: &str,
    initial_tokens: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let inserted = sqlx::query_scalar(
        "INSERT INTO users (username, username_key, password_hash, tokens, created_at)
         VALUES ($1, $2, $3, 0, $4) RETURNING id",
    )
    .bind(username)
    .bind(username_key)
    .bind(password_hash)
    .bind(unix_now())
    .fetch_one(&mut *tx)
    .await;
    let user_id = match inserted {
        Ok(id) => id,
        Err(sqlx::Error::Database(err)) if err.is_unique_violation() => return Ok(None),
        Err(err) => return Err(err),
    };
    ledger::record(&mut *tx, user_id, initial_tokens, Reason::InitialGrant).await?;
    tx.commit().await?;
    Ok(Some(user_id))
}

/// Adds `amount` tokens to a user's balance; the balance after, or `None` for no such user.
pub async fn grant(db: &Db, username_key: &str, amount: i64) -> Result<Option<i64>, sqlx::Error> {
    let user_id: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE username_key = $1")
        .bind(username_key)
        .fetch_optional(db)
        .await?;
    match user_id {
        Some(user_id) => ledger::record(db, user_id, amount, Reason::Grant).await,
        None => Ok(None),
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
