//! Login tokens: generated from the OS's secure generator, stored only as SHA-256 hashes,
//! and checked when a client presents one (the routes take it from `Authorization`).

use rand::{
    distributions::{Alphanumeric, DistString},
    rngs::OsRng,
};

use crate::{
    db::{self, tokens::TokenOwner, Db},
    services::{sha256_hex, ServiceError, ServiceResult},
};

pub const TOKEN_LENGTH: usize = 32;

/// A token handed to a client at login; `expires_at` in Unix seconds, `None` for never.
pub struct IssuedToken {
    pub token: String,
    pub expires_at: Option<i64>,
}

/// Creates a token for `user_id` and stores its hash.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn issue(db: &Db, user_id: i64, ttl_secs: Option<u64>) -> ServiceResult<IssuedToken> {
    let token = Alphanumeric.sample_string(&mut OsRng, TOKEN_LENGTH);
    let expires_at = ttl_secs.map(|ttl| db::unix_now().saturating_add_unsigned(ttl));
    db::tokens::insert(db, &token_hash(&token), user_id, expires_at).await?;
    Ok(IssuedToken { token, expires_at })
}

/// Who a live token belongs to, with their balance as read with it.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user_id: i64,
    pub tokens: i64,
    /// The hash of the token presented, so that logout can revoke exactly it.
    pub token_hash: String,
}

/// The user behind a presented login token, with their balance; `NotAuthenticated` for a
/// token that is malformed, unknown, expired or revoked.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn authenticate(db: &Db, presented: &str) -> ServiceResult<Authenticated> {
    if !is_well_formed(presented) {
        return Err(ServiceError::NotAuthenticated);
    }
    let token_hash = token_hash(presented);
    let TokenOwner { user_id, tokens } = db::tokens::find_owner(db, &token_hash)
        .await?
        .ok_or(ServiceError::NotAuthenticated)?;
    Ok(Authenticated {
        user_id,
        tokens,
        token_hash,
    })
}

/// Revokes one login token, given as its hash.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn logout(db: &Db, token_hash: &str) -> ServiceResult<()> {
    db::tokens::revoke(db, token_hash).await?;
    Ok(())
}

/// Revokes every login token of the user.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn logout_everywhere(db: &Db, user_id: i64) -> ServiceResult<()> {
    db::tokens::revoke_all(db, user_id).await?;
    Ok(())
}

/// What the database keeps instead of the token.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// Whether `token` could be one this service issued: 32 ASCII letters and digits, so
/// nothing else costs a database look-up.
fn is_well_formed(token: &str) -> bool {
    token.len() == TOKEN_LENGTH && token.bytes().all(|byte| byte.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_token_is_thirty_two_letters_and_digits() {
        assert!(is_well_formed("abcdefghijklmnopqrstuvwxyzABCDE1"));
        for bad in [
            "",
            "abcdefghijklmnopqrstuvwxyzABCDE",
            "abcdefghijklmnopqrstuvwxyzABCDE12",
            "abcdefghijklmnopqrstuvwxyzABCD-1",
            "abcdefghijklmnopqrstuvwxyzABCDé",
        ] {
            assert!(!is_well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn the_hash_is_hex_sha256() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
