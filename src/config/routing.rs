//! Which upstreams serve which models: the configuration file's upstreams and targets,
//! merged with the one-upstream shorthand (`LLM_BASE_URL`, `LLM_MODEL`, `LLM_MODELS`),
//! and how a call moves between targets (`UPSTREAM_*`).

use std::{collections::BTreeMap, time::Duration};

use http::{HeaderName, HeaderValue};
use secrecy::SecretString;

use super::{ConfigError, UpstreamUrl};

/// The name `LLM_BASE_URL`'s upstream goes by, for targets that mean it.
pub const SHORTHAND_UPSTREAM: &str = "default";

/// The most targets a model may have: which of them a call tried is kept in one `u64`.
pub const MAX_TARGETS: usize = 64;

/// One upstream speaking OpenAI's protocol.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    pub base_url: UpstreamUrl,
    pub api_key: Option<SecretString>,
    /// The limit for one answer; `None`: `LLM_TIMEOUT_SECS`.
    pub timeout: Option<Duration>,
    /// Sent with every request to it.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Requests in flight to it at most; `None`: no limit.
    pub max_concurrent: Option<usize>,
}

/// One way to serve a model: an upstream, the model's name there, a weight among the
/// targets of its priority, and the priority (0 first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetConfig {
    pub upstream: String,
    pub model: String,
    pub weight: u32,
    pub priority: u32,
}

/// A served model and the targets that serve it.
#[derive(Clone, Debug)]
pub struct ServedModel {
    pub name: String,
    pub targets: Vec<TargetConfig>,
}

/// Every upstream and every served model, `LLM_MODEL` first.
#[derive(Clone, Debug)]
pub struct Routing {
    pub upstreams: Vec<UpstreamConfig>,
    pub models: Vec<ServedModel>,
}

/// How a call moves on from a failing target, and how long a failing target rests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `UPSTREAM_MAX_ATTEMPTS`: targets tried for one call at most.
    pub max_attempts: u32,
    /// `UPSTREAM_FAILURES_TO_OPEN`: consecutive failures that open a target's breaker.
    pub failures_to_open: u32,
    /// `UPSTREAM_COOLDOWN_SECS`: how long an opened breaker first skips its target.
    pub cooldown: Duration,
    /// `UPSTREAM_COOLDOWN_MAX_SECS`: the ceiling the cooling time doubles up to.
    pub cooldown_max: Duration,
}

/// The shorthand's variables, as read.
pub(super) struct Shorthand {
    pub base_url: Option<UpstreamUrl>,
    pub api_key: Option<SecretString>,
    pub model: String,
    pub models: Vec<String>,
}

/// Who serves what, from the shorthand and the configuration file's `upstreams` and
/// `targets`: `None` when nothing is configured (the built-in demo model).
pub(super) fn resolve(
    shorthand: Shorthand,
    mut upstreams: Vec<UpstreamConfig>,
    mut targets: BTreeMap<String, Vec<TargetConfig>>,
) -> Result<Option<Routing>, ConfigError> {
    let Shorthand {
        base_url,
        api_key,
        model,
        models,
    } = shorthand;
    let mut names: Vec<String> = Vec::new();
    for name in std::iter::once(&model).chain(&models) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    match base_url {
        Some(base_url) => upstreams.push(UpstreamConfig {
            name: SHORTHAND_UPSTREAM.to_string(),
            base_url,
            api_key,
            timeout: None,
            headers: Vec::new(),
            max_concurrent: None,
        }),
        None if targets.is_empty() => return Ok(None),
        None => {
            // Only the file's targets serve: LLM_MODEL and LLM_MODELS must be among them.
            if let Some(missing) = names.iter().find(|name| !targets.contains_key(*name)) {
                let variable = if *missing == model {
                    "LLM_MODEL"
                } else {
                    "LLM_MODELS"
                };
                let routed: Vec<&str> = targets.keys().map(String::as_str).collect();
                return Err(ConfigError::new(
                    variable,
                    format!(
                        "{missing:?} has no targets in CONFIG_FILE and LLM_BASE_URL is empty; \
                         name one of {routed:?}"
                    ),
                ));
            }
        }
    }
    let shorthand_target = |name: &str| TargetConfig {
        upstream: SHORTHAND_UPSTREAM.to_string(),
        model: name.to_string(),
        weight: 1,
        priority: 0,
    };
    let mut served = Vec::new();
    for name in names {
        let of_name = targets
            .remove(&name)
            .unwrap_or_else(|| vec![shorthand_target(&name)]);
        served.push(ServedModel {
            name,
            targets: of_name,
        });
    }
    served.extend(
        targets
            .into_iter()
            .map(|(name, targets)| ServedModel { name, targets }),
    );
    Ok(Some(Routing {
        upstreams,
        models: served,
    }))
}
