//! Loads the configuration, sets up logging, opens and migrates the database, then serves
//! (`tokenchat`), audits the ledger (`tokenchat audit`), grants tokens (`tokenchat grant`)
//! or creates a user (`tokenchat create-user`).

use std::{
    io::{BufRead, IsTerminal},
    net::SocketAddr,
    process::ExitCode,
};

use tokenchat::{
    db, domain, server,
    services::{self, error::with_sources},
    AppState, Config,
};
use tokio::net::{TcpListener, TcpSocket};
use tracing_subscriber::{fmt::format::FmtSpan, EnvFilter};

const USAGE: &str = "\
usage: tokenchat               serve the API (configuration from the environment and .env)
       tokenchat audit         check every balance and chat against the ledger; exit 1 on any offence
       tokenchat grant USER N  add N tokens to USER's balance, recorded in the ledger
       tokenchat create-user USER
                               create USER with the password read from standard input
                               (works while REGISTRATION_OPEN=false)";

enum Command {
    Serve,
    Audit,
    Grant { username: String, amount: i64 },
    CreateUser { username: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => Command::Serve,
        ["audit"] => Command::Audit,
        ["grant", username, amount] => match amount.parse() {
            Ok(amount) => Command::Grant {
                username: username.to_string(),
                amount,
            },
            Err(_) => return usage_error(),
        },
        ["create-user", username] => Command::CreateUser {
            username: username.to_string(),
        },
        ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => return usage_error(),
    };
    // A missing .env is normal; a broken one is reported by the variable it fails to set.
    let _ = dotenvy::dotenv();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tokenchat: {err}");
            return ExitCode::FAILURE;
        }
    };
    let span_events = if config.log_span_timings {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&config.log_filter))
        .with_ansi(std::io::stdout().is_terminal())
        .with_span_events(span_events)
        .init();
    let outcome = match command {
        Command::Serve => serve(config).await,
        Command::Audit => audit(config).await,
        Command::Grant { username, amount } => grant(config, &username, amount).await,
        Command::CreateUser { username } => create_user(config, &username).await,
    };
    outcome.unwrap_or_else(|err| {
        eprintln!("tokenchat: {err}");
        ExitCode::FAILURE
    })
}

fn usage_error() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

async fn open_database(config: &Config, open: db::Open) -> Result<db::Db, String> {
    let settings = db::PoolSettings {
        max_connections: config.database_max_connections,
        statement_timeout: config.database_statement_timeout,
    };
    let database = db::connect_with(config.database_url.expose(), open, &settings)
        .await
        .map_err(|err| format!("cannot open DATABASE_URL: {err}"))?;
    db::migrate(&database)
        .await
        .map_err(|err| format!("cannot migrate the database: {err}"))?;
    Ok(database)
}

async fn serve(config: Config) -> Result<ExitCode, String> {
    raise_descriptor_limit_and_log_cap(&config);
    // The port first: a server that cannot listen must not create or migrate anything.
    let listener = listen(config.bind_addr)
        .map_err(|err| format!("cannot listen on BIND_ADDR {}: {err}", config.bind_addr))?;
    let database = open_database(&config, db::Open::CreateIfMissing).await?;
    let state = AppState::new(config, database.clone())
        .map_err(|err| format!("cannot build the LLM client: {err}"))?;
    let address = listener
        .local_addr()
        .map_err(|err| format!("cannot read the bound address: {err}"))?;
    match &state.config.llm_base_url {
        Some(url) => tracing::info!(
            %address,
            model = %state.config.llm_model,
            llm = %url,
            "tokenchat listening"
        ),
        None => {
            tracing::info!(%address, model = state.llm.model_name(), "tokenchat listening");
            tracing::warn!(
                "LLM_BASE_URL is empty: answering from the built-in demo model (hello-world \
                 programs); set it to an OpenAI-compatible API to use a real model"
            );
        }
    }
    tokenchat::serve(listener, state, shutdown_signal())
        .await
        .map_err(|err| format!("server error: {err}"))?;
    database.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Connections the kernel may queue for us: at the connection cap they wait there, and past
/// this many a client's connection attempt is dropped and retried only a second or more later.
/// (Tokio's `TcpListener::bind` queues 128; the kernel caps this at `net.core.somaxconn`.)
const LISTEN_BACKLOG: u32 = 1024;

fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // A restarted server can bind again while its old connections linger in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the file-descriptor soft limit to the hard limit, since every open connection holds
/// a descriptor, and logs it with the connection cap in one line.
fn raise_descriptor_limit_and_log_cap(config: &Config) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(descriptors) => {
            let max_connections = server::connection_cap(&config.connections);
            tracing::info!(
                file_descriptor_limit = descriptors,
                max_connections,
                "connection limits"
            );
            if max_connections > server::connections_for_descriptor_limit(descriptors) {
                tracing::warn!(
                    max_connections,
                    "MAX_CONNECTIONS leaves too few file descriptors: past them, new \
                     connections wait while idle ones are closed"
                );
            }
        }
        Err(err) => tracing::warn!(
            error = %err,
            max_connections = server::connection_cap(&config.connections),
            "cannot raise the file-descriptor limit"
        ),
    }
}

async fn audit(config: Config) -> Result<ExitCode, String> {
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    let report = services::audit::run_reporting(&database, |offence| {
        println!("OFFENCE {offence}");
    })
    .await
    .map_err(|err| format!("audit failed to run: {}", with_sources(&err)))?;
    println!(
        "audit {}: {} users, {} chats, {} ledger rows, {} offences",
        if report.passed() { "passed" } else { "FAILED" },
        report.users,
        report.chats,
        report.ledger_rows,
        report.offence_count
    );
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn grant(config: Config, username: &str, amount: i64) -> Result<ExitCode, String> {
    let amount = domain::GrantAmount::parse(amount).map_err(|err| err.to_string())?;
    // A name that breaks the rules cannot have been registered.
    let username =
        domain::Username::parse(username).map_err(|_| format!("no user named {username}"))?;
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    let balance = services::accounts::grant(&database, &username, amount)
        .await
        .map_err(|err| with_sources(&err))?;
    println!(
        "granted {} tokens to {}; balance now {balance}",
        amount.get(),
        username.as_str()
    );
    Ok(ExitCode::SUCCESS)
}

/// Creates a user as `/register` would, by the same rules, with the password read from the
/// first line of standard input (so it never shows in the process list or shell history).
async fn create_user(config: Config, username: &str) -> Result<ExitCode, String> {
    let username = domain::Username::parse(username).map_err(|err| err.to_string())?;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|err| format!("cannot read the password from standard input: {err}"))?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    let password = domain::Password::parse(password, config.password_min_length, "password")
        .map_err(|err| err.to_string())?;
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    let state = AppState::new(config, database)
        .map_err(|err| format!("cannot build the LLM client: {err}"))?;
    match services::accounts::create(&state, &username, password).await {
        Ok(tokens) => {
            println!("created {} with {tokens} tokens", username.as_str());
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => Err(with_sources(&err)),
    }
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
