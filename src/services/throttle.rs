//! Abuse limits: login attempts and registrations per client address, chats per user
//! (rates, with governor), and failed-login lock-outs per (username, address) and per
//! username across addresses (counters of our own, below). Every store is bounded.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::Mutex,
    time::{Duration, Instant},
};

use governor::{
    clock::{Clock, DefaultClock},
    DefaultKeyedRateLimiter, Quota, RateLimiter,
};
use sha2::{Digest, Sha256};

use crate::{config::AbuseLimits, services::ServiceError};

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

/// Every limit of [`AbuseLimits`], shared by all requests of the process.
pub struct Throttle {
    login_attempts: Option<DefaultKeyedRateLimiter<ClientAddress>>,
    registrations: Option<DefaultKeyedRateLimiter<ClientAddress>>,
    chats: Option<DefaultKeyedRateLimiter<i64>>,
    /// Few enough that a stolen token cannot keep the hashing cores busy for everyone.
    password_changes: Option<DefaultKeyedRateLimiter<i64>>,
    failures_by_user_and_address: Option<FailureCounter>,
    failures_by_user: Option<FailureCounter>,
}

impl Throttle {
    pub fn new(limits: &AbuseLimits) -> Self {
        Self {
            login_attempts: keyed(limits.login_attempts_per_minute, Quota::per_minute),
            registrations: keyed(limits.registrations_per_hour, Quota::per_hour),
            chats: keyed(limits.chat_rate_per_minute, Quota::per_minute),
            password_changes: keyed(limits.password_changes_per_hour, Quota::per_hour),
            failures_by_user_and_address: limits.login_failures_per_user_and_address.map(|max| {
                FailureCounter::new(max, limits.login_failures_per_user_and_address_window)
            }),
            failures_by_user: limits
                .login_failures_per_user
                .map(|max| FailureCounter::new(max, limits.login_failures_per_user_window)),
        }
    }

    /// Counts a login attempt from `address`; `RateLimited` past the per-address rate.
    pub fn login_attempt(&self, address: ClientAddress) -> Result<(), ServiceError> {
        check_rate(self.login_attempts.as_ref(), &address)
    }

    /// Counts a registration from `address`; `RateLimited` past the per-address rate.
    pub fn registration(&self, address: ClientAddress) -> Result<(), ServiceError> {
        check_rate(self.registrations.as_ref(), &address)
    }

    /// Counts a chat of `user_id`; `RateLimited` past the per-user rate.
    pub fn chat(&self, user_id: i64) -> Result<(), ServiceError> {
        check_rate(self.chats.as_ref(), &user_id)
    }

    /// Counts a password check of `username_key` from `address` as a failure before it
    /// runs, so that concurrent guesses cannot all pass the check while none has failed
    /// yet; `RateLimited`, counting nothing, while the name is locked from `address` or
    /// from everywhere. A check that succeeds is taken back by [`Self::password_matched`].
    pub fn begin_password_check(
        &self,
        username_key: &str,
        address: ClientAddress,
    ) -> Result<(), ServiceError> {
        let pair = pair_key(username_key, address);
        let user = user_key(username_key);
        let locked = |left: Duration| ServiceError::TooManyAttempts {
            retry_after_secs: retry_after_secs(left),
        };
        if let Some(counter) = &self.failures_by_user_and_address {
            counter.try_count(pair).map_err(locked)?;
        }
        if let Some(counter) = &self.failures_by_user {
            if let Err(left) = counter.try_count(user) {
                if let Some(pairs) = &self.failures_by_user_and_address {
                    pairs.take_back(&pair);
                }
                return Err(locked(left));
            }
        }
        Ok(())
    }

    /// The password was right: the check counted by [`Self::begin_password_check`] is taken
    /// back, and the owner's own address starts afresh. The earlier failures from other
    /// addresses stay counted, or an attacker could reset them by watching the owner log in.
    pub fn password_matched(&self, username_key: &str, address: ClientAddress) {
        if let Some(counter) = &self.failures_by_user_and_address {
            counter.clear(&pair_key(username_key, address));
        }
        if let Some(counter) = &self.failures_by_user {
            counter.take_back(&user_key(username_key));
        }
    }

    /// Counts a password change of `user_id`, successful or not: each costs two hashes.
    pub fn password_change(&self, user_id: i64) -> Result<(), ServiceError> {
        check_rate(self.password_changes.as_ref(), &user_id)
    }

    /// Forgets what no longer limits anyone, so the stores shrink after a burst.
    pub fn forget_stale(&self) {
        for limiter in [&self.login_attempts, &self.registrations]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        for limiter in [&self.chats, &self.password_changes].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        for counter in [&self.failures_by_user_and_address, &self.failures_by_user]
            .into_iter()
            .flatten()
        {
            counter.forget_expired();
        }
    }
}

/// A limiter of `count` per period for each key, or none when the limit is off.
fn keyed<K>(count: Option<u32>, per: fn(NonZeroU32) -> Quota) -> Option<DefaultKeyedRateLimiter<K>>
where
    K: Clone + Eq + std::hash::Hash,
{
    count
        .and_then(NonZeroU32::new)
        .map(|count| RateLimiter::keyed(per(count)))
}

/// How often the stores drop what has expired.
const FORGET_PERIOD: Duration = Duration::from_secs(60);

/// Calls [`Throttle::forget_stale`] every minute, forever.
pub async fn forget_stale_periodically(throttle: std::sync::Arc<Throttle>) {
    let mut ticks = tokio::time::interval(FORGET_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        throttle.forget_stale();
    }
}

fn check_rate<K>(limiter: Option<&DefaultKeyedRateLimiter<K>>, key: &K) -> Result<(), ServiceError>
where
    K: Clone + Eq + std::hash::Hash,
{
    let Some(limiter) = limiter else {
        return Ok(());
    };
    limiter
        .check_key(key)
        .map_err(|not_until| ServiceError::TooManyAttempts {
            retry_after_secs: retry_after_secs(
                not_until.wait_time_from(DefaultClock::default().now()),
            ),
        })
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

/// Most keys a counter remembers: at 16 bytes a key, a few megabytes at the most.
const MAX_TRACKED: usize = 100_000;

/// Failures per key in fixed windows; `max` failures lock the key until its window ends.
///
/// Hand-written rather than governor because a lock-out counts failures only and must be
/// checked before the password is, without spending anything on a success; a GCRA limiter
/// can only count every attempt it is asked about.
struct FailureCounter {
    max: u32,
    window: Duration,
    windows: Mutex<HashMap<Key, Window>>,
}

struct Window {
    started: Instant,
    failures: u32,
}

impl FailureCounter {
    fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one failure of `key` unless it is locked; how long it stays locked, if it is.
    fn try_count(&self, key: Key) -> Result<(), Duration> {
        let mut windows = self.windows.lock().expect("throttle lock poisoned");
        if windows.len() >= MAX_TRACKED && !windows.contains_key(&key) {
            windows.retain(|_, window| window.started.elapsed() < self.window);
            if windows.len() >= MAX_TRACKED {
                // Still full of live windows: the oldest has the least time left to count.
                let oldest = windows
                    .iter()
                    .min_by_key(|(_, window)| window.started)
                    .map(|(key, _)| *key);
                if let Some(oldest) = oldest {
                    windows.remove(&oldest);
                }
            }
        }
        let window = windows.entry(key).or_insert(Window {
            started: Instant::now(),
            failures: 0,
        });
        if window.started.elapsed() >= self.window {
            *window = Window {
                started: Instant::now(),
                failures: 0,
            };
        }
        if window.failures >= self.max {
            return Err(self.window.saturating_sub(window.started.elapsed()));
        }
        window.failures += 1;
        Ok(())
    }

    /// Takes back one failure counted by [`Self::try_count`].
    fn take_back(&self, key: &Key) {
        let mut windows = self.windows.lock().expect("throttle lock poisoned");
        if let Some(window) = windows.get_mut(key) {
            window.failures = window.failures.saturating_sub(1);
        }
    }

    fn clear(&self, key: &Key) {
        self.windows
            .lock()
            .expect("throttle lock poisoned")
            .remove(key);
    }

    fn forget_expired(&self) {
        let mut windows = self.windows.lock().expect("throttle lock poisoned");
        windows.retain(|_, window| window.started.elapsed() < self.window);
        windows.shrink_to_fit();
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.windows.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> ClientAddress {
        ClientAddress::new(text.parse().unwrap())
    }

    #[test]
    fn a_counter_locks_after_the_last_allowed_failure_and_names_a_wait() {
        let counter = FailureCounter::new(3, Duration::from_secs(60));
        let key = user_key("alice");
        for _ in 0..3 {
            counter.try_count(key).unwrap();
        }
        let left = counter.try_count(key).expect_err("locked");
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        counter.try_count(user_key("bob")).unwrap();
    }

    #[test]
    fn a_taken_back_or_cleared_count_or_an_elapsed_window_unlocks() {
        let counter = FailureCounter::new(1, Duration::from_millis(30));
        let key = user_key("alice");
        counter.try_count(key).unwrap();
        assert!(counter.try_count(key).is_err());
        counter.take_back(&key);
        counter.try_count(key).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        counter.try_count(key).unwrap();
        counter.clear(&key);
        counter.try_count(key).unwrap();
    }

    #[test]
    fn concurrent_checks_never_pass_more_than_the_limit() {
        let limits = crate::config::Config::from_lookup(|_| None).unwrap().abuse;
        let throttle = std::sync::Arc::new(Throttle::new(&limits));
        let address = address("203.0.113.9");
        let passed: usize = (0..8)
            .map(|_| {
                let throttle = throttle.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .filter(|_| throttle.begin_password_check("alice", address).is_ok())
                        .count()
                })
            })
            .map(|thread| thread.join().unwrap())
            .sum();
        assert_eq!(passed, 10);
    }

    #[test]
    fn a_counter_never_remembers_more_than_its_cap() {
        let counter = FailureCounter::new(5, Duration::from_secs(60));
        for n in 0..(MAX_TRACKED + 500) {
            let _ = counter.try_count(user_key(&n.to_string()));
        }
        assert_eq!(counter.tracked(), MAX_TRACKED);
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
