//! The configuration file (`CONFIG_FILE`, TOML): one `[models."<name>"]` section per
//! priced or routed model (the price book, and the targets that serve it), and the
//! upstreams those targets name ([`upstreams`]). Every value is checked as it is read, so a
//! bad file stops start-up with one line naming the file, the line and the field.

mod error;
mod upstreams;

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Deserializer};

pub use self::error::FileError;
use self::error::Place;
pub use self::upstreams::Context;
use self::upstreams::{TargetEntry, UpstreamEntry};
use super::routing::{TargetConfig, UpstreamConfig, MAX_TARGETS, SHORTHAND_UPSTREAM};
use crate::{
    domain::MAX_BALANCE,
    pricing::{ModelPricing, PriceBook, Prices, Tokenizer},
};

/// The file read when `CONFIG_FILE` is unset, if it exists in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "tokenchat.toml";

/// The longest answer a model entry may name as its `max_output_tokens`.
const MAX_OUTPUT_TOKENS_CEILING: u64 = 100_000_000;
/// `max_output_tokens` when an entry names none.
const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;
/// Prompt tokens reserved for each image, audio or file part when an entry names no
/// `media_part_tokens`: above what OpenAI's models count for one high-detail image.
const DEFAULT_MEDIA_PART_TOKENS: u64 = 2048;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    models: BTreeMap<String, toml::Spanned<ModelEntry>>,
    #[serde(default)]
    upstreams: BTreeMap<String, toml::Spanned<UpstreamEntry>>,
}

/// What a configuration file says: the price book, the upstreams it names, and the
/// targets of each model it routes.
#[derive(Default)]
pub struct ConfigFile {
    pub price_book: PriceBook,
    pub upstreams: Vec<UpstreamConfig>,
    /// Each routed model's targets, by served name.
    pub targets: BTreeMap<String, Vec<TargetConfig>>,
}

/// One `[models."<name>"]` section as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    prompt: Option<Amount>,
    cached_prompt: Option<Amount>,
    completion: Option<Amount>,
    request: Option<Amount>,
    max_output_tokens: Option<OutputTokens>,
    /// `o200k_base`, `cl100k_base` or `bytes`; by default OpenAI's encoding of a model it
    /// knows by name, else `bytes`.
    tokenizer: Option<TokenizerName>,
    media_part_tokens: Option<Amount>,
    /// The upstreams that serve it (the several-upstreams configuration).
    targets: Option<Vec<toml::Spanned<TargetEntry>>>,
}

/// A whole number from 0 to the largest balance.
#[derive(Clone, Copy)]
struct Amount(u64);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        match u64::try_from(value) {
            Ok(amount) if value <= MAX_BALANCE => Ok(Self(amount)),
            _ => Err(serde::de::Error::custom(format!(
                "{value} is not a whole number from 0 to {MAX_BALANCE}"
            ))),
        }
    }
}

/// A `max_output_tokens`: from 1 to [`MAX_OUTPUT_TOKENS_CEILING`].
#[derive(Clone, Copy)]
struct OutputTokens(u64);

impl<'de> Deserialize<'de> for OutputTokens {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        match u64::try_from(value) {
            Ok(tokens @ 1..=MAX_OUTPUT_TOKENS_CEILING) => Ok(Self(tokens)),
            _ => Err(serde::de::Error::custom(format!(
                "{value} is not a whole number from 1 to {MAX_OUTPUT_TOKENS_CEILING}"
            ))),
        }
    }
}

struct TokenizerName(Tokenizer);

impl<'de> Deserialize<'de> for TokenizerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map(Self).map_err(|_| {
            serde::de::Error::custom(format!(
                "{name:?} is not a tokenizer; use o200k_base, cl100k_base or bytes"
            ))
        })
    }
}

/// Reads the configuration file at `path`.
pub fn read(path: &Path, context: &Context<'_>) -> Result<ConfigFile, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| FileError {
        file: shown.clone(),
        line: None,
        field: None,
        message: format!("cannot be read ({err})"),
    })?;
    parse(&shown, &text, context)
}

/// Parses the text of a configuration file named `file`.
pub fn parse(file: &str, text: &str, context: &Context<'_>) -> Result<ConfigFile, FileError> {
    let parsed: File = toml::from_str(text).map_err(|err| {
        let start = err.span().map(|span| span.start);
        FileError {
            file: file.to_string(),
            line: start.map(|start| line_of(text, start)),
            field: field_named(err.message()).or_else(|| start.and_then(|at| key_at(text, at))),
            message: first_line(err.message()),
        }
    })?;
    let mut upstreams = Vec::with_capacity(parsed.upstreams.len());
    for (name, entry) in parsed.upstreams {
        let at = Place {
            file,
            line: line_of(text, entry.span().start),
        };
        upstreams.push(entry.into_inner().check(&name, &at, context)?);
    }
    let known = |name: &str| {
        (name == SHORTHAND_UPSTREAM && context.shorthand_upstream)
            || upstreams.iter().any(|upstream| upstream.name == name)
    };
    let routed = parsed
        .models
        .values()
        .any(|entry| entry.get_ref().targets.is_some());
    let mut models = BTreeMap::new();
    let mut targets = BTreeMap::new();
    for (name, entry) in parsed.models {
        let span = entry.span();
        let mut entry = entry.into_inner();
        let at = Place {
            file,
            line: line_of(text, span.start),
        };
        match entry.targets.take() {
            Some(written) if written.is_empty() => {
                return Err(at.error(format!("models.{name:?}.targets"), "lists no target"))
            }
            Some(written) if written.len() > MAX_TARGETS => {
                return Err(at.error(
                    format!("models.{name:?}.targets"),
                    format!("lists more than {MAX_TARGETS} targets"),
                ))
            }
            Some(written) => {
                let mut checked = Vec::with_capacity(written.len());
                for (index, target) in written.into_iter().enumerate() {
                    let at = Place {
                        file,
                        line: line_of(text, target.span().start),
                    };
                    checked.push(target.into_inner().check(&name, index, &at, &known)?);
                }
                targets.insert(name.clone(), checked);
            }
            // With no `LLM_BASE_URL`, a routed file's models are served only by targets.
            None if routed && !context.shorthand_upstream => {
                return Err(at.error(
                    format!("models.{name:?}"),
                    "has no targets, and no LLM_BASE_URL serves it",
                ))
            }
            None => {}
        }
        let priced = [
            entry.prompt,
            entry.cached_prompt,
            entry.completion,
            entry.request,
        ]
        .iter()
        .any(Option::is_some);
        if !priced && !targets.contains_key(&name) {
            return Err(at.error(
                format!("models.{name:?}"),
                "a model entry needs prompt, completion or request, or targets",
            ));
        }
        if !priced {
            // Routed, not priced: its chats cost `CHAT_COST`, so what only prices use would
            // be read and ignored; refused instead.
            let unused = [
                ("max_output_tokens", entry.max_output_tokens.is_some()),
                ("tokenizer", entry.tokenizer.is_some()),
                ("media_part_tokens", entry.media_part_tokens.is_some()),
            ];
            if let Some((field, _)) = unused.iter().find(|(_, given)| *given) {
                return Err(at.error(
                    format!("models.{name:?}.{field}"),
                    "is used only with prices: give prompt, completion or request too",
                ));
            }
            continue;
        }
        let prompt = entry.prompt.map_or(0, |amount| amount.0);
        let prices = Prices {
            prompt,
            cached_prompt: entry.cached_prompt.map_or(prompt, |amount| amount.0),
            completion: entry.completion.map_or(0, |amount| amount.0),
            request: entry.request.map_or(0, |amount| amount.0),
            max_output_tokens: entry
                .max_output_tokens
                .map_or(DEFAULT_MAX_OUTPUT_TOKENS, |tokens| tokens.0),
        };
        let pricing = ModelPricing {
            prices,
            tokenizer: entry
                .tokenizer
                .map_or_else(|| Tokenizer::for_model(&name), |name| name.0),
            media_part_tokens: entry
                .media_part_tokens
                .map_or(DEFAULT_MEDIA_PART_TOKENS, |tokens| tokens.0),
        };
        models.insert(name, pricing);
    }
    Ok(ConfigFile {
        price_book: PriceBook::new(models),
        upstreams,
        targets,
    })
}

/// The 1-based line of the byte `at` of `text`.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The field a serde message names in backticks (`missing field `completion``).
fn field_named(message: &str) -> Option<String> {
    let field = message.split('`').nth(1)?;
    (message.contains("field") && !field.is_empty()).then(|| field.to_string())
}

/// The key written on the line holding the byte `at`: what comes before its `=`, or the
/// table a `[header]` opens.
fn key_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |newline| newline + 1);
    // A value within an inline table (`targets = [{ weight = 0 }]`): the key right before it.
    if let Some((before, _)) = text
        .get(start..at)
        .and_then(|prefix| prefix.rsplit_once('='))
    {
        let key = before
            .rsplit(|c: char| c.is_whitespace() || matches!(c, '{' | ',' | '['))
            .find(|part| !part.is_empty());
        if let Some(key) = key {
            return Some(key.to_string());
        }
    }
    let line = text[start..].lines().next().unwrap_or("").trim();
    let key = match line.split_once('=') {
        Some((key, _)) => key.trim(),
        None => line.trim_start_matches('[').trim_end_matches(']').trim(),
    };
    (!key.is_empty()).then(|| key.to_string())
}

/// The message up to its first line break (toml's messages can quote the source below).
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

#[cfg(test)]
mod tests;
