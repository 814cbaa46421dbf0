//! Readiness for a load balancer: whether the database answers with every migration of
//! this build applied, and, reported beside it but not required, whether the model is
//! reachable and serves `LLM_MODEL`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Mutex;

use crate::{
    db::{self, Db, MigrationState},
    llm::{LlmClient, ModelProbe},
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
    last_probe: Mutex<Option<(Instant, ModelProbe)>>,
}

/// What `/ready` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub database: DatabaseReadiness,
    pub model: ModelProbe,
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
        Readiness {
            database,
            model: self.model_status().await,
        }
    }

    /// The model's reachability, probed at most once per [`PROBE_FRESH_FOR`].
    async fn model_status(&self) -> ModelProbe {
        let mut last = self.last_probe.lock().await;
        if let Some((when, probe)) = &*last {
            if when.elapsed() < PROBE_FRESH_FOR {
                return probe.clone();
            }
        }
        let probe = self.llm.probe().await;
        *last = Some((Instant::now(), probe.clone()));
        probe
    }

    /// Asks the model once and logs one line of what it found: reachable and serving
    /// `LLM_MODEL`, reachable without it, or unreachable (with the URL, never the key).
    pub async fn probe_model_and_log(self: Arc<Self>) {
        let probe = self.model_status().await;
        let model = self.llm.model_name();
        let url = self.llm.base_url().unwrap_or_default();
        match probe {
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
