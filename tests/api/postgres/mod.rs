//! PostgreSQL: the whole suite once more on it, and what only several processes sharing one
//! database can show: races for the last tokens and for one idempotency key, and one
//! process's orphans refunded by another.

mod abuse_limits;
mod alerts;
mod instances;
mod key_limits;
mod outages;
mod tls;

use instances::{chat, http_client, TwoInstances};

use std::{process::Command, time::Duration};

use serde_json::json;

use crate::{
    common::{
        database::{on_postgres, postgres_server, TestDatabase, POSTGRES_URL_VARIABLE},
        Reply,
    },
    server::{wait_until, Server},
};

/// Runs this test binary again with `TEST_BACKEND=postgres`, so one `cargo test` covers
/// both backends whenever a PostgreSQL server is configured.
#[test]
fn the_whole_suite_also_passes_on_postgresql() {
    if on_postgres() {
        return; // This is that run.
    }
    let Some(_) = postgres_server() else {
        println!("PostgreSQL run skipped: set {POSTGRES_URL_VARIABLE} to run the suite on it too");
        return;
    };
    let output = Command::new(std::env::current_exe().unwrap())
        .env("TEST_BACKEND", "postgres")
        .args(["--skip", "the_whole_suite_also_passes_on_postgresql"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    let summary: Vec<&str> = report
        .lines()
        .filter(|line| line.starts_with("test result") || line.contains("FAILED"))
        .collect();
    println!("on PostgreSQL: {}", summary.join("\n"));
    assert!(
        output.status.success(),
        "the suite failed on PostgreSQL:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn two_processes_racing_for_the_last_tokens_answer_exactly_what_the_balance_buys() {
    let Some(pair) = TwoInstances::start(&[("INITIAL_TOKENS", "5000")]).await else {
        return;
    };
    let http = http_client();
    let token = pair.user(&http).await;
    let answered = pair.race_chats(&http, &token, 300).await;
    assert_eq!(answered, 50);
    assert_eq!(pair.llm.calls(), 50);
    assert_eq!(pair.scalar("SELECT tokens FROM users").await, 0);
    let audit = pair.audit();
    assert!(audit.status.success(), "{audit:?}");
    // Migrating a migrated database logs no server notice ("already exists").
    let migrated = pair.run("migrate");
    assert!(migrated.status.success(), "{migrated:?}");
    let said = [&migrated.stdout, &migrated.stderr].map(|out| String::from_utf8_lossy(out));
    assert!(!said.concat().contains("already exists"), "{said:?}");
}

#[tokio::test]
async fn two_processes_creating_keys_at_once_never_pass_the_cap_of_live_keys() {
    let Some(pair) = TwoInstances::start(&[]).await else {
        return;
    };
    let http = http_client();
    let token = pair.user(&http).await;
    // Several rounds, as the race showed in about half of them.
    for round in 0..4 {
        let creations: Vec<_> = (0..40)
            .map(|n| {
                let base = if n % 2 == 0 {
                    &pair.first.base
                } else {
                    &pair.second.base
                };
                let (http, url, token) = (http.clone(), format!("{base}/keys"), token.clone());
                tokio::spawn(async move {
                    let created = http
                        .post(url)
                        .bearer_auth(token)
                        .json(&json!({ "name": format!("key {n}") }))
                        .send()
                        .await
                        .unwrap();
                    created.status().as_u16()
                })
            })
            .collect();
        let mut created = 0;
        for creation in creations {
            match creation.await.unwrap() {
                201 => created += 1,
                400 => {}
                other => panic!("unexpected status {other}"),
            }
        }
        assert_eq!(created, 25, "round {round}");
        let live = "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL";
        assert_eq!(pair.scalar(live).await, 25, "round {round}");
        // Revoke them all for the next round.
        let revoked = pair
            .scalar(
                "WITH revoked AS (UPDATE api_keys SET revoked_at = 1 WHERE revoked_at IS NULL
                 RETURNING id) SELECT COUNT(*) FROM revoked",
            )
            .await;
        assert_eq!(revoked, 25);
    }
}

#[tokio::test]
async fn one_idempotency_key_sent_to_both_processes_at_once_is_charged_once() {
    let Some(pair) = TwoInstances::start(&[]).await else {
        return;
    };
    pair.llm.set_reply(Reply::Stall(Duration::from_millis(500)));
    let http = reqwest::Client::new();
    let token = pair.user(&http).await;
    let sends: Vec<_> = [
        &pair.first.base,
        &pair.second.base,
        &pair.first.base,
        &pair.second.base,
    ]
    .into_iter()
    .map(|base| {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        tokio::spawn(async move { chat(&http, &base, &token, Some("same-key")).await })
    })
    .collect();
    let mut statuses = Vec::new();
    for send in sends {
        statuses.push(send.await.unwrap());
    }
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.iter().all(|status| [200, 409].contains(status)),
        "{statuses:?}"
    );
    // Once the first has settled, a retry anywhere replays it.
    assert_eq!(
        chat(&http, &pair.second.base, &token, Some("same-key")).await,
        200
    );
    assert_eq!(
        chat(&http, &pair.first.base, &token, Some("same-key")).await,
        200
    );
    assert_eq!(pair.llm.calls(), 1);
    assert_eq!(pair.scalar("SELECT tokens FROM users").await, 3900);
    assert!(pair.audit().status.success());
}

#[tokio::test]
async fn chats_of_a_killed_process_are_refunded_once_by_the_other() {
    let Some(mut pair) =
        TwoInstances::start(&[("LLM_TIMEOUT_SECS", "1"), ("INITIAL_TOKENS", "4000")]).await
    else {
        return;
    };
    pair.llm.set_reply(Reply::Stall(Duration::from_secs(30)));
    let http = reqwest::Client::new();
    let token = pair.user(&http).await;
    for _ in 0..3 {
        let (http, base, token) = (http.clone(), pair.first.base.clone(), token.clone());
        tokio::spawn(async move {
            let _ = http
                .post(format!("{base}/chat"))
                .bearer_auth(token)
                .json(&json!({ "message": "doomed" }))
                .send()
                .await;
        });
    }
    wait_until(|| async { pair.llm.calls() == 3 }).await;
    assert_eq!(pair.scalar("SELECT tokens FROM users").await, 3700);
    pair.first.child.kill().unwrap();
    pair.first.child.wait().unwrap();
    // The second process's sweep (every second here) refunds them past their deadline
    // (1 + 5 s), each once.
    wait_until(|| async {
        pair.scalar("SELECT COUNT(*) FROM chats WHERE status = 'failed'")
            .await
            == 3
    })
    .await;
    assert_eq!(pair.scalar("SELECT tokens FROM users").await, 4000);
    assert_eq!(
        pair.scalar("SELECT COUNT(*) FROM ledger WHERE reason = 'chat_refund'")
            .await,
        3
    );
    assert!(pair.audit().status.success());
}

#[test]
fn a_database_that_is_down_at_start_stops_the_server_with_one_line() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    // With parameters sqlx does not know, which it warns of with their values.
    let url = format!(
        "postgres://tokenchat:hunter2-secret@127.0.0.1:{port}/tokenchat\
         ?PASSWORD=upper-secret&sslpassword=ssl-secret&password=amp&tail-secret"
    );
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let output = Server::command(dir.path(), &[("DATABASE_URL", &url)])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(30));
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(said.contains("cannot open DATABASE_URL"), "{said}");
    let everything = format!("{said}{}", String::from_utf8_lossy(&output.stdout));
    for secret in [
        "hunter2-secret",
        "upper-secret",
        "ssl-secret",
        "tail-secret",
    ] {
        assert!(!everything.contains(secret), "{everything}");
    }
}

#[tokio::test]
async fn the_statement_timeout_bounds_every_statement_on_postgresql() {
    if !on_postgres() {
        println!("skipped: runs in the PostgreSQL run of the suite");
        return;
    }
    let database = TestDatabase::create().await;
    let settings = tokenchat::db::PoolSettings {
        max_connections: Some(2),
        statement_timeout: Some(Duration::from_millis(100)),
    };
    let db =
        tokenchat::db::connect_with(database.url(), tokenchat::db::Open::ExistingOnly, &settings)
            .await
            .unwrap();
    let slow = tokenchat::db_run!(&db, pool => {
        sqlx::query("SELECT pg_sleep(2)").execute(pool).await.map(|_| ())
    });
    let err = slow.expect_err("a two-second statement outlived a 100 ms timeout");
    assert!(err.to_string().contains("statement timeout"), "{err}");
    db.close().await;
}

/// A chat's transaction locks its payer's row before its foreign key checks can share it
/// (migration `payer_locked_first`). Otherwise a second chat of the same user, waiting for
/// the first, would already hold a KEY SHARE lock on the row, PostgreSQL would record the
/// row's deleter as a MultiXact of both, and that old version would stay in the way of
/// every read of the row until VACUUM (BENCHMARKS.md, "Row locks that no reader can see
/// past"). Seen from outside: while the second chat waits, the row's visible version names
/// one deleter, the first chat's transaction.
#[tokio::test]
async fn a_waiting_second_chat_of_one_user_never_shares_the_row_lock_of_the_first() {
    use sqlx::{Connection, PgConnection};
    if !on_postgres() {
        println!("skipped: runs in the PostgreSQL run of the suite");
        return;
    }
    let database = TestDatabase::create().await;
    let db = tokenchat::db::connect(database.url(), tokenchat::db::Open::CreateIfMissing)
        .await
        .unwrap();
    tokenchat::db::migrate(&db).await.unwrap();
    db.close().await;
    let observer = sqlx::PgPool::connect(database.url()).await.unwrap();
    let user_id: i64 = sqlx::query_scalar(
        "INSERT INTO users (username, username_key, password_hash, tokens, created_at)
         VALUES ('payer', 'payer', 'not-a-hash', 1000, 0) RETURNING id",
    )
    .fetch_one(&observer)
    .await
    .unwrap();
    let insert_chat = format!(
        "INSERT INTO chats (user_id, message, status, cost, created_at)
         VALUES ({user_id}, 'hi', 'pending', 100, 0)"
    );

    let mut first = PgConnection::connect(database.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut first).await.unwrap();
    sqlx::query(&insert_chat).execute(&mut first).await.unwrap();
    let first_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut first)
        .await
        .unwrap();

    let mut second = PgConnection::connect(database.url()).await.unwrap();
    let second_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut second)
        .await
        .unwrap();
    let waiting_chat = {
        let insert_chat = insert_chat.clone();
        tokio::spawn(async move {
            sqlx::query(&insert_chat)
                .execute(&mut second)
                .await
                .unwrap();
            second
        })
    };
    let waits_for_first =
        format!("SELECT count(*) FROM pg_locks WHERE pid = {second_pid} AND NOT granted");
    wait_until(|| async {
        sqlx::query_scalar::<_, i64>(&waits_for_first)
            .fetch_one(&observer)
            .await
            .unwrap()
            == 1
    })
    .await;

    let deleter: String = sqlx::query_scalar(&format!(
        "SELECT xmax::text FROM users WHERE id = {user_id}"
    ))
    .fetch_one(&observer)
    .await
    .unwrap();
    assert_eq!(
        deleter, first_xid,
        "the payer's row names a deleter other than the first chat's transaction"
    );

    sqlx::query("COMMIT").execute(&mut first).await.unwrap();
    waiting_chat.await.unwrap().close().await.unwrap();
    let (chats, tokens): (i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM chats), tokens FROM users WHERE id = {user_id}"
    ))
    .fetch_one(&observer)
    .await
    .unwrap();
    assert_eq!((chats, tokens), (2, 800));
}

#[tokio::test]
async fn two_processes_racing_with_priced_chats_never_overspend_and_settle_every_charge_exactly() {
    let (_book_dir, book) = crate::prices::book_file(crate::prices::BOOK);
    let Some(pair) =
        TwoInstances::start(&[("INITIAL_TOKENS", "3000"), ("CONFIG_FILE", &book)]).await
    else {
        return;
    };
    pair.llm
        .set_reply(Reply::EchoReporting(crate::prices::usage(20, 5, 10, 2)));
    let http = http_client();
    let token = pair.user(&http).await;
    let answered = pair.race_chats(&http, &token, 200).await;
    // 5 + ceil(15 + 2.5 + 20) = 43 a chat, whichever process answered it.
    assert!(answered > 0);
    assert_eq!(
        pair.scalar("SELECT tokens FROM users").await,
        3000 - 43 * answered
    );
    assert_eq!(
        pair.scalar("SELECT COUNT(*) FROM chats WHERE cost > reserved OR status = 'pending'")
            .await,
        0
    );
    // One row a charged chat, its charge: the reservations were holds, all let go of.
    assert_eq!(
        pair.scalar("SELECT COUNT(*) FROM ledger WHERE reason = 'chat_charge' AND amount = -43")
            .await,
        answered
    );
    assert_eq!(
        pair.scalar("SELECT COUNT(*) FROM ledger WHERE chat_id IS NOT NULL")
            .await,
        answered
    );
    assert_eq!(pair.scalar("SELECT held FROM users").await, 0);
    let audit = pair.audit();
    assert!(audit.status.success(), "{audit:?}");
}
