//! The abuse limits counted in this process (with SQLite, whose file one process serves):
//! rates with governor, and failed-login lock-outs with counters of our own, below. Every
//! store is bounded.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::Mutex,
    time::{Duration, Instant},
};

use governor::{
    clock::{Clock, DefaultClock},
    DefaultKeyedRateLimiter, Quota, RateLimiter,
};

use super::keys::{pair_key, user_key, ClientAddress, Key};
use crate::{config::AbuseLimits, services::ServiceError};

/// Every limit of [`AbuseLimits`], kept in memory.
pub(super) struct InProcess {
    login_attempts: Option<DefaultKeyedRateLimiter<ClientAddress>>,
    registrations: Option<DefaultKeyedRateLimiter<ClientAddress>>,
    chats: Option<DefaultKeyedRateLimiter<i64>>,
    password_changes: Option<DefaultKeyedRateLimiter<i64>>,
    failures_by_user_and_address: Option<FailureCounter>,
    failures_by_user: Option<FailureCounter>,
}

impl InProcess {
    pub(super) fn new(limits: &AbuseLimits) -> Self {
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

    pub(super) fn login_attempt(&self, address: ClientAddress) -> Result<(), ServiceError> {
        check_rate(self.login_attempts.as_ref(), &address)
    }

    pub(super) fn registration(&self, address: ClientAddress) -> Result<(), ServiceError> {
        check_rate(self.registrations.as_ref(), &address)
    }

    pub(super) fn chat(&self, user_id: i64) -> Result<(), ServiceError> {
        check_rate(self.chats.as_ref(), &user_id)
    }

    pub(super) fn password_change(&self, user_id: i64) -> Result<(), ServiceError> {
        check_rate(self.password_changes.as_ref(), &user_id)
    }

    pub(super) fn begin_password_check(
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

    pub(super) fn password_matched(&self, username_key: &str, address: ClientAddress) {
        if let Some(counter) = &self.failures_by_user_and_address {
            counter.clear(&pair_key(username_key, address));
        }
        if let Some(counter) = &self.failures_by_user {
            counter.take_back(&user_key(username_key));
        }
    }

    pub(super) fn forget_stale(&self) {
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

/// Whole seconds, rounded up, and at least one: `Retry-After: 0` invites a hot loop.
fn retry_after_secs(wait: Duration) -> u64 {
    let rounded_up = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    rounded_up.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
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
        let throttle = std::sync::Arc::new(InProcess::new(&limits));
        let address = ClientAddress::new("203.0.113.9".parse().unwrap());
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
}
