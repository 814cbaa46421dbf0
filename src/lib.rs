//! tokenchat: a metered LLM chat API. Users register, log in, chat with an upstream
//! OpenAI-compatible model, and every answered question costs tokens from their balance.
//!
//! [`router`] builds the application; [`serve`] runs it on a listener until shut down.

// Outside tests, a `None` or an error is handled, never unwrapped into a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod domain;
pub mod in_flight;
pub mod llm;
pub mod pricing;
mod routes;
pub mod server;
pub mod services;
mod state;
pub mod telemetry;

use std::future::Future;

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use clock::rfc3339;
pub use config::Config;
pub use routes::{api_paths, openapi_document, router, ApiError};
pub use state::AppState;

/// Serves the application on `listener` until `shutdown` resolves, then stops accepting,
/// lets open requests finish and waits for every chat in progress to settle, for up to
/// `SHUTDOWN_GRACE_SECS`; after that, chats still waiting are refunded and connections
/// closed (see [`server`] for the time-outs and the connection cap).
///
/// Before it accepts, it prepares what login needs to fail unknown users as slowly as
/// wrong passwords, and asks the model's `GET /models` once, logging what it found. Meanwhile it refunds chats that an earlier process left pending (see
/// [`services::recovery`]), checkpoints the database's write-ahead log, and lets the
/// abuse limits forget what no longer limits anyone.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Err(err) = services::passwords::prepare().await {
        tracing::warn!(error = %err, "could not prepare the dummy password hash");
    }
    let background = Background::default();
    background.spawn(state.recovery.clone().run_periodically());
    background.spawn(db::checkpoint_periodically(state.db.clone()));
    background.spawn(services::throttle::forget_stale_periodically(
        state.throttle.clone(),
    ));
    // In the background: a model that does not answer must not hold up serving.
    background.spawn(state.health.clone().probe_model_and_log());
    background.spawn(telemetry::upkeep_periodically(state.metrics.clone()));
    if let Some(alerts) = state.alerts.worker() {
        background.spawn(alerts);
    }
    let chats = state.chats.in_flight().clone();
    let limits = state.config.connections.clone();
    let served = server::run(listener, router(state), limits, chats, shutdown).await;
    background.stop().await;
    served
}

/// The process's periodic work beside serving (recovery, checkpoints, forgetting stale
/// limits, the model probe, metrics upkeep): every task tracked, and all of them stopped and
/// waited for when serving is over.
#[derive(Default)]
struct Background {
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks
            .spawn(async move { stop.run_until_cancelled(task).await });
    }

    /// Cancels every task (each is dropped at its next await) and waits until all have ended.
    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
