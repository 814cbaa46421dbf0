//! Login tokens: generated from the OS's secure generator, stored only as SHA-256 hashes,
//! and read from `Authorization: Token <t>`, `Bearer <t>` or a bare `<t>`.

use rand::{
    distributions::{Alphanumeric, DistString},
    rngs::OsRng,
};

use crate::{
    db::{self, tokens::TokenOwner, Db},
    error::Error,
    services::sha256_hex,
};

pub const TOKEN_LENGTH: usize = 32;

/// A token handed to a client at login; `expires_at` in Unix seconds, `None` for never.
pub struct IssuedToken {
    pub token: String,
    pub expires_at: Option<i64>,
}

/// Creates a token for `user_id` and stores its hash.
pub async fn issue(db: &Db, user_id: i64, ttl_secs: Option<u64>) -> Result<IssuedToken, Error> {
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

/// The user behind an `Authorization` header value, with their balance, or `Unauthorized`.
pub async fn authenticate(db: &Db, authorization: &str) -> Result<Authenticated, Error> {
    let token = token_from_header(authorization).ok_or(Error::Unauthorized)?;
    let token_hash = token_hash(token);
    let TokenOwner { user_id, tokens } = db::tokens::find_owner(db, &token_hash)
        .await?
        .ok_or(Error::Unauthorized)?;
    Ok(Authenticated {
        user_id,
        tokens,
        token_hash,
    })
}

/// Revokes one login token, given as its hash.
pub async fn logout(db: &Db, token_hash: &str) -> Result<(), Error> {
    db::tokens::revoke(db, token_hash).await?;
    Ok(())
}

/// Revokes every login token of the user.
pub async fn logout_everywhere(db: &Db, user_id: i64) -> Result<(), Error> {
    db::tokens::revoke_all(db, user_id).await?;
    Ok(())
}

/// What the database keeps instead of the token.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// Extracts a well-formed token from any of the three accepted header forms.
fn token_from_header(value: &str) -> Option<&str> {
    let value = value.trim();
    let token = match value.split_once(' ') {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") =>
        {
            rest.trim()
        }
        Some(_) => return None,
        None => value,
    };
    let well_formed =
        token.len() == TOKEN_LENGTH && token.bytes().all(|byte| byte.is_ascii_alphanumeric());
    well_formed.then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "abcdefghijklmnopqrstuvwxyzABCDE1";

    #[test]
    fn all_three_header_forms_yield_the_token() {
        for header in [
            TOKEN.to_string(),
            format!("Token {TOKEN}"),
            format!("Bearer {TOKEN}"),
            format!("bearer  {TOKEN} "),
        ] {
            assert_eq!(token_from_header(&header), Some(TOKEN), "{header}");
        }
    }

    #[test]
    fn malformed_headers_yield_nothing() {
        for header in [
            "",
            "Bearer",
            "Basic dXNlcjpwYXNz",
            &format!("Basic {TOKEN}"),
            &TOKEN[1..],
            &format!("{TOKEN}x"),
            "abcdefghijklmnopqrstuvwxyzABCD-1",
        ] {
            assert_eq!(token_from_header(header), None, "{header}");
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
