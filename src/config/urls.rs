//! The URLs of the configuration that may hold secrets (`DATABASE_URL`'s password,
//! `LLM_BASE_URL`'s user info and query), shown redacted everywhere but where they are used.

use std::fmt;

use reqwest::Url;

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
        let scheme = self.0.split(':').next().unwrap_or_default();
        // Unreadable, or read as a URL with no user info though it holds an `@`
        // (`postgres:/user:pw@host`): it may still hold a secret, so only a scheme is shown.
        let hidden = || match scheme.bytes().all(|byte| byte.is_ascii_alphabetic()) {
            true if !scheme.is_empty() => format!("{scheme}:<redacted>"),
            _ => "<redacted>".to_string(),
        };
        let Ok(mut url) = Url::parse(&self.0) else {
            return hidden();
        };
        let is_password = |name: &str| name.to_ascii_lowercase().ends_with("password");
        let in_query = url.query_pairs().any(|(name, _)| is_password(&name));
        if url.password().is_none() && url.username().is_empty() && self.0.contains('@') {
            return hidden();
        }
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
            .replace("=REDACTED", "=<redacted>")
    }

    /// Whether it is an SQLite database that lives only as long as a connection
    /// (`sqlite::memory:`, `sqlite://` with no file, `mode=memory`, `vfs=memdb`): each
    /// connection of the pool would have its own, and every balance would be gone at exit.
    pub fn is_sqlite_in_memory(&self) -> bool {
        if crate::db::Backend::of_url(&self.0) != Some(crate::db::Backend::Sqlite) {
            return false;
        }
        // Read as sqlx reads it (`SqliteConnectOptions::from_str`), which says no more.
        let rest = self
            .0
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
        let params: Vec<(String, String)> = serde_urlencoded::from_str(params).unwrap_or_default();
        database.is_empty()
            || database == ":memory:"
            || params.iter().any(|(name, value)| {
                (name == "mode" && value == "memory") || (name == "vfs" && value == "memdb")
            })
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

/// What a header's or query parameter's name holds when its value is a credential:
/// `X-Api-Key`, `Api-Key`, `X-Goog-Api-Key`, `Ocp-Apim-Subscription-Key`, `X-Auth-Token`,
/// `Cookie`; `?key=`, `?api_key=`, `?sig=`, `?client_secret=`, `?password=`.
const CREDENTIAL_NAMES: [&str; 7] = ["auth", "key", "token", "secret", "pass", "sig", "cookie"];

/// Whether a header or query parameter of this name (any case) carries a credential.
pub fn names_a_credential(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    CREDENTIAL_NAMES.iter().any(|part| name.contains(part))
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
