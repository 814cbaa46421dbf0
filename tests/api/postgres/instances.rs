//! Two tokenchat processes on one PostgreSQL database, and what the tests send them.

use serde_json::json;

use crate::{
    common::{
        database::{on_postgres, TestDatabase},
        FakeLlm,
    },
    server::Server,
};

/// Two tokenchat processes on one fresh PostgreSQL database and one fake model.
pub(super) struct TwoInstances {
    pub(super) first: Server,
    pub(super) second: Server,
    pub(super) llm: FakeLlm,
    pub(super) database: TestDatabase,
    _dir: tempfile::TempDir,
}

impl TwoInstances {
    /// `None`, saying so, unless this is the PostgreSQL run.
    pub(super) async fn start(vars: &[(&str, &str)]) -> Option<Self> {
        if !on_postgres() {
            println!("skipped: runs in the PostgreSQL run of the suite");
            return None;
        }
        let database = TestDatabase::create().await;
        let llm = FakeLlm::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec![
            ("DATABASE_URL", database.url()),
            ("LLM_BASE_URL", llm.base_url.as_str()),
            ("CHAT_RATE_PER_MINUTE", "0"),
            ("LOGIN_ATTEMPTS_PER_MINUTE", "0"),
            // Hundreds of concurrent chats come from 127.0.0.1.
            ("MAX_CONNECTIONS_PER_ADDRESS", "0"),
        ];
        all.extend_from_slice(vars);
        let first = Server::start(dir.path(), &all);
        let second = Server::start(dir.path(), &all);
        Some(Self {
            first,
            second,
            llm,
            database,
            _dir: dir,
        })
    }

    /// Registers `user` on the first instance and logs in on the second.
    pub(super) async fn user(&self, http: &reqwest::Client) -> String {
        let credentials = json!({ "username": "user", "password": "pass123" });
        let registered = http
            .post(format!("{}/register", self.first.base))
            .json(&credentials)
            .send()
            .await
            .unwrap();
        assert_eq!(registered.status(), 201);
        let login: serde_json::Value = http
            .post(format!("{}/login", self.second.base))
            .json(&credentials)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        login["token"].as_str().unwrap().to_string()
    }

    /// A new API key of the user of `token`, made on the first process as `body` asks.
    pub(super) async fn key(
        &self,
        http: &reqwest::Client,
        token: &str,
        body: serde_json::Value,
    ) -> String {
        let created: serde_json::Value = http
            .post(format!("{}/keys", self.first.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        created["key"].as_str().unwrap().to_string()
    }

    /// `count` chats at once, every other one to each process; how many were answered (the
    /// rest must be 402).
    pub(super) async fn race_chats(
        &self,
        http: &reqwest::Client,
        token: &str,
        count: usize,
    ) -> i64 {
        let chats: Vec<_> = (0..count)
            .map(|n| {
                let base = if n % 2 == 0 {
                    &self.first.base
                } else {
                    &self.second.base
                };
                let (http, base, token) = (http.clone(), base.clone(), token.to_string());
                tokio::spawn(async move { chat(&http, &base, &token, None).await })
            })
            .collect();
        let mut answered = 0;
        for chat in chats {
            match chat.await.unwrap() {
                200 => answered += 1,
                402 => {}
                other => panic!("unexpected status {other}"),
            }
        }
        answered
    }

    pub(super) fn audit(&self) -> std::process::Output {
        self.run("audit")
    }

    /// `tokenchat <command>` on the pair's database.
    pub(super) fn run(&self, command: &str) -> std::process::Output {
        Server::command(self._dir.path(), &[("DATABASE_URL", self.database.url())])
            .arg(command)
            .output()
            .unwrap()
    }

    pub(super) async fn scalar(&self, sql: &str) -> i64 {
        let db = tokenchat::db::connect(self.database.url(), tokenchat::db::Open::ExistingOnly)
            .await
            .unwrap();
        let value =
            tokenchat::db_run!(&db, pool => sqlx::query_scalar(sql).fetch_one(pool).await).unwrap();
        db.close().await;
        value
    }
}

pub(super) async fn chat(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    key: Option<&str>,
) -> u16 {
    let mut request = http
        .post(format!("{base}/chat"))
        .bearer_auth(token)
        .json(&json!({ "message": "race" }));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap().status().as_u16()
}

/// A client that keeps enough connections open for a race of many requests.
pub(super) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}
