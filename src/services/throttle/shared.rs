//! The abuse limits counted on PostgreSQL, in the `rate_limits` table every instance shares,
//! by the GCRA of [`rates`]: one statement a check, so two instances admit what one would.
//!
//! A failed-login lock-out of `max` failures a window is a GCRA of `max` a window too: a
//! check counts one failure, a password that matched takes it back (the time moves back one
//! interval) or clears the row. Unlike the fixed windows counted in-process, a locked name
//! is let try again one interval (window / max) after the lock, then once an interval.
//!
//! Every row is named for what it limits: `login:<address>`, `register:<address>`,
//! `chat:<user id>`, `password:<user id>`, and for the lock-outs `fail:<hash>` of the
//! username and address, `fail-user:<hash>` of the username, so that no username (nor what
//! someone typed as one) is stored in clear.

use std::time::Duration;

use super::keys::{pair_key, user_key, ClientAddress, Key};
use crate::{
    config::AbuseLimits,
    db::Db,
    services::{
        rates::{self, Checked, Gcra},
        ServiceError, ServiceResult,
    },
};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;

/// Every limit of [`AbuseLimits`], as rates on the shared database; `None` when off.
pub(super) struct Shared {
    db: Db,
    login_attempts: Option<Gcra>,
    registrations: Option<Gcra>,
    chats: Option<Gcra>,
    password_changes: Option<Gcra>,
    failures_by_user_and_address: Option<Gcra>,
    failures_by_user: Option<Gcra>,
}

impl Shared {
    pub(super) fn new(limits: &AbuseLimits, db: Db) -> Self {
        let per = |count: Option<u32>, period_ms: i64| {
            count.filter(|count| *count > 0).map(|count| Gcra {
                limit: i64::from(count),
                period_ms,
            })
        };
        Self {
            db,
            login_attempts: per(limits.login_attempts_per_minute, MINUTE_MS),
            registrations: per(limits.registrations_per_hour, HOUR_MS),
            chats: per(limits.chat_rate_per_minute, MINUTE_MS),
            password_changes: per(limits.password_changes_per_hour, HOUR_MS),
            failures_by_user_and_address: per(
                limits.login_failures_per_user_and_address,
                millis(limits.login_failures_per_user_and_address_window),
            ),
            failures_by_user: per(
                limits.login_failures_per_user,
                millis(limits.login_failures_per_user_window),
            ),
        }
    }

    pub(super) async fn login_attempt(&self, address: ClientAddress) -> ServiceResult<()> {
        self.count(self.login_attempts, &format!("login:{address}"))
            .await
    }

    pub(super) async fn registration(&self, address: ClientAddress) -> ServiceResult<()> {
        self.count(self.registrations, &format!("register:{address}"))
            .await
    }

    pub(super) async fn chat(&self, user_id: i64) -> ServiceResult<()> {
        self.count(self.chats, &format!("chat:{user_id}")).await
    }

    pub(super) async fn password_change(&self, user_id: i64) -> ServiceResult<()> {
        self.count(self.password_changes, &format!("password:{user_id}"))
            .await
    }

    pub(super) async fn begin_password_check(
        &self,
        username_key: &str,
        address: ClientAddress,
    ) -> ServiceResult<()> {
        let pair = pair_name(username_key, address);
        self.count(self.failures_by_user_and_address, &pair).await?;
        let counted_user = self
            .count(self.failures_by_user, &user_name(username_key))
            .await;
        if counted_user.is_err() {
            // Locked everywhere, or not checked at all: the pair's failure never happened.
            if let Some(rate) = self.failures_by_user_and_address {
                if let Err(err) = rates::take_back(&self.db, &pair, rate).await {
                    tracing::warn!(error = %err, "could not take back a counted login failure");
                }
            }
        }
        counted_user
    }

    /// Errors are logged, not returned: the password did match, and what is left counted
    /// only makes a lock-out come one failure early.
    pub(super) async fn password_matched(&self, username_key: &str, address: ClientAddress) {
        if self.failures_by_user_and_address.is_some() {
            if let Err(err) = rates::clear(&self.db, &pair_name(username_key, address)).await {
                tracing::warn!(error = %err, "could not clear the login failures of a pair");
            }
        }
        if let Some(rate) = self.failures_by_user {
            if let Err(err) = rates::take_back(&self.db, &user_name(username_key), rate).await {
                tracing::warn!(error = %err, "could not take back a counted login failure");
            }
        }
    }

    /// Checks and counts one request of `name` against `rate`, if that limit is on.
    async fn count(&self, rate: Option<Gcra>, name: &str) -> ServiceResult<()> {
        let Some(rate) = rate else {
            return Ok(());
        };
        match rates::check(&self.db, name, rate, crate::clock::unix_now_ms()).await? {
            Checked::Admitted { .. } => Ok(()),
            Checked::Refused {
                retry_after_secs, ..
            } => Err(ServiceError::TooManyAttempts { retry_after_secs }),
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn pair_name(username_key: &str, address: ClientAddress) -> String {
    format!("fail:{}", hex(&pair_key(username_key, address)))
}

fn user_name(username_key: &str) -> String {
    format!("fail-user:{}", hex(&user_key(username_key)))
}

fn hex(key: &Key) -> String {
    key.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_out_rows_are_named_by_a_hash_never_by_the_username() {
        let address = ClientAddress::new("203.0.113.9".parse().unwrap());
        let pair = pair_name("alice", address);
        let user = user_name("alice");
        for name in [&pair, &user] {
            assert!(!name.contains("alice"), "{name}");
            assert!(!name.contains("203.0.113.9"), "{name}");
        }
        assert_eq!(user.len(), "fail-user:".len() + 32, "{user}");
        assert_ne!(pair, pair_name("alice", ClientAddress::unknown()));
        assert_ne!(user, user_name("bob"));
    }
}
