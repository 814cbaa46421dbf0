//! Requests and model tokens a minute per API key and per user, shared by every instance:
//! each request is checked and counted in the database in one statement ([`db::rates`]), so
//! two instances admit what one would; a call's model tokens, known only once it is over,
//! are counted then and checked before the next call. What is left of the minute is given
//! back for OpenAI's `x-ratelimit-*` headers. The same GCRA ([`check`], [`take_back`],
//! [`clear`]) counts the abuse limits on PostgreSQL (`services::throttle`).

use crate::{
    db::{self, rates::Rate, Db},
    services::{ServiceError, ServiceResult},
};

pub const MINUTE_MS: i64 = 60_000;

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

/// Checks and counts one request of `name` (`key:<id>` or `user:<id>`), allowed `rpm`
/// requests a minute, at `now_ms`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn request(db: &Db, name: &str, rpm: i64, now_ms: i64) -> ServiceResult<KeyRate> {
    let checked = check(db, name, per_minute(rpm), now_ms).await?;
    Ok(judged(rpm, now_ms, checked))
}

/// The rate of a key's requests a minute (`rate_limits.name`; the PostgreSQL look-up of a
/// key writes it as `'key:' || key_id` too).
pub fn key_requests(key_id: i64) -> String {
    format!("key:{key_id}")
}

/// The rate of a key's model tokens a minute.
pub fn key_tokens(key_id: i64) -> String {
    format!("key-tokens:{key_id}")
}

/// The rate of a user's requests a minute.
pub fn user_requests(user_id: i64) -> String {
    format!("user:{user_id}")
}

/// The rate of a user's model tokens a minute.
pub fn user_tokens(user_id: i64) -> String {
    format!("user-tokens:{user_id}")
}

/// Requests a minute as a [`Gcra`].
pub fn per_minute(rpm: i64) -> Gcra {
    Gcra {
        limit: rpm,
        period_ms: MINUTE_MS,
    }
}

/// What a check of one request, allowed `rpm` a minute, at `now_ms` found, with where the
/// minute stands for OpenAI's headers.
pub fn judged(rpm: i64, now_ms: i64, checked: Checked) -> KeyRate {
    let interval_ms = per_minute(rpm).interval_ms();
    let state = |tat_ms: i64| {
        let ahead = (tat_ms - now_ms).max(0);
        RateState {
            limit: rpm,
            remaining: ((MINUTE_MS - ahead) / interval_ms).clamp(0, rpm),
            reset_ms: ahead,
        }
    };
    match checked {
        Checked::Admitted { tat_ms } => KeyRate::Admitted(state(tat_ms)),
        Checked::Refused {
            tat_ms,
            retry_after_secs,
        } => KeyRate::Refused {
            retry_after_secs,
            state: state(tat_ms),
        },
    }
}

/// A rate of `limit` requests a `period_ms`, by GCRA: `limit` at once, then one every
/// `period_ms / limit`, as governor's quotas count in-process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    pub limit: i64,
    pub period_ms: i64,
}

impl Gcra {
    /// What one request takes of the period; never zero, or nothing would be counted.
    pub fn interval_ms(self) -> i64 {
        (self.period_ms / self.limit.max(1)).max(1)
    }

    /// How the database counts it.
    pub fn step(self) -> db::rates::Step {
        db::rates::Step {
            interval_ms: self.interval_ms(),
            window_ms: self.period_ms,
        }
    }
}

/// What checking one request of a shared rate found; the theoretical arrival time either
/// way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Admitted { tat_ms: i64 },
    Refused { tat_ms: i64, retry_after_secs: u64 },
}

/// Checks and counts one request of `name` against `rate` at `now_ms`, in one statement on
/// the database every instance shares (two when refused: the second reads how long to wait).
pub async fn check(db: &Db, name: &str, rate: Gcra, now_ms: i64) -> ServiceResult<Checked> {
    let found = db::rates::admit(db, name, now_ms, rate.step()).await?;
    Ok(Checked::of(found, rate, now_ms))
}

impl Checked {
    /// What the database's `found` means for a request at `now_ms` against `rate`.
    pub fn of(found: Rate, rate: Gcra, now_ms: i64) -> Self {
        match found {
            Rate::Admitted { tat_ms } => Self::Admitted { tat_ms },
            Rate::Refused { tat_ms } => {
                // Admitted again once the time, one interval on, is back within the period.
                let wait_ms = (tat_ms + rate.interval_ms() - rate.period_ms - now_ms).max(1);
                Self::Refused {
                    tat_ms,
                    retry_after_secs: (wait_ms as u64).div_ceil(1000),
                }
            }
        }
    }
}

/// Checks, counting nothing, whether `name` (`key-tokens:<id>` or `user-tokens:<id>`),
/// allowed `tpm` model tokens a minute, has any of its minute left at `now_ms`: a call is
/// admitted while the tokens counted stay within the minute ahead of now, whatever it will
/// use (which no one knows before the model answers).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn tokens_left(db: &Db, name: &str, tpm: i64, now_ms: i64) -> ServiceResult<KeyRate> {
    let tat_ms = db::rates::tat(db, name).await?.unwrap_or(now_ms);
    let ahead = (tat_ms - now_ms).max(0);
    let state = RateState {
        limit: tpm,
        remaining: ((MINUTE_MS - ahead).max(0) as i128 * tpm as i128 / MINUTE_MS as i128) as i64,
        reset_ms: ahead,
    };
    if ahead < MINUTE_MS {
        return Ok(KeyRate::Admitted(state));
    }
    // Admitted again once less than a minute is ahead: one millisecond past the boundary.
    let wait_ms = ahead - MINUTE_MS + 1;
    Ok(KeyRate::Refused {
        retry_after_secs: (wait_ms as u64).div_ceil(1000),
        state,
    })
}

/// Counts `tokens` model tokens of `name`, allowed `tpm` a minute, at `now_ms`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn count_tokens(
    db: &Db,
    name: &str,
    tpm: i64,
    tokens: i64,
    now_ms: i64,
) -> ServiceResult<()> {
    // Each token takes a minute's share; rounded up, so a limit is never passed by rounding.
    let (share, tpm) = (
        tokens.max(0) as i128 * MINUTE_MS as i128,
        tpm.max(1) as i128,
    );
    let cost_ms = (share + tpm - 1) / tpm;
    let cost_ms = i64::try_from(cost_ms).unwrap_or(db::rates::ADD_HORIZON_MS);
    db::rates::add(db, name, now_ms, cost_ms).await?;
    Ok(())
}

/// Takes back one request of `name` that [`check`] admitted against `rate`.
pub async fn take_back(db: &Db, name: &str, rate: Gcra) -> ServiceResult<()> {
    Ok(db::rates::take_back(db, name, rate.interval_ms()).await?)
}

/// Forgets every request counted for `name`.
pub async fn clear(db: &Db, name: &str) -> ServiceResult<()> {
    Ok(db::rates::clear(db, name).await?)
}

/// Rows whose time was past this long ago are swept: the margin keeps an instance whose
/// clock runs ahead from deleting a row another still counts on.
const SWEEP_MARGIN_MS: i64 = MINUTE_MS;

/// Deletes the rates that no longer limit anyone (their time is past); how many went.
pub async fn forget_past(db: &Db, now_ms: i64) -> ServiceResult<u64> {
    Ok(db::rates::forget_before(db, now_ms - SWEEP_MARGIN_MS).await?)
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
