//! Upgrading a database that holds accounts: every migration keeps every row, id and
//! balance, and the triggers work afterwards.

use tokenchat::db::{self, db_run, Db};

use crate::common::{database::on_postgres, TestDatabase};

/// The migrations of this backend up to (not including) `first_version_left_out`, as a
/// migrator of their own read from a copy of those files.
async fn migrator_before(
    first_version_left_out: &str,
) -> (sqlx::migrate::Migrator, tempfile::TempDir) {
    let backend = if on_postgres() { "postgres" } else { "sqlite" };
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.as_str() < first_version_left_out {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    (migrator, dir)
}

/// A new database with the migrations before `first_version_left_out` run on it.
async fn database_before(first_version_left_out: &str) -> (TestDatabase, Db) {
    let database = TestDatabase::create().await;
    let db = db::connect(database.url(), db::Open::CreateIfMissing)
        .await
        .unwrap();
    let (before, _dir) = migrator_before(first_version_left_out).await;
    db::run_migrator(&db, &before).await.unwrap();
    (database, db)
}

async fn execute(db: &Db, statement: &str) {
    db_run!(db, pool => sqlx::query(statement).execute(pool).await.map(|_| ())).unwrap();
}

async fn count(db: &Db, query: &str) -> i64 {
    db_run!(db, pool => sqlx::query_scalar(query).fetch_one(pool).await).unwrap()
}

#[tokio::test]
async fn the_streaming_migration_keeps_every_row_and_the_ledger_still_moves_balances() {
    let (_database, db) = database_before("20261201000000").await;

    // A year of history in miniature, written as the earlier schema's triggers write it.
    execute(
        &db,
        "INSERT INTO users (username, username_key, password_hash, tokens, created_at)
         VALUES ('alice', 'alice', 'x', 0, 1)",
    )
    .await;
    execute(
        &db,
        "INSERT INTO ledger (user_id, amount, reason, balance_after, created_at)
         VALUES (1, 1000, 'initial_grant', 1000, 1)",
    )
    .await;
    for status in ["answered", "failed", "pending"] {
        execute(
            &db,
            "INSERT INTO chats (user_id, message, status, cost, created_at, deadline_at)
             VALUES (1, 'hi', 'pending', 100, 2, 999999999999)",
        )
        .await;
        if status != "pending" {
            let response = if status == "answered" {
                "'hello'"
            } else {
                "NULL"
            };
            execute(
                &db,
                &format!(
                    "UPDATE chats SET status = '{status}', response = {response}, finished_at = 3
                     WHERE id = (SELECT MAX(id) FROM chats)"
                ),
            )
            .await;
        }
    }
    execute(
        &db,
        "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, chat_id, created_at)
         VALUES (1, 'k', 'h', 1, 2)",
    )
    .await;
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 800);
    let ledger_before = count(&db, "SELECT COUNT(*) FROM ledger").await;

    db::migrate(&db).await.unwrap();

    assert_eq!(count(&db, "SELECT COUNT(*) FROM chats").await, 3);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM ledger").await,
        ledger_before
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM idempotency_keys").await, 1);
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 800);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM chats WHERE refunded AND status = 'failed'"
        )
        .await,
        1
    );
    let report = tokenchat::services::audit::run(&db).await.unwrap();
    assert!(report.passed(), "{:#?}", report.offences);

    // The triggers came through: a new chat reserves, an abandoned refunded one is
    // refunded, the pending one still fails with its refund, and ids go on.
    execute(
        &db,
        "INSERT INTO chats (user_id, message, status, cost, created_at)
         VALUES (1, 'again', 'pending', 100, 4)",
    )
    .await;
    assert_eq!(count(&db, "SELECT MAX(id) FROM chats").await, 4);
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 700);
    execute(
        &db,
        "UPDATE chats SET status = 'abandoned', refunded = TRUE, finished_at = 5 WHERE id = 4",
    )
    .await;
    execute(
        &db,
        "UPDATE chats SET status = 'failed', refunded = TRUE, finished_at = 5 WHERE id = 3",
    )
    .await;
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 900);
    // Deleting a user still cascades through the new tables' references.
    let report = tokenchat::services::audit::run(&db).await.unwrap();
    assert!(report.passed(), "{:#?}", report.offences);
    execute(&db, "DELETE FROM users").await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM ledger").await, 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM chats").await, 0);
    db.close().await;
}

#[tokio::test]
async fn the_pass_through_migration_keeps_the_ledger_and_its_triggers_and_meters_embeddings() {
    let (_database, db) = database_before("20261210000000").await;
    execute(
        &db,
        "INSERT INTO users (username, username_key, password_hash, tokens, created_at)
         VALUES ('alice', 'alice', 'x', 0, 1)",
    )
    .await;
    execute(
        &db,
        "INSERT INTO ledger (user_id, amount, reason, balance_after, created_at)
         VALUES (1, 1000, 'initial_grant', 1000, 1)",
    )
    .await;
    for status in ["answered", "failed"] {
        execute(
            &db,
            "INSERT INTO chats (user_id, message, status, cost, created_at, deadline_at)
             VALUES (1, 'hi', 'pending', 100, 2, 999999999999)",
        )
        .await;
        execute(
            &db,
            &format!(
                "UPDATE chats SET status = '{status}', refunded = {}, response = 'x',
                                  finished_at = 3
                 WHERE id = (SELECT MAX(id) FROM chats)",
                status == "failed"
            ),
        )
        .await;
    }
    let rows = "SELECT id, amount, reason, chat_id, balance_after FROM ledger ORDER BY id";
    type Row = (i64, i64, String, Option<i64>, i64);
    let ledger = |db: &Db| {
        let db = db.clone();
        async move {
            db_run!(&db, pool => sqlx::query_as::<_, Row>(rows).fetch_all(pool).await).unwrap()
        }
    };
    let before = ledger(&db).await;
    assert_eq!(before.len(), 4);
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 900);

    db::migrate(&db).await.unwrap();

    assert_eq!(ledger(&db).await, before);
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 900);
    // The chats' triggers write to the new ledger: a reservation, then its refund.
    execute(
        &db,
        "INSERT INTO chats (user_id, message, status, cost, created_at)
         VALUES (1, 'again', 'pending', 100, 4)",
    )
    .await;
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 800);
    execute(
        &db,
        "UPDATE chats SET status = 'failed', refunded = TRUE, finished_at = 5 WHERE id = 3",
    )
    .await;
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 900);
    // And an embeddings call is reserved, then kept or refunded, in ledger rows naming it.
    for (id, status) in [(1, "answered"), (2, "failed")] {
        execute(
            &db,
            "INSERT INTO embeddings (user_id, model, status, cost, created_at, deadline_at)
             VALUES (1, 'm', 'pending', 1, 6, 999999999999)",
        )
        .await;
        execute(
            &db,
            &format!("UPDATE embeddings SET status = '{status}', finished_at = 7 WHERE id = {id}"),
        )
        .await;
    }
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 899);
    let kinds = "SELECT COUNT(*) FROM ledger WHERE embedding_id IS NOT NULL
                 AND reason IN ('embedding', 'embedding_refund')";
    assert_eq!(count(&db, kinds).await, 3);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM ledger").await, 9);
    let report = tokenchat::services::audit::run(&db).await.unwrap();
    assert!(report.passed(), "{:#?}", report.offences);
    execute(&db, "DELETE FROM users").await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM ledger").await, 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM embeddings").await, 0);
    db.close().await;
}

/// The opcodes SQLite would run for `statement`, one per step of its program.
async fn sqlite_program(
    pool: &tokenchat::db::Connections<sqlx::Sqlite>,
    statement: &str,
) -> Vec<String> {
    use sqlx::Row;
    sqlx::query(&format!("EXPLAIN {statement}"))
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<String, _>("opcode"))
        .collect()
}

#[tokio::test]
async fn the_status_checks_migration_keeps_every_row_and_still_refuses_an_unknown_status() {
    let (_database, db) = database_before("20261218000000").await;
    execute(
        &db,
        "INSERT INTO users (username, username_key, password_hash, tokens, created_at)
         VALUES ('alice', 'alice', 'x', 1000, 1)",
    )
    .await;
    for (table, status, columns) in [
        ("chats", "answered", "message, status, cost, created_at"),
        ("chats", "abandoned", "message, status, cost, created_at"),
        ("embeddings", "failed", "model, status, cost, created_at"),
    ] {
        execute(
            &db,
            &format!(
                "INSERT INTO {table} (user_id, deadline_at, {columns})
                 VALUES (1, 999999999999, 'm', 'pending', 10, 2)"
            ),
        )
        .await;
        execute(
            &db,
            &format!(
                "UPDATE {table} SET status = '{status}', finished_at = 3
                 WHERE id = (SELECT MAX(id) FROM {table})"
            ),
        )
        .await;
    }
    type Rows = Vec<(i64, String, i64)>;
    let rows = |db: &Db, table: &'static str| {
        let db = db.clone();
        async move {
            let query = format!("SELECT id, status, cost FROM {table} ORDER BY id");
            db_run!(&db, pool => sqlx::query_as::<_, (i64, String, i64)>(&query)
                .fetch_all(pool)
                .await)
            .unwrap()
        }
    };
    let (chats, embeddings): (Rows, Rows) =
        (rows(&db, "chats").await, rows(&db, "embeddings").await);
    assert_eq!(chats.len(), 2);
    assert_eq!(embeddings.len(), 1);

    db::migrate(&db).await.unwrap();

    assert_eq!(rows(&db, "chats").await, chats);
    assert_eq!(rows(&db, "embeddings").await, embeddings);
    assert_eq!(count(&db, "SELECT tokens FROM users").await, 980);
    // Every status the tables know still goes in; one they do not is refused.
    for (table, statuses) in [
        ("chats", &["pending", "abandoned", "failed", "answered"][..]),
        ("embeddings", &["pending", "answered", "failed"][..]),
    ] {
        for status in statuses {
            let update = format!("UPDATE {table} SET status = '{status}' WHERE id = 1");
            execute(&db, &update).await;
        }
        let unknown = format!("UPDATE {table} SET status = 'lost' WHERE id = 1");
        let refused = db_run!(&db, pool => sqlx::query(&unknown).execute(pool).await.map(|_| ()));
        match refused {
            Err(sqlx::Error::Database(err)) => assert!(err.is_check_violation(), "{err}"),
            other => panic!("{table}: status 'lost' was not refused: {other:?}"),
        }
    }
    if let db::Db::Sqlite(sqlite) = &db {
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&sqlite.writer)
            .await
            .unwrap();
        assert_eq!(integrity, "ok");
        // No temporary B-tree for the CHECK any more on the connection that writes (the
        // one that migrated, which read its schema again).
        for table in ["chats", "embeddings"] {
            let update = format!("UPDATE {table} SET status = 'answered' WHERE id = 1");
            let program = sqlite_program(&sqlite.writer, &update).await;
            assert!(program.iter().any(|opcode| opcode == "Halt"), "{program:?}");
            assert!(
                !program.iter().any(|opcode| opcode == "OpenEphemeral"),
                "{table}: {program:?}"
            );
        }
    }
    db.close().await;
}

#[tokio::test]
async fn the_holds_migration_settles_calls_reserved_before_it_as_they_were_and_holds_the_next() {
    let (_database, db) = database_before("20261219000000").await;
    for statement in [
        "INSERT INTO users (username, username_key, password_hash, tokens, created_at)
         VALUES ('alice', 'alice', 'x', 0, 1)",
        "INSERT INTO ledger (user_id, amount, reason, balance_after, created_at)
         VALUES (1, 1000, 'initial_grant', 1000, 1)",
        // A priced chat and a priced embeddings call in flight across the upgrade, each
        // reserved in the ledger as before.
        "INSERT INTO chats (user_id, message, status, cost, reserved, created_at, deadline_at)
         VALUES (1, 'm', 'pending', 50, 50, 2, 999999999999)",
        "INSERT INTO embeddings (user_id, model, status, cost, reserved, created_at, deadline_at)
         VALUES (1, 'm', 'pending', 30, 30, 2, 999999999999)",
    ] {
        execute(&db, statement).await;
    }
    let balance = "SELECT tokens FROM users";
    assert_eq!(count(&db, balance).await, 920);

    db::migrate(&db).await.unwrap();

    assert_eq!(count(&db, balance).await, 920);
    assert_eq!(count(&db, "SELECT held FROM users").await, 0);
    // They settle as they were reserved: the rest, and the whole reservation, given back.
    execute(
        &db,
        "UPDATE chats SET status = 'answered', response = 'r', cost = 20, finished_at = 3
         WHERE id = 1",
    )
    .await;
    execute(
        &db,
        "UPDATE embeddings SET status = 'failed', finished_at = 3 WHERE id = 1",
    )
    .await;
    assert_eq!(count(&db, balance).await, 980);
    // A call reserved now holds: no ledger row until it is charged, then one.
    execute(
        &db,
        "INSERT INTO chats (user_id, message, status, cost, reserved, created_at, deadline_at,
                            held)
         VALUES (1, 'm', 'pending', 100, 100, 4, 999999999999, TRUE)",
    )
    .await;
    assert_eq!(count(&db, "SELECT held FROM users").await, 100);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM ledger WHERE chat_id = 2").await,
        0
    );
    // What is held is not the user's to spend: a hold past the rest is refused.
    let past = "INSERT INTO chats (user_id, message, status, cost, reserved, created_at,
                                   deadline_at, held)
                VALUES (1, 'm', 'pending', 881, 881, 4, 999999999999, TRUE)";
    match db_run!(&db, pool => sqlx::query(past).execute(pool).await.map(|_| ())) {
        Err(sqlx::Error::Database(err)) => assert!(err.is_check_violation(), "{err}"),
        other => panic!("a hold past the balance was not refused: {other:?}"),
    }
    execute(
        &db,
        "UPDATE chats SET status = 'answered', response = 'r', cost = 40, finished_at = 5
         WHERE id = 2",
    )
    .await;
    let rows: Vec<(i64, String, i64, i64)> = db_run!(&db, pool => sqlx::query_as(
        "SELECT id, reason, amount, balance_after FROM ledger ORDER BY id",
    )
    .fetch_all(pool)
    .await)
    .unwrap();
    let moves: Vec<(&str, i64, i64)> = rows
        .iter()
        .map(|(_, reason, amount, after)| (reason.as_str(), *amount, *after))
        .collect();
    assert_eq!(
        moves,
        [
            ("initial_grant", 1000, 1000),
            ("chat_reservation", -50, 950),
            ("embedding", -30, 920),
            ("chat_settlement", 30, 950),
            ("embedding_refund", 30, 980),
            ("chat_charge", -40, 940),
        ]
    );
    // On SQLite the ledger lost AUTOINCREMENT: ids go on one by one from the last. (On
    // PostgreSQL `ledger_moves_balance` draws each row's id a second time, under the lock.)
    if let db::Db::Sqlite(_) = &db {
        let ids: Vec<i64> = rows.iter().map(|row| row.0).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    }
    assert_eq!(count(&db, "SELECT held FROM users").await, 0);
    let unknown = "INSERT INTO ledger (user_id, amount, reason, balance_after, created_at)
                   VALUES (1, 1, 'lost', 941, 6)";
    match db_run!(&db, pool => sqlx::query(unknown).execute(pool).await.map(|_| ())) {
        Err(sqlx::Error::Database(err)) => assert!(err.is_check_violation(), "{err}"),
        other => panic!("an unknown reason was not refused: {other:?}"),
    }
    let audit = tokenchat::services::audit::run(&db).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.offences);
    if let db::Db::Sqlite(sqlite) = &db {
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&sqlite.writer)
            .await
            .unwrap();
        assert_eq!(integrity, "ok");
    }
    db.close().await;
}
