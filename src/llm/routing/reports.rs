//! What `/ready` and start-up show of the routes: each upstream's `GET /models`, the default
//! model's reachability, and every target's breaker as it is now.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{health::BreakerState, Router};
use crate::llm::ModelProbe;

/// What one target is, for `/ready`.
#[derive(Debug, Clone)]
pub struct TargetReport {
    /// The served model it serves.
    pub served: String,
    pub upstream: Arc<str>,
    /// The model's name at the upstream.
    pub model: String,
    pub state: BreakerState,
    /// How long until its state may change by itself (an open breaker's rest).
    pub retry_in: Option<Duration>,
}

/// What asking one upstream's `GET /models` found.
#[derive(Debug, Clone)]
pub struct UpstreamProbe {
    pub name: Arc<str>,
    pub url: String,
    /// The models it lists, or why it could not be asked.
    pub listed: Result<Vec<String>, String>,
}

impl Router {
    /// Asks every upstream's `GET /models`, all at once.
    pub(super) async fn probe_upstreams(&self) -> Vec<UpstreamProbe> {
        let probes = self.upstreams.iter().map(|upstream| async move {
            UpstreamProbe {
                name: upstream.name().clone(),
                url: upstream.shown_url().to_string(),
                listed: upstream
                    .listed_models()
                    .await
                    .map_err(|err| err.to_string()),
            }
        });
        futures_util::future::join_all(probes).await
    }

    /// The default model's reachability: served by a target whose upstream lists it,
    /// else reachable without it, else unreachable (with the first reason).
    pub(super) fn default_probe(&self, probes: &[UpstreamProbe]) -> ModelProbe {
        let Some(route) = self.models.get(&self.default_model) else {
            return ModelProbe::Unreachable("no target".into());
        };
        let mut reachable = false;
        let mut reason = None;
        for target in &route.targets {
            let Some(probe) = probes
                .iter()
                .find(|probe| probe.name == *target.upstream.name())
            else {
                continue;
            };
            match &probe.listed {
                Ok(listed) if listed.contains(&target.model) => return ModelProbe::Serving,
                Ok(_) => reachable = true,
                Err(why) => {
                    reason.get_or_insert_with(|| format!("{}: {why}", probe.name));
                }
            }
        }
        if reachable {
            ModelProbe::ReachableWithoutModel
        } else {
            ModelProbe::Unreachable(reason.unwrap_or_default())
        }
    }

    pub(super) fn targets(&self) -> Vec<TargetReport> {
        let now = Instant::now();
        let mut reports: Vec<TargetReport> = self
            .models
            .iter()
            .flat_map(|(served, route)| {
                route.targets.iter().map(move |target| {
                    let (state, retry_in) = target.health.state_at(now);
                    TargetReport {
                        served: served.clone(),
                        upstream: target.upstream.name().clone(),
                        model: target.model.clone(),
                        state,
                        retry_in,
                    }
                })
            })
            .collect();
        reports.sort_by(|a, b| (&a.upstream, &a.served).cmp(&(&b.upstream, &b.served)));
        reports
    }
}
