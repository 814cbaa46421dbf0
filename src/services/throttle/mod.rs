//! Abuse limits: login attempts and registrations per client address, chats and password
//! changes per user, and failed-login lock-outs per (username, address) and per username
//! across addresses. With SQLite they are counted in this process ([`local`]); with
//! PostgreSQL in the database every instance shares ([`shared`]), so that two instances
//! admit what one would.

mod keys;
mod local;
mod shared;

use std::time::Duration;

pub use self::keys::ClientAddress;
use self::{local::InProcess, shared::Shared};
use crate::{config::AbuseLimits, db::Db, services::ServiceResult};

/// Every limit of [`AbuseLimits`], shared by all requests of the process and, on
/// PostgreSQL, by every instance.
pub struct Throttle {
    store: Store,
    /// Where `rate_limits` is: every limit's on PostgreSQL, keys' and users' rates on both.
    db: Db,
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
        Self {
            store,
            db: db.clone(),
        }
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

    /// Forgets what no longer limits anyone, so the stores shrink after a burst: what this
    /// process counts, and the rows of `rate_limits` whose time is past (on SQLite too,
    /// where keys' requests a minute are counted there: a key used and revoked left its row
    /// for ever).
    pub async fn forget_stale(&self) {
        if let Store::InProcess(store) = &self.store {
            store.forget_stale();
        }
        match crate::services::rates::forget_past(&self.db, crate::clock::unix_now_ms()).await {
            Ok(forgotten) => tracing::debug!(forgotten, "swept past rate limits"),
            Err(err) => tracing::warn!(error = %err, "could not sweep past rate limits"),
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
