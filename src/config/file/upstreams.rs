//! The configuration file's `[upstreams.<name>]` sections and the `targets` of its models,
//! as written, and their checks: a URL that parses, a key variable that is set, headers
//! that are headers (and hold no credentials), targets that name a known upstream.

use std::{collections::BTreeMap, time::Duration};

use http::{HeaderName, HeaderValue};
use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

use super::error::{FileError, Place};
use crate::config::{
    names_a_credential,
    routing::{TargetConfig, UpstreamConfig, SHORTHAND_UPSTREAM},
    UpstreamUrl,
};

/// One `[upstreams.<name>]` section as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamEntry {
    base_url: String,
    /// The name of the environment variable that holds its key: never the key itself.
    api_key_env: Option<String>,
    timeout_secs: Option<Bounded<1, 3600>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    max_concurrent: Option<Bounded<1, 1_000_000>>,
}

/// One element of a model's `targets` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TargetEntry {
    upstream: String,
    /// The model's name there; by default the served name.
    model: Option<String>,
    weight: Option<Bounded<1, 1_000_000>>,
    priority: Option<Bounded<0, 1_000>>,
}

/// A whole number from `MIN` to `MAX`.
#[derive(Clone, Copy)]
pub(super) struct Bounded<const MIN: u64, const MAX: u64>(u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        match u64::try_from(value) {
            Ok(number) if (MIN..=MAX).contains(&number) => Ok(Self(number)),
            _ => Err(serde::de::Error::custom(format!(
                "{value} is not a whole number from {MIN} to {MAX}"
            ))),
        }
    }
}

/// The key in the environment variable `variable` names, or why there is none. The name is
/// repeated only when it looks like one (capitals, digits and `_`): a key written here by
/// mistake must not reach the log of a failed start.
fn read_key(variable: &str, context: &Context<'_>) -> Result<SecretString, String> {
    let conventional = !variable.is_empty()
        && variable
            .bytes()
            .all(|byte| byte.is_ascii_uppercase() || byte.is_ascii_digit() || byte == b'_');
    let is_name = !variable.is_empty()
        && !variable.starts_with(|first: char| first.is_ascii_digit())
        && variable
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
    if !is_name {
        return Err(
            "is not the name of an environment variable (the file names the variable \
                    that holds the key, never the key)"
                .into(),
        );
    }
    let shown = if conventional { variable } else { "it names" };
    let key = (context.lookup)(variable).filter(|key| !key.is_empty());
    let key = key.ok_or_else(|| format!("the environment variable {shown} is not set"))?;
    crate::config::vars::secret(key)
        .map_err(|reason| format!("the environment variable {shown} {reason}"))
}

/// Headers an upstream entry may not set: tokenchat's own, and credentials, which belong
/// in the variable `api_key_env` names rather than in the file.
const OWNED_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "content-type",
    "content-length",
    "host",
];

/// Whether the file may not set the header `name` (lower case, as `HeaderName` keeps it).
fn is_owned_or_a_credential(name: &str) -> bool {
    OWNED_HEADERS.contains(&name) || names_a_credential(name)
}

/// What reading the file needs from outside it: the environment (for key variables) and
/// whether `LLM_BASE_URL` makes an upstream named [`SHORTHAND_UPSTREAM`].
pub struct Context<'a> {
    pub lookup: &'a dyn Fn(&str) -> Option<String>,
    pub shorthand_upstream: bool,
}

impl UpstreamEntry {
    /// The upstream `name`, checked, with its key read from the environment.
    pub(super) fn check(
        self,
        name: &str,
        at: &Place<'_>,
        context: &Context<'_>,
    ) -> Result<UpstreamConfig, FileError> {
        let field = |part: &str| format!("upstreams.{name}.{part}");
        if name == SHORTHAND_UPSTREAM && context.shorthand_upstream {
            return Err(at.error(
                format!("upstreams.{name}"),
                "the name default is LLM_BASE_URL's upstream; choose another",
            ));
        }
        let base_url = UpstreamUrl::parse(&self.base_url)
            .map_err(|err| at.error(field("base_url"), err.reason))?;
        let api_key = match self.api_key_env {
            None => None,
            Some(variable) => Some(
                read_key(&variable, context)
                    .map_err(|reason| at.error(field("api_key_env"), reason))?,
            ),
        };
        if api_key.is_some() && base_url.has_user_info() {
            return Err(at.error(
                field("api_key_env"),
                "base_url carries a user name too, and both would be sent as Authorization; \
                 keep one",
            ));
        }
        let mut headers = Vec::with_capacity(self.headers.len());
        for (header, value) in self.headers {
            let header_name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| at.error(field("headers"), format!("{header:?} is not a header")))?;
            if is_owned_or_a_credential(header_name.as_str()) {
                return Err(at.error(
                    field("headers"),
                    format!(
                        "{header} is not set from the file (a key goes in the variable \
                         api_key_env names)"
                    ),
                ));
            }
            let value = HeaderValue::from_str(&value).map_err(|_| {
                at.error(
                    field("headers"),
                    format!("the value of {header} is not a header value"),
                )
            })?;
            headers.push((header_name, value));
        }
        Ok(UpstreamConfig {
            name: name.to_string(),
            base_url,
            api_key,
            timeout: self.timeout_secs.map(|secs| Duration::from_secs(secs.0)),
            headers,
            max_concurrent: self.max_concurrent.map(|most| most.0 as usize),
        })
    }
}

impl TargetEntry {
    /// The target of the served model `model`, whose upstream must be one of `known`.
    pub(super) fn check(
        self,
        model: &str,
        index: usize,
        at: &Place<'_>,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<TargetConfig, FileError> {
        if !known(&self.upstream) {
            return Err(at.error(
                format!("models.{model:?}.targets[{index}].upstream"),
                format!("no upstream is named {:?}", self.upstream),
            ));
        }
        Ok(TargetConfig {
            upstream: self.upstream,
            model: self.model.unwrap_or_else(|| model.to_string()),
            weight: self.weight.map_or(1, |weight| weight.0 as u32),
            priority: self.priority.map_or(0, |priority| priority.0 as u32),
        })
    }
}
