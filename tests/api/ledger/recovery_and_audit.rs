//! Recovery refunds abandoned chats once and however many there are, one that cannot be
//! refunded holds back no other, grants leave room for pending refunds, and the audit finds
//! what disagrees with the ledger.

use std::time::Duration;

use crate::common::TestApp;

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
        orphaned_chat(&app, user_id).await;
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

#[tokio::test]
async fn a_sweep_refunds_every_abandoned_chat_however_many_batches_they_fill() {
    let app = TestApp::new().await;
    // Exactly two batches of 100: the sweep must read a third, empty one to know it is done.
    let mut tokens = Vec::new();
    for n in 0..5 {
        let username = format!("user{n}");
        tokens.push(app.user_with_token(&username).await);
        let id = user_id(&app, &username).await;
        for _ in 0..40 {
            orphaned_chat(&app, id).await;
        }
    }
    let swept = app
        .state
        .recovery
        .sweep(tokenchat::db::unix_now() + 61)
        .await
        .unwrap();
    assert_eq!((swept.refunded_chats, swept.unsettled_chats), (200, 0));
    for token in &tokens {
        assert_eq!(app.balance(token).await, 4000);
    }
    assert_eq!(app.chat_counts().await, [("failed".to_string(), 200)]);
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
        tokenchat::db::chats::NewChat {
            user_id,
            conversation_id: None,
            message: "orphan",
            cost: 100,
            priced: None,
            budgets: Default::default(),
            settle_within: Duration::from_secs(60),
        },
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
