//! The configuration's defaults, bounds and errors, and that no secret shows in its output.

use super::*;

fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_lookup(|name| {
        pairs
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_string())
    })
}

#[test]
fn defaults_match_the_contract() {
    let config = config(&[]).unwrap();
    assert_eq!(config.bind_addr.to_string(), "127.0.0.1:8000");
    assert_eq!(config.database_url.expose(), "sqlite://tokenchat.db");
    assert_eq!(config.llm_base_url, None, "empty: the built-in demo model");
    assert_eq!(config.llm_stream_idle, Duration::from_secs(30));
    assert_eq!(config.llm_stream_max, Duration::from_secs(600));
    assert_eq!(
        config.abandoned_stream_charge,
        AbandonedStreamCharge::Delivered
    );
    assert!(config.llm_api_key.is_none());
    assert_eq!(config.llm_model, "llama3.2");
    assert_eq!(config.llm_timeout, Duration::from_secs(60));
    assert_eq!(config.chat_cost, 100);
    assert_eq!(config.initial_tokens, 4000);
    assert_eq!(config.token_ttl, Some(Duration::from_secs(86400)));
    assert_eq!(config.max_message_chars, 8000);
    assert_eq!(config.max_body_bytes, 65536);
    assert_eq!(config.v1_max_body_bytes, 20 * 1024 * 1024);
    assert_eq!(config.embedding_cost, 1);
    assert_eq!(config.password_min_length, 6);
    assert_eq!(config.connections.max_inflight_body_bytes, 64 * 1024 * 1024);
}

#[test]
fn env_example_lists_every_variable_with_its_default() {
    let example: Vec<(&str, &str)> = include_str!("../../.env.example")
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| line.split_once('=').expect("KEY=value"))
        .collect();
    let names: Vec<&str> = example.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "BIND_ADDR",
            "DATABASE_URL",
            "DATABASE_MAX_CONNECTIONS",
            "DATABASE_STATEMENT_TIMEOUT_MS",
            "LLM_BASE_URL",
            "LLM_API_KEY",
            "LLM_MODEL",
            "LLM_MODELS",
            "LLM_SYSTEM_PROMPT",
            "LLM_TIMEOUT_SECS",
            "LLM_STREAM_IDLE_SECS",
            "LLM_STREAM_MAX_SECS",
            "ABANDONED_STREAM_CHARGE",
            "CHAT_COST",
            "EMBEDDING_COST",
            // CONFIG_FILE is there commented out: unset and empty differ (the default file
            // if it exists, or none), and no value names the default's "if it exists".
            "UPSTREAM_MAX_ATTEMPTS",
            "UPSTREAM_FAILURES_TO_OPEN",
            "UPSTREAM_COOLDOWN_SECS",
            "UPSTREAM_COOLDOWN_MAX_SECS",
            "MIN_OUTPUT_TOKENS",
            "INITIAL_TOKENS",
            "TOKEN_TTL_SECS",
            "MAX_MESSAGE_CHARS",
            "CONTEXT_MAX_CHARS",
            "MAX_BODY_BYTES",
            "V1_MAX_BODY_BYTES",
            "PASSWORD_MIN_LENGTH",
            "IDEMPOTENCY_KEY_LIFETIME_SECS",
            "RUST_LOG",
            "LOG_SPAN_TIMINGS",
            "LOG_FORMAT",
            "METRICS_TOKEN",
            "HEADER_READ_TIMEOUT_SECS",
            "IDLE_TIMEOUT_SECS",
            "BODY_READ_TIMEOUT_SECS",
            "WRITE_STALL_TIMEOUT_SECS",
            "MAX_CONNECTIONS",
            "MAX_CONNECTIONS_PER_ADDRESS",
            "MAX_INFLIGHT_BODY_BYTES",
            "SHUTDOWN_GRACE_SECS",
            "LOGIN_ATTEMPTS_PER_MINUTE",
            "LOGIN_FAILURES_PER_USER_AND_ADDRESS",
            "LOGIN_FAILURES_PER_USER_AND_ADDRESS_WINDOW_SECS",
            "LOGIN_FAILURES_PER_USER",
            "LOGIN_FAILURES_PER_USER_WINDOW_SECS",
            "REGISTRATIONS_PER_HOUR",
            "REGISTRATION_OPEN",
            "CHAT_RATE_PER_MINUTE",
            "PASSWORD_CHANGES_PER_HOUR",
            "TRUST_PROXY_HEADERS",
            "PASSWORD_HASH_QUEUE",
        ]
    );
    let from_example = format!("{:?}", config(&example).unwrap());
    assert_eq!(from_example, format!("{:?}", config(&[]).unwrap()));
}

#[test]
fn a_price_book_is_read_from_config_file_and_a_bad_one_stops_start_up() {
    let dir = std::env::temp_dir().join(format!("tokenchat-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[models.m]\nprompt = 2\ncompletion = 8\n").unwrap();
    let path = good.to_str().unwrap();
    let config = config(&[("CONFIG_FILE", path)]).unwrap();
    assert_eq!(config.price_book.model("m").unwrap().prices.completion, 8);
    assert_eq!(config.min_output_tokens, 16);
    let none = super::Config::from_lookup(|name| (name == "CONFIG_FILE").then(String::new));
    assert!(none.unwrap().price_book.is_empty(), "empty: no price book");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[models.m]\nprompt = 2\ncompletion = -8\n").unwrap();
    let err = super::Config::from_lookup(|name| {
        (name == "CONFIG_FILE").then(|| bad.to_str().unwrap().to_string())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!(
            "invalid CONFIG_FILE: {}, line 3, field completion: ",
            bad.display()
        )),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    let missing = dir.join("missing.toml");
    let err = super::Config::from_lookup(|name| {
        (name == "CONFIG_FILE").then(|| missing.to_str().unwrap().to_string())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("missing.toml: cannot be read"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_zero_per_address_cap_turns_it_off() {
    let limits = |value| {
        config(&[("MAX_CONNECTIONS_PER_ADDRESS", value)])
            .unwrap()
            .connections
            .max_connections_per_address
    };
    assert_eq!(limits("0"), None);
    assert_eq!(limits(""), Some(64));
    assert_eq!(limits("3"), Some(3));
}

#[test]
fn a_zero_ttl_means_tokens_never_expire() {
    assert_eq!(config(&[("TOKEN_TTL_SECS", "0")]).unwrap().token_ttl, None);
}

#[test]
fn each_bad_value_names_its_variable() {
    for (name, value) in [
        ("BIND_ADDR", "nowhere"),
        ("DATABASE_URL", "mysql://localhost/db"),
        ("LLM_BASE_URL", "ftp://example.com"),
        ("LLM_BASE_URL", "not a url"),
        ("LLM_TIMEOUT_SECS", "soon"),
        ("LLM_TIMEOUT_SECS", "0"),
        ("LLM_STREAM_IDLE_SECS", "0"),
        ("LLM_STREAM_MAX_SECS", "0"),
        ("ABANDONED_STREAM_CHARGE", "sometimes"),
        ("CHAT_COST", "-5"),
        ("CHAT_COST", "0"),
        ("INITIAL_TOKENS", "lots"),
        ("TOKEN_TTL_SECS", "-1"),
        ("MAX_MESSAGE_CHARS", "1.5"),
        ("CONTEXT_MAX_CHARS", "-1"),
        ("MAX_BODY_BYTES", "big"),
        ("V1_MAX_BODY_BYTES", "0"),
        ("V1_MAX_BODY_BYTES", "2147483648"),
        ("EMBEDDING_COST", "0"),
        ("PASSWORD_MIN_LENGTH", "0"),
        ("RUST_LOG", "info,[[["),
        ("TOKEN_TTL_SECS", "999999999999"),
        ("LLM_TIMEOUT_SECS", "18446744073709551615"),
        ("CHAT_COST", "9223372036854775807"),
        ("INITIAL_TOKENS", "1000000000000000000"),
        ("HEADER_READ_TIMEOUT_SECS", "0"),
        ("IDLE_TIMEOUT_SECS", "never"),
        ("MAX_CONNECTIONS", "0"),
        ("WRITE_STALL_TIMEOUT_SECS", "0"),
        ("MAX_CONNECTIONS_PER_ADDRESS", "-1"),
        ("MAX_CONNECTIONS_PER_ADDRESS", "1000001"),
        ("MAX_INFLIGHT_BODY_BYTES", "lots"),
        ("MAX_INFLIGHT_BODY_BYTES", "0"),
        ("MAX_INFLIGHT_BODY_BYTES", "65536"),
        ("SHUTDOWN_GRACE_SECS", "99999999"),
        ("REGISTRATION_OPEN", "maybe"),
        ("CHAT_RATE_PER_MINUTE", "-1"),
        ("PASSWORD_CHANGES_PER_HOUR", "many"),
        ("IDEMPOTENCY_KEY_LIFETIME_SECS", "0"),
        ("LOG_SPAN_TIMINGS", "sometimes"),
        ("LOG_FORMAT", "xml"),
        ("TRUST_PROXY_HEADERS", "yes please"),
    ] {
        let err = config(&[(name, value)]).expect_err(value);
        assert_eq!(err.variable, name);
        assert!(err.to_string().starts_with(&format!("invalid {name}: ")));
    }
}

#[test]
fn postgres_urls_are_accepted_and_their_password_never_shows() {
    for url in [
        "postgres://tokenchat:hunter2-secret@127.0.0.1:5432/tokenchat",
        "postgresql://tokenchat:hunter2-secret@db.internal/tokenchat?sslmode=require",
    ] {
        let config = config(&[("DATABASE_URL", url)]).unwrap();
        assert_eq!(config.database_url.expose(), url);
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
    let err =
        config(&[("DATABASE_URL", "mysql://root:hunter2-secret@localhost/db")]).expect_err("mysql");
    assert!(!err.to_string().contains("hunter2-secret"), "{err}");
    // A password in the query, as PostgreSQL also takes it.
    let in_query =
        "postgres://tokenchat@db.internal/tokenchat?password=hunter2-secret&sslmode=disable";
    let shown = config(&[("DATABASE_URL", in_query)])
        .unwrap()
        .database_url
        .redacted();
    assert_eq!(
        shown,
        "postgres://tokenchat@db.internal/tokenchat?password=<redacted>&sslmode=disable"
    );
    // Read as no user info (one slash), or not a URL at all: only a scheme is shown.
    for (url, expected) in [
        (
            "postgres:/tokenchat:hunter2-secret@db/tokenchat",
            "postgres:<redacted>",
        ),
        ("host=db password=hunter2-secret", "<redacted>"),
    ] {
        assert_eq!(DatabaseUrl(url.into()).redacted(), expected);
    }
}

#[test]
fn an_sqlite_database_that_names_no_file_is_refused() {
    for url in [
        "sqlite://",
        "sqlite:",
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite://x.db?mode=memory",
        "sqlite://x.db?mode=%6Demory",
        "sqlite://x.db?vfs=memdb",
    ] {
        let err = config(&[("DATABASE_URL", url)]).expect_err(url);
        assert_eq!(err.variable, "DATABASE_URL");
        assert!(err.reason.contains("names no file"), "{err}");
    }
    for url in [
        "sqlite://data/tokenchat.db",
        "sqlite:///data/:memory:",
        "postgres://db.internal/mode=memory",
    ] {
        assert!(config(&[("DATABASE_URL", url)]).is_ok(), "{url}");
    }
}

#[test]
fn a_key_or_token_that_no_header_could_carry_stops_start_up_without_repeating_it() {
    for (variable, value) in [
        ("LLM_API_KEY", "sk-very-secret\n"),
        ("LLM_API_KEY", " sk-very-secret"),
        ("METRICS_TOKEN", "metrics-secret "),
        ("METRICS_TOKEN", " "),
    ] {
        let err = config(&[(variable, value)]).expect_err(value);
        assert_eq!(err.variable, variable);
        assert!(!err.to_string().contains("secret"), "{err}");
    }
    // A key and a URL's user info would both be sent as `Authorization`.
    let both = config(&[
        ("LLM_BASE_URL", "http://user:pw@127.0.0.1:11434/v1"),
        ("LLM_API_KEY", "sk-very-secret"),
    ]);
    assert_eq!(both.expect_err("both").variable, "LLM_API_KEY");
}

#[test]
fn debug_output_never_shows_the_llm_key() {
    let config = config(&[("LLM_API_KEY", "sk-very-secret")]).unwrap();
    use secrecy::ExposeSecret;
    let key = config.llm_api_key.as_ref().unwrap();
    assert_eq!(key.expose_secret(), "sk-very-secret");
    assert!(!format!("{config:?}").contains("sk-very-secret"));
}

#[test]
fn an_upstream_url_joins_paths_under_its_own_and_keeps_its_query() {
    let url = UpstreamUrl::parse("http://user:pw@127.0.0.1:8080/v1/?key=q").unwrap();
    assert_eq!(
        url.join("chat/completions").as_str(),
        "http://user:pw@127.0.0.1:8080/v1/chat/completions?key=q"
    );
    let bare = UpstreamUrl::parse("https://api.example.com").unwrap();
    assert_eq!(
        bare.join("models").as_str(),
        "https://api.example.com/models"
    );
}

#[test]
fn an_upstream_url_is_shown_without_its_user_info_or_query() {
    let url = UpstreamUrl::parse("http://user:pw@127.0.0.1:8080/v1?key=q").unwrap();
    let shown = "http://<redacted>@127.0.0.1:8080/v1?<redacted>";
    assert_eq!(url.redacted(), shown);
    assert_eq!(url.to_string(), shown);
    assert_eq!(format!("{url:?}"), format!("{shown:?}"));
    let config = config(&[("LLM_BASE_URL", "http://user:pw@h/v1?key=q")]).unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("pw") && !debug.contains("key=q"), "{debug}");
    let plain = UpstreamUrl::parse("http://127.0.0.1:11434/v1").unwrap();
    assert_eq!(plain.redacted(), "http://127.0.0.1:11434/v1");
    // A value that is not a URL is not repeated in the error either.
    let err = UpstreamUrl::parse("http//user:secret@host").unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
}

/// `text` as a configuration file, and the configuration of `pairs` reading it.
fn with_file(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenchat.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_string();
    let mut all = vec![("CONFIG_FILE", path.as_str())];
    all.extend_from_slice(pairs);
    config(&all)
}

#[test]
fn the_shorthand_upstream_is_named_default_and_the_file_may_add_fallbacks_to_it() {
    let file = "[upstreams.backup]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n\
                [models.\"llama3.2\"]\ntargets = [{ upstream = \"default\" }, \
                { upstream = \"backup\", priority = 1 }]\n";
    let routed = with_file(
        file,
        &[
            ("LLM_BASE_URL", "http://127.0.0.1:8/v1"),
            ("LLM_MODELS", "other"),
        ],
    )
    .unwrap();
    let routing = routed.routing.unwrap();
    let names: Vec<&str> = routing.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["backup", "default"]);
    let served: Vec<(&str, usize)> = routing
        .models
        .iter()
        .map(|model| (model.name.as_str(), model.targets.len()))
        .collect();
    assert_eq!(served, [("llama3.2", 2), ("other", 1)]);
    assert_eq!(routing.models[1].targets[0].upstream, "default");
    assert!(
        config(&[]).unwrap().routing.is_none(),
        "nothing set: the demo"
    );
}

#[test]
fn a_default_model_no_target_serves_stops_start_up_naming_it() {
    let file = "[upstreams.u]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n\
                [models.gpt]\ntargets = [{ upstream = \"u\" }]\n";
    let err = with_file(file, &[]).unwrap_err();
    assert_eq!(err.variable, "LLM_MODEL");
    assert!(err.reason.contains("\"llama3.2\" has no targets"), "{err}");
    let served = with_file(file, &[("LLM_MODEL", "gpt")]).unwrap();
    assert_eq!(served.routing.unwrap().models[0].name, "gpt");
    let default_taken = with_file(
        "[upstreams.default]\nbase_url = \"http://127.0.0.1:9/v1\"\n",
        &[("LLM_BASE_URL", "http://127.0.0.1:8/v1")],
    )
    .unwrap_err();
    assert!(
        default_taken.reason.contains("upstreams.default"),
        "{default_taken}"
    );
    let policy = config(&[("UPSTREAM_MAX_ATTEMPTS", "0")]).unwrap_err();
    assert_eq!(policy.variable, "UPSTREAM_MAX_ATTEMPTS");
}
