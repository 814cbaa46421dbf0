//! Accounts: registration, login, logout, password changes and operator grants.

use std::sync::Arc;

use crate::{
    config::Config,
    db::{self, Db},
    domain::{GrantAmount, Invalid, Password, Username, MAX_BALANCE},
    services::{
        auth::{self, Credential, IssuedToken},
        passwords::PasswordHasher,
        throttle::{ClientAddress, Throttle},
        ServiceError, ServiceResult,
    },
};

/// Registration, login and password changes, built once at start: the database, the
/// password hasher, the abuse limits and the settings they follow.
pub struct Accounts {
    db: Db,
    passwords: Arc<PasswordHasher>,
    throttle: Arc<Throttle>,
    config: Arc<Config>,
}

impl Accounts {
    pub fn new(
        db: Db,
        passwords: Arc<PasswordHasher>,
        throttle: Arc<Throttle>,
        config: Arc<Config>,
    ) -> Self {
        Self {
            db,
            passwords,
            throttle,
            config,
        }
    }

    /// Creates a user from `/register`, within the per-address rate and only while
    /// registration is open; returns the starting balance.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn register(
        &self,
        username: &Username,
        password: Password,
        address: ClientAddress,
    ) -> ServiceResult<i64> {
        if !self.config.abuse.registration_open {
            return Err(ServiceError::RegistrationClosed);
        }
        self.throttle.registration(address).await?;
        self.create(username, password).await
    }

    /// Creates a user with the starting balance, as an operator may even with registration
    /// closed; returns that balance.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn create(&self, username: &Username, password: Password) -> ServiceResult<i64> {
        let password_hash = self.passwords.hash(password.into_inner()).await?;
        let tokens = self.config.initial_tokens;
        db::users::insert(
            &self.db,
            username.as_str(),
            &username.key(),
            &password_hash,
            tokens,
        )
        .await?
        .ok_or(ServiceError::UsernameTaken)?;
        Ok(tokens)
    }

    /// Checks the password and issues a new login token. Unknown users, usernames that
    /// cannot exist (`None`) and wrong passwords fail alike, after the same Argon2 work; only
    /// a name that could be someone's counts towards a lock-out, so junk names cost no memory.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn login(
        &self,
        username: Option<&Username>,
        password: Password,
        address: ClientAddress,
    ) -> ServiceResult<IssuedToken> {
        self.throttle.login_attempt(address).await?;
        let Some(username) = username else {
            self.passwords.verify(password.into_inner(), None).await?;
            return Err(ServiceError::WrongCredentials);
        };
        let key = username.key();
        self.throttle.begin_password_check(&key, address).await?;
        let credentials = db::users::find_credentials(&self.db, &key).await?;
        let disabled = credentials.as_ref().is_some_and(|found| found.disabled);
        let (user_id, stored_hash) = credentials
            .map(|found| (found.id, found.password_hash))
            .unzip();
        // `verify` runs Argon2 even without a stored hash, so both failures cost the same.
        let verified = self
            .passwords
            .verify(password.into_inner(), stored_hash)
            .await?;
        let Some(user_id) = user_id.filter(|_| verified) else {
            return Err(ServiceError::WrongCredentials);
        };
        self.throttle.password_matched(&key, address).await;
        // Said only to whoever knows the password: to anyone else a disabled account is
        // indistinguishable from any other.
        if disabled {
            return Err(ServiceError::AccountDisabled);
        }
        let ttl_secs = self.config.token_ttl.map(|ttl| ttl.as_secs());
        auth::issue(&self.db, user_id, ttl_secs).await
    }

    /// Changes a user's password when `old` is the current one, and revokes every login
    /// token of theirs but `keep_token_hash` (the one the change was made with). A wrong old
    /// password counts as a failed login, so a stolen token guesses no faster than login.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn change_password(
        &self,
        user_id: i64,
        credential: &Credential,
        old: Password,
        new: Password,
        address: ClientAddress,
    ) -> ServiceResult<()> {
        let keep_token_hash = auth::login_token_hash(credential)?;
        self.throttle.login_attempt(address).await?;
        self.throttle.password_change(user_id).await?;
        let credentials = db::users::credentials_by_id(&self.db, user_id)
            .await?
            .ok_or(ServiceError::NotAuthenticated)?;
        let key = credentials.username_key;
        self.throttle.begin_password_check(&key, address).await?;
        let verified = self
            .passwords
            .verify(old.into_inner(), Some(credentials.password_hash))
            .await?;
        if !verified {
            return Err(
                Invalid::new("old_password", "old_password is not the current password").into(),
            );
        }
        self.throttle.password_matched(&key, address).await;
        let new_hash = self.passwords.hash(new.into_inner()).await?;
        db::users::set_password(&self.db, user_id, &new_hash, keep_token_hash).await?;
        Ok(())
    }
}

/// Adds `amount` tokens to a user's balance (takes them, when negative) through the
/// ledger; the new balance. A grant that would lift the balance, with the tokens its
/// pending chats reserved, over [`MAX_BALANCE`] (so that their refunds always fit), or take
/// it below zero, is refused and writes nothing.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn grant(db: &Db, username: &Username, amount: GrantAmount) -> ServiceResult<i64> {
    match db::users::grant(db, &username.key(), amount.get(), MAX_BALANCE).await? {
        db::users::Grant::Granted { balance } => Ok(balance),
        db::users::Grant::NoSuchUser => Err(ServiceError::NoSuchUser(username.as_str().into())),
        db::users::Grant::OverCeiling { balance } => Err(Invalid::new(
            "amount",
            format!(
                "the balance, with what its pending chats reserved, would exceed the ceiling \
                 of {MAX_BALANCE} tokens (it is {balance})"
            ),
        )
        .into()),
        db::users::Grant::BelowZero { balance } => Err(Invalid::new(
            "amount",
            format!("the balance would go below zero (it is {balance})"),
        )
        .into()),
    }
}

/// Disables a user's account (`disabled`) or enables it again: while disabled, its login,
/// tokens and keys are refused; its balance and history are kept.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn set_disabled(db: &Db, username: &Username, disabled: bool) -> ServiceResult<()> {
    let disabled_at = disabled.then(db::unix_now);
    if !db::users::set_disabled(db, &username.key(), disabled_at).await? {
        return Err(ServiceError::NoSuchUser(username.as_str().into()));
    }
    Ok(())
}
