//! Property: whatever mix of registrations, chats, upstream failures, time-outs and
//! idempotent retries runs at once, every balance is its ledger, every answered chat was
//! delivered and paid for exactly once, and nothing is left pending.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use crate::common::TestApp;
use axum::http::StatusCode;
use proptest::prelude::*;

const USERS: usize = 3;
const INITIAL_TOKENS: i64 = 500;
const CHAT_COST: i64 = 100;

#[derive(Debug, Clone, Copy)]
enum Upstream {
    Answers,
    Fails,
    TalksNonsense,
    TimesOut,
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        user: usize,
    },
    Chat {
        user: usize,
        upstream: Upstream,
        key: Option<u8>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let upstream = prop_oneof![
        3 => Just(Upstream::Answers),
        1 => Just(Upstream::Fails),
        1 => Just(Upstream::TalksNonsense),
        1 => Just(Upstream::TimesOut),
    ];
    prop_oneof![
        1 => (0..USERS).prop_map(|user| Op::Register { user }),
        4 => (0..USERS, upstream, proptest::option::of(0..3u8))
            .prop_map(|(user, upstream, key)| Op::Chat { user, upstream, key }),
    ]
}

/// What one chat op saw.
struct Seen {
    user: usize,
    key: Option<u8>,
    chat_id: i64,
}

/// Runs each wave's ops all at once, the waves one after another, so registrations in
/// one wave give later waves users to chat for.
async fn run_in_waves(waves: Vec<Vec<Op>>) {
    let app = Arc::new(
        TestApp::with_env(&[
            ("INITIAL_TOKENS", &INITIAL_TOKENS.to_string()),
            ("CHAT_COST", &CHAT_COST.to_string()),
            ("LLM_TIMEOUT_SECS", "1"),
        ])
        .await,
    );
    let tokens: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
    let mut delivered = Vec::new();
    for wave in waves {
        let tasks: Vec<_> = wave
            .into_iter()
            .map(|op| {
                let (app, tokens) = (app.clone(), tokens.clone());
                tokio::spawn(async move { perform(&app, &tokens, op).await })
            })
            .collect();
        for task in tasks {
            delivered.extend(task.await.unwrap());
        }
    }

    app.assert_all_settled().await;

    let tokens = tokens.lock().unwrap().clone();
    for (user, token) in tokens {
        let answered: BTreeSet<i64> = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
            "SELECT c.id FROM chats c JOIN users u ON u.id = c.user_id
             WHERE u.username = $1 AND c.status = 'answered'",
        )
        .bind(format!("user{user}"))
        .fetch_all(pool)
        .await)
        .unwrap()
        .into_iter()
        .collect();
        let seen: BTreeSet<i64> = delivered
            .iter()
            .filter(|seen| seen.user == user)
            .map(|seen| seen.chat_id)
            .collect();
        assert_eq!(seen, answered, "user{user}: delivered vs stored answers");
        assert_eq!(
            app.balance(&token).await,
            INITIAL_TOKENS - CHAT_COST * answered.len() as i64,
            "user{user}"
        );
    }
    // One key, one answer.
    let mut by_key: HashMap<(usize, u8), BTreeSet<i64>> = HashMap::new();
    for seen in &delivered {
        if let Some(key) = seen.key {
            by_key
                .entry((seen.user, key))
                .or_default()
                .insert(seen.chat_id);
        }
    }
    for ((user, key), chats) in by_key {
        assert_eq!(chats.len(), 1, "user{user} key {key} bought {chats:?}");
    }
}

/// Registers `user` (or finds it taken) and logs in: a fresh token, also kept for later ops.
async fn register_and_login(
    app: &TestApp,
    tokens: &Mutex<HashMap<usize, String>>,
    user: usize,
) -> String {
    let name = format!("user{user}");
    let registered = app.register(&name, "pass123").await.status;
    assert!(
        [StatusCode::CREATED, StatusCode::CONFLICT].contains(&registered),
        "{registered}"
    );
    let login = app.login(&name, "pass123").await;
    let token = login.json["token"].as_str().unwrap().to_string();
    tokens.lock().unwrap().entry(user).or_insert(token.clone());
    token
}

async fn perform(app: &TestApp, tokens: &Mutex<HashMap<usize, String>>, op: Op) -> Option<Seen> {
    match op {
        Op::Register { user } => {
            register_and_login(app, tokens, user).await;
            None
        }
        Op::Chat {
            user,
            upstream,
            key,
        } => {
            // A user's first op registers them, racing any other op that does the same.
            let known = tokens.lock().unwrap().get(&user).cloned();
            let token = match known {
                Some(token) => token,
                None => register_and_login(app, tokens, user).await,
            };
            let prefix = match upstream {
                Upstream::Answers => "",
                Upstream::Fails => "[fail] ",
                Upstream::TalksNonsense => "[garbage] ",
                Upstream::TimesOut => "[stall] ",
            };
            let message = format!("{prefix}question {}", key.unwrap_or(9));
            let response = match key {
                Some(key) => {
                    app.chat_with_key(&token, &format!("key-{key}"), &message)
                        .await
                }
                None => app.chat(&token, &message).await,
            };
            let expected_failure = match upstream {
                Upstream::Answers => StatusCode::OK,
                Upstream::Fails | Upstream::TalksNonsense => StatusCode::BAD_GATEWAY,
                Upstream::TimesOut => StatusCode::GATEWAY_TIMEOUT,
            };
            let mut allowed = vec![expected_failure, StatusCode::PAYMENT_REQUIRED];
            if key.is_some() {
                allowed.extend([StatusCode::CONFLICT, StatusCode::UNPROCESSABLE_ENTITY]);
            }
            assert!(
                allowed.contains(&response.status),
                "{upstream:?}: {response:?}"
            );
            (response.status == StatusCode::OK).then(|| Seen {
                user,
                key,
                chat_id: response.json["chat_id"].as_i64().unwrap(),
            })
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn the_ledger_invariant_holds_after_any_concurrent_sequence(
        waves in prop::collection::vec(prop::collection::vec(op(), 1..10), 1..5)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_in_waves(waves));
    }
}
