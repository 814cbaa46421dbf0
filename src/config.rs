//! Configuration: every environment variable of the contract, parsed and checked once at start.

use std::{fmt, net::SocketAddr, time::Duration};

use reqwest::Url;

pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful assistant. Answer clearly and concisely.";

/// Everything the server reads from its environment.
#[derive(Clone)]
pub struct Config {
    pub bind_addr: SocketAddr,
    pub database_url: String,
    pub llm_base_url: Url,
    pub llm_api_key: Option<String>,
    pub llm_model: String,
    pub llm_system_prompt: String,
    pub llm_timeout: Duration,
    pub chat_cost: i64,
    pub initial_tokens: i64,
    /// `None` when `TOKEN_TTL_SECS=0`: login tokens never expire.
    pub token_ttl: Option<Duration>,
    pub max_message_chars: usize,
    pub max_body_bytes: usize,
    pub password_min_length: usize,
    pub log_filter: String,
}

/// A variable whose value cannot be used; start-up stops with this one line.
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

impl Config {
    /// Reads the process environment (after `.env`, which `main` loads).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds a configuration from any variable source; unset and empty mean "use the default".
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars(&lookup);
        let llm_base_url: Url = vars.parse("LLM_BASE_URL", "http://127.0.0.1:11434/v1")?;
        if !matches!(llm_base_url.scheme(), "http" | "https") {
            return Err(ConfigError::new(
                "LLM_BASE_URL",
                format!(
                    "unsupported scheme {:?}; use http or https",
                    llm_base_url.scheme()
                ),
            ));
        }
        let database_url = vars.string("DATABASE_URL", "sqlite://tokenchat.db");
        if !database_url.starts_with("sqlite:") {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "unsupported database; use a sqlite:// URL".to_string(),
            ));
        }
        let log_filter = vars.string("RUST_LOG", "info");
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            return Err(ConfigError::new("RUST_LOG", err.to_string()));
        }
        let token_ttl_secs: u64 = vars.parse("TOKEN_TTL_SECS", "86400")?;
        Ok(Self {
            bind_addr: vars.parse("BIND_ADDR", "127.0.0.1:8000")?,
            database_url,
            llm_base_url,
            llm_api_key: lookup("LLM_API_KEY").filter(|key| !key.is_empty()),
            llm_model: vars.string("LLM_MODEL", "llama3.2"),
            llm_system_prompt: vars.string("LLM_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
            llm_timeout: Duration::from_secs(vars.at_least("LLM_TIMEOUT_SECS", "60", 1)?),
            chat_cost: vars.at_least("CHAT_COST", "100", 1)?,
            initial_tokens: vars.at_least("INITIAL_TOKENS", "4000", 0)?,
            token_ttl: (token_ttl_secs > 0).then(|| Duration::from_secs(token_ttl_secs)),
            max_message_chars: vars.at_least("MAX_MESSAGE_CHARS", "8000", 1)?,
            max_body_bytes: vars.at_least("MAX_BODY_BYTES", "65536", 1)?,
            password_min_length: vars.at_least("PASSWORD_MIN_LENGTH", "6", 1)?,
            log_filter,
        })
    }
}

impl ConfigError {
    fn new(variable: &'static str, reason: String) -> Self {
        Self { variable, reason }
    }
}

struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    fn string(&self, name: &str, default: &str) -> String {
        (self.0)(name)
            .filter(|value| !value.trim().is_empty())
            .unwrap_or_else(|| default.to_string())
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

    fn at_least<T>(&self, name: &'static str, default: &str, minimum: T) -> Result<T, ConfigError>
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
        Ok(value)
    }
}

/// Keeps the LLM key out of any `{:?}` that reaches a log.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("bind_addr", &self.bind_addr)
            .field("database_url", &self.database_url)
            .field("llm_base_url", &self.llm_base_url.as_str())
            .field(
                "llm_api_key",
                &self.llm_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("llm_model", &self.llm_model)
            .field("llm_system_prompt", &self.llm_system_prompt)
            .field("llm_timeout", &self.llm_timeout)
            .field("chat_cost", &self.chat_cost)
            .field("initial_tokens", &self.initial_tokens)
            .field("token_ttl", &self.token_ttl)
            .field("max_message_chars", &self.max_message_chars)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("password_min_length", &self.password_min_length)
            .field("log_filter", &self.log_filter)
            .finish()
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
        assert_eq!(config.database_url, "sqlite://tokenchat.db");
        assert_eq!(config.llm_base_url.as_str(), "http://127.0.0.1:11434/v1");
        assert_eq!(config.llm_api_key, None);
        assert_eq!(config.llm_model, "llama3.2");
        assert_eq!(config.llm_timeout, Duration::from_secs(60));
        assert_eq!(config.chat_cost, 100);
        assert_eq!(config.initial_tokens, 4000);
        assert_eq!(config.token_ttl, Some(Duration::from_secs(86400)));
        assert_eq!(config.max_message_chars, 8000);
        assert_eq!(config.max_body_bytes, 65536);
        assert_eq!(config.password_min_length, 6);
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
                "LLM_BASE_URL",
                "LLM_API_KEY",
                "LLM_MODEL",
                "LLM_SYSTEM_PROMPT",
                "LLM_TIMEOUT_SECS",
                "CHAT_COST",
                "INITIAL_TOKENS",
                "TOKEN_TTL_SECS",
                "MAX_MESSAGE_CHARS",
                "MAX_BODY_BYTES",
                "PASSWORD_MIN_LENGTH",
                "RUST_LOG",
            ]
        );
        let from_example = format!("{:?}", config(&example).unwrap());
        assert_eq!(from_example, format!("{:?}", config(&[]).unwrap()));
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
            ("CHAT_COST", "-5"),
            ("CHAT_COST", "0"),
            ("INITIAL_TOKENS", "lots"),
            ("TOKEN_TTL_SECS", "-1"),
            ("MAX_MESSAGE_CHARS", "1.5"),
            ("MAX_BODY_BYTES", "big"),
            ("PASSWORD_MIN_LENGTH", "0"),
            ("RUST_LOG", "info,[[["),
        ] {
            let err = config(&[(name, value)]).expect_err(value);
            assert_eq!(err.variable, name);
            assert!(err.to_string().starts_with(&format!("invalid {name}: ")));
        }
    }

    #[test]
    fn debug_output_never_shows_the_llm_key() {
        let config = config(&[("LLM_API_KEY", "sk-very-secret")]).unwrap();
        assert_eq!(config.llm_api_key.as_deref(), Some("sk-very-secret"));
        assert!(!format!("{config:?}").contains("sk-very-secret"));
    }
}
