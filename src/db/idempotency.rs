//! Queries on `idempotency_keys`: claiming a key for a chat, and finding what it led to.

use super::{db_execute, db_run, unix_now, Db};
use crate::domain::ChatStatus;

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours; go ahead.
    Claimed,
    /// The key is held by an earlier request for the same user.
    Held {
        request_hash: String,
        /// The chat it started, once reserved.
        chat_id: Option<i64>,
        /// That chat's status.
        chat_status: Option<ChatStatus>,
    },
}

/// How many times a claim meets a key that its holder lets go before it can be read.
const CLAIM_ATTEMPTS: usize = 3;

/// Claims `key` for the user, first forgetting a claim of it made before `expired_before`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn claim(
    db: &Db,
    user_id: i64,
    key: &str,
    request_hash: &str,
    expired_before: i64,
) -> Result<Claim, sqlx::Error> {
    db_run!(db, pool => {
        let mut tx = pool.begin().await?;
        sqlx::query(
            "DELETE FROM idempotency_keys
             WHERE user_id = $1 AND idem_key = $2 AND created_at < $3",
        )
        .bind(user_id)
        .bind(key)
        .bind(expired_before)
        .execute(&mut *tx)
        .await?;
        // READ COMMITTED (PostgreSQL): the holder of the key may let it go (its chat failed)
        // between the insert that met it and the read of it, and the read then finds
        // nothing; the key is free again, so the claim is tried once more.
        let mut attempts = 0;
        let claim = loop {
            attempts += 1;
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, created_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, idem_key) DO NOTHING",
            )
            .bind(user_id)
            .bind(key)
            .bind(request_hash)
            .bind(unix_now())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 1 {
                break Claim::Claimed;
            }
            let held: Option<(String, Option<i64>, Option<ChatStatus>)> = sqlx::query_as(
                "SELECT k.request_hash, k.chat_id, c.status FROM idempotency_keys k
                 LEFT JOIN chats c ON c.id = k.chat_id
                 WHERE k.user_id = $1 AND k.idem_key = $2",
            )
            .bind(user_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            match held {
                Some((request_hash, chat_id, chat_status)) => {
                    break Claim::Held {
                        request_hash,
                        chat_id,
                        chat_status,
                    }
                }
                // A key taken and let go again on every attempt is busy: in progress.
                None if attempts == CLAIM_ATTEMPTS => {
                    break Claim::Held {
                        request_hash: request_hash.to_string(),
                        chat_id: None,
                        chat_status: None,
                    }
                }
                None => continue,
            }
        };
        tx.commit().await?;
        Ok(claim)
    })
}

/// Ties a claimed key to the chat it reserved. Until then a repeat is "in progress"; a
/// process that dies before this leaves a claim that `sweep` forgets.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn attach(db: &Db, user_id: i64, key: &str, chat_id: i64) -> Result<(), sqlx::Error> {
    db_execute!(
        db,
        sqlx::query(
            "UPDATE idempotency_keys SET chat_id = $1 WHERE user_id = $2 AND idem_key = $3",
        )
        .bind(chat_id)
        .bind(user_id)
        .bind(key)
    )?;
    Ok(())
}

/// Lets go of a claim that never reserved a chat (out of tokens, or an error before).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn release(db: &Db, user_id: i64, key: &str) -> Result<(), sqlx::Error> {
    db_execute!(
        db,
        sqlx::query(
            "DELETE FROM idempotency_keys
             WHERE user_id = $1 AND idem_key = $2 AND chat_id IS NULL",
        )
        .bind(user_id)
        .bind(key)
    )?;
    Ok(())
}

/// Forgets keys past their lifetime, and claims that never reserved a chat before
/// `abandoned_before` (their process died between claim and reservation).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn sweep(
    db: &Db,
    expired_before: i64,
    abandoned_before: i64,
) -> Result<u64, sqlx::Error> {
    let swept = db_run!(db, pool => {
        sqlx::query(
            "DELETE FROM idempotency_keys
             WHERE created_at < $1 OR (chat_id IS NULL AND created_at < $2)",
        )
        .bind(expired_before)
        .bind(abandoned_before)
        .execute(pool)
        .await?
        .rows_affected()
    });
    Ok(swept)
}
