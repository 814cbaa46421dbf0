//! Configuration: every environment variable of the contract, parsed and checked once at start.

use std::{fmt, net::SocketAddr, time::Duration};

use reqwest::Url;
use secrecy::SecretString;

pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful assistant. Answer clearly and concisely.";

pub use crate::domain::MAX_BALANCE;

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
    pub chat_cost: i64,
    pub initial_tokens: i64,
    /// `None` when `TOKEN_TTL_SECS=0`: login tokens never expire.
    pub token_ttl: Option<Duration>,
    pub max_message_chars: usize,
    /// Characters of earlier turns (messages and answers) sent with a new message.
    pub context_max_chars: usize,
    pub max_body_bytes: usize,
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

/// `DATABASE_URL`, which may hold a password: `Debug` shows it with the password masked,
/// and only [`DatabaseUrl::expose`] gives the whole of it, to the database driver.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `<redacted>`, for logs and messages.
    pub fn redacted(&self) -> String {
        match Url::parse(&self.0) {
            Ok(mut url) if url.password().is_some() => {
                // The URL type would percent-encode `<redacted>`; mark it plainly and swap.
                let _ = url.set_password(Some("REDACTED"));
                url.to_string().replacen(":REDACTED@", ":<redacted>@", 1)
            }
            Ok(_) => self.0.clone(),
            // Unparsable: it may still hold a secret somewhere, so show only its scheme.
            Err(_) => format!(
                "{}:<redacted>",
                self.0.split(':').next().unwrap_or_default()
            ),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

/// `LLM_BASE_URL`, which may carry credentials in its user info (`http://user:pw@host`) or
/// its query (`?key=…`): `Debug` and `Display` show it with both replaced by `<redacted>`,
/// and only [`UpstreamUrl::join`] gives the whole of it, to the HTTP client.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl(Url);

impl UpstreamUrl {
    /// An http or https URL; the error never repeats the value, which may hold a secret.
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(raw.trim())
            .map_err(|err| ConfigError::new("LLM_BASE_URL", format!("not a URL ({err})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::new(
                "LLM_BASE_URL",
                format!("unsupported scheme {:?}; use http or https", url.scheme()),
            ));
        }
        Ok(Self(url))
    }

    /// The URL of `path` under this API root: appended to the root's path, with the root's
    /// query (an API key some providers take there) and user info kept.
    pub fn join(&self, path: &str) -> Url {
        let mut url = self.0.clone();
        let joined = format!(
            "{}/{}",
            url.path().trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        url.set_path(&joined);
        url
    }

    /// The URL for logs and messages: user info and query replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        redacted_url(&self.0)
    }
}

/// `url` with its user info and query replaced by `<redacted>`, for logs and messages.
pub fn redacted_url(url: &Url) -> String {
    let mut shown = format!("{}://", url.scheme());
    if !url.username().is_empty() || url.password().is_some() {
        shown.push_str("<redacted>@");
    }
    if let Some(host) = url.host_str() {
        shown.push_str(host);
    }
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    if url.query().is_some() {
        shown.push_str("?<redacted>");
    }
    shown
}

impl fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
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
        let log_filter = vars.string("RUST_LOG", "info");
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            return Err(ConfigError::new("RUST_LOG", err.to_string()));
        }
        let token_ttl_secs: u64 = vars.between("TOKEN_TTL_SECS", "86400", 0, MAX_TOKEN_TTL_SECS)?;
        let config = Self {
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
            llm_api_key: lookup("LLM_API_KEY")
                .filter(|key| !key.is_empty())
                .map(SecretString::from),
            llm_model: vars.string("LLM_MODEL", "llama3.2"),
            llm_models: vars
                .string("LLM_MODELS", "")
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_string)
                .collect(),
            llm_system_prompt: vars.string("LLM_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
            llm_timeout: vars.seconds("LLM_TIMEOUT_SECS", "60", 1, HOUR_SECS)?,
            llm_stream_idle: vars.seconds("LLM_STREAM_IDLE_SECS", "30", 1, HOUR_SECS)?,
            llm_stream_max: vars.seconds("LLM_STREAM_MAX_SECS", "600", 1, DAY_SECS)?,
            abandoned_stream_charge: vars.parse("ABANDONED_STREAM_CHARGE", "delivered")?,
            chat_cost: vars.between("CHAT_COST", "100", 1, MAX_BALANCE)?,
            initial_tokens: vars.between("INITIAL_TOKENS", "4000", 0, MAX_BALANCE)?,
            token_ttl: (token_ttl_secs > 0).then(|| Duration::from_secs(token_ttl_secs)),
            max_message_chars: vars.between("MAX_MESSAGE_CHARS", "8000", 1, 1_000_000)?,
            context_max_chars: vars.between("CONTEXT_MAX_CHARS", "24000", 0, 10_000_000)?,
            max_body_bytes: vars.between("MAX_BODY_BYTES", "65536", 1, 64 * 1024 * 1024)?,
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
            metrics_token: lookup("METRICS_TOKEN")
                .filter(|token| !token.is_empty())
                .map(SecretString::from),
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
        };
        // A budget smaller than one body of the largest kind would refuse every such request.
        let largest_body = config.completions_body_limit();
        if config.connections.max_inflight_body_bytes < largest_body {
            return Err(ConfigError::new(
                "MAX_INFLIGHT_BODY_BYTES",
                format!(
                    "{} is below the largest request body, {largest_body} bytes (of \
                     /v1/chat/completions, from MAX_BODY_BYTES, MAX_MESSAGE_CHARS and \
                     CONTEXT_MAX_CHARS)",
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
    /// The body limit of `/chat`: `MAX_BODY_BYTES`, raised where needed so that every
    /// message of up to `MAX_MESSAGE_CHARS` fits in any valid encoding.
    pub fn chat_body_limit(&self) -> usize {
        let longest_valid =
            self.max_message_chars * MAX_ENCODED_BYTES_PER_CHAR + CHAT_BODY_OVERHEAD_BYTES;
        self.max_body_bytes.max(longest_valid)
    }

    /// The body limit of `/v1/chat/completions`: room for a whole conversation of a message
    /// and its context in any valid encoding, with the fields around each message.
    pub fn completions_body_limit(&self) -> usize {
        let chars = self.max_message_chars + self.context_max_chars;
        let longest_valid = chars * MAX_ENCODED_BYTES_PER_CHAR + 16 * CHAT_BODY_OVERHEAD_BYTES;
        self.max_body_bytes.max(longest_valid)
    }
}

impl ConfigError {
    fn new(variable: &'static str, reason: String) -> Self {
        Self { variable, reason }
    }
}

struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    fn optional(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|value| !value.trim().is_empty())
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.optional(name).unwrap_or_else(|| default.to_string())
    }

    fn parse<T>(&self, name: &'static str, default: &str) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        let raw = self.string(name, default);
        raw.trim()
            .parse()
            .map_err(|err| ConfigError::new(name, format!("{raw:?} ({err})")))
    }

    fn between<T>(
        &self,
        name: &'static str,
        default: &str,
        minimum: T,
        maximum: T,
    ) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display,
        T::Err: fmt::Display,
    {
        let value: T = self.parse(name, default)?;
        if value < minimum {
            return Err(ConfigError::new(
                name,
                format!("{value} is below the minimum of {minimum}"),
            ));
        }
        if value > maximum {
            return Err(ConfigError::new(
                name,
                format!("{value} is above the maximum of {maximum}"),
            ));
        }
        Ok(value)
    }

    fn seconds(
        &self,
        name: &'static str,
        default: &str,
        minimum: u64,
        maximum: u64,
    ) -> Result<Duration, ConfigError> {
        self.between(name, default, minimum, maximum)
            .map(Duration::from_secs)
    }

    /// A count per period where 0 turns the limit off.
    fn limit(&self, name: &'static str, default: &str) -> Result<Option<u32>, ConfigError> {
        let value: u32 = self.parse(name, default)?;
        Ok((value > 0).then_some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = config(&[]).unwrap();
        assert_eq!(config.bind_addr.to_string(), "127.0.0.1:8000");
        assert_eq!(config.database_url.expose(), "sqlite://tokenchat.db");
        assert_eq!(config.llm_base_url, None, "empty: the built-in demo model");
        assert_eq!(config.llm_stream_idle, Duration::from_secs(30));
        assert_eq!(config.llm_stream_max, Duration::from_secs(600));
        assert_eq!(
            config.abandoned_stream_charge,
            AbandonedStreamCharge::Delivered
        );
        assert!(config.llm_api_key.is_none());
        assert_eq!(config.llm_model, "llama3.2");
        assert_eq!(config.llm_timeout, Duration::from_secs(60));
        assert_eq!(config.chat_cost, 100);
        assert_eq!(config.initial_tokens, 4000);
        assert_eq!(config.token_ttl, Some(Duration::from_secs(86400)));
        assert_eq!(config.max_message_chars, 8000);
        assert_eq!(config.max_body_bytes, 65536);
        assert_eq!(config.password_min_length, 6);
        assert_eq!(config.connections.max_inflight_body_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn env_example_lists_every_variable_with_its_default() {
        let example: Vec<(&str, &str)> = include_str!("../.env.example")
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| line.split_once('=').expect("KEY=value"))
            .collect();
        let names: Vec<&str> = example.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "BIND_ADDR",
                "DATABASE_URL",
                "DATABASE_MAX_CONNECTIONS",
                "DATABASE_STATEMENT_TIMEOUT_MS",
                "LLM_BASE_URL",
                "LLM_API_KEY",
                "LLM_MODEL",
                "LLM_MODELS",
                "LLM_SYSTEM_PROMPT",
                "LLM_TIMEOUT_SECS",
                "LLM_STREAM_IDLE_SECS",
                "LLM_STREAM_MAX_SECS",
                "ABANDONED_STREAM_CHARGE",
                "CHAT_COST",
                "INITIAL_TOKENS",
                "TOKEN_TTL_SECS",
                "MAX_MESSAGE_CHARS",
                "CONTEXT_MAX_CHARS",
                "MAX_BODY_BYTES",
                "PASSWORD_MIN_LENGTH",
                "IDEMPOTENCY_KEY_LIFETIME_SECS",
                "RUST_LOG",
                "LOG_SPAN_TIMINGS",
                "LOG_FORMAT",
                "METRICS_TOKEN",
                "HEADER_READ_TIMEOUT_SECS",
                "IDLE_TIMEOUT_SECS",
                "BODY_READ_TIMEOUT_SECS",
                "WRITE_STALL_TIMEOUT_SECS",
                "MAX_CONNECTIONS",
                "MAX_CONNECTIONS_PER_ADDRESS",
                "MAX_INFLIGHT_BODY_BYTES",
                "SHUTDOWN_GRACE_SECS",
                "LOGIN_ATTEMPTS_PER_MINUTE",
                "LOGIN_FAILURES_PER_USER_AND_ADDRESS",
                "LOGIN_FAILURES_PER_USER_AND_ADDRESS_WINDOW_SECS",
                "LOGIN_FAILURES_PER_USER",
                "LOGIN_FAILURES_PER_USER_WINDOW_SECS",
                "REGISTRATIONS_PER_HOUR",
                "REGISTRATION_OPEN",
                "CHAT_RATE_PER_MINUTE",
                "PASSWORD_CHANGES_PER_HOUR",
                "TRUST_PROXY_HEADERS",
                "PASSWORD_HASH_QUEUE",
            ]
        );
        let from_example = format!("{:?}", config(&example).unwrap());
        assert_eq!(from_example, format!("{:?}", config(&[]).unwrap()));
    }

    #[test]
    fn a_zero_per_address_cap_turns_it_off() {
        let limits = |value| {
            config(&[("MAX_CONNECTIONS_PER_ADDRESS", value)])
                .unwrap()
                .connections
                .max_connections_per_address
        };
        assert_eq!(limits("0"), None);
        assert_eq!(limits(""), Some(64));
        assert_eq!(limits("3"), Some(3));
    }

    #[test]
    fn a_zero_ttl_means_tokens_never_expire() {
        assert_eq!(config(&[("TOKEN_TTL_SECS", "0")]).unwrap().token_ttl, None);
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        for (name, value) in [
            ("BIND_ADDR", "nowhere"),
            ("DATABASE_URL", "mysql://localhost/db"),
            ("LLM_BASE_URL", "ftp://example.com"),
            ("LLM_BASE_URL", "not a url"),
            ("LLM_TIMEOUT_SECS", "soon"),
            ("LLM_TIMEOUT_SECS", "0"),
            ("LLM_STREAM_IDLE_SECS", "0"),
            ("LLM_STREAM_MAX_SECS", "0"),
            ("ABANDONED_STREAM_CHARGE", "sometimes"),
            ("CHAT_COST", "-5"),
            ("CHAT_COST", "0"),
            ("INITIAL_TOKENS", "lots"),
            ("TOKEN_TTL_SECS", "-1"),
            ("MAX_MESSAGE_CHARS", "1.5"),
            ("CONTEXT_MAX_CHARS", "-1"),
            ("MAX_BODY_BYTES", "big"),
            ("PASSWORD_MIN_LENGTH", "0"),
            ("RUST_LOG", "info,[[["),
            ("TOKEN_TTL_SECS", "999999999999"),
            ("LLM_TIMEOUT_SECS", "18446744073709551615"),
            ("CHAT_COST", "9223372036854775807"),
            ("INITIAL_TOKENS", "1000000000000000000"),
            ("HEADER_READ_TIMEOUT_SECS", "0"),
            ("IDLE_TIMEOUT_SECS", "never"),
            ("MAX_CONNECTIONS", "0"),
            ("WRITE_STALL_TIMEOUT_SECS", "0"),
            ("MAX_CONNECTIONS_PER_ADDRESS", "-1"),
            ("MAX_CONNECTIONS_PER_ADDRESS", "1000001"),
            ("MAX_INFLIGHT_BODY_BYTES", "lots"),
            ("MAX_INFLIGHT_BODY_BYTES", "0"),
            ("MAX_INFLIGHT_BODY_BYTES", "65536"),
            ("SHUTDOWN_GRACE_SECS", "99999999"),
            ("REGISTRATION_OPEN", "maybe"),
            ("CHAT_RATE_PER_MINUTE", "-1"),
            ("PASSWORD_CHANGES_PER_HOUR", "many"),
            ("IDEMPOTENCY_KEY_LIFETIME_SECS", "0"),
            ("LOG_SPAN_TIMINGS", "sometimes"),
            ("LOG_FORMAT", "xml"),
            ("TRUST_PROXY_HEADERS", "yes please"),
        ] {
            let err = config(&[(name, value)]).expect_err(value);
            assert_eq!(err.variable, name);
            assert!(err.to_string().starts_with(&format!("invalid {name}: ")));
        }
    }

    #[test]
    fn postgres_urls_are_accepted_and_their_password_never_shows() {
        for url in [
            "postgres://tokenchat:hunter2-secret@127.0.0.1:5432/tokenchat",
            "postgresql://tokenchat:hunter2-secret@db.internal/tokenchat?sslmode=require",
        ] {
            let config = config(&[("DATABASE_URL", url)]).unwrap();
            assert_eq!(config.database_url.expose(), url);
            let shown = format!("{config:?}");
            assert!(!shown.contains("hunter2-secret"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
        let err = config(&[("DATABASE_URL", "mysql://root:hunter2-secret@localhost/db")])
            .expect_err("mysql");
        assert!(!err.to_string().contains("hunter2-secret"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_the_llm_key() {
        let config = config(&[("LLM_API_KEY", "sk-very-secret")]).unwrap();
        use secrecy::ExposeSecret;
        let key = config.llm_api_key.as_ref().unwrap();
        assert_eq!(key.expose_secret(), "sk-very-secret");
        assert!(!format!("{config:?}").contains("sk-very-secret"));
    }

    #[test]
    fn an_upstream_url_joins_paths_under_its_own_and_keeps_its_query() {
        let url = UpstreamUrl::parse("http://user:pw@127.0.0.1:8080/v1/?key=q").unwrap();
        assert_eq!(
            url.join("chat/completions").as_str(),
            "http://user:pw@127.0.0.1:8080/v1/chat/completions?key=q"
        );
        let bare = UpstreamUrl::parse("https://api.example.com").unwrap();
        assert_eq!(
            bare.join("models").as_str(),
            "https://api.example.com/models"
        );
    }

    #[test]
    fn an_upstream_url_is_shown_without_its_user_info_or_query() {
        let url = UpstreamUrl::parse("http://user:pw@127.0.0.1:8080/v1?key=q").unwrap();
        let shown = "http://<redacted>@127.0.0.1:8080/v1?<redacted>";
        assert_eq!(url.redacted(), shown);
        assert_eq!(url.to_string(), shown);
        assert_eq!(format!("{url:?}"), format!("{shown:?}"));
        let config = config(&[("LLM_BASE_URL", "http://user:pw@h/v1?key=q")]).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("pw") && !debug.contains("key=q"), "{debug}");
        let plain = UpstreamUrl::parse("http://127.0.0.1:11434/v1").unwrap();
        assert_eq!(plain.redacted(), "http://127.0.0.1:11434/v1");
        // A value that is not a URL is not repeated in the error either.
        let err = UpstreamUrl::parse("http//user:secret@host").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
