//! Time as the service keeps it: whole seconds since the Unix epoch in the database, RFC 3339
//! in UTC in every answer.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

/// The clock the limits read (budget periods, per-minute rates, key expiry): the system's,
/// moved on by an offset that is zero unless a test moves it, so that a budget period can
/// roll over in a test without waiting a day. Cheap to clone; clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        unix_now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Seconds since the Unix epoch.
    pub fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Moves this clock and its clones on by `by`. Tests only: nothing in the service
    /// calls it.
    #[doc(hidden)]
    pub fn advance(&self, by: Duration) {
        let by_ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(by_ms, Ordering::Relaxed);
    }
}

/// Milliseconds since the Unix epoch, by the system clock.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Seconds since the Unix epoch: the unit of every time column.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// An RFC 3339 time (any offset) as Unix seconds; `None` when it is not one.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(OffsetDateTime::unix_timestamp)
}

/// A Unix time as RFC 3339 UTC, the form of every time in a response.
pub fn rfc3339(unix_secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix_secs)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        // Unreachable for times this service writes (years 1970 to 9999).
        .unwrap_or_else(|| unix_secs.to_string())
}
