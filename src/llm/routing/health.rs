//! One target's health: the circuit breaker (consecutive failures open it for a cooling
//! time that doubles while its probes keep failing, to a ceiling; a success closes it) and
//! the rest a busy upstream asked for with `Retry-After`.
//!
//! Kept per process, behind a mutex held for a few instructions: another instance learns
//! of a dead target from its own calls, within one cooling time.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::config::RetryPolicy;

/// How long a target whose probe is in flight counts as resting, for `Retry-After`.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// What `/ready` and the metrics call a target's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum BreakerState {
    /// Taking calls.
    Closed,
    /// Skipped until its cooling time is over.
    Open,
    /// Its cooling time is over: the next call is its probe.
    HalfOpen,
    /// Rate-limited or overloaded: skipped for as long as its `Retry-After` said.
    Cooling,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The value of the `tokenchat_upstream_breaker_state` gauge.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
            Self::Cooling => 3.0,
        }
    }
}

pub(super) struct Health {
    state: Mutex<State>,
    policy: RetryPolicy,
}

struct State {
    consecutive_failures: u32,
    /// Set while the breaker is open (or half open, once the instant has passed).
    open_until: Option<Instant>,
    /// How long the breaker stays open the next time it opens from a failed probe.
    cooling: Duration,
    /// A probe call is in flight: every other call skips the target.
    probing: bool,
    /// Until when the upstream asked to be left alone (`Retry-After`).
    busy_until: Option<Instant>,
}

/// Whether a call may go to the target now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Yes; `probe`: as the one call that decides whether an opened breaker closes.
    Admitted { probe: bool },
    /// No, not before this instant.
    Resting { until: Instant },
}

impl Health {
    pub(super) fn new(policy: RetryPolicy) -> Self {
        Self {
            state: Mutex::new(State {
                consecutive_failures: 0,
                open_until: None,
                cooling: policy.cooldown,
                probing: false,
                busy_until: None,
            }),
            policy,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it cannot leave the state inconsistent: every field is
        // written whole.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a call could go to the target at `now`, without taking it.
    pub(super) fn available(&self, now: Instant) -> Admission {
        self.state().admission(now)
    }

    /// Takes the target for a call at `now`: as its probe when the breaker is half open.
    pub(super) fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state();
        let admission = state.admission(now);
        if let Admission::Admitted { probe: true } = admission {
            state.probing = true;
        }
        admission
    }

    /// The call got an answer (or a refusal of the request that is the client's fault):
    /// the target works. A `Retry-After` it gave another call still stands: a call already
    /// under way when it was said proves nothing against it.
    pub(super) fn succeeded(&self) {
        let mut state = self.state();
        state.consecutive_failures = 0;
        state.open_until = None;
        state.cooling = self.policy.cooldown;
        state.probing = false;
    }

    /// The call failed at `now`; `probe`: it was the half-open breaker's probe. `true` when
    /// this failure opened the breaker.
    pub(super) fn failed(&self, now: Instant, probe: bool) -> bool {
        let mut state = self.state();
        // A probe still probing (another call's success may have closed the breaker
        // meanwhile: then this is one failure like any other).
        if probe && state.probing {
            // A failed probe: open again, for twice as long, to the ceiling.
            state.probing = false;
            state.cooling = (state.cooling * 2).min(self.policy.cooldown_max);
            state.open_until = Some(now + state.cooling);
            return true;
        }
        if state.open_until.is_some() {
            // A call let through before the breaker opened: its failure is already known,
            // and would otherwise count as a failed probe, doubling the rest each time.
            return false;
        }
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        if state.consecutive_failures >= self.policy.failures_to_open {
            state.cooling = self.policy.cooldown;
            state.open_until = Some(now + state.cooling);
            return true;
        }
        false
    }

    /// The upstream said it is busy at `now`: left alone for `retry_after`.
    pub(super) fn busy(&self, now: Instant, retry_after: Duration) {
        let mut state = self.state();
        state.probing = false;
        let until = now + retry_after;
        state.busy_until = Some(state.busy_until.map_or(until, |busy| busy.max(until)));
    }

    /// A probe call that ended with no verdict (its client went away): the next call
    /// probes instead.
    pub(super) fn probe_abandoned(&self) {
        self.state().probing = false;
    }

    /// The state at `now`, and how long until it may change by itself.
    pub(super) fn state_at(&self, now: Instant) -> (BreakerState, Option<Duration>) {
        let state = self.state();
        if let Some(busy) = state.busy_until.filter(|busy| *busy > now) {
            return (BreakerState::Cooling, Some(busy - now));
        }
        match state.open_until {
            None => (BreakerState::Closed, None),
            Some(open) if open > now => (BreakerState::Open, Some(open - now)),
            Some(_) => (BreakerState::HalfOpen, None),
        }
    }
}

impl State {
    fn admission(&self, now: Instant) -> Admission {
        if let Some(busy) = self.busy_until.filter(|busy| *busy > now) {
            return Admission::Resting { until: busy };
        }
        match self.open_until {
            None => Admission::Admitted { probe: false },
            Some(open) if open > now => Admission::Resting { until: open },
            Some(_) if self.probing => Admission::Resting {
                until: now + PROBE_WAIT,
            },
            Some(_) => Admission::Admitted { probe: true },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            failures_to_open: 3,
            cooldown: Duration::from_secs(10),
            cooldown_max: Duration::from_secs(35),
        }
    }

    #[test]
    fn consecutive_failures_open_the_breaker_and_a_successful_probe_closes_it() {
        let health = Health::new(policy());
        let now = Instant::now();
        assert!(!health.failed(now, false));
        health.succeeded();
        assert!(!health.failed(now, false));
        assert!(!health.failed(now, false));
        assert!(health.failed(now, false), "the third in a row opens it");
        let until = now + Duration::from_secs(10);
        assert_eq!(health.admit(now), Admission::Resting { until });
        assert_eq!(health.state_at(now).0, BreakerState::Open);
        let later = until + Duration::from_millis(1);
        assert_eq!(health.state_at(later).0, BreakerState::HalfOpen);
        assert_eq!(health.admit(later), Admission::Admitted { probe: true });
        assert!(
            matches!(health.admit(later), Admission::Resting { .. }),
            "one probe at a time"
        );
        health.succeeded();
        assert_eq!(health.admit(later), Admission::Admitted { probe: false });
        assert_eq!(health.state_at(later).0, BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_doubles_the_cooling_time_up_to_its_ceiling() {
        let health = Health::new(policy());
        let mut now = Instant::now();
        for _ in 0..3 {
            health.failed(now, false);
        }
        for expected in [20, 35, 35] {
            now += Duration::from_secs(36);
            assert_eq!(health.admit(now), Admission::Admitted { probe: true });
            assert!(health.failed(now, true));
            assert_eq!(
                health.available(now),
                Admission::Resting {
                    until: now + Duration::from_secs(expected)
                }
            );
        }
    }

    #[test]
    fn a_busy_target_rests_for_its_retry_after_and_an_abandoned_probe_frees_the_next() {
        let health = Health::new(policy());
        let now = Instant::now();
        health.busy(now, Duration::from_secs(7));
        let until = now + Duration::from_secs(7);
        assert_eq!(health.available(now), Admission::Resting { until });
        assert_eq!(health.state_at(now).0, BreakerState::Cooling);
        assert_eq!(
            health.available(until),
            Admission::Admitted { probe: false }
        );
        for _ in 0..3 {
            health.failed(now, false);
        }
        let later = now + Duration::from_secs(11);
        assert_eq!(health.admit(later), Admission::Admitted { probe: true });
        health.probe_abandoned();
        assert_eq!(health.admit(later), Admission::Admitted { probe: true });
    }

    #[test]
    fn calls_already_under_way_when_the_breaker_opens_leave_its_rest_as_it_is() {
        let health = Health::new(policy());
        let now = Instant::now();
        // Twelve calls in flight, all failing: the third opens the breaker for 10 s, and
        // the nine after it change nothing.
        let opened: Vec<bool> = (0..12).map(|_| health.failed(now, false)).collect();
        assert_eq!(opened.iter().filter(|opened| **opened).count(), 1);
        let until = now + Duration::from_secs(10);
        assert_eq!(health.available(now), Admission::Resting { until });
        // Its probe failing still doubles it.
        let later = until + Duration::from_millis(1);
        assert_eq!(health.admit(later), Admission::Admitted { probe: true });
        assert!(health.failed(later, true));
        assert_eq!(
            health.available(later),
            Admission::Resting {
                until: later + Duration::from_secs(20)
            }
        );
    }

    #[test]
    fn a_retry_after_stands_when_a_call_already_under_way_succeeds() {
        let health = Health::new(policy());
        let now = Instant::now();
        health.busy(now, Duration::from_secs(30));
        health.succeeded();
        let until = now + Duration::from_secs(30);
        assert_eq!(health.available(now), Admission::Resting { until });
        assert_eq!(health.state_at(now).0, BreakerState::Cooling);
    }

    #[test]
    fn a_probe_failing_after_another_call_closed_the_breaker_is_one_failure_of_many() {
        let health = Health::new(policy());
        let now = Instant::now();
        for _ in 0..3 {
            health.failed(now, false);
        }
        let later = now + Duration::from_secs(11);
        assert_eq!(health.admit(later), Admission::Admitted { probe: true });
        // A call let through before it opened succeeds first and closes it.
        health.succeeded();
        assert!(!health.failed(later, true), "one failure does not open it");
        assert_eq!(
            health.available(later),
            Admission::Admitted { probe: false }
        );
    }
}
