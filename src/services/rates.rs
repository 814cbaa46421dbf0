//! Requests a minute per API key, shared by every instance: each request is checked and
//! counted in the database in one statement ([`db::rates`]), so two instances admit what one
//! would. What is left of the minute is given back for OpenAI's `x-ratelimit-*` headers.

use crate::{
    db::{self, rates::Rate, Db},
    services::{ServiceError, ServiceResult},
};

const MINUTE_MS: i64 = 60_000;

/// Where a key's rate stands after a request it admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Requests a minute at most.
    pub limit: i64,
    /// Requests it may still make at once.
    pub remaining: i64,
    /// Milliseconds until the whole limit is free again.
    pub reset_ms: i64,
}

/// What checking a key's request found: admitted and counted, or refused with how long to
/// wait; where the rate stands either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRate {
    Admitted(RateState),
    Refused {
        retry_after_secs: u64,
        state: RateState,
    },
}

impl KeyRate {
    /// Where the rate stands, or `TooManyAttempts` with how long to wait.
    pub fn admitted(self) -> ServiceResult<RateState> {
        match self {
            Self::Admitted(state) => Ok(state),
            Self::Refused {
                retry_after_secs, ..
            } => Err(ServiceError::TooManyAttempts { retry_after_secs }),
        }
    }
}

/// Checks and counts one request of the key `key_id`, allowed `rpm` requests a minute, at
/// `now_ms`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn key_request(db: &Db, key_id: i64, rpm: i64, now_ms: i64) -> ServiceResult<KeyRate> {
    let interval_ms = MINUTE_MS / rpm.max(1);
    let name = format!("key:{key_id}");
    let state = |tat_ms: i64| {
        let ahead = (tat_ms - now_ms).max(0);
        RateState {
            limit: rpm,
            remaining: ((MINUTE_MS - ahead) / interval_ms).clamp(0, rpm),
            reset_ms: ahead,
        }
    };
    Ok(
        match db::rates::admit(db, &name, now_ms, interval_ms, MINUTE_MS).await? {
            Rate::Admitted { tat_ms } => KeyRate::Admitted(state(tat_ms)),
            Rate::Refused { tat_ms } => {
                let wait_ms = (tat_ms + interval_ms - MINUTE_MS - now_ms).max(1);
                KeyRate::Refused {
                    retry_after_secs: (wait_ms as u64).div_ceil(1000),
                    state: state(tat_ms),
                }
            }
        },
    )
}

/// The time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_of_thirty_admits_thirty_at_once_then_one_every_two_seconds() {
        // The arithmetic of the statement, replayed: admitted while tat - now <= a minute.
        let (rpm, interval) = (30, MINUTE_MS / 30);
        let mut tat = 0_i64;
        let now = 1_000_000;
        let mut admitted = 0;
        for _ in 0..100 {
            let next = tat.max(now) + interval;
            if next - now <= MINUTE_MS {
                tat = next;
                admitted += 1;
            }
        }
        assert_eq!(admitted, rpm);
        assert_eq!(
            tat + interval - MINUTE_MS - now,
            2000,
            "the next one, two seconds on"
        );
    }
}
