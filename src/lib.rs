//! tokenchat: a metered LLM chat API. Users register, log in, chat with an upstream
//! OpenAI-compatible model, and every answered question costs tokens from their balance.
//!
//! [`router`] builds the application; [`serve`] runs it on a listener until shut down.

pub mod config;
pub mod db;
pub mod domain;
mod routes;
pub mod server;
pub mod services;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::Config;
pub use routes::{router, ApiError};

use crate::{
    db::Db,
    services::{llm::LlmClient, passwords::PasswordHasher, throttle::Throttle},
};

/// What every handler shares; cloning it is cheap.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub config: Arc<Config>,
    pub llm: LlmClient,
    /// Chats in progress; shutdown waits for them to settle.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown's grace period is over: chats still waiting for the model
    /// give up and are refunded, so the process can exit with its accounts settled.
    pub cancel_chats: CancellationToken,
    pub throttle: Arc<Throttle>,
    pub passwords: Arc<PasswordHasher>,
}

impl AppState {
    pub fn new(config: Config, db: Db) -> Result<Self, reqwest::Error> {
        Ok(Self {
            llm: LlmClient::new(&config)?,
            throttle: Arc::new(Throttle::new(&config.abuse)),
            passwords: Arc::new(PasswordHasher::new(config.abuse.password_hash_queue)),
            db,
            config: Arc::new(config),
            tasks: TaskTracker::new(),
            cancel_chats: CancellationToken::new(),
        })
    }
}

/// Serves the application on `listener` until `shutdown` resolves, then stops accepting,
/// lets open requests finish and waits for every chat in progress to settle, for up to
/// `SHUTDOWN_GRACE_SECS`; after that, chats still waiting are refunded and connections
/// closed (see [`server`] for the time-outs and the connection cap).
///
/// Before it accepts, it prepares what login needs to fail unknown users as slowly as
/// wrong passwords. Meanwhile it refunds chats that an earlier process left pending (see
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
    let recovery = tokio::spawn(services::recovery::run_periodically(state.clone()));
    let checkpoints = tokio::spawn(db::checkpoint_periodically(state.db.clone()));
    let forgetting = tokio::spawn(services::throttle::forget_stale_periodically(
        state.throttle.clone(),
    ));
    let served = server::run(listener, state, shutdown).await;
    recovery.abort();
    checkpoints.abort();
    forgetting.abort();
    served
}
