//! Credentials: login tokens and API keys, generated from the OS's secure generator,
//! stored only as SHA-256 hashes, and checked when a client presents one (the routes take
//! it from `Authorization`).

use rand::{
    distributions::{Alphanumeric, DistString},
    rngs::OsRng,
};

use crate::{
    db::{self, api_keys::Counted, tokens::TokenOwner, Db},
    domain::{BudgetUse, Limits, TokenBudget},
    services::{
        rates::{self, Checked, KeyRate},
        sha256_hex, ServiceError, ServiceResult,
    },
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

/// What an API key starts with, so it is told apart from a login token at a glance.
pub const API_KEY_PREFIX: &str = "tc_";
/// Random characters of an API key after its prefix.
pub const API_KEY_RANDOM_LENGTH: usize = 40;

/// Who a live credential belongs to, with their balance as read with it.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user_id: i64,
    pub tokens: i64,
    pub credential: Credential,
    /// The user's limits: their own, each one not set taken from the configuration's.
    pub user_limits: Limits,
    /// An API key with `rpm`: this request counted in its requests a minute, or refused.
    pub key_rate: Option<KeyRate>,
}

/// The credential a request came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A login token, by its hash, so that logout can revoke exactly it.
    LoginToken { token_hash: String },
    /// An API key, by its id, with its limits.
    ApiKey { key_id: i64, limits: Limits },
}

impl Credential {
    /// The key and its limits, when the credential is an API key.
    pub fn key_limits(&self) -> Option<(i64, &Limits)> {
        match self {
            Self::ApiKey { key_id, limits } => Some((*key_id, limits)),
            Self::LoginToken { .. } => None,
        }
    }

    /// The budget of the key, if it has one, that a call at `now` counts against.
    pub fn budget_use(&self, now: i64) -> Option<(i64, BudgetUse)> {
        let (key_id, limits) = self.key_limits()?;
        Some((key_id, limits.budget?.use_at(now)))
    }
}

/// How stale a key's `last_used_at` may get before a use refreshes it: one write a minute
/// per busy key rather than one per request.
const LAST_USED_GRANULARITY_SECS: i64 = 60;

/// The user behind a presented login token or API key at `now_ms`, with their balance and
/// limits (their own, else `default_limits`'); `NotAuthenticated` for one that is
/// malformed, unknown, expired or revoked, and `AccountDisabled` for a live one of a
/// disabled account. A key with `rpm` has the request counted in its requests a minute:
/// every request it makes, whatever the route or the answer.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn authenticate(
    db: &Db,
    presented: &str,
    default_limits: &Limits,
    now_ms: i64,
) -> ServiceResult<Authenticated> {
    let now = now_ms.div_euclid(1000);
    if is_api_key_shaped(presented) {
        let (owner, counted) =
            db::api_keys::find_owner_counting(db, &token_hash(presented), now, now_ms)
                .await?
                .ok_or(ServiceError::NotAuthenticated)?;
        if owner.disabled {
            return Err(ServiceError::AccountDisabled);
        }
        let key_rate = match owner.rpm {
            None => None,
            Some(rpm) => Some(count_key_request(db, owner.key_id, rpm, counted, now_ms).await?),
        };
        if owner
            .last_used_at
            .is_none_or(|used| now - used >= LAST_USED_GRANULARITY_SECS)
        {
            db::api_keys::touch(db, owner.key_id).await?;
        }
        return Ok(Authenticated {
            user_id: owner.user_id,
            tokens: owner.tokens,
            credential: Credential::ApiKey {
                key_id: owner.key_id,
                limits: Limits {
                    budget: budget_of(owner.budget_tokens, owner.budget_period.as_deref()),
                    models: Limits::models_from_json(owner.models.as_deref()),
                    rpm: owner.rpm,
                    tpm: owner.tpm,
                },
            },
            user_limits: user_limits(&owner.user_limits).or(default_limits),
            key_rate,
        });
    }
    if !is_well_formed(presented) {
        return Err(ServiceError::NotAuthenticated);
    }
    let token_hash = token_hash(presented);
    let TokenOwner {
        user_id,
        tokens,
        disabled,
        user_limits: stored,
    } = db::tokens::find_owner(db, &token_hash)
        .await?
        .ok_or(ServiceError::NotAuthenticated)?;
    if disabled {
        return Err(ServiceError::AccountDisabled);
    }
    Ok(Authenticated {
        user_id,
        tokens,
        credential: Credential::LoginToken { token_hash },
        user_limits: user_limits(&stored).or(default_limits),
        key_rate: None,
    })
}

/// The request of the key `key_id`, allowed `rpm` a minute, as the look-up `counted` it, or
/// counted now where it could not.
async fn count_key_request(
    db: &Db,
    key_id: i64,
    rpm: i64,
    counted: Counted,
    now_ms: i64,
) -> ServiceResult<KeyRate> {
    let name = rates::key_requests(key_id);
    let rate = rates::per_minute(rpm);
    let found = match counted {
        Counted::NotHere => return rates::request(db, &name, rpm, now_ms).await,
        Counted::Admitted { tat_ms } => db::rates::Rate::Admitted { tat_ms },
        Counted::Refused => db::rates::refused(db, &name, now_ms, rate.step()).await?,
    };
    Ok(rates::judged(rpm, now_ms, Checked::of(found, rate, now_ms)))
}

/// A budget as stored; `None` without one (or with a period this build does not know).
pub fn budget_of(tokens: Option<i64>, period: Option<&str>) -> Option<TokenBudget> {
    Some(TokenBudget {
        tokens: tokens?,
        period: period?.parse().ok()?,
    })
}

/// A user's own limits as stored.
pub fn user_limits(stored: &db::user_limits::StoredUserLimits) -> Limits {
    stored
        .user_limits
        .as_deref()
        .map(Limits::from_json)
        .unwrap_or_default()
}

/// A new API key: `tc_` and 40 letters and digits.
pub fn generate_api_key() -> String {
    format!(
        "{API_KEY_PREFIX}{}",
        Alphanumeric.sample_string(&mut OsRng, API_KEY_RANDOM_LENGTH)
    )
}

fn is_api_key_shaped(presented: &str) -> bool {
    presented
        .strip_prefix(API_KEY_PREFIX)
        .is_some_and(|random| {
            random.len() == API_KEY_RANDOM_LENGTH
                && random.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

/// Revokes the login token a request came with; an API key is revoked by its owner
/// instead (see `keys::revoke`).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn logout(db: &Db, credential: &Credential) -> ServiceResult<()> {
    db::tokens::revoke(db, login_token_hash(credential)?).await?;
    Ok(())
}

/// The hash of the login token behind `credential`; `Forbidden` for an API key, which may
/// use the service but not manage the account (log out, change the password, manage keys).
pub fn login_token_hash(credential: &Credential) -> ServiceResult<&str> {
    match credential {
        Credential::LoginToken { token_hash } => Ok(token_hash),
        Credential::ApiKey { .. } => Err(ServiceError::Forbidden(
            "this needs a login token; an API key cannot manage the account",
        )),
    }
}

/// Revokes every login token of the user; `Forbidden` with an API key, so a leaked key
/// cannot keep its owner signed out.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn logout_everywhere(
    db: &Db,
    user_id: i64,
    credential: &Credential,
) -> ServiceResult<()> {
    login_token_hash(credential)?;
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
    fn an_api_key_is_tc_and_forty_letters_and_digits() {
        let key = generate_api_key();
        assert!(is_api_key_shaped(&key), "{key}");
        assert_eq!(key.len(), 43);
        assert_ne!(generate_api_key(), key);
        assert!(!is_api_key_shaped(&key[..42]));
        assert!(!is_api_key_shaped(&format!("tc-{}", &key[3..])));
        assert!(!is_well_formed(&key), "never mistaken for a login token");
    }

    #[test]
    fn the_hash_is_hex_sha256() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
