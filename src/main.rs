//! Loads the configuration, sets up logging, opens and migrates the database, and serves.

use std::{io::IsTerminal, process::ExitCode};

use tokenchat::{db, AppState, Config};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    // A missing .env is normal; a broken one is reported by the variable it fails to set.
    let _ = dotenvy::dotenv();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tokenchat: {err}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&config.log_filter))
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("tokenchat: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    let database = db::connect(&config.database_url)
        .await
        .map_err(|err| format!("cannot open DATABASE_URL: {err}"))?;
    db::migrate(&database)
        .await
        .map_err(|err| format!("cannot migrate the database: {err}"))?;
    let listener = TcpListener::bind(config.bind_addr)
        .await
        .map_err(|err| format!("cannot listen on BIND_ADDR {}: {err}", config.bind_addr))?;
    let state = AppState::new(config, database.clone())
        .map_err(|err| format!("cannot build the LLM client: {err}"))?;
    let address = listener
        .local_addr()
        .map_err(|err| format!("cannot read the bound address: {err}"))?;
    tracing::info!(
        %address,
        model = %state.config.llm_model,
        llm = %state.config.llm_base_url,
        "tokenchat listening"
    );
    tokenchat::serve(listener, state, shutdown_signal())
        .await
        .map_err(|err| format!("server error: {err}"))?;
    database.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: finishing requests and chats in progress");
}
