//! Abuse limits: login attempts and registrations per client address, chats and password
//! changes per user, and failed-login lock-outs per (username, address) and per username
//! across addresses. With SQLite they are counted in this process ([`local`]); with
//! PostgreSQL in the database every instance shares ([`shared`]), so that two instances
//! admit what one would.

mod local;
mod shared;

use std::{net::IpAddr, time::Duration};

use sha2::{Digest, Sha256};

use self::{local::InProcess, shared::Shared};
use crate::{config::AbuseLimits, db::Db, services::ServiceResult};

/// The address a rate is counted for. IPv6 clients are counted by their /64, since one
/// subscriber commonly holds a whole /64 and could otherwise rotate through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddress(IpAddr);

impl ClientAddress {
    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
            v4 => Self(v4),
        }
    }

    /// The address of a request that came with none (in-process calls).
    pub fn unknown() -> Self {
        Self(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }
}

/// Every limit of [`AbuseLimits`], shared by all requests of the process and, on
/// PostgreSQL, by every instance.
pub struct Throttle {
    store: Store,
}

/// Where the limits are counted: in this process, with SQLite (whose file one process
/// serves), or on PostgreSQL, where several instances share the database and so the counts.
enum Store {
    InProcess(Box<InProcess>),
    Shared(Shared),
}

impl Throttle {
    pub fn new(limits: &AbuseLimits, db: &Db) -> Self {
        let store = match db {
            Db::Sqlite(_) => Store::InProcess(Box::new(InProcess::new(limits))),
            Db::Postgres(_) => Store::Shared(Shared::new(limits, db.clone())),
        };
        Self { store }
    }

    /// Counts a login attempt from `address`; `RateLimited` past the per-address rate.
    pub async fn login_attempt(&self, address: ClientAddress) -> ServiceResult<()> {
        match &self.store {
            Store::InProcess(store) => store.login_attempt(address),
            Store::Shared(store) => store.login_attempt(address).await,
        }
    }

    /// Counts a registration from `address`; `RateLimited` past the per-address rate.
    pub async fn registration(&self, address: ClientAddress) -> ServiceResult<()> {
        match &self.store {
            Store::InProcess(store) => store.registration(address),
            Store::Shared(store) => store.registration(address).await,
        }
    }

    /// Counts a chat of `user_id`; `RateLimited` past the per-user rate.
    pub async fn chat(&self, user_id: i64) -> ServiceResult<()> {
        match &self.store {
            Store::InProcess(store) => store.chat(user_id),
            Store::Shared(store) => store.chat(user_id).await,
        }
    }

    /// Counts a password check of `username_key` from `address` as a failure before it
    /// runs, so that concurrent guesses cannot all pass the check while none has failed
    /// yet; `RateLimited`, counting nothing, while the name is locked from `address` or
    /// from everywhere. A check that succeeds is taken back by [`Self::password_matched`].
    pub async fn begin_password_check(
        &self,
        username_key: &str,
        address: ClientAddress,
    ) -> ServiceResult<()> {
        match &self.store {
            Store::InProcess(store) => store.begin_password_check(username_key, address),
            Store::Shared(store) => store.begin_password_check(username_key, address).await,
        }
    }

    /// The password was right: the check counted by [`Self::begin_password_check`] is taken
    /// back, and the owner's own address starts afresh. The earlier failures from other
    /// addresses stay counted, or an attacker could reset them by watching the owner log in.
    pub async fn password_matched(&self, username_key: &str, address: ClientAddress) {
        match &self.store {
            Store::InProcess(store) => store.password_matched(username_key, address),
            Store::Shared(store) => store.password_matched(username_key, address).await,
        }
    }

    /// Counts a password change of `user_id`, successful or not: each costs two hashes.
    /// Few enough that a stolen token cannot keep the hashing cores busy for everyone.
    pub async fn password_change(&self, user_id: i64) -> ServiceResult<()> {
        match &self.store {
            Store::InProcess(store) => store.password_change(user_id),
            Store::Shared(store) => store.password_change(user_id).await,
        }
    }

    /// Forgets what no longer limits anyone, so the stores shrink after a burst: in this
    /// process, or on PostgreSQL the rows of `rate_limits` whose time is past.
    pub async fn forget_stale(&self) {
        match &self.store {
            Store::InProcess(store) => store.forget_stale(),
            Store::Shared(store) => match store.forget_stale().await {
                Ok(forgotten) => tracing::debug!(forgotten, "swept past rate limits"),
                Err(err) => tracing::warn!(error = %err, "could not sweep past rate limits"),
            },
        }
    }
}

/// How often the stores drop what has expired.
const FORGET_PERIOD: Duration = Duration::from_secs(60);

/// Calls [`Throttle::forget_stale`] every minute, forever.
pub async fn forget_stale_periodically(throttle: std::sync::Arc<Throttle>) {
    let mut ticks = tokio::time::interval(FORGET_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        throttle.forget_stale().await;
    }
}

/// Whole seconds, rounded up, and at least one: `Retry-After: 0` invites a hot loop.
fn retry_after_secs(wait: Duration) -> u64 {
    let rounded_up = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    rounded_up.max(1)
}

/// A fixed-size key: however long the username, an entry costs the same.
type Key = [u8; 16];

fn user_key(username_key: &str) -> Key {
    digest(&[b"user", username_key.as_bytes()])
}

fn pair_key(username_key: &str, address: ClientAddress) -> Key {
    digest(&[
        b"pair",
        username_key.as_bytes(),
        address.0.to_string().as_bytes(),
    ])
}

fn digest(parts: &[&[u8]]) -> Key {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let mut key = [0; 16];
    key.copy_from_slice(&hasher.finalize()[..16]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> ClientAddress {
        ClientAddress::new(text.parse().unwrap())
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_slash_64() {
        assert_eq!(address("2001:db8::1"), address("2001:db8::ffff:1"));
        assert_ne!(address("2001:db8::1"), address("2001:db8:0:1::1"));
        assert_eq!(address("::ffff:10.0.0.1"), address("10.0.0.1"));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
