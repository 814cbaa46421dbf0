//! Readiness for a load balancer: whether the database answers with every migration of
//! this build applied, and, reported beside it but not required, whether the model is
//! reachable and serves `LLM_MODEL`, and what each upstream's probe found.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Mutex;

use crate::{
    db::{self, Db, MigrationState},
    llm::{LlmClient, ModelProbe, UpstreamProbe},
};

/// How long the database may take to answer a readiness check before it counts as down.
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one probe of the model stands for: a load balancer asking `/ready` every
/// second costs the model one `GET /models` every this often, not one a second.
const PROBE_FRESH_FOR: Duration = Duration::from_secs(15);

/// What readiness asks, built once at start: the database, the model, and the last probe
/// of the model and when it was made (held while probing, so that many `/ready` at once
/// make one probe).
pub struct Health {
    db: Db,
    llm: LlmClient,
    last_probe: Mutex<Option<(Instant, Probed)>>,
}

/// What probing the model found: the default model's reachability, and each upstream's.
#[derive(Debug, Clone)]
pub struct Probed {
    pub model: ModelProbe,
    pub upstreams: Vec<UpstreamProbe>,
}

/// What `/ready` found.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub database: DatabaseReadiness,
    pub model: ModelProbe,
    pub upstreams: Vec<UpstreamProbe>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseReadiness {
    Ready(MigrationState),
    /// It answers, but this build's migrations are not all applied.
    NotMigrated(MigrationState),
    /// It did not answer in time, or answered with an error.
    Unreachable,
}

impl Readiness {
    /// Ready to serve: the database answers and is migrated. The model is not required:
    /// a model that is down fails chats with 502, and the rest of the API still serves.
    pub fn is_ready(&self) -> bool {
        matches!(self.database, DatabaseReadiness::Ready(_))
    }
}

impl Health {
    pub fn new(db: Db, llm: LlmClient) -> Self {
        Self {
            db,
            llm,
            last_probe: Mutex::new(None),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn readiness(&self) -> Readiness {
        let database =
            match tokio::time::timeout(DATABASE_CHECK_TIMEOUT, db::migration_state(&self.db)).await
            {
                Ok(Ok(migrations)) if migrations.complete() => DatabaseReadiness::Ready(migrations),
                Ok(Ok(migrations)) => DatabaseReadiness::NotMigrated(migrations),
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "readiness: the database did not answer");
                    DatabaseReadiness::Unreachable
                }
                Err(_) => {
                    tracing::warn!("readiness: the database did not answer in time");
                    DatabaseReadiness::Unreachable
                }
            };
        let probed = self.model_status().await;
        Readiness {
            database,
            model: probed.model,
            upstreams: probed.upstreams,
        }
    }

    /// The model's reachability, probed at most once per [`PROBE_FRESH_FOR`].
    async fn model_status(&self) -> Probed {
        let mut last = self.last_probe.lock().await;
        if let Some((when, probed)) = &*last {
            if when.elapsed() < PROBE_FRESH_FOR {
                return probed.clone();
            }
        }
        let (model, upstreams) = self.llm.probe().await;
        let probed = Probed { model, upstreams };
        *last = Some((Instant::now(), probed.clone()));
        probed
    }

    /// Asks every upstream once and logs one line for each (its name and URL, never its
    /// key), then one of what it found for `LLM_MODEL`: reachable and served, reachable
    /// without it, or unreachable.
    pub async fn probe_model_and_log(self: Arc<Self>) {
        let probed = self.model_status().await;
        let targets = self.llm.targets();
        for upstream in &probed.upstreams {
            let models: Vec<&str> = targets
                .iter()
                .filter(|target| target.upstream == upstream.name)
                .map(|target| target.model.as_str())
                .collect();
            match &upstream.listed {
                Ok(listed) => {
                    let missing: Vec<&str> = models
                        .iter()
                        .copied()
                        .filter(|model| !listed.iter().any(|listed| listed == model))
                        .collect();
                    tracing::info!(
                        upstream = &*upstream.name,
                        url = upstream.url,
                        ?missing,
                        "upstream is reachable"
                    );
                }
                Err(why) => tracing::warn!(
                    upstream = &*upstream.name,
                    url = upstream.url,
                    reason = %why,
                    "upstream is unreachable"
                ),
            }
        }
        let model = self.llm.model_name();
        let url = self
            .llm
            .upstreams()
            .iter()
            .map(|(_, url)| url.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let url = url.as_str();
        match probed.model {
            ModelProbe::BuiltIn => {}
            ModelProbe::Serving => {
                tracing::info!(
                    llm = url,
                    model,
                    "the model is reachable and serves LLM_MODEL"
                )
            }
            ModelProbe::ReachableWithoutModel => tracing::warn!(
                llm = url,
                model,
                "the model is reachable but does not list LLM_MODEL: chats may fail with 502"
            ),
            ModelProbe::Unreachable(why) => tracing::warn!(
                llm = url,
                model,
                reason = %why,
                "the model is unreachable: chats fail with 502 until it answers"
            ),
        }
    }
}
