//! Reading the environment: each variable as a string, a parsed value, a number within
//! bounds, a duration or a limit that 0 turns off, with the error naming the variable.

use std::{fmt, time::Duration};

use secrecy::SecretString;

use super::ConfigError;

pub(super) struct Vars<'a>(pub(super) &'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    pub(super) fn optional(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|value| !value.trim().is_empty())
    }

    pub(super) fn string(&self, name: &str, default: &str) -> String {
        self.optional(name).unwrap_or_else(|| default.to_string())
    }

    pub(super) fn parse<T>(&self, name: &'static str, default: &str) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        let raw = self.string(name, default);
        raw.trim()
            .parse()
            .map_err(|err| ConfigError::new(name, format!("{raw:?} ({err})")))
    }

    pub(super) fn between<T>(
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

    pub(super) fn seconds(
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
    pub(super) fn limit(
        &self,
        name: &'static str,
        default: &str,
    ) -> Result<Option<u32>, ConfigError> {
        let value: u32 = self.parse(name, default)?;
        Ok((value > 0).then_some(value))
    }
}

/// A key or token as a header will carry it, or why it cannot be one; the reason never
/// repeats it. White space at either end (which HTTP strips, so it could never match) and
/// control characters (the line break `echo` leaves) are refused rather than sent.
pub(super) fn secret(value: String) -> Result<SecretString, &'static str> {
    if value.trim() != value {
        return Err("has white space at its start or end; remove it");
    }
    if value.chars().any(char::is_control) {
        return Err("holds a control character (a line break?); remove it");
    }
    Ok(SecretString::from(value))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_secret_with_white_space_around_it_or_a_line_break_in_it_is_refused() {
        assert!(super::secret("sk-live-123".into()).is_ok());
        for bad in ["sk-live-123\n", " sk-live-123", "sk-live-123 ", "sk-\tlive"] {
            assert!(super::secret(bad.into()).is_err(), "{bad:?}");
        }
    }
}
