//! `/keys` and `/keys/{id}`: a user's API keys, managed with a login token, with their
//! limits: the models each may ask for and when it expires.

use axum::{extract::State, http::StatusCode, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    error::{error_responses, ApiError, Envelope, InvalidBody, NotFound},
    extract::{AuthUser, PathId, Payload},
    rfc3339,
};
use crate::{
    clock::parse_rfc3339,
    config::user_limits::{MAX_RPM, MAX_TPM},
    domain::{KeyName, TokenBudget, MAX_BALANCE},
    services::keys::{self, KeyLimits, KeyRecord, LimitsChange},
    state::AppState,
};

/// Served models one key may name at most.
const MAX_KEY_MODELS: usize = 64;

/// A field this build does not know is refused naming it (400 `invalid_json`): a mistyped
/// limit (`"budgets"`) would otherwise make a key without the limit its owner meant.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// A name to tell the key apart by.
    name: String,
    /// The served models the key may ask for; absent or null: every one.
    #[serde(default)]
    models: Option<Vec<String>>,
    /// When the key stops working (RFC 3339); absent or null: never, until revoked.
    #[serde(default)]
    expires_at: Option<String>,
    /// Tokens the key may spend in each period; absent or null: only the balance limits it.
    #[serde(default)]
    budget: Option<Budget>,
    /// Requests a minute at most, counted across every instance; absent or null: no limit.
    #[serde(default)]
    rpm: Option<i64>,
    /// Model tokens (prompt and completion, as the model counts them) a minute at most,
    /// counted across every instance; absent or null: no limit.
    #[serde(default)]
    tpm: Option<i64>,
}

/// A key's budget: at most `tokens` charged in each `period` (day, week or month in UTC,
/// or total), reservations in flight included.
#[derive(Deserialize, Serialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    period: String,
    tokens: i64,
}

/// `PATCH /keys/{id}`: each field given is set (`null` removes the limit), each absent kept;
/// an unknown one is refused naming it, as for [`NewKey`].
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyChange {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Budget>)]
    budget: Option<Option<Budget>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    tpm: Option<Option<i64>>,
}

/// A field that is present, as `Some` of its value (which may be null).
fn present<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    created_at: String,
    id: i64,
    /// `tc_` and 40 letters and digits, shown this once.
    key: String,
    name: String,
}

#[derive(Serialize, ToSchema)]
pub struct ListedKey {
    /// Its budget, or null.
    budget: Option<Budget>,
    created_at: String,
    /// When the key stops working, or null: never, until revoked.
    expires_at: Option<String>,
    id: i64,
    last_used_at: Option<String>,
    /// The served models the key may ask for, or null: every one.
    models: Option<Vec<String>>,
    name: String,
    /// The key's first characters.
    prefix: String,
    /// With a budget: when the next period begins (null for a total budget).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    resets_at: Option<Option<String>>,
    /// Requests a minute at most, or null.
    rpm: Option<i64>,
    /// With a budget: tokens charged in the current period, reservations in flight included.
    #[serde(skip_serializing_if = "Option::is_none")]
    spent: Option<i64>,
    /// Model tokens a minute at most, or null.
    tpm: Option<i64>,
}

impl From<KeyRecord> for ListedKey {
    fn from(key: KeyRecord) -> Self {
        Self {
            created_at: rfc3339(key.created_at),
            expires_at: key.limits.expires_at.map(rfc3339),
            id: key.id,
            last_used_at: key.last_used_at.map(rfc3339),
            models: key.limits.models,
            budget: key.limits.budget.map(|budget| Budget {
                period: budget.period.as_str().to_string(),
                tokens: budget.tokens,
            }),
            resets_at: key.spent.map(|_| key.resets_at.map(rfc3339)),
            spent: key.spent,
            rpm: key.limits.rpm,
            tpm: key.limits.tpm,
            name: key.name,
            prefix: key.prefix,
        }
    }
}

impl Budget {
    /// The budget as the product's type: tokens from 1 to the largest balance, a known
    /// period.
    fn parse(&self) -> Result<TokenBudget, ApiError> {
        let period = self.period.parse().map_err(|_| {
            ApiError::invalid_input("budget", "budget.period must be day, week, month or total")
        })?;
        if !(1..=MAX_BALANCE).contains(&self.tokens) {
            return Err(ApiError::invalid_input(
                "budget",
                format!("budget.tokens must be a whole number from 1 to {MAX_BALANCE}"),
            ));
        }
        Ok(TokenBudget {
            tokens: self.tokens,
            period,
        })
    }
}

/// The served models a key may ask for, checked: at least one, each served, none twice.
fn allowed_models(state: &AppState, models: Vec<String>) -> Result<Vec<String>, ApiError> {
    if models.is_empty() || models.len() > MAX_KEY_MODELS {
        return Err(ApiError::invalid_input(
            "models",
            format!(
                "models must name 1 to {MAX_KEY_MODELS} served models, or be null for every one"
            ),
        ));
    }
    let mut allowed: Vec<String> = Vec::with_capacity(models.len());
    for model in models {
        if !state.llm.serves(&model) {
            let shown: String = model.chars().take(100).collect();
            return Err(ApiError::invalid_input(
                "models",
                format!("{shown:?} is not a served model (GET /v1/models lists them)"),
            ));
        }
        if !allowed.contains(&model) {
            allowed.push(model);
        }
    }
    Ok(allowed)
}

/// The most requests a minute a key may make at most: from 1 to [`MAX_RPM`].
fn requests_a_minute(rpm: i64) -> Result<i64, ApiError> {
    if (1..=MAX_RPM).contains(&rpm) {
        return Ok(rpm);
    }
    Err(ApiError::invalid_input(
        "rpm",
        format!("rpm must be a whole number from 1 to {MAX_RPM}"),
    ))
}

/// An expiry given as RFC 3339, in Unix seconds.
fn expiry(text: &str) -> Result<i64, ApiError> {
    parse_rfc3339(text).ok_or_else(|| {
        ApiError::invalid_input(
            "expires_at",
            "expires_at must be an RFC 3339 time, such as 2027-01-01T00:00:00Z",
        )
    })
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    keys: Vec<ListedKey>,
}

error_responses! { Envelope =>
    /// What listing or revoking keys answers without a login token of a live account.
    NotKeyManager {
        401: "unauthorized",
        403: "forbidden or account_disabled",
    }
}

/// 201 with the key, shown this once.
#[utoipa::path(
    operation_id = "create_key",
    post,
    path = "/keys",
    tag = "keys",
    security(("bearer" = []), ("token" = [])),
    request_body(content = NewKey, content_type = "application/json"),
    responses(
        (status = 201, body = CreatedKey, description = "The key, shown this once"),
        InvalidBody,
        (status = 401, description = "unauthorized", body = Envelope),
        (
            status = 403,
            description = "forbidden (an API key managing keys) or account_disabled",
            body = Envelope
        ),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    Payload(new): Payload<NewKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let name = KeyName::parse(&new.name)?;
    let limits = KeyLimits {
        models: new
            .models
            .map(|models| allowed_models(&state, models))
            .transpose()?,
        expires_at: new.expires_at.as_deref().map(expiry).transpose()?,
        budget: new.budget.as_ref().map(Budget::parse).transpose()?,
        rpm: new.rpm.map(requests_a_minute).transpose()?,
        tpm: new.tpm.map(tokens_a_minute).transpose()?,
    };
    let issued = keys::create(&state.db, user.id, &user.credential, &name, &limits).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            created_at: rfc3339(issued.created_at),
            id: issued.id,
            key: issued.key,
            name: issued.name,
        }),
    ))
}

/// The live keys, oldest first, each by the first characters of its key.
#[utoipa::path(
    operation_id = "list_keys",
    get,
    path = "/keys",
    tag = "keys",
    security(("bearer" = []), ("token" = [])),
    responses(
        (status = 200, body = KeyList, description = "The live keys, oldest first"),
        NotKeyManager,
    )
)]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<KeyList>, ApiError> {
    let now = state.config.clock.now();
    let keys = keys::list(&state.db, user.id, &user.credential, now)
        .await?
        .into_iter()
        .map(ListedKey::from)
        .collect();
    Ok(Json(KeyList { keys }))
}

/// 204; the key is refused from then on.
#[utoipa::path(
    operation_id = "revoke_key",
    delete,
    path = "/keys/{id}",
    tag = "keys",
    security(("bearer" = []), ("token" = [])),
    params(("id" = i64, Path, description = "A key id")),
    responses(
        (status = 204, description = "Revoked"),
        NotKeyManager,
        NotFound,
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    user: AuthUser,
    id: PathId,
) -> Result<StatusCode, ApiError> {
    let id = id.get()?;
    keys::revoke(&state.db, user.id, &user.credential, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 200 with the key as it is now: each limit given is set, `null` removes one, each absent
/// one is kept.
#[utoipa::path(
    operation_id = "change_key",
    patch,
    path = "/keys/{id}",
    tag = "keys",
    security(("bearer" = []), ("token" = [])),
    params(("id" = i64, Path, description = "A key id")),
    request_body(content = KeyChange, content_type = "application/json"),
    responses(
        (status = 200, body = ListedKey, description = "The key with its limits"),
        InvalidBody,
        NotKeyManager,
        NotFound,
    )
)]
pub async fn change(
    State(state): State<AppState>,
    user: AuthUser,
    id: PathId,
    Payload(change): Payload<KeyChange>,
) -> Result<Json<ListedKey>, ApiError> {
    let id = id.get()?;
    let models = match change.models {
        None => None,
        Some(None) => Some(None),
        Some(Some(models)) => Some(Some(allowed_models(&state, models)?)),
    };
    let expires_at = match change.expires_at {
        None => None,
        Some(None) => Some(None),
        Some(Some(text)) => Some(Some(expiry(&text)?)),
    };
    let budget = match change.budget {
        None => None,
        Some(None) => Some(None),
        Some(Some(budget)) => Some(Some(budget.parse()?)),
    };
    let rpm = match change.rpm {
        None => None,
        Some(None) => Some(None),
        Some(Some(rpm)) => Some(Some(requests_a_minute(rpm)?)),
    };
    let tpm = match change.tpm {
        None => None,
        Some(None) => Some(None),
        Some(Some(tpm)) => Some(Some(tokens_a_minute(tpm)?)),
    };
    let change = LimitsChange {
        models,
        expires_at,
        budget,
        rpm,
        tpm,
    };
    let now = state.config.clock.now();
    let key = keys::change_limits(&state.db, user.id, &user.credential, id, &change, now).await?;
    Ok(Json(ListedKey::from(key)))
}

/// The most model tokens a minute a key may use: from 1 to [`MAX_TPM`].
fn tokens_a_minute(tpm: i64) -> Result<i64, ApiError> {
    if (1..=MAX_TPM).contains(&tpm) {
        return Ok(tpm);
    }
    Err(ApiError::invalid_input(
        "tpm",
        format!("tpm must be a whole number from 1 to {MAX_TPM}"),
    ))
}
