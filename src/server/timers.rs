//! A connection's deadlines: idle, headers, linger after a close, stalled writes.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{registry::Activity, CLOSE_LINGER};
use crate::config::ConnectionLimits;

/// What ends a connection when its deadline passes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Expiry {
    /// No request for `IDLE_TIMEOUT_SECS`: close gracefully.
    Idle,
    /// A request's headers took longer than `HEADER_READ_TIMEOUT_SECS`: drop.
    Headers,
    /// Asked to close [`CLOSE_LINGER`] ago and still open: drop.
    Linger,
    /// Output has made no progress for `WRITE_STALL_TIMEOUT_SECS`: drop.
    WriteStall,
}

/// A connection's own clocks, kept by its task.
#[derive(Default)]
pub(super) struct Timers {
    /// When the first bytes of the request being read arrived.
    pub(super) headers_since: Option<Instant>,
    /// When the connection was asked to close.
    pub(super) closing_since: Option<Instant>,
}

impl Timers {
    /// The next deadline and what happens then. While a request is in flight only a stalled
    /// write has one: the request's own work may take long, a client that reads nothing may
    /// not.
    pub(super) fn due(
        &self,
        activity: &Activity,
        limits: &ConnectionLimits,
    ) -> Option<(Instant, Expiry)> {
        let between_requests = (!activity.is_busy()).then(|| {
            if let Some(since) = self.closing_since {
                (since + CLOSE_LINGER, Expiry::Linger)
            } else if let Some(since) = self.headers_since {
                (since + limits.header_read_timeout, Expiry::Headers)
            } else {
                (activity.idle_since() + limits.idle_timeout, Expiry::Idle)
            }
        });
        let write_stall = activity
            .write_stalled_since()
            .map(|since| (since + limits.write_stall_timeout, Expiry::WriteStall));
        [between_requests, write_stall]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
    }

    pub(super) fn observe(&mut self, activity: &Activity) {
        let reading_headers =
            !activity.is_busy() && activity.headers_started.load(Ordering::SeqCst);
        self.headers_since = match (reading_headers, self.headers_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
    }
}
