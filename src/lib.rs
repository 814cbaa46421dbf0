//! tokenchat: a metered LLM chat API. Users register, log in, chat with an upstream
//! OpenAI-compatible model, and every answered question costs tokens from their balance.
//!
//! [`router`] builds the application; [`serve`] runs it on a listener until shut down.

pub mod config;
pub mod db;
pub mod error;
mod routes;
pub mod server;
pub mod services;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::Config;
pub use error::Error;
pub use routes::router;

use crate::{
    db::Db,
    services::{llm::LlmClient, throttle::LoginThrottle},
};

/// Failed logins allowed per username in one window before it is locked until the window ends.
const LOGIN_FAILURES_PER_WINDOW: u32 = 10;
const LOGIN_FAILURE_WINDOW: Duration = Duration::from_secs(300);

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
    pub login_throttle: Arc<LoginThrottle>,
}

impl AppState {
    pub fn new(config: Config, db: Db) -> Result<Self, reqwest::Error> {
        Ok(Self {
            llm: LlmClient::new(&config)?,
            db,
            config: Arc::new(config),
            tasks: TaskTracker::new(),
            cancel_chats: CancellationToken::new(),
            login_throttle: Arc::new(LoginThrottle::new(
                LOGIN_FAILURES_PER_WINDOW,
                LOGIN_FAILURE_WINDOW,
            )),
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
/// [`services::recovery`]) and checkpoints the database's write-ahead log.
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
    let served = server::run(listener, state, shutdown).await;
    recovery.abort();
    checkpoints.abort();
    served
}
