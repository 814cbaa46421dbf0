//! Running a property: one app for all its cases, two fresh users a case, each request sent
//! through the router and the balances, the model's calls and the ledger audited after.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::Instant,
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, Request, StatusCode},
};
use http_body_util::BodyExt;
use proptest::{
    collection::vec,
    prelude::*,
    strategy::BoxedStrategy,
    test_runner::{Config, TestCaseError, TestRunner},
};
use serde_json::Value;
use tower::ServiceExt;

use crate::common::TestApp;

use super::case::Hostile;
use super::checks::{check_answer, CaseState};
use super::rendering::{uri_shape, Names};
use super::{CHAT_COST, INITIAL_TOKENS, MAX_BODY_BYTES, MAX_MESSAGE_CHARS, PASSWORD};

/// What came back, unparsed.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} {:?}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// One of the case's users.
struct User {
    id: i64,
    initial: i64,
}

/// One property's app, shared by its cases, and what its cases saw.
pub(super) struct Harness {
    runtime: tokio::runtime::Runtime,
    app: TestApp,
    password_hash: String,
    cases: AtomicUsize,
    seen: Mutex<BTreeMap<String, usize>>,
}

impl Harness {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (app, password_hash) = runtime.block_on(async {
            let app = TestApp::with_env(&[
                ("MAX_MESSAGE_CHARS", &MAX_MESSAGE_CHARS.to_string()),
                ("MAX_BODY_BYTES", &MAX_BODY_BYTES.to_string()),
                ("INITIAL_TOKENS", &INITIAL_TOKENS.to_string()),
                ("CHAT_COST", &CHAT_COST.to_string()),
            ])
            .await;
            let hash = app.state.passwords.hash(PASSWORD.into()).await.unwrap();
            (app, hash)
        });
        Self {
            runtime,
            app,
            password_hash,
            cases: AtomicUsize::new(0),
            seen: Mutex::default(),
        }
    }

    /// A user with `initial` tokens and a live login token, as `/register` and `/login`
    /// would leave them.
    /// `name` is the one the user got: a hostile registration may have taken the first.
    async fn user(&self, name: &mut String, initial: i64) -> (User, String) {
        let db = &self.app.state.db;
        let id = loop {
            let key = tokenchat::domain::username_key(name);
            let inserted =
                tokenchat::db::users::insert(db, name, &key, &self.password_hash, initial)
                    .await
                    .unwrap();
            match inserted {
                Some(id) => break id,
                None => name.push('x'),
            }
        };
        let token = tokenchat::services::auth::issue(db, id, Some(86_400))
            .await
            .unwrap()
            .token;
        (User { id, initial }, token)
    }

    async fn balance(&self, user: &User) -> i64 {
        tokenchat::db::users::balance(&self.app.state.db, user.id)
            .await
            .unwrap()
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.app.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    fn record(&self, answer: &Answer, json: Option<&Value>) {
        let code = json
            .and_then(|json| json["code"].as_str())
            .map_or(String::new(), |code| format!(" {code}"));
        let key = format!("{}{code}", answer.status.as_u16());
        *self.seen.lock().unwrap().entry(key).or_default() += 1;
    }

    /// Sends `requests` for two fresh users, checking every answer and, at the end, the
    /// balances, the model's calls and the ledger audit.
    async fn run_case(
        &self,
        requests: Vec<Hostile>,
        initial: [i64; 2],
    ) -> Result<(), TestCaseError> {
        let case = self.cases.fetch_add(1, Ordering::SeqCst);
        let mut names = [format!("case{case}.a"), format!("case{case}.b")];
        let (user0, token0) = self.user(&mut names[0], initial[0]).await;
        let (user1, token1) = self.user(&mut names[1], initial[1]).await;
        let users = [user0, user1];
        let mut names = Names {
            users: names,
            tokens: [token0, token1],
            last_chat: 1,
        };
        let llm_calls = self.app.llm.calls();
        let mut state = CaseState {
            alive: [true, true],
            answered: [BTreeSet::new(), BTreeSet::new()],
        };
        for hostile in &requests {
            let request = names.request(hostile);
            let shown = format!("{hostile:#?}\nsent as {request:?}");
            let answer = self.send(request).await;
            let json = check_answer(&hostile.method, &answer).map_err(|err| {
                TestCaseError::fail(format!("{err}\nrequest: {shown}\nanswer: {answer:?}"))
            })?;
            self.record(&answer, json.as_ref());
            let balances = [self.balance(&users[0]).await, self.balance(&users[1]).await];
            state
                .follow(hostile, &answer, json.as_ref(), balances)
                .map_err(|err| {
                    TestCaseError::fail(format!("{err}\nrequest: {shown}\nanswer: {answer:?}"))
                })?;
            if let Some(last) = state.answered.iter().flatten().max() {
                names.last_chat = *last;
            }
        }
        for (n, user) in users.iter().enumerate() {
            let answered = state.answered[n].len() as i64;
            prop_assert_eq!(
                self.balance(user).await,
                user.initial - CHAT_COST * answered,
                "user {}: {} answered chats; requests: {:#?}",
                n,
                answered,
                requests
            );
        }
        let answered = state.answered.iter().map(BTreeSet::len).sum::<usize>();
        prop_assert_eq!(
            self.app.llm.calls() - llm_calls,
            answered,
            "the model was asked once per answered chat and never otherwise; requests: {:#?}",
            requests
        );
        self.app.assert_all_settled().await;
        Ok(())
    }

    /// Runs `cases` cases of 1 to 6 requests from `strategy`, and prints what came back.
    pub(super) fn check(
        name: &str,
        cases: u32,
        strategy: BoxedStrategy<Hostile>,
        initial: BoxedStrategy<[i64; 2]>,
    ) {
        // `PROPTEST_CASES=n` runs n cases of each property instead.
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(cases);
        let harness = Self::new();
        let started = Instant::now();
        let mut runner = TestRunner::new(Config {
            cases,
            source_file: Some(file!()),
            ..Config::default()
        });
        let requests = vec(
            strategy.prop_filter("a target that parses", |h| uri_shape(&h.target).is_ok()),
            1..=6,
        );
        let result = runner.run(&(requests, initial), |(requests, initial)| {
            harness
                .runtime
                .block_on(harness.run_case(requests, initial))
        });
        let seen = harness.seen.lock().unwrap().clone();
        let total: usize = seen.values().sum();
        eprintln!(
            "hostile::{name}: {} cases, {total} requests in {:.1?}; answers: {seen:?}",
            harness.cases.load(Ordering::SeqCst),
            started.elapsed()
        );
        if let Err(err) = result {
            panic!("{err}");
        }
    }
}
