//! TLS to PostgreSQL when neither the URL nor `PGSSLMODE` says: libpq's `prefer` for a
//! server elsewhere, plain on the same machine (a loopback address or a socket), where
//! encrypting buys nothing and cost 7 to 14% of the requests a second (BENCHMARKS.md,
//! session 43).

use std::net::IpAddr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// `options` (read from `url`) with `sslmode=disable` for a local server, when nothing said
/// which mode to use.
pub(super) fn with_default_sslmode(url: &str, options: PgConnectOptions) -> PgConnectOptions {
    let said = std::env::var_os("PGSSLMODE").is_some() || names_sslmode(url);
    if said || !is_local(&options) {
        return options;
    }
    options.ssl_mode(PgSslMode::Disable)
}

/// Whether `url`'s query sets `sslmode` (or sqlx's `ssl-mode`).
fn names_sslmode(url: &str) -> bool {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    query.split('&').any(|pair| {
        let name = pair.split('=').next().unwrap_or_default();
        name.eq_ignore_ascii_case("sslmode") || name.eq_ignore_ascii_case("ssl-mode")
    })
}

fn is_local(options: &PgConnectOptions) -> bool {
    let host = options
        .get_host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    options.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn mode(url: &str) -> PgSslMode {
        let options = PgConnectOptions::from_str(url).unwrap();
        with_default_sslmode(url, options).get_ssl_mode()
    }

    #[test]
    fn a_local_server_is_spoken_to_plainly_unless_the_url_says_otherwise() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return; // The environment says, for every URL.
        }
        for local in [
            "postgres://u@127.0.0.1/db",
            "postgres://u@localhost:5433/db",
            "postgres://u@[::1]/db",
        ] {
            assert!(matches!(mode(local), PgSslMode::Disable), "{local}");
        }
        assert!(matches!(
            mode("postgres://u@db.example.com/db"),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@10.0.0.5/db"),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@localhost/db?ssl-mode=prefer"),
            PgSslMode::Prefer
        ));
    }
}
