//! Work a request abandons half-way (its future dropped when the client hangs up or a
//! time-out fires) is undone before its database connection serves anyone else: an open
//! transaction is rolled back, an unfinished statement runs out, and the next statement on
//! that connection sees only committed data and gets its own answer; the next request is
//! not made to wait for the abandoned work.

use std::time::Duration;

use futures_util::FutureExt;

use tokenchat::db::{self, db_read, db_run, Db};

use crate::common::TestDatabase;

/// Counts to three million: a statement that runs for a good part of a second.
const SLOW_COUNT: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
                          WHERE x < 3000000) SELECT count(*) FROM c";

async fn migrated() -> (TestDatabase, Db) {
    let database = TestDatabase::create().await;
    let db = db::connect(database.url(), db::Open::CreateIfMissing)
        .await
        .unwrap();
    db::migrate(&db).await.unwrap();
    (database, db)
}

async fn password_hash(db: &Db, user_id: i64) -> String {
    db_read!(db, pool => sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_one(pool)
        .await)
    .unwrap()
}

#[tokio::test]
async fn a_transaction_dropped_before_its_commit_is_undone_before_its_connection_runs_anything_else(
) {
    let (database, db) = migrated().await;
    let user = db::users::insert(&db, "alice", "alice", "before", 4000)
        .await
        .unwrap()
        .unwrap();
    // Several times over, so that the same connection (SQLite's one writer) is taken again
    // each time straight after a transaction was abandoned on it.
    for attempt in 0..3 {
        let seen = abandon_a_write_then_read(&db, user).await.unwrap();
        assert_eq!(seen, "before", "attempt {attempt}");
    }
    // The connection is in no transaction left over: what it commits now, another process
    // sees at once.
    commit_password_hash(&db, user, "committed").await.unwrap();
    let other = db::connect(database.url(), db::Open::ExistingOnly)
        .await
        .unwrap();
    assert_eq!(password_hash(&other, user).await, "committed");
    assert_eq!(password_hash(&db, user).await, "committed");
}

#[tokio::test]
async fn a_statement_abandoned_half_way_leaves_its_connection_answering_the_next_one_rightly() {
    let (database, db) = migrated().await;
    let user = db::users::insert(&db, "alice", "alice", "before", 4000)
        .await
        .unwrap()
        .unwrap();
    for attempt in 0..2 {
        let abandoned = tokio::time::timeout(Duration::from_millis(20), count_slowly(&db)).await;
        assert!(abandoned.is_err(), "attempt {attempt}: it finished in time");
        let answer: i64 = db_run!(&db, pool => sqlx::query_scalar("SELECT CAST(7 AS BIGINT)")
            .fetch_one(pool)
            .await)
        .unwrap();
        assert_eq!(answer, 7, "attempt {attempt}");
    }
    // The same with a transaction open around the abandoned statement.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(20),
        write_then_count_slowly(&db, user),
    )
    .await;
    assert!(abandoned.is_err(), "it finished in time");
    commit_password_hash(&db, user, "committed").await.unwrap();
    let other = db::connect(database.url(), db::Open::ExistingOnly)
        .await
        .unwrap();
    assert_eq!(password_hash(&other, user).await, "committed");
    // SQLite's one writer is back in its pool, idle. (sqlx's PostgreSQL pool counts its
    // connections busy until the abandoned statements have run out on the server.)
    let writer = &db.pool_use()[0];
    if writer.name == "sqlite_writer" {
        assert_eq!((writer.in_use, writer.idle), (0, 1), "{writer:?}");
    }
}

async fn count_slowly(db: &Db) -> Result<i64, sqlx::Error> {
    db_run!(db, pool => sqlx::query_scalar(SLOW_COUNT).fetch_one(pool).await)
}

/// A transaction that writes, then runs [`SLOW_COUNT`] before it commits.
async fn write_then_count_slowly(db: &Db, user: i64) -> Result<i64, sqlx::Error> {
    db_run!(db, pool => {
        let mut transaction = pool.begin().await?;
        sqlx::query("UPDATE users SET password_hash = 'abandoned' WHERE id = $1")
            .bind(user)
            .execute(&mut *transaction)
            .await?;
        let count = sqlx::query_scalar(SLOW_COUNT).fetch_one(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(count)
    })
}

/// Writes in a transaction and drops it uncommitted, then reads what was written.
async fn abandon_a_write_then_read(db: &Db, user: i64) -> Result<String, sqlx::Error> {
    db_run!(db, pool => {
        let mut abandoned = pool.begin().await?;
        sqlx::query("UPDATE users SET password_hash = 'abandoned' WHERE id = $1")
            .bind(user)
            .execute(&mut *abandoned)
            .await?;
        drop(abandoned);
        sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
            .bind(user)
            .fetch_one(pool)
            .await
    })
}

async fn commit_password_hash(db: &Db, user: i64, hash: &str) -> Result<(), sqlx::Error> {
    db_run!(db, pool => {
        let mut transaction = pool.begin().await?;
        sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
            .bind(user)
            .bind(hash)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await
    })
}

#[tokio::test]
async fn a_begin_abandoned_before_its_answer_leaves_no_transaction_to_the_next_user() {
    let (database, db) = migrated().await;
    let user = db::users::insert(&db, "alice", "alice", "before", 4000)
        .await
        .unwrap()
        .unwrap();
    let other = db::connect(database.url(), db::Open::ExistingOnly)
        .await
        .unwrap();
    for attempt in 0..5 {
        // Polled once: the connection is taken and `BEGIN` sent, then the wait for its
        // answer is abandoned. PostgreSQL's sqlx counts the transaction only once answered,
        // so it would not roll it back: the connection must not serve anyone after this.
        // (The answer may come within that one poll on a busy machine: then the
        // transaction is simply dropped, and the next try abandons one.)
        let abandoned = (0..100).any(|_| begin_and_drop(&db).now_or_never().is_none());
        // SQLite's connection thread may answer within the poll every time; and when it
        // does not, sqlx's own acknowledgement rolls the transaction back.
        if crate::common::database::on_postgres() {
            assert!(abandoned, "attempt {attempt}: every BEGIN answered at once");
        }
        // Outside any transaction: committed as it returns, so another process sees it.
        let hash = format!("attempt {attempt}");
        let changed = db_run!(&db, pool => sqlx::query(
            "UPDATE users SET password_hash = $2 WHERE id = $1",
        )
        .bind(user)
        .bind(&hash)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .unwrap();
        assert_eq!(changed, 1);
        assert_eq!(password_hash(&other, user).await, hash);
    }
}

#[tokio::test]
async fn a_statement_abandoned_on_postgresql_does_not_hold_up_the_next_one() {
    if !crate::common::database::on_postgres() {
        println!("skipped: SQLite's readers cannot be made to wait without burning a core");
        return;
    }
    let (_database, db) = migrated().await;
    // One connection open and idle, the one the next statement would be given.
    let _: i64 = db_read!(&db, pool => sqlx::query_scalar("SELECT CAST(1 AS BIGINT)")
        .fetch_one(pool)
        .await)
    .unwrap();
    let abandoned =
        tokio::time::timeout(Duration::from_millis(50), sleep_on_the_server(&db, 5)).await;
    assert!(abandoned.is_err(), "the sleep ended early");
    // The abandoned connection is still busy for five seconds; the next statement is not
    // made to wait for it (it gets another).
    let started = std::time::Instant::now();
    let answer: i64 = db_read!(&db, pool => sqlx::query_scalar("SELECT CAST(7 AS BIGINT)")
        .fetch_one(pool)
        .await)
    .unwrap();
    assert_eq!(answer, 7);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited {:?}",
        started.elapsed()
    );
}

/// Begins a transaction and drops it.
async fn begin_and_drop(db: &Db) -> Result<(), sqlx::Error> {
    db_run!(db, pool => pool.begin().await.map(drop))
}

async fn sleep_on_the_server(db: &Db, seconds: i64) -> Result<(), sqlx::Error> {
    db_read!(db, pool => sqlx::query("SELECT pg_sleep($1)")
        .bind(seconds as f64)
        .execute(pool)
        .await
        .map(drop))
}
