//! Shared test harness: a fresh SQLite database per test, the router driven in-process,
//! and a fake OpenAI-compatible model on an ephemeral loopback port.
#![allow(dead_code)]

pub mod database;
pub mod fake_llm;

use axum::{
    body::Body,
    http::{header, Method, Request, StatusCode},
    Router,
};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokenchat::{AppState, Config};
use tower::ServiceExt;

pub use database::TestDatabase;
#[allow(unused_imports)]
pub use fake_llm::{FakeLlm, Reply};

pub struct TestApp {
    pub router: Router,
    pub state: AppState,
    pub llm: FakeLlm,
    pub database: TestDatabase,
}

/// What came back: status, content type and the body parsed as JSON.
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub headers: axum::http::HeaderMap,
    pub json: Value,
}

impl TestResponse {
    /// The `X-Tokens-Remaining` header as a number.
    #[track_caller]
    pub fn tokens_remaining(&self) -> i64 {
        self.headers
            .get("x-tokens-remaining")
            .unwrap_or_else(|| panic!("no X-Tokens-Remaining: {self:?}"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl TestApp {
    pub async fn new() -> Self {
        Self::with_env(&[]).await
    }

    /// A fresh app whose configuration is the defaults, pointed at its own database and fake
    /// model, with `overrides` on top.
    pub async fn with_env(overrides: &[(&str, &str)]) -> Self {
        init_logging();
        let database = TestDatabase::create().await;
        let llm = FakeLlm::start().await;
        let (state, router) = build(database.url(), &llm.base_url, overrides).await;
        Self {
            router,
            state,
            llm,
            database,
        }
    }

    /// The same database and model, as a freshly started process would see them.
    pub async fn restart(&mut self, overrides: &[(&str, &str)]) {
        self.state.db.close().await;
        let (state, router) = build(self.database.url(), &self.llm.base_url, overrides).await;
        self.state = state;
        self.router = router;
    }

    /// Another process's view of the same database and model, with its own settings.
    pub async fn another_process(&self, overrides: &[(&str, &str)]) -> AppState {
        build(self.database.url(), &self.llm.base_url, overrides)
            .await
            .0
    }

    /// A JSON POST from the client address `from` (the app must trust proxy headers).
    pub async fn post_from(&self, from: &str, path: &str, body: Value) -> TestResponse {
        self.request(
            Method::POST,
            path,
            &[
                ("content-type", "application/json"),
                ("x-forwarded-for", from),
            ],
            body.to_string(),
        )
        .await
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> TestResponse {
        TestResponse::read(self.respond(method, path, headers, body).await).await
    }

    /// The router's answer to one request, unread.
    async fn respond(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> axum::response::Response {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.router
            .clone()
            .oneshot(request.body(body.into()).unwrap())
            .await
            .unwrap()
    }

    pub async fn post_json(&self, path: &str, body: Value) -> TestResponse {
        self.request(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    pub async fn post_authorized(&self, path: &str, token: &str, body: Value) -> TestResponse {
        let authorization = format!("Token {token}");
        self.request(
            Method::POST,
            path,
            &[
                ("content-type", "application/json"),
                ("authorization", &authorization),
            ],
            body.to_string(),
        )
        .await
    }

    pub async fn register(&self, username: &str, password: &str) -> TestResponse {
        self.post_json(
            "/register/",
            json!({ "username": username, "password": password }),
        )
        .await
    }

    pub async fn login(&self, username: &str, password: &str) -> TestResponse {
        self.post_json(
            "/login/",
            json!({ "username": username, "password": password }),
        )
        .await
    }

    /// A request whose answer is not JSON (`/metrics`, the page): status, content type, text.
    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> (StatusCode, String, String) {
        let response = self.respond(method, path, headers, body).await;
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|value| value.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    /// Registers `username` with password `pass123` and returns a fresh login token.
    pub async fn user_with_token(&self, username: &str) -> String {
        assert_eq!(
            self.register(username, "pass123").await.status,
            StatusCode::CREATED
        );
        let login = self.login(username, "pass123").await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        login.json["token"].as_str().unwrap().to_string()
    }

    pub async fn chat(&self, token: &str, message: &str) -> TestResponse {
        self.post_authorized("/chat/", token, json!({ "message": message }))
            .await
    }

    pub async fn balance(&self, token: &str) -> i64 {
        let response = self.post_authorized("/balance/", token, json!({})).await;
        assert_eq!(response.status, StatusCode::OK, "{response:?}");
        response.json["tokens"].as_i64().unwrap()
    }

    pub async fn get_authorized(&self, path: &str, token: &str) -> TestResponse {
        let authorization = format!("Bearer {token}");
        self.request(Method::GET, path, &[("authorization", &authorization)], "")
            .await
    }

    /// A chat sent with an `Idempotency-Key`.
    pub async fn chat_with_key(&self, token: &str, key: &str, message: &str) -> TestResponse {
        let authorization = format!("Token {token}");
        self.request(
            Method::POST,
            "/chat",
            &[
                ("content-type", "application/json"),
                ("authorization", &authorization),
                ("idempotency-key", key),
            ],
            json!({ "message": message }).to_string(),
        )
        .await
    }

    /// Runs the ledger audit and fails the test, listing the offences, unless it passes.
    pub async fn assert_audit_passes(&self) {
        let report = tokenchat::services::audit::run(&self.state.db)
            .await
            .unwrap();
        assert!(report.passed(), "audit offences: {:#?}", report.offences);
    }

    /// Runs `tampering` (SQL) on the app's database and asserts that the audit then finds
    /// one offence, which says `found`.
    pub async fn assert_audit_finds_after(&self, tampering: &str, found: &str) {
        tokenchat::db_run!(&self.state.db, pool => sqlx::query(tampering)
            .execute(pool)
            .await
            .map(|_| ()))
        .unwrap();
        let report = tokenchat::services::audit::run(&self.state.db)
            .await
            .unwrap();
        assert_eq!(report.offences.len(), 1, "{:?}", report.offences);
        assert!(report.offences[0].contains(found), "{:?}", report.offences);
    }

    /// Asserts that no chat is left pending and that the ledger audit passes.
    pub async fn assert_all_settled(&self) {
        let pending: i64 =
            tokenchat::db_run!(&self.state.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM chats WHERE status = 'pending'")
                .fetch_one(pool)
                .await)
                .unwrap();
        assert_eq!(pending, 0, "chats left pending");
        self.assert_audit_passes().await;
    }

    /// Rows of `SELECT status, COUNT(*) FROM chats GROUP BY status`, read straight from the file.
    pub async fn chat_counts(&self) -> Vec<(String, i64)> {
        tokenchat::db_run!(&self.state.db, pool => sqlx::query_as("SELECT status, COUNT(*) FROM chats GROUP BY status ORDER BY status")
            .fetch_all(pool)
            .await)
            .unwrap()
    }
}

/// With `TEST_LOG=1`, the server's logs go to the test's output (shown for failing tests).
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("TEST_LOG").is_some() {
        ONCE.call_once(|| {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("debug,hyper=info"))
                .with_test_writer()
                .init();
        });
    }
}

async fn build(
    database_url: &str,
    llm_url: &str,
    overrides: &[(&str, &str)],
) -> (AppState, Router) {
    // Tests register many users and chat fast from one address: the rate limits (and the
    // upstream's breaker) are off unless a test turns one on. The lock-outs after failed
    // logins keep their defaults.
    let base = [
        ("DATABASE_URL", database_url),
        ("LLM_BASE_URL", llm_url),
        ("LLM_TIMEOUT_SECS", "5"),
        ("LOGIN_ATTEMPTS_PER_MINUTE", "0"),
        ("REGISTRATIONS_PER_HOUR", "0"),
        ("CHAT_RATE_PER_MINUTE", "0"),
        // Tests that make the model fail many times in a row expect it asked each time.
        ("UPSTREAM_FAILURES_TO_OPEN", "1000000"),
    ];
    let config = Config::from_lookup(|name| {
        overrides
            .iter()
            .chain(base.iter())
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_string())
    })
    .unwrap();
    let db = tokenchat::db::connect(
        config.database_url.expose(),
        tokenchat::db::Open::CreateIfMissing,
    )
    .await
    .unwrap();
    tokenchat::db::migrate(&db).await.unwrap();
    let state = AppState::new(config, db).unwrap();
    (state.clone(), tokenchat::router(state))
}

impl TestResponse {
    pub async fn read(response: axum::response::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map(|value| value.to_str().unwrap().to_string());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let empty_by_design = status == StatusCode::NO_CONTENT && bytes.is_empty();
        let json = if empty_by_design {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                panic!(
                    "{status}: body is not JSON ({err}): {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Self {
            status,
            content_type,
            headers,
            json,
        }
    }

    /// Asserts the contract's error envelope with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.json["code"], code, "{self:?}");
        assert!(
            self.json["error"]
                .as_str()
                .is_some_and(|text| !text.is_empty()),
            "{self:?}"
        );
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/json"),
            "{self:?}"
        );
        // RFC 9110: every 401 names the scheme it would accept.
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(
                self.headers[header::WWW_AUTHENTICATE],
                "Bearer realm=\"tokenchat\"",
                "{self:?}"
            );
        }
    }
}
