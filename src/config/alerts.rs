//! The alert webhook's settings: `ALERT_WEBHOOK_URL` (unset: alerts off), the secret that
//! signs each event (`ALERT_WEBHOOK_SECRET`, required with the URL) and the fractions spent
//! that raise one (`ALERT_THRESHOLDS`).

use std::fmt;

use reqwest::Url;
use secrecy::SecretString;

use super::{vars::Vars, ConfigError};

/// Where alerts go and how they are signed; `Debug` shows neither the secret nor more of
/// the URL than its origin (a webhook URL often carries a token in its path).
#[derive(Clone)]
pub struct AlertsConfig {
    pub url: Url,
    pub secret: SecretString,
    /// Ascending, each once.
    pub thresholds: Vec<Threshold>,
}

/// A fraction spent, in millionths: above 0, at most 1,000,000 (all of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Threshold(u32);

/// Millionths of the whole, the unit of a [`Threshold`].
pub const PPM: u32 = 1_000_000;

impl Threshold {
    pub fn ppm(self) -> u32 {
        self.0
    }

    /// The fraction, for an event's JSON (`0.8`).
    pub fn fraction(self) -> f64 {
        f64::from(self.0) / f64::from(PPM)
    }

    /// Whether `spent` of `of` has reached this fraction; exact, in integers.
    pub fn reached(self, spent: i64, of: i64) -> bool {
        of > 0 && i128::from(spent) * i128::from(PPM) >= i128::from(self.0) * i128::from(of)
    }
}

impl std::str::FromStr for Threshold {
    type Err = String;

    /// A decimal fraction in (0, 1], at most six decimals (`0.8`, `0.95`, `1`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (whole, decimals) = text.split_once('.').unwrap_or((text, ""));
        let digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
        if whole.is_empty() && decimals.is_empty()
            || !digits(whole)
            || !digits(decimals)
            || decimals.len() > 6
            || whole.len() > 1
        {
            return Err(format!(
                "{text:?} is not a fraction like 0.8 (at most six decimals)"
            ));
        }
        let whole: u32 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| format!("{text:?}"))?
        };
        let padded = format!("{decimals:0<6}");
        let part: u32 = padded.parse().map_err(|_| format!("{text:?}"))?;
        let ppm = whole * PPM + part;
        if ppm == 0 || ppm > PPM {
            return Err(format!("{text} is not above 0 and at most 1"));
        }
        Ok(Self(ppm))
    }
}

impl fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertsConfig")
            .field("url", &origin(&self.url))
            .field("secret", &self.secret)
            .field("thresholds", &self.thresholds)
            .finish()
    }
}

/// The URL's scheme, host and port only, for logs and `Debug`.
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The alert settings; `None` when `ALERT_WEBHOOK_URL` is unset or empty.
pub(super) fn read(vars: &Vars<'_>) -> Result<Option<AlertsConfig>, ConfigError> {
    let thresholds = read_thresholds(vars)?;
    let Some(raw) = vars.optional("ALERT_WEBHOOK_URL") else {
        return Ok(None);
    };
    // Never the value in the message: its path or query may be the receiver's secret.
    let url = Url::parse(raw.trim())
        .map_err(|err| ConfigError::new("ALERT_WEBHOOK_URL", format!("not a URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::new(
            "ALERT_WEBHOOK_URL",
            format!("unsupported scheme {:?}; use http or https", url.scheme()),
        ));
    }
    let Some(secret) = vars.optional("ALERT_WEBHOOK_SECRET") else {
        return Err(ConfigError::new(
            "ALERT_WEBHOOK_SECRET",
            "required when ALERT_WEBHOOK_URL is set: every event is signed with it",
        ));
    };
    Ok(Some(AlertsConfig {
        url,
        secret: SecretString::from(secret),
        thresholds,
    }))
}

/// `ALERT_THRESHOLDS`: comma-separated fractions, default `0.8`; sorted, repeats kept once.
fn read_thresholds(vars: &Vars<'_>) -> Result<Vec<Threshold>, ConfigError> {
    let raw = vars.string("ALERT_THRESHOLDS", "0.8");
    let mut thresholds = raw
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<Threshold>, String>>()
        .map_err(|reason| ConfigError::new("ALERT_THRESHOLDS", reason))?;
    thresholds.sort_unstable();
    thresholds.dedup();
    Ok(thresholds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_fractions_above_zero_up_to_one_in_millionths() {
        let ppm = |text: &str| text.parse::<Threshold>().map(Threshold::ppm);
        assert_eq!(ppm("0.8"), Ok(800_000));
        assert_eq!(ppm(" .95 "), Ok(950_000));
        assert_eq!(ppm("1"), Ok(1_000_000));
        assert_eq!(ppm("1.0"), Ok(1_000_000));
        assert_eq!(ppm("0.000001"), Ok(1));
        for bad in [
            "0",
            "0.0",
            "1.01",
            "2",
            "-0.5",
            "",
            ".",
            "0.8x",
            "80%",
            "0.0000001",
        ] {
            assert!(ppm(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_threshold_is_reached_exactly_at_its_fraction() {
        let eighty: Threshold = "0.8".parse().unwrap();
        assert!(!eighty.reached(799, 1000));
        assert!(eighty.reached(800, 1000));
        assert!(eighty.reached(1000, 1000));
        assert!(!eighty.reached(0, 0), "nothing to spend is never 80% spent");
        assert!(eighty.reached(i64::MAX, i64::MAX), "no overflow");
    }
}
