//! Configuration: every environment variable of the contract, parsed and checked once at start
//! ([`vars`] reads and checks each one; [`urls`] keeps the URLs that may hold secrets), and
//! the optional configuration file with the price book ([`file`](mod@file)).

pub mod alerts;
pub mod dotenv;
pub mod file;
mod origins;
pub mod routing;
mod urls;
pub mod user_limits;
mod vars;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use secrecy::SecretString;

use crate::{clock::Clock, domain::Limits, pricing::PriceBook};

pub use alerts::{AlertsConfig, Threshold};
pub use routing::{RetryPolicy, Routing};
pub use urls::{names_a_credential, redacted_url, DatabaseUrl, UpstreamUrl};
use vars::Vars;

pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful assistant. Answer clearly and concisely.";

pub use crate::domain::MAX_BALANCE;

/// The name the built-in demo model is served under, when no upstream is configured.
pub const DEMO_MODEL_NAME: &str = "demo";

/// Everything the server reads from its environment.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind_addr: SocketAddr,
    pub database_url: DatabaseUrl,
    /// `DATABASE_MAX_CONNECTIONS`; `None`: one for SQLite, ten for PostgreSQL.
    pub database_max_connections: Option<u32>,
    /// `DATABASE_STATEMENT_TIMEOUT_MS` (PostgreSQL only); `None`: the server's own.
    pub database_statement_timeout: Option<Duration>,
    /// `None` when `LLM_BASE_URL` is empty: answers come from the built-in demo model.
    pub llm_base_url: Option<UpstreamUrl>,
    pub llm_api_key: Option<SecretString>,
    pub llm_model: String,
    /// `LLM_MODELS`: more model names served beside `LLM_MODEL`, each passed upstream as
    /// its own name.
    pub llm_models: Vec<String>,
    pub llm_system_prompt: String,
    pub llm_timeout: Duration,
    /// How long a streamed answer may go silent before it counts as timed out.
    pub llm_stream_idle: Duration,
    /// `LLM_STREAM_MAX_SECS`: how long a streamed answer may take in all, once it began
    /// (`llm_timeout` bounds the wait for it to begin).
    pub llm_stream_max: Duration,
    /// How a streamed chat whose client went away before its end is settled.
    pub abandoned_stream_charge: AbandonedStreamCharge,
    /// What an answered chat costs a model the price book does not price.
    pub chat_cost: i64,
    /// `CONFIG_FILE`, when one was read.
    pub config_file: Option<PathBuf>,
    /// The prices per model and per token from `CONFIG_FILE`; empty: flat `CHAT_COST`.
    pub price_book: Arc<PriceBook>,
    /// Which upstreams serve which models (the configuration file's upstreams and targets,
    /// and the `LLM_BASE_URL` shorthand); `None`: the built-in demo model.
    pub routing: Option<Routing>,
    /// How a call moves on from a failing target (`UPSTREAM_*`).
    pub retry: RetryPolicy,
    /// `MIN_OUTPUT_TOKENS`: the shortest answer a low balance's cap is lowered to.
    pub min_output_tokens: u64,
    /// `EMBEDDING_COST`: tokens per answered `/v1/embeddings` call.
    pub embedding_cost: i64,
    pub initial_tokens: i64,
    /// `None` when `TOKEN_TTL_SECS=0`: login tokens never expire.
    pub token_ttl: Option<Duration>,
    pub max_message_chars: usize,
    /// Characters of earlier turns (messages and answers) sent with a new message.
    pub context_max_chars: usize,
    pub max_body_bytes: usize,
    /// `V1_MAX_BODY_BYTES`: the largest body of the `/v1` routes, which carry images.
    pub v1_max_body_bytes: usize,
    pub password_min_length: usize,
    /// How long an `Idempotency-Key` is remembered after its first use.
    pub idempotency_key_lifetime: Duration,
    pub log_filter: String,
    /// `LOG_SPAN_TIMINGS=true`: a log line as each span closes, with the time it took, so
    /// a slow request shows where its time went (with `RUST_LOG=tokenchat=debug`, down to
    /// each service and database call).
    pub log_span_timings: bool,
    /// `LOG_FORMAT`: lines for people, or one JSON object a line for log collectors.
    pub log_format: LogFormat,
    /// `METRICS_TOKEN`: when set, `GET /metrics` asks for it as a Bearer token.
    pub metrics_token: Option<SecretString>,
    pub connections: ConnectionLimits,
    pub abuse: AbuseLimits,
    /// The limits of a user who has none of their own (`USER_*`).
    pub user_limits: Limits,
    /// The clock budgets, rates and key expiry read: the system's (tests move it on).
    pub clock: Clock,
    /// The alert webhook (`ALERT_WEBHOOK_*`, `ALERT_THRESHOLDS`); `None`: alerts are off.
    pub alerts: Option<AlertsConfig>,
    /// `CORS_ORIGINS`: the origins whose pages may call the API; `None`: any.
    pub cors_origins: Option<Box<[String]>>,
}

/// How long a connection may take over each part of a request, and how many may be open.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// From a connection's first byte of a request to the end of its headers.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may wait between requests.
    pub idle_timeout: Duration,
    /// From the end of the headers to the end of the body.
    pub body_read_timeout: Duration,
    /// How long a connection's output may make no progress (its client reads nothing)
    /// before the connection is dropped.
    pub write_stall_timeout: Duration,
    /// `None`: derived from the file-descriptor limit when serving starts.
    pub max_connections: Option<usize>,
    /// Open connections from one client address at most; `None` when
    /// `MAX_CONNECTIONS_PER_ADDRESS=0`.
    pub max_connections_per_address: Option<usize>,
    /// Bytes of request bodies all connections together may hold while they arrive; a
    /// request whose body would pass it is answered 503 `busy`.
    pub max_inflight_body_bytes: usize,
    /// After a shutdown signal, how long open requests and chats may take to finish.
    pub shutdown_grace: Duration,
}

/// Limits on what one client address or one user may do; a limit of `None` is off.
#[derive(Clone, Debug)]
pub struct AbuseLimits {
    /// Login attempts per client address per minute, whatever their outcome.
    pub login_attempts_per_minute: Option<u32>,
    /// Failed logins of one username from one address before that pair is locked.
    pub login_failures_per_user_and_address: Option<u32>,
    pub login_failures_per_user_and_address_window: Duration,
    /// Failed logins of one username from all addresses before it is locked everywhere.
    pub login_failures_per_user: Option<u32>,
    pub login_failures_per_user_window: Duration,
    /// Registrations per client address per hour.
    pub registrations_per_hour: Option<u32>,
    /// `false`: `/register` is closed and only the command line creates users.
    pub registration_open: bool,
    /// Chats per user per minute.
    pub chat_rate_per_minute: Option<u32>,
    /// Password changes per user per hour, successful or not.
    pub password_changes_per_hour: Option<u32>,
    /// Take the client address from `X-Forwarded-For` (set only behind a trusted proxy).
    pub trust_proxy_headers: bool,
    /// Password hashes that may wait for a free core; beyond them requests are 503 `busy`.
    pub password_hash_queue: usize,
}

/// How a streamed chat is settled when its client goes away before the model finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbandonedStreamCharge {
    /// Charged once any of the answer was sent to the client, refunded otherwise: hanging
    /// up just before the end is no way to get answers for free.
    Delivered,
    /// Always refunded.
    Never,
}

impl std::str::FromStr for AbandonedStreamCharge {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "delivered" => Ok(Self::Delivered),
            "never" => Ok(Self::Never),
            _ => Err("use delivered or never"),
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event, with the span's fields before it.
    Text,
    /// One JSON object per line, the span's fields (the request id among them) included.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err("use text or json"),
        }
    }
}

/// A variable whose value cannot be used; start-up stops with this one line.
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

/// A day, an hour: the ceilings of durations, so no setting overflows a clock.
const DAY_SECS: u64 = 24 * 60 * 60;
const HOUR_SECS: u64 = 60 * 60;
/// Tokens may live ten years at most: their expiry stays a valid RFC 3339 time.
const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * DAY_SECS;
/// The largest `MAX_INFLIGHT_BODY_BYTES`: 1 TiB, more memory than any machine we run on.
const MAX_INFLIGHT_BODY_BYTES: usize = 1 << 40;

impl Config {
    /// Reads the process environment (after `.env`, which `main` loads).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds a configuration from any variable source; unset and empty mean "use the default".
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars(&lookup);
        let llm_base_url = match vars.optional("LLM_BASE_URL") {
            None => None,
            Some(raw) => Some(UpstreamUrl::parse(&raw)?),
        };
        let database_url = DatabaseUrl(vars.string("DATABASE_URL", "sqlite://tokenchat.db"));
        if crate::db::Backend::of_url(database_url.expose()).is_none() {
            return Err(ConfigError::new(
                "DATABASE_URL",
                format!(
                    "unsupported database in {:?}; use a sqlite://, postgres:// or postgresql:// URL",
                    database_url.redacted()
                ),
            ));
        }
        if database_url.is_sqlite_in_memory() {
            return Err(ConfigError::new(
                "DATABASE_URL",
                format!(
                    "{:?} names no file, so every account would be lost at exit; name one, \
                     e.g. sqlite://tokenchat.db",
                    database_url.redacted()
                ),
            ));
        }
        let log_filter = vars.string("RUST_LOG", "info");
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            return Err(ConfigError::new("RUST_LOG", err.to_string()));
        }
        let token_ttl_secs: u64 = vars.between("TOKEN_TTL_SECS", "86400", 0, MAX_TOKEN_TTL_SECS)?;
        let config_file = match lookup("CONFIG_FILE") {
            None => Some(PathBuf::from(file::DEFAULT_CONFIG_FILE)).filter(|path| path.exists()),
            Some(path) if path.trim().is_empty() => None,
            Some(path) => Some(PathBuf::from(path)),
        };
        let llm_api_key = match lookup("LLM_API_KEY").filter(|key| !key.is_empty()) {
            None => None,
            Some(key) => {
                Some(vars::secret(key).map_err(|reason| ConfigError::new("LLM_API_KEY", reason))?)
            }
        };
        if llm_api_key.is_some()
            && llm_base_url
                .as_ref()
                .is_some_and(UpstreamUrl::has_user_info)
        {
            return Err(ConfigError::new(
                "LLM_API_KEY",
                "LLM_BASE_URL carries a user name too, and both would be sent as Authorization; \
                 keep one",
            ));
        }
        let llm_model = vars.string("LLM_MODEL", "llama3.2");
        let llm_models: Vec<String> = vars
            .string("LLM_MODELS", "")
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect();
        let mut config_file_read = match &config_file {
            None => file::ConfigFile::default(),
            Some(path) => {
                let context = file::Context {
                    lookup: &lookup,
                    shorthand_upstream: llm_base_url.is_some(),
                };
                file::read(path, &context)
                    .map_err(|err| ConfigError::new("CONFIG_FILE", err.to_string()))?
            }
        };
        let routing = routing::resolve(
            routing::Shorthand {
                base_url: llm_base_url.clone(),
                api_key: llm_api_key.clone(),
                model: llm_model.clone(),
                models: llm_models.clone(),
            },
            std::mem::take(&mut config_file_read.upstreams),
            std::mem::take(&mut config_file_read.targets),
        )?;
        let cooldown = vars.seconds("UPSTREAM_COOLDOWN_SECS", "5", 1, HOUR_SECS)?;
        let retry = RetryPolicy {
            max_attempts: vars.between("UPSTREAM_MAX_ATTEMPTS", "3", 1, 100)?,
            failures_to_open: vars.between("UPSTREAM_FAILURES_TO_OPEN", "5", 1, 1_000_000)?,
            cooldown,
            cooldown_max: vars
                .seconds("UPSTREAM_COOLDOWN_MAX_SECS", "300", 1, DAY_SECS)?
                .max(cooldown),
        };
        let mut config = Self {
            bind_addr: vars.parse("BIND_ADDR", "127.0.0.1:8000")?,
            database_url,
            database_max_connections: match vars.optional("DATABASE_MAX_CONNECTIONS") {
                None => None,
                Some(_) => Some(vars.between("DATABASE_MAX_CONNECTIONS", "", 1, 10_000)?),
            },
            database_statement_timeout: match vars.optional("DATABASE_STATEMENT_TIMEOUT_MS") {
                None => None,
                Some(_) => Some(Duration::from_millis(vars.between(
                    "DATABASE_STATEMENT_TIMEOUT_MS",
                    "",
                    1,
                    HOUR_SECS * 1000,
                )?)),
            },
            llm_base_url,
            llm_api_key,
            llm_model,
            llm_models,
            llm_system_prompt: vars.string("LLM_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
            llm_timeout: vars.seconds("LLM_TIMEOUT_SECS", "60", 1, HOUR_SECS)?,
            llm_stream_idle: vars.seconds("LLM_STREAM_IDLE_SECS", "30", 1, HOUR_SECS)?,
            llm_stream_max: vars.seconds("LLM_STREAM_MAX_SECS", "600", 1, DAY_SECS)?,
            abandoned_stream_charge: vars.parse("ABANDONED_STREAM_CHARGE", "delivered")?,
            chat_cost: vars.between("CHAT_COST", "100", 1, MAX_BALANCE)?,
            config_file,
            price_book: Arc::new(std::mem::take(&mut config_file_read.price_book)),
            routing,
            retry,
            min_output_tokens: vars.between("MIN_OUTPUT_TOKENS", "16", 1, 1_000_000)?,
            embedding_cost: vars.between("EMBEDDING_COST", "1", 1, MAX_BALANCE)?,
            initial_tokens: vars.between("INITIAL_TOKENS", "4000", 0, MAX_BALANCE)?,
            token_ttl: (token_ttl_secs > 0).then(|| Duration::from_secs(token_ttl_secs)),
            max_message_chars: vars.between("MAX_MESSAGE_CHARS", "8000", 1, 1_000_000)?,
            context_max_chars: vars.between("CONTEXT_MAX_CHARS", "24000", 0, 10_000_000)?,
            max_body_bytes: vars.between("MAX_BODY_BYTES", "65536", 1, 64 * 1024 * 1024)?,
            v1_max_body_bytes: vars.between("V1_MAX_BODY_BYTES", "20971520", 1, 1 << 30)?,
            password_min_length: vars.between("PASSWORD_MIN_LENGTH", "6", 1, 1024)?,
            idempotency_key_lifetime: vars.seconds(
                "IDEMPOTENCY_KEY_LIFETIME_SECS",
                "86400",
                1,
                30 * DAY_SECS,
            )?,
            log_filter,
            log_span_timings: vars.parse("LOG_SPAN_TIMINGS", "false")?,
            log_format: vars.parse("LOG_FORMAT", "text")?,
            metrics_token: match lookup("METRICS_TOKEN").filter(|token| !token.is_empty()) {
                None => None,
                Some(token) => Some(
                    vars::secret(token)
                        .map_err(|reason| ConfigError::new("METRICS_TOKEN", reason))?,
                ),
            },
            connections: ConnectionLimits {
                header_read_timeout: vars.seconds(
                    "HEADER_READ_TIMEOUT_SECS",
                    "10",
                    1,
                    HOUR_SECS,
                )?,
                idle_timeout: vars.seconds("IDLE_TIMEOUT_SECS", "60", 1, DAY_SECS)?,
                body_read_timeout: vars.seconds("BODY_READ_TIMEOUT_SECS", "30", 1, HOUR_SECS)?,
                write_stall_timeout: vars.seconds(
                    "WRITE_STALL_TIMEOUT_SECS",
                    "30",
                    1,
                    HOUR_SECS,
                )?,
                max_connections: match vars.optional("MAX_CONNECTIONS") {
                    None => None,
                    Some(_) => Some(vars.between("MAX_CONNECTIONS", "", 1, 1_000_000)?),
                },
                max_connections_per_address: match vars.between(
                    "MAX_CONNECTIONS_PER_ADDRESS",
                    "64",
                    0,
                    1_000_000,
                )? {
                    0 => None,
                    cap => Some(cap),
                },
                max_inflight_body_bytes: vars.between(
                    "MAX_INFLIGHT_BODY_BYTES",
                    "67108864",
                    1,
                    MAX_INFLIGHT_BODY_BYTES,
                )?,
                shutdown_grace: vars.seconds("SHUTDOWN_GRACE_SECS", "30", 0, HOUR_SECS)?,
            },
            abuse: AbuseLimits {
                login_attempts_per_minute: vars.limit("LOGIN_ATTEMPTS_PER_MINUTE", "30")?,
                login_failures_per_user_and_address: vars
                    .limit("LOGIN_FAILURES_PER_USER_AND_ADDRESS", "10")?,
                login_failures_per_user_and_address_window: vars.seconds(
                    "LOGIN_FAILURES_PER_USER_AND_ADDRESS_WINDOW_SECS",
                    "900",
                    1,
                    DAY_SECS,
                )?,
                login_failures_per_user: vars.limit("LOGIN_FAILURES_PER_USER", "100")?,
                login_failures_per_user_window: vars.seconds(
                    "LOGIN_FAILURES_PER_USER_WINDOW_SECS",
                    "3600",
                    1,
                    DAY_SECS,
                )?,
                registrations_per_hour: vars.limit("REGISTRATIONS_PER_HOUR", "10")?,
                registration_open: vars.parse("REGISTRATION_OPEN", "true")?,
                chat_rate_per_minute: vars.limit("CHAT_RATE_PER_MINUTE", "60")?,
                password_changes_per_hour: vars.limit("PASSWORD_CHANGES_PER_HOUR", "10")?,
                trust_proxy_headers: vars.parse("TRUST_PROXY_HEADERS", "false")?,
                password_hash_queue: vars.between("PASSWORD_HASH_QUEUE", "64", 0, 1_000_000)?,
            },
            user_limits: Limits::default(),
            clock: Clock::default(),
            alerts: alerts::read(&vars)?,
            cors_origins: origins::read(&vars)?,
        };
        config.user_limits = user_limits::default_user_limits(&vars, &config.served_models())?;
        // A budget smaller than one body of the largest kind would refuse every such request.
        let largest_body = config.v1_max_body_bytes.max(config.chat_body_limit());
        if config.connections.max_inflight_body_bytes < largest_body {
            return Err(ConfigError::new(
                "MAX_INFLIGHT_BODY_BYTES",
                format!(
                    "{} is below the largest request body, {largest_body} bytes (of /v1, \
                     V1_MAX_BODY_BYTES, or of /chat, from MAX_BODY_BYTES and MAX_MESSAGE_CHARS)",
                    config.connections.max_inflight_body_bytes
                ),
            ));
        }
        Ok(config)
    }
}

/// The most bytes one character of a message can take in a request body: a character
/// outside the Basic Multilingual Plane written as two JSON escapes (`\ud83d\ude00`), or as
/// four percent-encoded bytes in form data (`%F0%9F%98%80`).
const MAX_ENCODED_BYTES_PER_CHAR: usize = 12;
/// Room in a chat body for everything but the message: field names, other fields.
const CHAT_BODY_OVERHEAD_BYTES: usize = 4096;

impl Config {
    /// The names of the models served: every routed model's, or the demo model's.
    pub fn served_models(&self) -> Vec<String> {
        match &self.routing {
            Some(routing) => routing
                .models
                .iter()
                .map(|model| model.name.clone())
                .collect(),
            None => vec![DEMO_MODEL_NAME.to_string()],
        }
    }

    /// The body limit of `/chat`: `MAX_BODY_BYTES`, raised where needed so that every
    /// message of up to `MAX_MESSAGE_CHARS` fits in any valid encoding.
    pub fn chat_body_limit(&self) -> usize {
        let longest_valid =
            self.max_message_chars * MAX_ENCODED_BYTES_PER_CHAR + CHAT_BODY_OVERHEAD_BYTES;
        self.max_body_bytes.max(longest_valid)
    }
}

impl ConfigError {
    fn new(variable: &'static str, reason: impl Into<String>) -> Self {
        Self {
            variable,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests;
