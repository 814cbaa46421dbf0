//! Money-grade accounting: the ledger, history, idempotent retries and recovery.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use crate::common::{Reply, TestApp};
use axum::http::StatusCode;
use serde_json::{json, Value};

async fn ledger_sum(app: &TestApp, username: &str) -> i64 {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger l
         JOIN users u ON u.id = l.user_id
         WHERE u.username = $1",
    )
    .bind(username)
    .fetch_one(pool)
    .await)
    .unwrap()
}

#[tokio::test]
async fn every_balance_move_is_one_ledger_row_with_the_balance_after_it() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.chat(&token, "answered").await;
    app.chat(&token, "[fail] refunded").await;

    let page = app.get_authorized("/transactions", &token).await;
    assert_eq!(page.status, StatusCode::OK);
    let rows: Vec<(i64, &str, i64)> = page.json["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["amount"].as_i64().unwrap(),
                row["reason"].as_str().unwrap(),
                row["balance_after"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (100, "chat_refund", 3900),
            (-100, "chat_reservation", 3800),
            (-100, "chat_reservation", 3900),
            (4000, "initial_grant", 4000),
        ]
    );
    assert_eq!(page.json["transactions"][3]["chat_id"], Value::Null);
    assert_eq!(page.json["next"], Value::Null);
    assert_eq!(ledger_sum(&app, "user").await, app.balance(&token).await);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_storm_of_concurrent_chats_over_four_tokens_charges_exactly_the_answered_ones() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "3700")]).await;
    app.register("storm", "pass123").await;
    let mut tokens = Vec::new();
    for _ in 0..4 {
        tokens.push(
            app.login("storm", "pass123").await.json["token"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    app.llm.set_reply(Reply::FailRandomly(1.0 / 3.0));

    let app = Arc::new(app);
    let chats: Vec<_> = (0..200)
        .map(|i| {
            let app = app.clone();
            let token = tokens[i % 4].clone();
            tokio::spawn(async move { app.chat(&token, &format!("storm {i}")).await })
        })
        .collect();
    let mut answered = BTreeSet::new();
    let (mut refused, mut failed) = (0, 0);
    for chat in chats {
        let response = chat.await.unwrap();
        match response.status {
            StatusCode::OK => {
                assert!(answered.insert(response.json["chat_id"].as_i64().unwrap()));
            }
            StatusCode::PAYMENT_REQUIRED => refused += 1,
            StatusCode::BAD_GATEWAY => failed += 1,
            other => panic!("unexpected {other}: {response:?}"),
        }
    }
    assert_eq!(answered.len() + refused + failed, 200);
    assert!(answered.len() <= 37);
    assert!(failed > 0, "the fake failed no chat");

    let balance = app.balance(&tokens[0]).await;
    assert_eq!(balance, 3700 - 100 * answered.len() as i64);
    assert_eq!(ledger_sum(&app, "storm").await, balance);
    let stored: BTreeSet<i64> =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT id FROM chats WHERE status = 'answered'")
            .fetch_all(pool)
            .await)
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(stored, answered);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_retry_after_success_returns_the_first_answer_without_a_second_charge() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let first = app.chat_with_key(&token, "key-1", "hello").await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.headers.contains_key("idempotent-replayed"));

    let retry = app.chat_with_key(&token, "key-1", "hello").await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.json, first.json);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.tokens_remaining(), 3900);
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&token).await, 3900);

    // A new key is a new chat.
    let other = app.chat_with_key(&token, "key-2", "hello").await;
    assert_ne!(other.json["chat_id"], first.json["chat_id"]);
    assert_eq!(app.balance(&token).await, 3800);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_key_reused_with_another_body_is_422_and_charges_nothing() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.chat_with_key(&token, "key", "hello").await;
    let reused = app.chat_with_key(&token, "key", "something else").await;
    reused.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(app.llm.calls(), 1);
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_in_flight_is_409() {
    let app = Arc::new(TestApp::new().await);
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::Stall(Duration::from_millis(800)));
    let first = tokio::spawn({
        let (app, token) = (app.clone(), token.clone());
        async move { app.chat_with_key(&token, "key", "slow").await }
    });
    while app.llm.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let duplicate = app.chat_with_key(&token, "key", "slow").await;
    duplicate.assert_error(StatusCode::CONFLICT, "request_in_progress");

    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    let replay = app.chat_with_key(&token, "key", "slow").await;
    assert_eq!(replay.json, first.json);
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn a_retry_after_a_refunded_failure_is_tried_again_and_charged_only_if_answered() {
    let app = TestApp::with_env(&[("LLM_TIMEOUT_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    for (reply, status) in [
        (Reply::Status(500), StatusCode::BAD_GATEWAY),
        (
            Reply::Stall(Duration::from_secs(3)),
            StatusCode::GATEWAY_TIMEOUT,
        ),
    ] {
        app.llm.set_reply(reply);
        assert_eq!(
            app.chat_with_key(&token, "key", "hello").await.status,
            status
        );
        assert_eq!(app.balance(&token).await, 4000);
    }
    app.llm.set_reply(Reply::Echo);
    let answered = app.chat_with_key(&token, "key", "hello").await;
    assert_eq!(answered.status, StatusCode::OK);
    assert_eq!(app.llm.calls(), 3);
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(
        app.chat_with_key(&token, "key", "hello").await.json,
        answered.json
    );
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_retry_after_out_of_tokens_is_tried_again_once_tokens_are_granted() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "50")]).await;
    let token = app.user_with_token("user").await;
    let refused = app.chat_with_key(&token, "key", "hello").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(refused.tokens_remaining(), 50);
    let user = tokenchat::domain::Username::parse("USER").unwrap();
    let amount = tokenchat::domain::GrantAmount::parse(100).unwrap();
    let granted = tokenchat::services::accounts::grant(&app.state.db, &user, amount)
        .await
        .unwrap();
    assert_eq!(granted, 150);
    let answered = app.chat_with_key(&token, "key", "hello").await;
    assert_eq!(answered.status, StatusCode::OK);
    assert_eq!(answered.json["tokens"], 50);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn keys_belong_to_one_user_and_expire_after_a_day() {
    let app = TestApp::new().await;
    let alice = app.user_with_token("alice").await;
    let bob = app.user_with_token("bob").await;
    let first = app.chat_with_key(&alice, "shared", "hello").await;
    let bobs = app.chat_with_key(&bob, "shared", "hello").await;
    assert_ne!(bobs.json["chat_id"], first.json["chat_id"]);
    assert_eq!(app.balance(&bob).await, 3900);

    tokenchat::db_run!(&app.state.db, pool => sqlx::query("UPDATE idempotency_keys SET created_at = created_at - 86401")
        .execute(pool)
        .await.map(|done| done.rows_affected()))
        .unwrap();
    let after_a_day = app.chat_with_key(&alice, "shared", "hello").await;
    assert_ne!(after_a_day.json["chat_id"], first.json["chat_id"]);
    assert_eq!(app.balance(&alice).await, 3800);
}

#[tokio::test]
async fn idempotency_keys_longer_than_255_characters_are_400() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let response = app.chat_with_key(&token, &"k".repeat(256), "hello").await;
    response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(response.json["field"], "Idempotency-Key");
    assert_eq!(app.llm.calls(), 0);
    let longest = app.chat_with_key(&token, &"k".repeat(255), "hello").await;
    assert_eq!(longest.status, StatusCode::OK);
}

#[tokio::test]
async fn every_authorised_response_carries_the_balance_in_a_header() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "150"), ("MAX_MESSAGE_CHARS", "5")]).await;
    let token = app.user_with_token("user").await;
    let chat = app.chat(&token, "hi").await;
    assert_eq!(chat.tokens_remaining(), 50);
    for response in [
        app.post_authorized("/balance", &token, json!({})).await,
        app.get_authorized("/chats", &token).await,
        app.get_authorized(&format!("/chats/{}", chat.json["chat_id"]), &token)
            .await,
        app.get_authorized("/transactions/", &token).await,
        app.get_authorized("/chats/999", &token).await,
        app.chat(&token, "too long").await,
        app.chat(&token, "hi").await,
    ] {
        assert_eq!(response.tokens_remaining(), 50, "{response:?}");
    }
    let unauthorised = app
        .request(axum::http::Method::GET, "/chats", &[], "")
        .await;
    assert!(!unauthorised.headers.contains_key("x-tokens-remaining"));
}

/// Follows `next` from the first page of `route` to the last; the ids of every row seen.
async fn walk_pages(app: &TestApp, token: &str, route: &str, rows: &str, limit: usize) -> Vec<i64> {
    let mut seen = Vec::new();
    let mut path = format!("{route}?limit={limit}");
    loop {
        let page = app.get_authorized(&path, token).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let items = page.json[rows].as_array().unwrap();
        assert!(items.len() <= limit);
        seen.extend(items.iter().map(|item| item["id"].as_i64().unwrap()));
        match page.json["next"].as_str() {
            Some(next) => path = format!("{route}?limit={limit}&cursor={next}"),
            None => return seen,
        }
    }
}

async fn ids_newest_first(app: &TestApp, table: &str) -> Vec<i64> {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(&format!("SELECT id FROM {table} ORDER BY id DESC"))
        .fetch_all(pool)
        .await)
        .unwrap()
}

#[tokio::test]
async fn chat_history_pages_cover_every_chat_once_newest_first() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "100000")]).await;
    let token = app.user_with_token("user").await;
    for i in 0..23 {
        let message = if i % 4 == 0 {
            format!("[fail] {i}")
        } else {
            format!("question {i}")
        };
        app.chat(&token, &message).await;
    }
    let seen = walk_pages(&app, &token, "/chats/", "chats", 7).await;
    assert_eq!(seen, ids_newest_first(&app, "chats").await);

    let newest = app.get_authorized("/chats?limit=1", &token).await.json["chats"][0].clone();
    assert_eq!(newest["message"], "question 22");
    assert_eq!(newest["response"], "Echo: question 22");
    assert_eq!(newest["status"], "answered");
    assert_eq!(newest["tokens_charged"], 100);
    assert!(newest["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(newest["finished_at"].as_str().unwrap().ends_with('Z'));

    let failed = app.get_authorized("/chats?limit=100", &token).await.json["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|chat| chat["message"] == "[fail] 20")
        .cloned()
        .unwrap();
    assert_eq!(
        (failed["status"].as_str(), failed["tokens_charged"].as_i64()),
        (Some("failed"), Some(0))
    );
    assert_eq!(failed["response"], Value::Null);
}

#[tokio::test]
async fn transaction_pages_cover_every_ledger_row_once() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    for i in 0..9 {
        app.chat(&token, if i % 3 == 0 { "[fail] x" } else { "fine" })
            .await;
    }
    let seen = walk_pages(&app, &token, "/transactions", "transactions", 4).await;
    assert_eq!(seen, ids_newest_first(&app, "ledger").await);
    assert_eq!(seen.len(), 1 + 9 + 3);
}

#[tokio::test]
async fn no_user_can_see_another_users_chats_or_transactions() {
    let app = TestApp::new().await;
    let alice = app.user_with_token("alice").await;
    let bob = app.user_with_token("bob").await;
    let alices_chat = app.chat(&alice, "alice's secret").await.json["chat_id"]
        .as_i64()
        .unwrap();

    let mine = app
        .get_authorized(&format!("/chats/{alices_chat}/"), &alice)
        .await;
    assert_eq!(mine.json["message"], "alice's secret");
    for path in [
        format!("/chats/{alices_chat}"),
        "/chats/0".into(),
        "/chats/abc".into(),
    ] {
        app.get_authorized(&path, &bob)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    assert_eq!(
        app.get_authorized("/chats", &bob).await.json["chats"],
        json!([])
    );
    let bobs_rows = app.get_authorized("/transactions", &bob).await.json["transactions"].clone();
    assert_eq!(bobs_rows.as_array().unwrap().len(), 1);
    assert_eq!(bobs_rows[0]["reason"], "initial_grant");
}

#[tokio::test]
async fn page_parameters_are_validated() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("cursor=abc", "cursor"),
        ("cursor=-4", "cursor"),
    ] {
        for route in ["/chats", "/transactions"] {
            let response = app
                .get_authorized(&format!("{route}?{query}"), &token)
                .await;
            response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
            assert_eq!(response.json["field"], field);
        }
    }
    let full = app.get_authorized("/transactions?limit=100", &token).await;
    assert_eq!(full.status, StatusCode::OK);
}

#[tokio::test]
async fn recovery_refunds_abandoned_chats_once_however_many_sweep() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let user_id: i64 =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT id FROM users")
        .fetch_one(pool)
        .await)
        .unwrap();
    // What a process that died mid-chat leaves behind: a reservation and a pending chat,
    // due to settle within a minute.
    for _ in 0..3 {
        tokenchat::db::chats::reserve(
            &app.state.db,
            user_id,
            None,
            "orphan",
            100,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    assert_eq!(app.balance(&token).await, 3700);
    app.assert_audit_passes().await;

    // Before its deadline a chat is left alone.
    let now = tokenchat::db::unix_now();
    let early = app.state.recovery.sweep(now + 59).await.unwrap();
    assert_eq!(early.refunded_chats, 0);

    let sweeps: Vec<_> = (0..4)
        .map(|_| {
            let state = app.state.clone();
            tokio::spawn(async move { state.recovery.sweep(now + 61).await.unwrap() })
        })
        .collect();
    let mut refunded = 0;
    for sweep in sweeps {
        refunded += sweep.await.unwrap().refunded_chats;
    }
    assert_eq!(refunded, 3);
    assert_eq!(app.balance(&token).await, 4000);
    assert_eq!(app.chat_counts().await, [("failed".to_string(), 3)]);
    app.assert_audit_passes().await;
}

/// The id of the only user called `username`.
async fn user_id(app: &TestApp, username: &str) -> i64 {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT id FROM users WHERE username = $1")
        .bind(username)
        .fetch_one(pool)
        .await)
    .unwrap()
}

/// What a process that died mid-chat leaves behind: a pending chat due within a minute.
async fn orphaned_chat(app: &TestApp, user_id: i64) {
    tokenchat::db::chats::reserve(
        &app.state.db,
        user_id,
        None,
        "orphan",
        100,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_chat_that_cannot_be_refunded_holds_back_no_other_chats_refund() {
    let app = TestApp::new().await;
    let first = app.user_with_token("first").await;
    let second = app.user_with_token("second").await;
    let (first_id, second_id) = (user_id(&app, "first").await, user_id(&app, "second").await);
    orphaned_chat(&app, first_id).await;
    orphaned_chat(&app, second_id).await;
    // The first user's balance is then lifted to the ceiling, as a build before the fix
    // let a grant do: the refund of the first chat cannot be written.
    tokenchat::db_run!(&app.state.db, pool => sqlx::query(
        "INSERT INTO ledger (user_id, amount, reason, balance_after, created_at)
         SELECT id, $2 - tokens, 'grant', $2, 0 FROM users WHERE id = $1")
        .bind(first_id)
        .bind(tokenchat::domain::MAX_BALANCE)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
    .unwrap();

    let now = tokenchat::db::unix_now();
    let swept = app.state.recovery.sweep(now + 61).await.unwrap();
    assert_eq!(swept.refunded_chats, 1);
    assert_eq!(swept.unsettled_chats, 1);
    assert_eq!(app.balance(&second).await, 4000, "refunded");
    assert_eq!(app.balance(&first).await, tokenchat::domain::MAX_BALANCE);
    let counts = app.chat_counts().await;
    assert_eq!(
        counts,
        [("failed".to_string(), 1), ("pending".to_string(), 1)]
    );
    // A second sweep tries again, and fails again without stopping.
    let again = app.state.recovery.sweep(now + 62).await.unwrap();
    assert_eq!((again.refunded_chats, again.unsettled_chats), (0, 1));
}

#[tokio::test]
async fn a_grant_leaves_room_under_the_ceiling_for_the_refunds_of_pending_chats() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    orphaned_chat(&app, user_id(&app, "user").await).await;
    assert_eq!(app.balance(&token).await, 3900);
    let username = tokenchat::domain::Username::parse("user").unwrap();
    let grant = |amount: i64| {
        let amount = tokenchat::domain::GrantAmount::parse(amount).unwrap();
        tokenchat::services::accounts::grant(&app.state.db, &username, amount)
    };
    let ceiling = tokenchat::domain::MAX_BALANCE;
    // Up to the ceiling with the 100 reserved counted: 3900 + 100 + grant.
    assert!(grant(ceiling - 3999).await.is_err());
    assert_eq!(app.balance(&token).await, 3900, "nothing written");
    assert_eq!(grant(ceiling - 4000).await.unwrap(), ceiling - 100);
    let now = tokenchat::db::unix_now();
    let swept = app.state.recovery.sweep(now + 61).await.unwrap();
    assert_eq!((swept.refunded_chats, swept.unsettled_chats), (1, 0));
    assert_eq!(app.balance(&token).await, ceiling);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn the_audit_counts_every_offence_but_keeps_only_the_first_thousand() {
    let app = TestApp::new().await;
    let wrong_users = tokenchat::services::audit::OFFENCES_KEPT as i64 + 1;
    // Users with a balance and no ledger rows at all: each one an offence.
    tokenchat::db_run!(&app.state.db, pool => sqlx::query(&format!(
        "INSERT INTO users (username, username_key, password_hash, tokens, created_at)
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {wrong_users})
         SELECT 'user' || i, 'user' || i, 'not a hash', 1, 0 FROM n"
    ))
    .execute(pool)
    .await
    .map(|done| done.rows_affected()))
    .unwrap();
    let mut handed_over = 0;
    let report = tokenchat::services::audit::run_reporting(&app.state.db, |offence| {
        assert!(
            offence.contains("balance 1 but ledger sums to 0"),
            "{offence}"
        );
        handed_over += 1;
    })
    .await
    .unwrap();
    assert!(!report.passed());
    assert_eq!(report.users, wrong_users);
    assert_eq!(handed_over, wrong_users);
    assert_eq!(report.offence_count, wrong_users as u64);
    assert_eq!(
        report.offences.len(),
        tokenchat::services::audit::OFFENCES_KEPT
    );
}

#[tokio::test]
async fn the_audit_names_a_balance_that_disagrees_with_the_ledger() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.chat(&token, "hello").await;
    tokenchat::db_run!(&app.state.db, pool => sqlx::query("UPDATE users SET tokens = tokens + 1")
        .execute(pool)
        .await.map(|done| done.rows_affected()))
    .unwrap();
    tokenchat::db_run!(&app.state.db, pool => sqlx::query("UPDATE chats SET status = 'failed'")
        .execute(pool)
        .await.map(|done| done.rows_affected()))
    .unwrap();
    let report = tokenchat::services::audit::run(&app.state.db)
        .await
        .unwrap();
    assert!(!report.passed());
    assert_eq!(report.offence_count, 2, "{:#?}", report.offences);
    assert_eq!(report.offences.len(), 2);
    assert!(report.offences[0].starts_with("user 1 (user): balance 3901 but ledger sums to 3900"));
    assert!(
        report.offences[1].starts_with("chat 1 (failed, cost 100): 1 reservation(s), 0 refund(s)")
    );
}
