//! Several upstreams behind one model: each served model has targets (an upstream, the
//! model's name there, a weight, a priority). A call goes to the highest priority that has
//! a target available, among those by weight, and moves on to another target when the one
//! it tried could not be reached, timed out before answering, failed with a 5xx or said it
//! is busy: at most `UPSTREAM_MAX_ATTEMPTS` targets, never once an answer has begun.
//! Each target has a circuit breaker ([`health`]), so a dead one costs nothing.

pub mod health;
mod reports;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::{future::BoxFuture, FutureExt, StreamExt};
use rand::Rng;

use self::health::{Admission, BreakerState, Health};
pub use self::reports::{TargetReport, UpstreamProbe};
use super::{
    openai::{self, Slot, Upstream},
    Ask, Backend, Completion, Embedding, Forwarded, LlmError, ModelProbe, ServedBy, Streamed,
};
use crate::{
    config::{Config, RetryPolicy, Routing},
    telemetry::Metrics,
};

/// The longest pause before trying the next target (the first is shorter, see
/// [`back_off`]): long enough to spread a burst of retries, short beside a model's answer.
const BACK_OFF_CEILING: Duration = Duration::from_millis(200);

/// The models and the upstreams that serve them.
pub(super) struct Router {
    models: HashMap<String, Route>,
    upstreams: Vec<Arc<Upstream>>,
    default_model: String,
    policy: RetryPolicy,
    /// `LLM_STREAM_IDLE_SECS`: how long a streamed answer may go silent.
    stream_idle: Duration,
    metrics: Metrics,
}

/// One served model's targets, the highest priority (the lowest number) first.
struct Route {
    targets: Vec<Target>,
    /// Where each priority's targets begin in `targets`, and end.
    tiers: Vec<(usize, usize)>,
    /// Counts calls, to share them among a tier's targets by weight.
    turn: AtomicUsize,
}

struct Target {
    upstream: Arc<Upstream>,
    /// The model's name at the upstream.
    model: String,
    weight: usize,
    health: Health,
}

/// Which target a call goes to, or that none is available.
enum Choice {
    Target {
        index: usize,
        slot: Slot,
        probe: bool,
    },
    Out,
}

/// Whether a call moves on after a target's failure, and what the target is told.
enum Verdict {
    /// The answer is the client's (a request the model rejected as invalid): given back,
    /// the target healthy.
    Final,
    /// The target failed (unreachable, timed out, an error status): the next is tried.
    Failed,
    /// The target is busy for this long: the next is tried.
    Busy(Duration),
    /// The target is busy for a moment: the next is tried, nothing held against it.
    Moved,
}

impl Router {
    pub(super) fn new(
        routing: &Routing,
        config: &Config,
        metrics: Metrics,
    ) -> Result<Self, reqwest::Error> {
        let http = openai::http_client(config)?;
        let upstreams: Vec<Arc<Upstream>> = routing
            .upstreams
            .iter()
            .map(|upstream| Arc::new(Upstream::new(upstream, http.clone(), config)))
            .collect();
        let by_name = |name: &str| {
            upstreams
                .iter()
                .find(|upstream| &**upstream.name() == name)
                .cloned()
        };
        let mut models = HashMap::new();
        for served in &routing.models {
            let mut targets: Vec<_> = served.targets.iter().collect();
            // Stable: targets of one priority keep the file's order.
            targets.sort_by_key(|target| target.priority);
            let mut tiers: Vec<(usize, usize)> = Vec::new();
            for (index, target) in targets.iter().enumerate() {
                match tiers.last_mut() {
                    Some((start, end)) if targets[*start].priority == target.priority => {
                        *end = index + 1
                    }
                    _ => tiers.push((index, index + 1)),
                }
            }
            let targets = targets
                .into_iter()
                .filter_map(|target| {
                    let upstream = by_name(&target.upstream)?;
                    metrics.breaker(upstream.name(), &served.name, BreakerState::Closed.gauge());
                    Some(Target {
                        upstream,
                        model: target.model.clone(),
                        weight: target.weight as usize,
                        health: Health::new(config.retry),
                    })
                })
                .collect();
            let route = Route {
                targets,
                tiers,
                turn: AtomicUsize::new(0),
            };
            models.insert(served.name.clone(), route);
        }
        Ok(Self {
            models,
            upstreams,
            default_model: routing.models[0].name.clone(),
            policy: config.retry,
            stream_idle: config.llm_stream_idle,
            metrics,
        })
    }

    /// The served model `ask` is for.
    fn model_of<'a>(&'a self, ask: &'a Ask<'_>) -> &'a str {
        match ask {
            Ask::Turns { .. } => &self.default_model,
            Ask::Forwarded { request, .. } => &request.model,
        }
    }

    /// Calls `model`'s targets with `send` until one answers: what `send` made of its
    /// answer (a stream's response head, or a whole answer read to its end, so that a body
    /// that is no answer, cut short, stalled or not the expected JSON, moves on and counts
    /// against its target too; one that is an answer holding nothing does neither), the
    /// slot it holds at its upstream, and who answered after how many attempts.
    async fn call<'s, F, Fut, T>(
        &'s self,
        model: &str,
        mut send: F,
    ) -> Result<(T, Slot, ServedBy), LlmError>
    where
        F: FnMut(Arc<Upstream>, &'s str) -> Fut,
        Fut: Future<Output = Result<T, LlmError>>,
    {
        let route = self
            .models
            .get(model)
            .ok_or(LlmError::Unusable("no target serves this model"))?;
        let mut tried = 0u64;
        let mut attempts = 0u32;
        let mut last_failure = None;
        while attempts < self.policy.max_attempts {
            if attempts > 0 {
                // Before choosing, so that no slot or probe is held while waiting.
                tokio::time::sleep(back_off(attempts)).await;
            }
            let (index, slot, probe) = match route.choose(tried, Instant::now()) {
                Choice::Target { index, slot, probe } => (index, slot, probe),
                Choice::Out => break,
            };
            tried |= 1 << index;
            attempts += 1;
            let target = &route.targets[index];
            let upstream = target.upstream.clone();
            let mut probing = ProbeGuard(probe.then_some(&target.health));
            let began = Instant::now();
            let answered = send(upstream.clone(), &target.model).await;
            let took = began.elapsed();
            let failure = match answered {
                Ok(response) => {
                    probing.settled();
                    target.health.succeeded();
                    self.count(target, "answered", took);
                    let served_by = ServedBy {
                        upstream: upstream.name().clone(),
                        attempts,
                    };
                    return Ok((response, slot, served_by));
                }
                Err(failure) => failure,
            };
            // Whatever the verdict, this probe is over when the guard drops below.
            self.count(target, failure.kind(), took);
            match verdict(&failure) {
                Verdict::Final => {
                    target.health.succeeded();
                    return Err(failure);
                }
                Verdict::Busy(rest) => target.health.busy(Instant::now(), rest),
                Verdict::Moved => {}
                Verdict::Failed => {
                    if target.health.failed(Instant::now(), probe) {
                        tracing::warn!(
                            upstream = &**upstream.name(),
                            model,
                            "upstream target failed repeatedly: skipped while it cools down"
                        );
                    }
                }
            }
            tracing::info!(
                upstream = &**upstream.name(),
                model,
                attempt = attempts,
                error = %failure,
                "upstream target failed"
            );
            last_failure = Some(failure);
        }
        // Every target rests (cooling, rate-limited, full): the client may come back when
        // the first of them does.
        if let Some(soonest) = route.resting_until(Instant::now()) {
            let wait = soonest.saturating_duration_since(Instant::now());
            return Err(LlmError::Busy {
                status: 503,
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                said: true,
            });
        }
        Err(last_failure.unwrap_or(LlmError::Unreachable))
    }

    /// Counts one attempt at `target` and its outcome.
    fn count(&self, target: &Target, outcome: &'static str, took: Duration) {
        self.metrics
            .upstream_attempt(target.upstream.name(), outcome, took);
    }

    async fn complete(&self, ask: Ask<'_>) -> Result<Completion, LlmError> {
        let model = self.model_of(&ask);
        let text_only = ask.wants_text_only();
        let asked = &ask;
        let (answered, slot, served_by) = self
            .call(model, move |upstream, name| async move {
                let response = upstream.ask(name, asked, false).await?;
                openai::read_answer(response).await
            })
            .await?;
        drop(ask);
        drop(slot);
        let mut completion = answered?;
        if text_only && completion.content.trim().is_empty() {
            return Err(LlmError::Unusable("no text"));
        }
        completion.served_by = Some(served_by);
        Ok(completion)
    }

    async fn stream(&self, ask: Ask<'_>) -> Result<Streamed, LlmError> {
        let model = self.model_of(&ask);
        let text_only = ask.wants_text_only();
        let asked = &ask;
        let (response, slot, served_by) = self
            .call(model, move |upstream, name| async move {
                upstream.ask(name, asked, true).await
            })
            .await?;
        drop(ask);
        // The slot at the upstream is held until the stream is dropped.
        let chunks = openai::read_stream(response, self.stream_idle).map(move |chunk| {
            let _held = &slot;
            chunk.map(|mut chunk| {
                if text_only {
                    chunk.substantial = !chunk.text.trim().is_empty();
                }
                chunk
            })
        });
        Ok(Streamed {
            chunks: Box::pin(chunks),
            served_by: Some(served_by),
        })
    }

    async fn embed(&self, request: Forwarded) -> Result<Embedding, LlmError> {
        let asked = &request;
        let (embedded, slot, _) = self
            .call(&request.model, move |upstream, name| async move {
                let response = upstream.ask_embeddings(name, asked).await?;
                openai::read_embeddings(response).await
            })
            .await?;
        drop(request);
        drop(slot);
        embedded
    }
}

impl Route {
    /// When every target rests at `now` (its breaker open or probing, its `Retry-After`, its
    /// upstream full), the soonest one may take a call again; `None` when one may now.
    /// Takes nothing, unlike [`Route::choose`].
    fn resting_until(&self, now: Instant) -> Option<Instant> {
        let mut soonest: Option<Instant> = None;
        for target in &self.targets {
            let until = match target.health.available(now) {
                Admission::Resting { until } => until,
                Admission::Admitted { .. } if target.upstream.has_free_slot() => return None,
                Admission::Admitted { .. } => now + Duration::from_secs(1),
            };
            soonest = Some(soonest.map_or(until, |soonest| soonest.min(until)));
        }
        soonest
    }

    /// A target not in `skipped` (a bit per target: at most `MAX_TARGETS` of them) that
    /// may take a call at `now`: of the highest priority that has one, by weight; taken
    /// (its upstream's slot, its probe) before it is given.
    fn choose(&self, mut skipped: u64, now: Instant) -> Choice {
        for &(start, end) in &self.tiers {
            loop {
                let mut total = 0;
                for index in start..end {
                    if skipped & (1 << index) != 0 {
                        continue;
                    }
                    match self.targets[index].health.available(now) {
                        Admission::Admitted { .. } => total += self.targets[index].weight,
                        Admission::Resting { .. } => skipped |= 1 << index,
                    }
                }
                if total == 0 {
                    break;
                }
                // Weighted round robin: each turn lands on one point of the tier's weights.
                let mut point = self.turn.fetch_add(1, Ordering::Relaxed) % total;
                let index = (start..end)
                    .filter(|index| skipped & (1 << index) == 0)
                    .find(|&index| {
                        let weight = self.targets[index].weight;
                        if point < weight {
                            return true;
                        }
                        point -= weight;
                        false
                    })
                    .unwrap_or(start);
                let target = &self.targets[index];
                skipped |= 1 << index;
                // Its upstream may have `max_concurrent` calls in flight, or its state may
                // have changed since it was counted: then the next one.
                let Some(slot) = target.upstream.slot() else {
                    continue;
                };
                if let Admission::Admitted { probe } = target.health.admit(now) {
                    return Choice::Target { index, slot, probe };
                }
            }
        }
        Choice::Out
    }
}

/// Frees a half-open target's probe if the call is dropped before its verdict.
struct ProbeGuard<'a>(Option<&'a Health>);

impl ProbeGuard<'_> {
    fn settled(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(health) = self.0 {
            health.probe_abandoned();
        }
    }
}

/// What a failure means for the call and the target.
fn verdict(failure: &LlmError) -> Verdict {
    match failure {
        LlmError::Rejected(_) => Verdict::Final,
        LlmError::Busy {
            retry_after_secs,
            said: true,
            ..
        } => Verdict::Busy(Duration::from_secs(*retry_after_secs)),
        // Busy without saying for how long: the next target, and this one again next time.
        LlmError::Busy { said: false, .. } => Verdict::Moved,
        // The target's (or its key's) fault: before its answer began, or in a whole
        // answer's body.
        LlmError::Timeout
        | LlmError::Unreachable
        | LlmError::Status(_)
        | LlmError::RefusedCredentials(_)
        | LlmError::Unusable(_)
        | LlmError::BrokeOff => Verdict::Failed,
    }
}

/// The longest a call to a model may take however its targets fail, given `config`: one
/// attempt at each target it may try (at most `UPSTREAM_MAX_ATTEMPTS`, and the most targets
/// any model has), each its upstream's whole time-out, with the pauses between; a stream's
/// last attempt, once begun, up to `LLM_STREAM_MAX_SECS`. A chat's deadline is this and a
/// margin: recovery must never refund a call still under way.
pub fn longest_call(config: &Config, streamed: bool) -> Duration {
    let (longest_timeout, most_targets) =
        config
            .routing
            .as_ref()
            .map_or((config.llm_timeout, 1), |routing| {
                let timeouts = routing.upstreams.iter().map(|upstream| upstream.timeout);
                let longest = timeouts.fold(config.llm_timeout, |longest, timeout| {
                    longest.max(timeout.unwrap_or(config.llm_timeout))
                });
                let targets = routing.models.iter().map(|model| model.targets.len());
                (longest, targets.max().unwrap_or(1))
            });
    let attempts = config.retry.max_attempts.min(most_targets as u32).max(1);
    let last = if streamed {
        longest_timeout.max(config.llm_stream_max)
    } else {
        longest_timeout
    };
    (longest_timeout + BACK_OFF_CEILING) * (attempts - 1) + last
}

/// The pause before the `attempt`+1-th target: full jitter up to 25 ms, doubling with
/// each attempt, to [`BACK_OFF_CEILING`].
fn back_off(attempt: u32) -> Duration {
    let ceiling = Duration::from_millis(25)
        .saturating_mul(1 << attempt.saturating_sub(1).min(8))
        .min(BACK_OFF_CEILING);
    ceiling.mul_f64(rand::thread_rng().gen::<f64>())
}

impl Backend for Router {
    fn complete<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Completion, LlmError>> {
        Router::complete(self, ask).boxed()
    }

    fn stream<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Streamed, LlmError>> {
        Router::stream(self, ask).boxed()
    }

    fn embed(&self, request: Forwarded) -> BoxFuture<'_, Result<Embedding, LlmError>> {
        Router::embed(self, request).boxed()
    }

    fn probe(&self) -> BoxFuture<'_, (ModelProbe, Vec<UpstreamProbe>)> {
        async move {
            let probes = self.probe_upstreams().await;
            (self.default_probe(&probes), probes)
        }
        .boxed()
    }

    fn targets(&self) -> Vec<TargetReport> {
        Router::targets(self)
    }

    fn route_without_calling(&self, model: &str) -> Option<Arc<str>> {
        let route = self.models.get(model)?;
        let began = Instant::now();
        let Choice::Target { index, slot, probe } = route.choose(0, began) else {
            return None;
        };
        let target = &route.targets[index];
        let _probing = ProbeGuard(probe.then_some(&target.health));
        target.health.succeeded();
        self.count(target, "answered", began.elapsed());
        drop(slot);
        Some(target.upstream.name().clone())
    }
}
