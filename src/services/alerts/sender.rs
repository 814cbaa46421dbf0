//! Posting one alert event to the webhook: the body signed with HMAC-SHA256 under the
//! secret (`X-Tokenchat-Signature: sha256=<hex>`), retried with exponential back-off and
//! jitter a bounded number of times, each attempt bounded by time-outs.

use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use reqwest::{header, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::{config::alerts::origin, telemetry::Metrics};

/// Attempts per event at most, the first included.
pub(super) const MAX_ATTEMPTS: u32 = 5;
/// The wait before the second attempt; it doubles after each failure, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One attempt's time limits: to connect, and in all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-tokenchat-signature";

/// The receiver and how to reach and sign for it.
pub(super) struct Webhook {
    client: reqwest::Client,
    url: Url,
    secret: SecretString,
    metrics: Metrics,
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    /// Worth another try (no answer, a time-out, a 5xx, 408 or 429); what went wrong.
    Retry(String),
    /// The receiver refused it (another 4xx): trying again would change nothing.
    Refused(StatusCode),
}

impl Webhook {
    pub(super) fn new(url: Url, secret: SecretString, metrics: Metrics) -> reqwest::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ATTEMPT_TIMEOUT)
            // A redirect would send the signed body somewhere the operator did not name.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokenchat/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            url,
            secret,
            metrics,
        })
    }

    /// Posts the event `id` (`body`, its JSON) until the receiver takes it, refuses it, or
    /// [`MAX_ATTEMPTS`] failed; logs and counts the outcome.
    pub(super) async fn deliver(&self, id: i64, body: Vec<u8>) {
        let signature = sign(self.secret.expose_secret().as_bytes(), &body);
        let receiver = origin(&self.url);
        for attempt in 1..=MAX_ATTEMPTS {
            match self.attempt(&body, &signature).await {
                Attempt::Delivered => {
                    tracing::info!(alert_id = id, attempt, "alert delivered");
                    self.metrics.alert("sent");
                    return;
                }
                Attempt::Refused(status) => {
                    tracing::warn!(alert_id = id, %receiver, status = status.as_u16(), "the alert webhook refused an alert; not retried");
                    break;
                }
                Attempt::Retry(reason) if attempt < MAX_ATTEMPTS => {
                    let wait = backoff(attempt);
                    tracing::info!(alert_id = id, %receiver, attempt, %reason, wait_ms = wait.as_millis() as u64, "alert not delivered; retrying");
                    tokio::time::sleep(wait).await;
                }
                Attempt::Retry(reason) => {
                    tracing::warn!(alert_id = id, %receiver, attempts = attempt, %reason, "alert not delivered; giving up");
                }
            }
        }
        self.metrics.alert("failed");
    }

    async fn attempt(&self, body: &[u8], signature: &str) -> Attempt {
        let sent = self
            .client
            .post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(answer) if answer.status().is_success() => Attempt::Delivered,
            Ok(answer) => {
                let status = answer.status();
                let transient = status.is_server_error()
                    || status == StatusCode::REQUEST_TIMEOUT
                    || status == StatusCode::TOO_MANY_REQUESTS;
                if transient {
                    Attempt::Retry(format!("status {}", status.as_u16()))
                } else {
                    Attempt::Refused(status)
                }
            }
            // Without the URL: its path or query may be the receiver's secret.
            Err(err) => Attempt::Retry(err.without_url().to_string()),
        }
    }
}

/// `sha256=` and the lowercase hex HMAC-SHA256 of `body` under `secret`: the header's value.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={:x}", mac.finalize().into_bytes())
}

/// The wait after failed attempt `attempt` (1-based): the doubling step, half of it fixed
/// and half random ("equal jitter"), so many instances failing at once do not retry in step.
fn backoff(attempt: u32) -> Duration {
    let step = FIRST_BACKOFF
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(MAX_BACKOFF);
    let half = step / 2;
    half + half.mul_f64(rand::thread_rng().gen::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256_in_lowercase_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn back_off_doubles_with_jitter_up_to_its_ceiling() {
        for attempt in 1..=MAX_ATTEMPTS + 20 {
            let step = FIRST_BACKOFF
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            let wait = backoff(attempt);
            assert!(wait >= step / 2 && wait <= step, "{attempt}: {wait:?}");
        }
        assert!(backoff(3) >= Duration::from_secs(1));
    }
}
