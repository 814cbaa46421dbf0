//! `/keys` and `/keys/{id}`: a user's API keys, managed with a login token.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    error::{error_responses, ApiError, Envelope, InvalidBody, NotFound},
    extract::{AuthUser, Payload},
    rfc3339,
};
use crate::{domain::KeyName, services::keys, state::AppState};

#[derive(Deserialize, ToSchema)]
pub struct NewKey {
    /// A name to tell the key apart by.
    name: String,
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
    created_at: String,
    id: i64,
    last_used_at: Option<String>,
    name: String,
    /// The key's first characters.
    prefix: String,
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
            description = "forbidden (an API key managing keys, or 25 live keys) or account_disabled",
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
    let issued = keys::create(&state.db, user.id, &user.credential, &name).await?;
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
    let keys = keys::list(&state.db, user.id, &user.credential)
        .await?
        .into_iter()
        .map(|key| ListedKey {
            created_at: rfc3339(key.created_at),
            id: key.id,
            last_used_at: key.last_used_at.map(rfc3339),
            name: key.name,
            prefix: key.prefix,
        })
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
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    // Not a number, or someone else's: either way there is no such key for this user.
    let id: i64 = id.parse().map_err(|_| ApiError::NotFound)?;
    keys::revoke(&state.db, user.id, &user.credential, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
