//! API keys: created, listed, limited and revoked by their owner with a login token (a key
//! cannot manage keys); accepted wherever a login token is, until revoked or past the expiry
//! its owner gave it, for the models its owner allowed it.

use crate::{
    db::{self, Db},
    domain::{Invalid, KeyName, TokenBudget},
    services::{
        auth::{self, Credential},
        rates, sha256_hex, ServiceError, ServiceResult,
    },
};

/// Live keys one user may hold at once.
pub const MAX_LIVE_KEYS: i64 = 25;

/// Characters of a key shown in a list to tell it apart.
const SHOWN_PREFIX_CHARS: usize = 7;

/// A key just created: the only time the key itself is shown.
pub struct IssuedKey {
    pub id: i64,
    pub name: String,
    pub key: String,
    pub created_at: i64,
}

/// A live key as its owner sees it in a list. Times are Unix seconds.
pub struct KeyRecord {
    pub id: i64,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub limits: KeyLimits,
    /// With a budget: what the current period has spent (reservations in flight included)
    /// and when the next begins (`None` for a total budget).
    pub spent: Option<i64>,
    pub resets_at: Option<i64>,
}

/// What a key may do: the served models it may ask for (`None`: every one) and when it
/// stops working (Unix seconds; `None`: never, until revoked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub models: Option<Vec<String>>,
    pub expires_at: Option<i64>,
    pub budget: Option<TokenBudget>,
    /// Requests a minute at most.
    pub rpm: Option<i64>,
    /// Model tokens a minute at most.
    pub tpm: Option<i64>,
}

/// A change of a key's limits: each kept (`None`) or set to what is given (`Some(None)`
/// removes it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsChange {
    pub models: Option<Option<Vec<String>>>,
    pub expires_at: Option<Option<i64>>,
    pub budget: Option<Option<TokenBudget>>,
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
}

impl KeyLimits {
    fn stored(&self) -> db::api_keys::StoredLimits {
        db::api_keys::StoredLimits {
            models: self.models.as_ref().map(|models| models_json(models)),
            expires_at: self.expires_at,
            budget: self.budget.map(stored_budget),
            rpm: self.rpm,
            tpm: self.tpm,
        }
    }
}

fn stored_budget(budget: TokenBudget) -> (i64, &'static str) {
    (budget.tokens, budget.period.as_str())
}

fn models_json(models: &[String]) -> String {
    serde_json::Value::from(models).to_string()
}

impl KeyRecord {
    /// The key as stored, its budget's spending as it stands at `now`.
    fn at(key: db::api_keys::ApiKey, now: i64) -> Self {
        let budget = auth::budget_of(key.budget_tokens, key.budget_period.as_deref());
        let current = budget.map(|budget| budget.use_at(now));
        let spent = current.map(|period| period.spent(key.budget_period_start, key.budget_spent));
        let resets_at = current.and_then(|period| period.resets_at);
        Self {
            id: key.id,
            name: key.name,
            prefix: key.prefix,
            created_at: key.created_at,
            last_used_at: key.last_used_at,
            limits: KeyLimits {
                models: key
                    .models
                    .map(|models| serde_json::from_str(&models).unwrap_or_default()),
                expires_at: key.expires_at,
                budget,
                rpm: key.rpm,
                tpm: key.tpm,
            },
            spent,
            resets_at,
        }
    }
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn create(
    db: &Db,
    user_id: i64,
    credential: &Credential,
    name: &KeyName,
    limits: &KeyLimits,
) -> ServiceResult<IssuedKey> {
    auth::login_token_hash(credential)?;
    let key = auth::generate_api_key();
    let prefix: String = key.chars().take(SHOWN_PREFIX_CHARS).collect();
    let key_hash = sha256_hex(key.as_bytes());
    let inserted = db::api_keys::insert(
        db,
        user_id,
        name.as_str(),
        &key_hash,
        &prefix,
        &limits.stored(),
        MAX_LIVE_KEYS,
    )
    .await?;
    let Some((id, created_at)) = inserted else {
        return Err(Invalid::new(
            "name",
            format!("at most {MAX_LIVE_KEYS} live API keys per user; delete one first"),
        )
        .into());
    };
    Ok(IssuedKey {
        id,
        name: name.as_str().to_string(),
        key,
        created_at,
    })
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn list(
    db: &Db,
    user_id: i64,
    credential: &Credential,
    now: i64,
) -> ServiceResult<Vec<KeyRecord>> {
    auth::login_token_hash(credential)?;
    let keys = db::api_keys::live(db, user_id).await?;
    Ok(keys
        .into_iter()
        .map(|key| KeyRecord::at(key, now))
        .collect())
}

/// Changes the limits of one of the user's live keys; the key as it is now.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn change_limits(
    db: &Db,
    user_id: i64,
    credential: &Credential,
    key_id: i64,
    change: &LimitsChange,
    now: i64,
) -> ServiceResult<KeyRecord> {
    auth::login_token_hash(credential)?;
    let stored = db::api_keys::LimitsChange {
        models: change
            .models
            .as_ref()
            .map(|models| models.as_deref().map(models_json)),
        expires_at: change.expires_at,
        budget: change.budget.map(|budget| budget.map(stored_budget)),
        budget_period_start: change
            .budget
            .flatten()
            .map(|budget| budget.period.start_of(now)),
        rpm: change.rpm,
        tpm: change.tpm,
    };
    let Some(changed) = db::api_keys::change_limits(db, user_id, key_id, &stored).await? else {
        return Err(ServiceError::NoSuchKey);
    };
    // What the key's rates counted stands, in their new units.
    let now_ms = now.saturating_mul(1000);
    if let Some(rpm) = change.rpm {
        let name = rates::key_requests(key_id);
        let window = rates::MINUTE_MS;
        db::rates::rescale(db, &name, now_ms, (changed.rpm_before, rpm), window).await?;
    }
    if let Some(tpm) = change.tpm {
        let name = rates::key_tokens(key_id);
        let horizon = db::rates::ADD_HORIZON_MS;
        db::rates::rescale(db, &name, now_ms, (changed.tpm_before, tpm), horizon).await?;
    }
    Ok(KeyRecord::at(changed.key, now))
}

/// Revokes one of the user's live keys: refused from then on.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn revoke(
    db: &Db,
    user_id: i64,
    credential: &Credential,
    key_id: i64,
) -> ServiceResult<()> {
    auth::login_token_hash(credential)?;
    if db::api_keys::revoke(db, user_id, key_id).await? {
        Ok(())
    } else {
        Err(ServiceError::NoSuchKey)
    }
}
