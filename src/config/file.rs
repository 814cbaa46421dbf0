//! The configuration file (`CONFIG_FILE`, TOML): the price book, one `[models."<name>"]`
//! section per priced model. Every value is checked as it is read, so a bad file stops
//! start-up with one line naming the file, the line and the field.

use std::{collections::BTreeMap, fmt, path::Path};

use serde::{Deserialize, Deserializer};

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

/// Why a configuration file cannot be used, in one line: the file, the line and the field.
#[derive(Debug, PartialEq, Eq)]
pub struct FileError {
    pub file: String,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads the price book from `path`.
pub fn read(path: &Path) -> Result<PriceBook, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| FileError {
        file: shown.clone(),
        line: None,
        field: None,
        message: format!("cannot be read ({err})"),
    })?;
    parse(&shown, &text)
}

/// Parses the text of a configuration file named `file`.
pub fn parse(file: &str, text: &str) -> Result<PriceBook, FileError> {
    let parsed: File = toml::from_str(text).map_err(|err| {
        let start = err.span().map(|span| span.start);
        FileError {
            file: file.to_string(),
            line: start.map(|start| line_of(text, start)),
            field: field_named(err.message()).or_else(|| start.and_then(|at| key_at(text, at))),
            message: first_line(err.message()),
        }
    })?;
    let mut models = BTreeMap::new();
    for (name, entry) in parsed.models {
        let span = entry.span();
        let entry = entry.into_inner();
        let priced = [
            entry.prompt,
            entry.cached_prompt,
            entry.completion,
            entry.request,
        ]
        .iter()
        .any(Option::is_some);
        if !priced {
            return Err(FileError {
                file: file.to_string(),
                line: Some(line_of(text, span.start)),
                field: Some(format!("models.{name:?}")),
                message: "a priced model needs prompt, completion or request".into(),
            });
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
    Ok(PriceBook::new(models))
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
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse("tokenchat.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn a_book_is_read_with_its_defaults() {
        let book = parse(
            "t.toml",
            "[models.\"gpt-4o-mini\"]\nprompt = 150\ncompletion = 600\nrequest = 1\nmax_output_tokens = 4096\n\n[models.local]\ncompletion = 400\n",
        )
        .unwrap();
        let mini = book.model("gpt-4o-mini").unwrap();
        assert_eq!(
            mini.prices,
            Prices {
                prompt: 150,
                cached_prompt: 150,
                completion: 600,
                request: 1,
                max_output_tokens: 4096
            }
        );
        assert_eq!(mini.tokenizer, Tokenizer::O200kBase);
        let local = book.model("local").unwrap();
        assert_eq!(local.prices.prompt, 0);
        assert_eq!(local.prices.max_output_tokens, DEFAULT_MAX_OUTPUT_TOKENS);
        assert_eq!(local.tokenizer, Tokenizer::Bytes);
        assert!(book.model("other").is_none());
        assert!(parse("t.toml", "").unwrap().is_empty());
    }

    #[test]
    fn a_bad_file_is_refused_naming_its_file_line_and_field() {
        let bad_type = error("[models.a]\nprompt = 1\ncompletion = \"six\"\n");
        assert!(
            bad_type.starts_with("tokenchat.toml, line 3, field completion: "),
            "{bad_type}"
        );
        let negative = error("[models.a]\n\nprompt = -1\n");
        assert!(
            negative.starts_with("tokenchat.toml, line 3, field prompt: "),
            "{negative}"
        );
        let unknown = error("[models.a]\nprompt = 1\ncompletoin = 2\n");
        assert!(
            unknown.starts_with("tokenchat.toml, line 3, field completoin: "),
            "{unknown}"
        );
        let zero_cap = error("[models.a]\nprompt = 1\nmax_output_tokens = 0\n");
        assert!(
            zero_cap.starts_with("tokenchat.toml, line 3, field max_output_tokens: "),
            "{zero_cap}"
        );
        let tokenizer = error("[models.a]\nprompt = 1\ntokenizer = \"gpt2\"\n");
        assert!(
            tokenizer.starts_with("tokenchat.toml, line 3, field tokenizer: "),
            "{tokenizer}"
        );
        let unpriced = error("[models.a]\nmax_output_tokens = 10\n");
        assert!(
            unpriced.starts_with("tokenchat.toml, line 1, field models.\"a\": "),
            "{unpriced}"
        );
        let syntax = error("[models.a]\nprompt = = 1\n");
        assert!(syntax.starts_with("tokenchat.toml, line 2"), "{syntax}");
        let top = error("[prices]\nx = 1\n");
        assert!(top.contains("field prices"), "{top}");
    }
}
