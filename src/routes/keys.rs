//! `/keys` and `/keys/{id}`: a user's API keys, managed with a login token.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    error::ApiError,
    extract::{AuthUser, Payload},
    rfc3339,
};
use crate::{domain::KeyName, services::keys, AppState};

#[derive(Deserialize)]
pub struct NewKey {
    name: String,
}

/// 201 with the key, shown this once.
#[utoipa::path(operation_id = "create_key", post, path = "/keys", tag = "keys", security(("bearer" = []), ("token" = [])), request_body(content = super::openapi::NewKey, content_type = "application/json"), responses((status = 201, body = super::openapi::CreatedKey, description = "The key, shown this once"), (status = 400, description = "invalid_json or invalid_input", body = super::openapi::Error), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "forbidden (an API key managing keys, or 25 live keys) or account_disabled", body = super::openapi::Error)))]
pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    Payload(new): Payload<NewKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let name = KeyName::parse(&new.name)?;
    let issued = keys::create(&state.db, user.id, &user.credential, &name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": issued.id,
            "name": issued.name,
            "key": issued.key,
            "created_at": rfc3339(issued.created_at),
        })),
    ))
}

/// The live keys, oldest first, each by the first characters of its key.
#[utoipa::path(operation_id = "list_keys", get, path = "/keys", tag = "keys", security(("bearer" = []), ("token" = [])), responses((status = 200, body = super::openapi::KeyList, description = "The live keys, oldest first"), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "forbidden or account_disabled", body = super::openapi::Error)))]
pub async fn list(State(state): State<AppState>, user: AuthUser) -> Result<Json<Value>, ApiError> {
    let keys: Vec<Value> = keys::list(&state.db, user.id, &user.credential)
        .await?
        .into_iter()
        .map(|key| {
            json!({
                "id": key.id,
                "name": key.name,
                "prefix": key.prefix,
                "created_at": rfc3339(key.created_at),
                "last_used_at": key.last_used_at.map(rfc3339),
            })
        })
        .collect();
    Ok(Json(json!({ "keys": keys })))
}

/// 204; the key is refused from then on.
#[utoipa::path(operation_id = "revoke_key", delete, path = "/keys/{id}", tag = "keys", security(("bearer" = []), ("token" = [])), params(("id" = i64, Path, description = "A key id")), responses((status = 204, description = "Revoked"), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "forbidden or account_disabled", body = super::openapi::Error), (status = 404, description = "not_found", body = super::openapi::Error)))]
pub async fn revoke(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    // Not a number, or someone else's: either way there is no such key for this user.
    let id: i64 = id.parse().map_err(|_| ApiError::NotFound)?;
    keys::revoke(&state.db, user.id, &user.credential, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
