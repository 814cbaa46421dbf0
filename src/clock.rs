//! Time as the service keeps it: whole seconds since the Unix epoch in the database, RFC 3339
//! in UTC in every answer.

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

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
