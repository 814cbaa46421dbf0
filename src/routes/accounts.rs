//! `/register` and `/login`.

use axum::{extract::State, http::StatusCode, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{extract::Payload, rfc3339};
use crate::{error::Error, services::accounts, AppState};

const MAX_USERNAME_CHARS: usize = 50;
const MAX_PASSWORD_BYTES: usize = 1024;

#[derive(Deserialize)]
pub struct Credentials {
    username: String,
    password: String,
}

pub async fn register(
    State(state): State<AppState>,
    Payload(credentials): Payload<Credentials>,
) -> Result<(StatusCode, Json<Value>), Error> {
    validate_username(&credentials.username)?;
    validate_password(&credentials.password, state.config.password_min_length)?;
    let tokens = accounts::register(&state, &credentials.username, credentials.password).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "message": "Registration Successful",
            "username": credentials.username,
            "tokens": tokens,
        })),
    ))
}

pub async fn login(
    State(state): State<AppState>,
    Payload(credentials): Payload<Credentials>,
) -> Result<Json<Value>, Error> {
    if credentials.username.is_empty() {
        return Err(Error::invalid_input(
            "username",
            "username must not be empty",
        ));
    }
    if credentials.password.is_empty() {
        return Err(Error::invalid_input(
            "password",
            "password must not be empty",
        ));
    }
    if credentials.password.len() > MAX_PASSWORD_BYTES {
        return Err(too_long_password());
    }
    let issued = accounts::login(&state, &credentials.username, credentials.password).await?;
    let expires_at = issued.expires_at.map(rfc3339);
    Ok(Json(
        json!({ "token": issued.token, "expires_at": expires_at }),
    ))
}

/// Django's rules: 1 to 50 characters, each a letter, a digit or one of `@ . + - _`.
fn validate_username(username: &str) -> Result<(), Error> {
    let length = username.chars().count();
    if length == 0 || length > MAX_USERNAME_CHARS {
        return Err(Error::invalid_input(
            "username",
            format!("username must be 1 to {MAX_USERNAME_CHARS} characters"),
        ));
    }
    let allowed = |c: char| c.is_alphanumeric() || matches!(c, '@' | '.' | '+' | '-' | '_');
    if !username.chars().all(allowed) {
        return Err(Error::invalid_input(
            "username",
            "username may contain only letters, digits and @ . + - _",
        ));
    }
    Ok(())
}

fn validate_password(password: &str, min_chars: usize) -> Result<(), Error> {
    if password.chars().count() < min_chars {
        return Err(Error::invalid_input(
            "password",
            format!("password must be at least {min_chars} characters"),
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(too_long_password());
    }
    Ok(())
}

fn too_long_password() -> Error {
    Error::invalid_input(
        "password",
        format!("password must be at most {MAX_PASSWORD_BYTES} bytes"),
    )
}
