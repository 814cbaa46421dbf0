//! Failed-login throttling: too many wrong passwords for one username in a window
//! locks that username's login for the rest of the window (429 with `Retry-After`).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::error::Error;

/// Entries kept before expired ones are swept, so random usernames cannot grow the map forever.
const SWEEP_ABOVE: usize = 10_000;

pub struct LoginThrottle {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<String, Window>>,
}

struct Window {
    started: Instant,
    failures: u32,
}

impl LoginThrottle {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// `RateLimited` while `key` has used up its failures in the current window.
    pub fn check(&self, key: &str) -> Result<(), Error> {
        let failures = self.failures.lock().expect("throttle lock poisoned");
        match failures.get(key) {
            Some(window) if window.failures >= self.max_failures => {
                let left = self.window.saturating_sub(window.started.elapsed());
                if left.is_zero() {
                    return Ok(());
                }
                Err(Error::RateLimited {
                    retry_after_secs: left.as_secs().max(1),
                })
            }
            _ => Ok(()),
        }
    }

    pub fn record_failure(&self, key: &str) {
        let mut failures = self.failures.lock().expect("throttle lock poisoned");
        if failures.len() >= SWEEP_ABOVE {
            failures.retain(|_, window| window.started.elapsed() < self.window);
        }
        let window = failures.entry(key.to_string()).or_insert(Window {
            started: Instant::now(),
            failures: 0,
        });
        if window.started.elapsed() >= self.window {
            *window = Window {
                started: Instant::now(),
                failures: 0,
            };
        }
        window.failures += 1;
    }

    pub fn clear(&self, key: &str) {
        self.failures
            .lock()
            .expect("throttle lock poisoned")
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_the_last_allowed_failure_and_names_a_wait() {
        let throttle = LoginThrottle::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            throttle.check("alice").unwrap();
            throttle.record_failure("alice");
        }
        match throttle.check("alice") {
            Err(Error::RateLimited { retry_after_secs }) => {
                assert!((1..=60).contains(&retry_after_secs))
            }
            other => panic!("expected a lock, got {other:?}"),
        }
        throttle.check("bob").unwrap();
    }

    #[test]
    fn a_success_or_an_elapsed_window_unlocks() {
        let throttle = LoginThrottle::new(1, Duration::from_millis(30));
        throttle.record_failure("alice");
        assert!(throttle.check("alice").is_err());
        std::thread::sleep(Duration::from_millis(40));
        throttle.check("alice").unwrap();

        throttle.record_failure("alice");
        throttle.clear("alice");
        throttle.check("alice").unwrap();
    }
}
