//! The URLs of the configuration that may hold secrets (`DATABASE_URL`'s password,
//! `LLM_BASE_URL`'s user info and query), shown redacted everywhere but where they are used.

use std::{fmt, str::FromStr};

use reqwest::Url;
use sqlx::sqlite::SqliteConnectOptions;

use super::ConfigError;

/// `DATABASE_URL`, which may hold a password: `Debug` shows it with the password masked,
/// and only [`DatabaseUrl::expose`] gives the whole of it, to the database driver.
#[derive(Clone)]
pub struct DatabaseUrl(pub(super) String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password (its user info's, or a `password` or `sslpassword` in its
    /// query, as PostgreSQL takes them) replaced by `<redacted>`, for logs and messages.
    pub fn redacted(&self) -> String {
        let Ok(mut url) = Url::parse(&self.0) else {
            // Unparsable: it may still hold a secret somewhere, so show only its scheme.
            return format!(
                "{}:<redacted>",
                self.0.split(':').next().unwrap_or_default()
            );
        };
        let is_password = |name: &str| name.to_ascii_lowercase().ends_with("password");
        let in_query = url.query_pairs().any(|(name, _)| is_password(&name));
        if url.password().is_none() && !in_query {
            return self.0.clone();
        }
        // The URL type would percent-encode `<redacted>`; mark it plainly and swap.
        if url.password().is_some() {
            let _ = url.set_password(Some("REDACTED"));
        }
        if in_query {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(name, value)| {
                    let value = if is_password(&name) {
                        "REDACTED".into()
                    } else {
                        value
                    };
                    (name.into_owned(), value.into_owned())
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string()
            .replacen(":REDACTED@", ":<redacted>@", 1)
            .replace("password=REDACTED", "password=<redacted>")
    }

    /// Whether it is an SQLite database that lives only as long as a connection
    /// (`sqlite::memory:`, `sqlite://` with no file, `mode=memory`): each connection of the
    /// pool would have its own, and every balance would be gone at exit.
    pub fn is_sqlite_in_memory(&self) -> bool {
        let Ok(options) = SqliteConnectOptions::from_str(&self.0) else {
            return false;
        };
        let url = self.0.to_ascii_lowercase();
        options.get_filename().as_os_str().is_empty()
            || url.contains(":memory:")
            || url.contains("mode=memory")
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

    /// Whether it carries a user name or password, which are sent as basic authentication.
    pub fn has_user_info(&self) -> bool {
        !self.0.username().is_empty() || self.0.password().is_some()
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
