//! What the service tells its operators: logs (the `RUST_LOG` filter, lines of text or of
//! JSON by `LOG_FORMAT`, each request's span with its id on every line logged while serving
//! it) and the Prometheus metrics of `GET /metrics`.

use std::{
    collections::HashMap,
    io::IsTerminal,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use http::Method;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use strum::IntoEnumIterator;
use tracing_subscriber::{fmt::format::FmtSpan, EnvFilter};

use crate::{
    config::{Config, LogFormat},
    db::PoolUse,
};

mod text_log;

/// Installs the process's logger; call once, before anything logs.
pub fn init_logging(config: &Config) {
    let span_events = if config.log_span_timings {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&config.log_filter))
        .with_span_events(span_events);
    match config.log_format {
        // The crate's default line, written for less (see `text_log`).
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .fmt_fields(text_log::TextFields)
            .event_format(text_log::TextLine::default())
            .init(),
        // The current span's fields and the list of spans around it are on every object,
        // so a collector can select all of one request's lines by its id.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// The service's Prometheus metrics (`GET /metrics`). Each [`crate::AppState`] records into
/// a recorder of its own rather than the process-wide one, so that two apps in one process
/// (the tests run many) never mix their figures.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    /// The series of each route, method and status seen, registered once: looking a
    /// series up by its labels in the recorder on every request cost the static route
    /// about a quarter of its throughput (BENCHMARKS.md).
    requests: Arc<RwLock<RequestSeriesByRoute>>,
}

/// Route, then (method, status), to the request counter and latency histogram. Bounded:
/// routes are the router's, methods eight labels, statuses a few dozen.
type RequestSeriesByRoute = HashMap<Box<str>, HashMap<(&'static str, u16), RequestSeries>>;

struct RequestSeries {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

/// Latency buckets, in seconds: from a cached read to a slow model's whole answer.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// How a chat ended, as the metrics count it (its label is the variant's snake_case name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum ChatOutcome {
    /// Answered and charged.
    Answered,
    /// Refused: the balance did not cover it; nothing was reserved.
    OutOfTokens,
    /// The model failed (unreachable, an error status, an unusable or broken answer): refunded.
    UpstreamError,
    /// The model did not answer in time: refunded (by recovery, when it was too late).
    UpstreamTimeout,
    /// The client went away before the answer was stored or streamed to its end.
    Abandoned,
    /// Refunded for another reason: shutdown, or a failure storing the answer.
    Refunded,
}

impl ChatOutcome {
    fn label(self) -> &'static str {
        self.into()
    }
}

/// How many tokens a chat's ending moved: kept as its charge, or given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMove {
    None,
    Charged(i64),
    Refunded(i64),
    /// A priced chat settled below its reservation: `charged` kept, `returned` given back.
    Settled {
        charged: i64,
        returned: i64,
    },
}

/// Keeps `tokenchat_chats_in_flight` one higher while it lives.
pub struct InFlight(Metrics);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .record(|| metrics::gauge!("tokenchat_chats_in_flight").decrement(1.0));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What became of an alert: `sent` (the receiver took it), `failed` (every attempt failed),
/// `dropped` (the queue was full and a settled charge went unchecked).
pub const ALERT_OUTCOMES: [&str; 3] = ["sent", "failed", "dropped"];

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("the latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Self {
            recorder: Arc::new(recorder),
            handle,
            requests: Arc::default(),
        };
        metrics.record(|| {
            metrics::describe_counter!(
                "tokenchat_http_requests_total",
                "Requests answered, by route, method and status."
            );
            metrics::describe_histogram!(
                "tokenchat_http_request_duration_seconds",
                metrics::Unit::Seconds,
                "Time to the head of each answer, by route and method."
            );
            metrics::describe_counter!("tokenchat_chats_total", "Chats ended, by outcome.");
            metrics::describe_counter!(
                "tokenchat_tokens_charged_total",
                "Tokens kept as the price of answered chats."
            );
            metrics::describe_counter!(
                "tokenchat_tokens_refunded_total",
                "Tokens reserved for chats and given back."
            );
            metrics::describe_counter!(
                "tokenchat_usage_overruns_total",
                "Priced calls whose usage cost more than their reservation (charged the reservation)."
            );
            metrics::describe_histogram!(
                "tokenchat_upstream_duration_seconds",
                metrics::Unit::Seconds,
                "Time the model took over a whole answer, streamed or not."
            );
            metrics::describe_counter!(
                "tokenchat_upstream_errors_total",
                "Model failures, by kind."
            );
            metrics::describe_counter!(
                "tokenchat_upstream_attempts_total",
                "Calls to each upstream (one per target a chat tried), by outcome: answered, or the kind of failure."
            );
            metrics::describe_histogram!(
                "tokenchat_upstream_attempt_seconds",
                metrics::Unit::Seconds,
                "Time each upstream took to begin its answer, or to fail."
            );
            metrics::describe_gauge!(
                "tokenchat_upstream_breaker_state",
                "Each target's circuit breaker: 0 closed, 1 open, 2 half open (its probe next), 3 cooling (Retry-After)."
            );
            metrics::describe_counter!(
                "tokenchat_alerts_total",
                "Alert events, by outcome: sent, failed (every attempt failed), dropped (a full queue skipped a check)."
            );
            metrics::describe_gauge!(
                "tokenchat_chats_in_flight",
                "Chats being served: reserving, waiting for the model, settling."
            );
            metrics::describe_gauge!(
                "tokenchat_database_connections",
                "Database connections, by pool and state (in_use, idle, max)."
            );
            // Every series a dashboard plots starts at zero rather than appearing later.
            for outcome in ChatOutcome::iter() {
                metrics::counter!("tokenchat_chats_total", "outcome" => outcome.label())
                    .absolute(0);
            }
            metrics::counter!("tokenchat_tokens_charged_total").absolute(0);
            metrics::counter!("tokenchat_tokens_refunded_total").absolute(0);
            metrics::counter!("tokenchat_usage_overruns_total").absolute(0);
            for outcome in ALERT_OUTCOMES {
                metrics::counter!("tokenchat_alerts_total", "outcome" => outcome).absolute(0);
            }
            metrics::gauge!("tokenchat_chats_in_flight").set(0.0);
        });
        metrics
    }

    /// Runs `record` with this app's recorder as the one the `metrics` macros use.
    fn record<T>(&self, record: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&*self.recorder, record)
    }

    /// One answered request. `route` is the matched route (`None`: no route matched).
    pub fn request(&self, route: Option<&str>, method: &Method, status: u16, took: Duration) {
        // Bounded labels only: an unknown method or path would otherwise mint a series
        // per attacker's whim.
        let route = match route {
            Some("/") => "/",
            Some(route) => route.trim_end_matches('/'),
            None => "unmatched",
        };
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::DELETE => "DELETE",
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        let seconds = took.as_secs_f64();
        let record = |series: &RequestSeries| {
            series.requests.increment(1);
            series.duration.record(seconds);
        };
        let known = self.requests.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = known.get(route).and_then(|of| of.get(&(method, status))) {
            return record(series);
        }
        drop(known);
        let mut known = self
            .requests
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let series = known
            .entry(route.into())
            .or_default()
            .entry((method, status))
            .or_insert_with(|| {
                let (route, status) = (route.to_string(), status.to_string());
                self.record(|| RequestSeries {
                    requests: metrics::counter!(
                        "tokenchat_http_requests_total",
                        "route" => route.clone(), "method" => method, "status" => status
                    ),
                    duration: metrics::histogram!(
                        "tokenchat_http_request_duration_seconds",
                        "route" => route, "method" => method
                    ),
                })
            });
        record(series);
    }

    /// A chat request begun; it counts as in flight until the guard is dropped.
    pub fn chat_begun(&self) -> InFlight {
        self.record(|| metrics::gauge!("tokenchat_chats_in_flight").increment(1.0));
        InFlight(self.clone())
    }

    /// A chat ended with `outcome`, moving `tokens`.
    pub fn chat_ended(&self, outcome: ChatOutcome, tokens: TokenMove) {
        self.record(|| {
            metrics::counter!("tokenchat_chats_total", "outcome" => outcome.label()).increment(1);
            match tokens {
                TokenMove::None => {}
                TokenMove::Charged(amount) => {
                    metrics::counter!("tokenchat_tokens_charged_total")
                        .increment(amount.unsigned_abs());
                }
                TokenMove::Refunded(amount) => {
                    metrics::counter!("tokenchat_tokens_refunded_total")
                        .increment(amount.unsigned_abs());
                }
                TokenMove::Settled { charged, returned } => {
                    metrics::counter!("tokenchat_tokens_charged_total")
                        .increment(charged.unsigned_abs());
                    metrics::counter!("tokenchat_tokens_refunded_total")
                        .increment(returned.unsigned_abs());
                }
            }
        });
    }

    /// A priced model used more than the cap it was sent (or reported a usage above the
    /// reservation): it was charged the reservation.
    pub fn usage_overrun(&self) {
        self.record(|| metrics::counter!("tokenchat_usage_overruns_total").increment(1));
    }

    /// An alert event `outcome`: one of [`ALERT_OUTCOMES`].
    pub fn alert(&self, outcome: &'static str) {
        self.record(|| {
            metrics::counter!("tokenchat_alerts_total", "outcome" => outcome).increment(1)
        });
    }

    /// The model answered (or failed to) after `took`; `error` names the failure's kind.
    pub fn upstream(&self, streamed: bool, took: Duration, error: Option<&'static str>) {
        let mode = if streamed { "stream" } else { "complete" };
        self.record(|| {
            metrics::histogram!("tokenchat_upstream_duration_seconds", "mode" => mode)
                .record(took.as_secs_f64());
            if let Some(kind) = error {
                metrics::counter!("tokenchat_upstream_errors_total", "kind" => kind).increment(1);
            }
        });
    }

    /// One call of `upstream` ended after `took` as `outcome` (`answered`, or the kind of
    /// its failure).
    pub fn upstream_attempt(&self, upstream: &Arc<str>, outcome: &'static str, took: Duration) {
        self.record(|| {
            // Shared, not copied: each label is one more reference to the name.
            metrics::counter!(
                "tokenchat_upstream_attempts_total",
                "upstream" => upstream.clone(), "outcome" => outcome
            )
            .increment(1);
            metrics::histogram!("tokenchat_upstream_attempt_seconds", "upstream" => upstream.clone())
                .record(took.as_secs_f64());
        });
    }

    /// The breaker of `upstream`'s target for `model` is now in the state whose gauge value
    /// (`BreakerState::gauge`) is `state`.
    pub fn breaker(&self, upstream: &str, model: &str, state: f64) {
        self.record(|| {
            metrics::gauge!(
                "tokenchat_upstream_breaker_state",
                "upstream" => upstream.to_string(), "model" => model.to_string()
            )
            .set(state);
        });
    }

    /// The Prometheus text exposition of everything recorded, with the database pools'
    /// use as of now.
    pub fn render(&self, pools: &[PoolUse]) -> String {
        self.record(|| {
            for pool in pools {
                let gauge = |state: &'static str, value: u32| {
                    metrics::gauge!(
                        "tokenchat_database_connections",
                        "pool" => pool.name, "state" => state
                    )
                    .set(f64::from(value));
                };
                gauge("in_use", pool.in_use);
                gauge("idle", pool.idle);
                gauge("max", pool.max);
            }
        });
        self.handle.render()
    }

    /// Drains what histograms gathered since the last render into their buckets, so that
    /// memory stays bounded when nothing scrapes `/metrics`.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// How often histograms are drained when nothing scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Runs [`Metrics::run_upkeep`] every few seconds, until aborted.
pub async fn upkeep_periodically(metrics: Metrics) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    loop {
        every.tick().await;
        metrics.run_upkeep();
    }
}
