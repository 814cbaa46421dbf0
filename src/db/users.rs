//! Queries on `users`: creation with its starting grant, credentials and balances.

use futures_util::stream::BoxStream;

use super::{db_execute, db_read, db_run, ledger::record_move, unix_now, Db};
use crate::domain::LedgerReason;

/// What login needs to check a password.
#[derive(Debug, sqlx::FromRow)]
pub struct Credentials {
    pub id: i64,
    pub password_hash: String,
    /// The account was disabled by an operator.
    pub disabled: bool,
}

/// Inserts a user with a zero balance and grants the starting one through the ledger,
/// in one transaction.
/// `None` when the username (compared by `username_key`) is taken.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn insert(
    db: &Db,
    username: &str,
    username_key: &str,
    password_hash: &str,
    initial_tokens: i64,
) -> Result<Option<i64>, sqlx::Error> {
    db_run!(db, pool => {
        let mut tx = pool.begin().await?;
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
        let user_id: i64 = match inserted {
            Ok(id) => id,
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => return Ok(None),
            Err(err) => return Err(err),
        };
        record_move!(&mut *tx, user_id, initial_tokens, LedgerReason::InitialGrant).await?;
        tx.commit().await?;
        Ok(Some(user_id))
    })
}

/// What a grant did.
#[derive(Debug, PartialEq, Eq)]
pub enum Grant {
    Granted {
        balance: i64,
    },
    NoSuchUser,
    /// The balance, with the tokens its pending chats reserved, would have gone over
    /// `ceiling`; nothing was written.
    OverCeiling {
        balance: i64,
    },
    /// The balance would have gone below zero; nothing was written.
    BelowZero {
        balance: i64,
    },
}

/// Adds `amount` tokens (negative to take) to a user's balance unless that would pass
/// `ceiling` or go below zero, in one transaction.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn grant(
    db: &Db,
    username_key: &str,
    amount: i64,
    ceiling: i64,
) -> Result<Grant, sqlx::Error> {
    db_run!(db, pool => {
        let mut tx = pool.begin().await?;
        // The tokens reserved by pending chats count as the user's here: each one's refund
        // must fit under the ceiling whatever is granted meanwhile, so a grant leaves room
        // for them (issue 21). Reserving and refunding keep balance + reserved the same;
        // only grants raise it. A held reservation never left `tokens`: `held` is what
        // priced calls in flight hold of it, and is not the user's to spend.
        let user: Option<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, tokens, CAST(COALESCE((SELECT SUM(cost) FROM chats
                                              WHERE chats.user_id = users.id
                                                AND status = 'pending' AND NOT held), 0)
                                     AS BIGINT),
                    held
             FROM users WHERE username_key = $1",
        )
        .bind(username_key)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((user_id, tokens, reserved, held)) = user else {
            return Ok(Grant::NoSuchUser);
        };
        let balance = tokens - held;
        let owned = tokens.saturating_add(reserved);
        if owned.checked_add(amount).is_none_or(|after| after > ceiling) {
            return Ok(Grant::OverCeiling { balance });
        }
        // The user exists and the ceiling holds: no row means the balance would go below zero.
        let outcome = match record_move!(&mut *tx, user_id, amount, LedgerReason::Grant).await? {
            Some(after) => Grant::Granted {
                balance: after - held,
            },
            None => Grant::BelowZero { balance },
        };
        tx.commit().await?;
        Ok(outcome)
    })
}

/// Replaces the password hash and revokes every login token of the user but one, in
/// one transaction.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn set_password(
    db: &Db,
    user_id: i64,
    password_hash: &str,
    keep_token_hash: &str,
) -> Result<(), sqlx::Error> {
    db_run!(db, pool => {
        let mut tx = pool.begin().await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(password_hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM login_tokens WHERE user_id = $1 AND token_hash <> $2")
            .bind(user_id)
            .bind(keep_token_hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    })
}

/// What a password change needs: the current hash and the key its lock-outs count under.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredPassword {
    pub username_key: String,
    pub password_hash: String,
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn credentials_by_id(
    db: &Db,
    user_id: i64,
) -> Result<Option<StoredPassword>, sqlx::Error> {
    db_read!(db, pool => {
        sqlx::query_as("SELECT username_key, password_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(pool)
            .await
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn find_credentials(
    db: &Db,
    username_key: &str,
) -> Result<Option<Credentials>, sqlx::Error> {
    db_read!(db, pool => {
        sqlx::query_as("SELECT id, password_hash, disabled_at IS NOT NULL AS disabled
             FROM users WHERE username_key = $1")
            .bind(username_key)
            .fetch_optional(pool)
            .await
    })
}

/// The tokens the user may spend: the ledger's balance less what their priced calls in
/// flight hold.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn balance(db: &Db, user_id: i64) -> Result<i64, sqlx::Error> {
    db_read!(db, pool => {
        sqlx::query_scalar("SELECT tokens - held FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_one(pool)
            .await
    })
}

/// Sets or clears `disabled_at` of the user with `username_key`; `false` when there is none.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn set_disabled(
    db: &Db,
    username_key: &str,
    disabled_at: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let changed = db_execute!(
        db,
        sqlx::query("UPDATE users SET disabled_at = $2 WHERE username_key = $1")
            .bind(username_key)
            .bind(disabled_at)
    )?;
    Ok(changed == 1)
}

/// A user as an operator's list shows them.
#[derive(Debug, sqlx::FromRow)]
pub struct Listed {
    pub id: i64,
    pub username: String,
    pub tokens: i64,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

/// Every user, oldest first, streamed: a million users are never in memory at once.
pub fn all(db: &Db) -> BoxStream<'_, Result<Listed, sqlx::Error>> {
    db_read!(db, pool => sqlx::query_as(
        "SELECT id, username, tokens - held AS tokens, created_at, disabled_at
         FROM users ORDER BY id",
    )
    .fetch(pool))
}
