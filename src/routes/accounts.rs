//! `/register`, `/login`, `/logout`, `/logout/all` and `/password`.

use axum::{
    extract::State,
    http::{header, HeaderName, StatusCode},
    Json,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    error::{ApiError, Envelope, Hashing, InvalidBody, Unauthorised},
    extract::{AuthUser, Client, Payload},
    rfc3339,
};
use crate::{
    domain::{Password, Username},
    services::auth,
    state::AppState,
};

#[derive(Deserialize, ToSchema)]
pub struct Credentials {
    /// 1 to 50 letters, digits or `@ . + - _`; unique regardless of case.
    username: String,
    /// At least PASSWORD_MIN_LENGTH characters, at most 1024 bytes.
    password: String,
}

#[derive(Serialize, ToSchema)]
pub struct Registered {
    /// "Registration Successful"
    message: &'static str,
    tokens: i64,
    username: String,
}

#[utoipa::path(
    post,
    path = "/register",
    tag = "accounts",
    request_body(content = Credentials, content_type = "application/json"),
    responses(
        (status = 201, body = Registered, description = "Registered with the starting balance"),
        InvalidBody,
        (status = 403, description = "registration_closed", body = Envelope),
        (status = 409, description = "username_taken", body = Envelope),
        Hashing,
    )
)]
pub async fn register(
    State(state): State<AppState>,
    Client(address): Client,
    Payload(credentials): Payload<Credentials>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
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
        Json(Registered {
            message: "Registration Successful",
            tokens,
            username: username.as_str().to_owned(),
        }),
    ))
}

#[derive(Serialize, ToSchema)]
pub struct LoginToken {
    /// RFC 3339, UTC; null when tokens never expire.
    expires_at: Option<String>,
    /// 32 characters of [A-Za-z0-9].
    token: String,
}

#[utoipa::path(
    post,
    path = "/login",
    tag = "accounts",
    request_body(content = Credentials, content_type = "application/json"),
    responses(
        (status = 200, body = LoginToken, description = "A new login token"),
        InvalidBody,
        (status = 401, description = "invalid_credentials", body = Envelope),
        (status = 403, description = "account_disabled", body = Envelope),
        Hashing,
    )
)]
pub async fn login(
    State(state): State<AppState>,
    Client(address): Client,
    Payload(credentials): Payload<Credentials>,
) -> Result<([(HeaderName, &'static str); 1], Json<LoginToken>), ApiError> {
    let username = Username::offered(&credentials.username)?;
    let password = Password::offered(credentials.password, "password")?;
    let issued = state
        .accounts
        .login(username.as_ref(), password, address)
        .await?;
    // A token is a credential: kept by no cache (RFC 6749 asks the same of its tokens).
    let no_store = [(header::CACHE_CONTROL, "no-store")];
    let token = LoginToken {
        expires_at: issued.expires_at.map(rfc3339),
        token: issued.token,
    };
    Ok((no_store, Json(token)))
}

/// Revokes the token this request came with.
#[utoipa::path(
    post,
    path = "/logout",
    tag = "accounts",
    security(("bearer" = []), ("token" = [])),
    responses(
        (status = 204, description = "This login token is revoked"),
        Unauthorised,
    )
)]
pub async fn logout(State(state): State<AppState>, user: AuthUser) -> Result<StatusCode, ApiError> {
    auth::logout(&state.db, &user.credential).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes every login token of the user.
#[utoipa::path(
    post,
    path = "/logout/all",
    tag = "accounts",
    security(("bearer" = []), ("token" = [])),
    responses(
        (status = 204, description = "Every login token of the user is revoked"),
        Unauthorised,
        (status = 403, description = "forbidden (an API key) or account_disabled", body = Envelope),
    )
)]
pub async fn logout_everywhere(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<StatusCode, ApiError> {
    auth::logout_everywhere(&state.db, user.id, &user.credential).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
pub struct PasswordChange {
    old_password: String,
    new_password: String,
}

/// Changes the password; every other login token of the user stops working.
#[utoipa::path(
    post,
    path = "/password",
    tag = "accounts",
    security(("bearer" = []), ("token" = [])),
    request_body(content = PasswordChange, content_type = "application/json"),
    responses(
        (status = 204, description = "Changed; every other login token is revoked"),
        InvalidBody,
        Unauthorised,
        Hashing,
    )
)]
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
