//! The command line: `tokenchat serve` (the default), `migrate`, `audit`, `models`, and the `user`
//! commands an operator runs instead of a web admin. Each opens the database named by the
//! configuration, does one thing, and says what it did in one line.

use std::{
    io::{BufRead, IsTerminal, Write},
    net::SocketAddr,
    process::ExitCode,
};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use futures_util::TryStreamExt;
use tokio::net::{TcpListener, TcpSocket};

use crate::{
    config::{dotenv, Config},
    db, domain, server, services,
    state::AppState,
    telemetry,
};

mod user_limits;

/// A metered, OpenAI-compatible LLM chat API. Configuration comes from the environment and
/// a `.env` file in the working directory (see `.env.example`).
#[derive(Debug, Parser)]
#[command(name = "tokenchat", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (what plain `tokenchat` does); creates and migrates a missing SQLite file.
    Serve,
    /// Create a missing SQLite file and apply the database's migrations, then exit.
    Migrate,
    /// Check every balance and chat against the ledger; exit 1 on any offence.
    Audit,
    /// List the price book (`CONFIG_FILE`): each priced model's prices, in the balance's
    /// tokens, its longest answer and how its text is counted.
    Models,
    /// Manage users: create, list, grant tokens, disable and enable.
    #[command(subcommand)]
    User(UserCommand),
    /// The older form of `tokenchat user grant`.
    #[command(hide = true)]
    Grant {
        username: String,
        #[arg(allow_negative_numbers = true)]
        amount: i64,
    },
    /// The older form of `tokenchat user create`.
    #[command(hide = true, name = "create-user")]
    CreateUser { username: String },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a user with the starting balance, even while registration is closed. The
    /// password is read from standard input, or asked for without echo on a terminal.
    Create { username: String },
    /// List every user: id, username, balance, created, disabled.
    List,
    /// Add N tokens to a user's balance (take them, when N is negative; more than the
    /// balance is refused), recorded in the ledger.
    Grant {
        username: String,
        #[arg(allow_negative_numbers = true)]
        amount: i64,
    },
    /// Disable a user: their login, tokens and keys are refused (403 account_disabled);
    /// the balance and history are kept.
    Disable { username: String },
    /// Enable a disabled user again.
    Enable { username: String },
    /// Show a user's limits, or change those given: each replaces theirs, `none` gives
    /// them the configuration's default (`USER_*`) again.
    Limits {
        username: String,
        /// Tokens charged a period at most: `TOKENS/PERIOD` (day, week, month in UTC, or
        /// total), e.g. `50000/day`.
        #[arg(long, value_name = "TOKENS/PERIOD|none")]
        budget: Option<String>,
        /// The served models they may ask for, comma-separated.
        #[arg(long, value_name = "MODEL,...|none")]
        models: Option<String>,
        /// Requests a minute at most.
        #[arg(long, value_name = "N|none")]
        rpm: Option<String>,
        /// Model tokens (prompt and completion) a minute at most.
        #[arg(long, value_name = "N|none")]
        tpm: Option<String>,
    },
}

/// Runs the command: loads the configuration (after `.env`), sets up logging and does it.
pub async fn run(cli: Cli) -> ExitCode {
    if let Err(err) = dotenv::load() {
        eprintln!("tokenchat: {err}");
        return ExitCode::FAILURE;
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tokenchat: {err}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init_logging(&config);
    let outcome = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Migrate => migrate(config).await,
        Command::Audit => audit(config).await,
        Command::Models => list_models(&config),
        Command::User(UserCommand::Create { username }) | Command::CreateUser { username } => {
            create_user(config, &username).await
        }
        Command::User(UserCommand::List) => list_users(config).await,
        Command::User(UserCommand::Grant { username, amount })
        | Command::Grant { username, amount } => grant(config, &username, amount).await,
        Command::User(UserCommand::Disable { username }) => {
            set_disabled(config, &username, true).await
        }
        Command::User(UserCommand::Enable { username }) => {
            set_disabled(config, &username, false).await
        }
        Command::User(UserCommand::Limits {
            username,
            budget,
            models,
            rpm,
            tpm,
        }) => {
            let change = user_limits::LimitsArgs {
                budget,
                models,
                rpm,
                tpm,
            };
            user_limits::run(config, &username, change).await
        }
    };
    outcome.unwrap_or_else(|err| {
        eprintln!("tokenchat: {}", one_line(&err));
        ExitCode::FAILURE
    })
}

/// The context and every cause beneath it, on one line, each cause once: sqlx's errors
/// end with their source's text, which anyhow's `{:#}` would write again.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

pub(crate) async fn open_database(config: &Config, open: db::Open) -> anyhow::Result<db::Db> {
    let settings = db::PoolSettings {
        max_connections: config.database_max_connections,
        statement_timeout: config.database_statement_timeout,
    };
    let database = db::connect_with(config.database_url.expose(), open, &settings)
        .await
        .context("cannot open DATABASE_URL")?;
    db::migrate(&database)
        .await
        .context("cannot migrate the database")?;
    Ok(database)
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    raise_descriptor_limit_and_log_cap(&config);
    // The port first: a server that cannot listen must not create or migrate anything.
    let listener = listen(config.bind_addr)
        .with_context(|| format!("cannot listen on BIND_ADDR {}", config.bind_addr))?;
    let database = open_database(&config, db::Open::CreateIfMissing).await?;
    let state = AppState::new(config, database.clone()).context("cannot build the LLM client")?;
    let address = listener
        .local_addr()
        .context("cannot read the bound address")?;
    match &state.config.routing {
        Some(routing) => tracing::info!(
            %address,
            model = state.llm.model_name(),
            upstreams = routing.upstreams.len(),
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
    crate::serve(listener, state, shutdown_signal())
        .await
        .context("server error")?;
    database.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn migrate(config: Config) -> anyhow::Result<ExitCode> {
    let database = open_database(&config, db::Open::CreateIfMissing).await?;
    let migrations = db::migration_state(&database)
        .await
        .context("cannot read the applied migrations")?;
    database.close().await;
    println!(
        "database {} is migrated: {} of {} migrations applied",
        config.database_url.redacted(),
        migrations.applied,
        migrations.known
    );
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

async fn audit(config: Config) -> anyhow::Result<ExitCode> {
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    let report = services::audit::run_reporting(&database, |offence| {
        println!("OFFENCE {offence}");
    })
    .await
    .context("audit failed to run")?;
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

/// A username given on the command line; one that breaks the rules cannot have been
/// registered, so it names nobody.
pub(crate) fn existing_username(username: &str) -> anyhow::Result<domain::Username> {
    domain::Username::parse(username).map_err(|_| anyhow!("no user named {username}"))
}

async fn grant(config: Config, username: &str, amount: i64) -> anyhow::Result<ExitCode> {
    let amount = domain::GrantAmount::parse(amount)?;
    let username = existing_username(username)?;
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    let balance = services::accounts::grant(&database, &username, amount).await?;
    let (verb, tokens) = if amount.get() < 0 {
        ("took", -amount.get())
    } else {
        ("granted", amount.get())
    };
    let direction = if amount.get() < 0 { "from" } else { "to" };
    println!(
        "{verb} {tokens} tokens {direction} {}; balance now {balance}",
        username.as_str()
    );
    Ok(ExitCode::SUCCESS)
}

async fn set_disabled(config: Config, username: &str, disabled: bool) -> anyhow::Result<ExitCode> {
    let username = existing_username(username)?;
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    services::accounts::set_disabled(&database, &username, disabled).await?;
    if disabled {
        println!(
            "disabled {}: login, tokens and keys are refused until `tokenchat user enable {}`",
            username.as_str(),
            username.as_str()
        );
    } else {
        println!("enabled {}", username.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints every user as a table, row by row as the database streams them.
fn list_models(config: &Config) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let write_failed = |err: std::io::Error| anyhow!(err).context("cannot write the list");
    let Some(file) = &config.config_file else {
        writeln!(
            out,
            "no price book (CONFIG_FILE): every chat costs CHAT_COST = {}",
            config.chat_cost
        )
        .map_err(write_failed)?;
        return Ok(ExitCode::SUCCESS);
    };
    writeln!(
        out,
        "{}: prices per million tokens (prompt, cached prompt, completion), per request; \
         unpriced models cost CHAT_COST = {}",
        file.display(),
        config.chat_cost
    )
    .map_err(write_failed)?;
    let header = [
        "model",
        "prompt",
        "cached",
        "completion",
        "request",
        "max_output",
        "tokenizer",
    ];
    let line = |out: &mut std::io::StdoutLock, cells: [&str; 7]| {
        let [model, prompt, cached, completion, request, max_output, tokenizer] = cells;
        writeln!(
            out,
            "{model:<32}  {prompt:>12}  {cached:>12}  {completion:>12}  {request:>10}  \
             {max_output:>10}  {tokenizer}"
        )
    };
    line(&mut out, header).map_err(write_failed)?;
    for (name, model) in config.price_book.models() {
        let prices = &model.prices;
        line(
            &mut out,
            [
                name,
                &prices.prompt.to_string(),
                &prices.cached_prompt.to_string(),
                &prices.completion.to_string(),
                &prices.request.to_string(),
                &prices.max_output_tokens.to_string(),
                model.tokenizer.as_str(),
            ],
        )
        .map_err(write_failed)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn list_users(config: Config) -> anyhow::Result<ExitCode> {
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    let mut out = std::io::stdout().lock();
    let line = |out: &mut std::io::StdoutLock, cells: [&str; 5]| {
        let [id, username, balance, created, disabled] = cells;
        writeln!(
            out,
            "{id:>8}  {username:<24}  {balance:>12}  {created:<20}  {disabled}"
        )
    };
    let write_failed = |err: std::io::Error| anyhow!(err).context("cannot write the list");
    line(
        &mut out,
        ["id", "username", "balance", "created", "disabled"],
    )
    .map_err(write_failed)?;
    let mut users = db::users::all(&database);
    while let Some(user) = users.try_next().await.context("cannot list the users")? {
        let disabled = user.disabled_at.map(crate::clock::rfc3339);
        line(
            &mut out,
            [
                &user.id.to_string(),
                &user.username,
                &user.tokens.to_string(),
                &crate::clock::rfc3339(user.created_at),
                disabled.as_deref().unwrap_or("-"),
            ],
        )
        .map_err(write_failed)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates a user as `/register` would, by the same rules. The password comes from the
/// first line of standard input (so it never shows in the process list or shell history),
/// or, on a terminal, from a prompt that does not echo it, asked twice.
async fn create_user(config: Config, username: &str) -> anyhow::Result<ExitCode> {
    let username = domain::Username::parse(username)?;
    let password = read_password(username.as_str())?;
    let password = domain::Password::parse(password, config.password_min_length, "password")?;
    let database = open_database(&config, db::Open::ExistingOnly).await?;
    let state = AppState::new(config, database).context("cannot build the LLM client")?;
    let tokens = state.accounts.create(&username, password).await?;
    println!("created {} with {tokens} tokens", username.as_str());
    Ok(ExitCode::SUCCESS)
}

fn read_password(username: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let ask =
            |prompt: &str| rpassword::prompt_password(prompt).context("cannot read the password");
        let password = ask(&format!("password for {username}: "))?;
        if ask("the same password again: ")? != password {
            bail!("the two passwords differ; nothing was created");
        }
        return Ok(password);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
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
