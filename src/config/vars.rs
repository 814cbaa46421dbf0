//! Reading the environment: each variable as a string, a parsed value, a number within
//! bounds, a duration or a limit that 0 turns off, with the error naming the variable.

use std::{fmt, time::Duration};

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
