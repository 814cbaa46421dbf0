//! `/register`, `/login`, `/logout`, `/logout/all` and `/password`.

use axum::{extract::State, http::StatusCode, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    error::ApiError,
    extract::{AuthUser, Client, Payload},
    rfc3339,
};
use crate::{
    domain::{Password, Username},
    services::auth,
    AppState,
};

#[derive(Deserialize)]
pub struct Credentials {
    username: String,
    password: String,
}

#[utoipa::path(post, path = "/register", tag = "accounts", request_body(content = super::openapi::Credentials, content_type = "application/json"), responses((status = 201, body = super::openapi::Registered, description = "Registered with the starting balance"), (status = 400, description = "invalid_json or invalid_input", body = super::openapi::Error), (status = 403, description = "registration_closed", body = super::openapi::Error), (status = 409, description = "username_taken", body = super::openapi::Error), (status = 429, description = "rate_limited", body = super::openapi::Error)))]
pub async fn register(
    State(state): State<AppState>,
    Client(address): Client,
    Payload(credentials): Payload<Credentials>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let username = Username::parse(&credentials.username)?;
    let password = Password::parse(
        credentials.password,
        state.config.password_min_length,
        "password",
    )?;
    let tokens = state
        .accounts
        .register(&username, password, address)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "message": "Registration Successful",
            "username": username.as_str(),
            "tokens": tokens,
        })),
    ))
}

#[utoipa::path(post, path = "/login", tag = "accounts", request_body(content = super::openapi::Credentials, content_type = "application/json"), responses((status = 200, body = super::openapi::LoginToken, description = "A new login token"), (status = 400, description = "invalid_json or invalid_input", body = super::openapi::Error), (status = 401, description = "invalid_credentials", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error), (status = 429, description = "rate_limited", body = super::openapi::Error)))]
pub async fn login(
    State(state): State<AppState>,
    Client(address): Client,
    Payload(credentials): Payload<Credentials>,
) -> Result<Json<Value>, ApiError> {
    let username = Username::offered(&credentials.username)?;
    let password = Password::offered(credentials.password, "password")?;
    let issued = state
        .accounts
        .login(username.as_ref(), password, address)
        .await?;
    let expires_at = issued.expires_at.map(rfc3339);
    Ok(Json(
        json!({ "token": issued.token, "expires_at": expires_at }),
    ))
}

/// Revokes the token this request came with.
#[utoipa::path(post, path = "/logout", tag = "accounts", security(("bearer" = []), ("token" = [])), responses((status = 204, description = "This login token is revoked"), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error)))]
pub async fn logout(State(state): State<AppState>, user: AuthUser) -> Result<StatusCode, ApiError> {
    auth::logout(&state.db, &user.credential).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes every login token of the user.
#[utoipa::path(post, path = "/logout/all", tag = "accounts", security(("bearer" = []), ("token" = [])), responses((status = 204, description = "Every login token of the user is revoked"), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "forbidden (an API key) or account_disabled", body = super::openapi::Error)))]
pub async fn logout_everywhere(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<StatusCode, ApiError> {
    auth::logout_everywhere(&state.db, user.id, &user.credential).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct PasswordChange {
    old_password: String,
    new_password: String,
}

/// Changes the password; every other login token of the user stops working.
#[utoipa::path(post, path = "/password", tag = "accounts", security(("bearer" = []), ("token" = [])), request_body(content = super::openapi::PasswordChange, content_type = "application/json"), responses((status = 204, description = "Changed; every other login token is revoked"), (status = 400, description = "invalid_json or invalid_input", body = super::openapi::Error), (status = 401, description = "unauthorized", body = super::openapi::Error), (status = 403, description = "account_disabled", body = super::openapi::Error), (status = 429, description = "rate_limited", body = super::openapi::Error)))]
pub async fn change_password(
    State(state): State<AppState>,
    Client(address): Client,
    user: AuthUser,
    Payload(change): Payload<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    let old = Password::offered(change.old_password, "old_password")?;
    let new = Password::parse(
        change.new_password,
        state.config.password_min_length,
        "new_password",
    )?;
    state
        .accounts
        .change_password(user.id, &user.credential, old, new, address)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
