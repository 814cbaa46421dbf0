//! Registration and login.

use crate::{
    db,
    error::Error,
    services::{
        auth::{self, IssuedToken},
        passwords,
    },
    AppState,
};

/// The key that makes usernames unique regardless of letter case.
pub fn username_key(username: &str) -> String {
    username.to_lowercase()
}

/// Creates a user with the starting balance; returns that balance.
pub async fn register(state: &AppState, username: &str, password: String) -> Result<i64, Error> {
    let password_hash = passwords::hash(password).await?;
    let tokens = state.config.initial_tokens;
    db::users::insert(
        &state.db,
        username,
        &username_key(username),
        &password_hash,
        tokens,
    )
    .await?
    .ok_or(Error::UsernameTaken)?;
    Ok(tokens)
}

/// Checks the password and issues a new login token. Unknown users and wrong passwords
/// fail alike, after the same Argon2 work.
pub async fn login(
    state: &AppState,
    username: &str,
    password: String,
) -> Result<IssuedToken, Error> {
    let key = username_key(username);
    state.login_throttle.check(&key)?;
    let credentials = db::users::find_credentials(&state.db, &key).await?;
    let (user_id, stored_hash) = credentials
        .map(|found| (found.id, found.password_hash))
        .unzip();
    // `verify` runs Argon2 even without a stored hash, so both failures cost the same.
    let verified = passwords::verify(password, stored_hash).await?;
    let Some(user_id) = user_id.filter(|_| verified) else {
        state.login_throttle.record_failure(&key);
        return Err(Error::InvalidCredentials);
    };
    state.login_throttle.clear(&key);
    let ttl_secs = state.config.token_ttl.map(|ttl| ttl.as_secs());
    auth::issue(&state.db, user_id, ttl_secs).await
}

/// Adds `amount` (> 0) tokens to a user's balance, through the ledger; the new balance,
/// or `None` for an unknown user.
pub async fn grant(db: &crate::db::Db, username: &str, amount: i64) -> Result<Option<i64>, Error> {
    if amount <= 0 {
        return Err(Error::invalid_input(
            "amount",
            "a grant must be a positive number of tokens",
        ));
    }
    Ok(db::users::grant(db, &username_key(username), amount).await?)
}
