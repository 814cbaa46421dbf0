//! The big database of the growth benchmark (`BENCH_BIG=1`): a year of a busy service's
//! history, written by SQL straight into the tables rather than through the API, which
//! would take days.
//!
//! 1,000,000 users (`user1` to `user1000000`, all with the password `bench-password`),
//! 5,000,000 chats (one in ten failed and refunded, each the first of its own conversation)
//! and 10,000,000 ledger rows: each user's initial grant, every chat's reservation, every
//! failed chat's refund, and 3,500,000 grants. `user1` is the heavy user: 100,000 chats of
//! its own, so its history has pages deep enough to measure. Balances and running balances
//! are those the ledger adds up to, so `tokenchat audit` passes on it.
//!
//! The triggers and secondary indexes are set aside while the rows go in, and put back
//! after: indexes built once from sorted rows instead of row by row, and no trigger moving
//! a balance ten million times.

use std::time::Instant;

use sqlx::{Connection, Executor, PgConnection, Row, SqliteConnection};

/// The one connection that writes the rows, on either backend.
enum Loader {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Loader {
    /// Runs one statement; the rows it changed.
    async fn run(&mut self, sql: &str) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(connection) => connection.execute(sql).await?.rows_affected(),
            Self::Postgres(connection) => connection.execute(sql).await?.rows_affected(),
        })
    }

    async fn rows<T>(&mut self, sql: &str) -> Vec<T>
    where
        T: Send + Unpin,
        for<'r> T:
            sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        match self {
            Self::Sqlite(connection) => sqlx::query_as(sql).fetch_all(connection).await,
            Self::Postgres(connection) => sqlx::query_as(sql).fetch_all(connection).await,
        }
        .expect("schema")
    }

    /// Runs one statement and says how long it took.
    async fn timed(&mut self, what: &str, sql: &str) {
        let started = Instant::now();
        let rows = self
            .run(sql)
            .await
            .unwrap_or_else(|err| panic!("{what}: {err}\n{sql}"));
        println!(
            "  {what}: {rows} rows in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}

pub const USERS: i64 = 1_000_000;
pub const CHATS: i64 = 5_000_000;
pub const GRANTS: i64 = 3_500_000;
/// Chats of `user1`; the others' are dealt round-robin to users 2 and up.
pub const HEAVY_USER_CHATS: i64 = 100_000;
const COST: i64 = 100;
/// `user1`'s initial grant: enough for its own chats and for every benchmark run after.
const HEAVY_USER_GRANT: i64 = 1_000_000_000_000;
const INITIAL_GRANT: i64 = 4000;
/// Every chat whose id is a multiple of this failed and was refunded.
const FAILED_EVERY: i64 = 10;
/// A year before the generation's `now`: the rows are spread over it.
const START: i64 = 1_764_547_200;

/// Whether the database at `url` already holds the big data set (generation takes minutes,
/// so runs reuse it).
pub async fn exists(url: &str) -> bool {
    let Ok(db) = tokenchat::db::connect(url, tokenchat::db::Open::ExistingOnly).await else {
        return false;
    };
    let users: Result<i64, _> = tokenchat::db_run!(&db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(pool).await
    });
    db.close().await;
    users.is_ok_and(|users| users >= USERS)
}

/// Creates (or empties and refills) the big database at `url`, SQLite or PostgreSQL.
pub async fn generate(url: &str, password_hash: &str) {
    let started = Instant::now();
    let db = tokenchat::db::connect(url, tokenchat::db::Open::CreateIfMissing)
        .await
        .expect("big database");
    tokenchat::db::migrate(&db).await.expect("migrations");
    db.close().await;
    let mut loader = if url.starts_with("sqlite") {
        Loader::Sqlite(SqliteConnection::connect(url).await.expect("SQLite"))
    } else {
        Loader::Postgres(PgConnection::connect(url).await.expect("PostgreSQL"))
    };
    match loader {
        Loader::Sqlite(_) => fill_sqlite(&mut loader, password_hash).await,
        Loader::Postgres(_) => fill_postgres(&mut loader, password_hash).await,
    }
    println!(
        "generated the big database in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

async fn fill_sqlite(loader: &mut Loader, password_hash: &str) {
    for pragma in [
        "PRAGMA foreign_keys = OFF",
        "PRAGMA synchronous = OFF",
        "PRAGMA cache_size = -1000000",
        "PRAGMA temp_store = FILE",
    ] {
        loader.run(pragma).await.expect(pragma);
    }
    let set_aside: Vec<(String, String, String)> = loader
        .rows(
            "SELECT type, name, sql FROM sqlite_master
             WHERE type IN ('index', 'trigger') AND sql IS NOT NULL
               AND tbl_name IN ('users', 'chats', 'ledger', 'conversations')",
        )
        .await;
    for (kind, name, _) in &set_aside {
        let drop = format!("DROP {} {name}", kind.to_uppercase());
        loader.run(&drop).await.expect("set aside");
    }
    fill(loader, password_hash, sqlite_numbers).await;
    for (_, _, sql) in set_aside.iter().filter(|(kind, _, _)| kind == "index") {
        loader.timed("index", sql).await;
    }
    loader.timed("balances", SET_BALANCES).await;
    for (_, _, sql) in set_aside.iter().filter(|(kind, _, _)| kind == "trigger") {
        loader.run(sql).await.expect("trigger back");
    }
    // Into the database file, so the first run does not meet a log of gigabytes.
    loader
        .timed("checkpoint", "PRAGMA wal_checkpoint(TRUNCATE)")
        .await;
}

async fn fill_postgres(loader: &mut Loader, password_hash: &str) {
    // Triggers (and the foreign keys, which PostgreSQL checks with triggers) off for this
    // session only.
    loader
        .run("SET session_replication_role = replica")
        .await
        .expect("replica role (the bench's PostgreSQL user must be a superuser)");
    let set_aside: Vec<(String, String)> = loader
        .rows(
            "SELECT indexname, indexdef FROM pg_indexes
             WHERE schemaname = current_schema()
               AND tablename IN ('users', 'chats', 'ledger', 'conversations')
               AND indexdef NOT LIKE 'CREATE UNIQUE INDEX%'",
        )
        .await;
    for (name, _) in &set_aside {
        let drop = format!("DROP INDEX {name}");
        loader.run(&drop).await.expect("set aside");
    }
    loader
        .run("SET maintenance_work_mem = '1GB'")
        .await
        .expect("settings");
    fill(loader, password_hash, postgres_numbers).await;
    for (_, sql) in &set_aside {
        loader.timed("index", sql).await;
    }
    loader.timed("balances", SET_BALANCES).await;
    for table in ["users", "chats", "ledger", "api_keys"] {
        let sequence = format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"
        );
        loader.run(&sequence).await.expect("sequence");
    }
    // What autovacuum would otherwise do during the first measurements (it did).
    loader.timed("vacuum", "VACUUM (ANALYZE)").await;
}

/// Every balance as the sum of its ledger rows (the triggers that keep it are set aside).
const SET_BALANCES: &str = "UPDATE users SET tokens = (
    SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger WHERE ledger.user_id = users.id)";

/// The numbers 1 to `count` as a subquery with one column, `i`.
fn sqlite_numbers(count: i64) -> String {
    format!("(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) SELECT i FROM n)")
}

fn postgres_numbers(count: i64) -> String {
    format!("(SELECT generate_series(CAST(1 AS BIGINT), {count}) AS i)")
}

/// The owner of chat `i`: `user1` for the first chats, then users 2 and up in turn.
fn owner_of_chat() -> String {
    format!(
        "CASE WHEN i <= {HEAVY_USER_CHATS} THEN 1 ELSE 2 + (i - {} ) % {} END",
        HEAVY_USER_CHATS + 1,
        USERS - 1
    )
}

/// The rows, written in the same SQL for both backends.
async fn fill(loader: &mut Loader, password_hash: &str, numbers: fn(i64) -> String) {
    let owner = owner_of_chat();
    let failed = format!("i % {FAILED_EVERY} = 0");
    let users = format!(
        "INSERT INTO users (id, username, username_key, password_hash, tokens, created_at)
         SELECT i, 'user' || i, 'user' || i, '{password_hash}', 0, {START} + i FROM {} AS s",
        numbers(USERS)
    );
    loader.timed("users", &users).await;
    let conversations = format!(
        "INSERT INTO conversations (id, user_id, title, created_at)
         SELECT i, {owner}, 'code hello world in python', {START} + 1000000 + i * 5 FROM {} AS s",
        numbers(CHATS)
    );
    loader.timed("conversations", &conversations).await;
    let answer = super::ANSWER.replace('\'', "''");
    let chats = format!(
        "INSERT INTO chats (id, user_id, message, response, status, cost, created_at, finished_at,
                            deadline_at, refunded, prompt_tokens, completion_tokens, conversation_id)
         SELECT i, {owner}, 'code hello world in python',
                CASE WHEN {failed} THEN NULL ELSE '{answer}' END,
                CASE WHEN {failed} THEN 'failed' ELSE 'answered' END,
                {COST}, {START} + 1000000 + i * 5, {START} + 1000001 + i * 5,
                {START} + 1000060 + i * 5, {failed},
                CASE WHEN {failed} THEN NULL ELSE 24 END,
                CASE WHEN {failed} THEN NULL ELSE 38 END, i
         FROM {} AS s",
        numbers(CHATS)
    );
    loader.timed("chats", &chats).await;
    // Ledger ids: initial grants first, then each chat's reservation, the refunds, the
    // grants; each row's balance_after is the running sum of its user's rows.
    let ledger = format!(
        "INSERT INTO ledger (id, user_id, amount, reason, chat_id, balance_after, created_at)
         SELECT id, user_id, amount, reason, chat_id,
                CAST(SUM(amount) OVER (PARTITION BY user_id ORDER BY id) AS BIGINT), created_at
         FROM (
             SELECT i AS id, i AS user_id,
                    CASE WHEN i = 1 THEN {heavy_grant} ELSE {INITIAL_GRANT} END AS amount,
                    'initial_grant' AS reason, CAST(NULL AS BIGINT) AS chat_id,
                    {START} + i AS created_at
             FROM {users}
             UNION ALL
             SELECT {USERS} + i, {owner}, -{COST}, 'chat_reservation', i, {START} + 1000000 + i * 5
             FROM {chats}
             UNION ALL
             SELECT {refunds_from} + i / {FAILED_EVERY}, {owner}, {COST}, 'chat_refund', i,
                    {START} + 1000001 + i * 5
             FROM {chats} WHERE {failed}
             UNION ALL
             SELECT {grants_from} + i, 1 + i % {USERS}, {COST}, 'grant', CAST(NULL AS BIGINT),
                    {START} + 30000000 + i
             FROM {grants}
         ) AS moves
         ORDER BY id",
        heavy_grant = HEAVY_USER_GRANT,
        users = numbers(USERS) + " AS s",
        chats = numbers(CHATS) + " AS s",
        grants = numbers(GRANTS) + " AS s",
        refunds_from = USERS + CHATS,
        grants_from = USERS + CHATS + CHATS / FAILED_EVERY,
    );
    loader.timed("ledger", &ledger).await;
}

/// How many rows the big tables hold, for the report.
pub async fn counts(url: &str) -> (i64, i64, i64) {
    let db = tokenchat::db::connect(url, tokenchat::db::Open::ExistingOnly)
        .await
        .expect("big database");
    let row = tokenchat::db_run!(&db, pool => {
        sqlx::query(
            "SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM ledger), (SELECT COUNT(*) FROM chats)",
        )
        .fetch_one(pool)
        .await
        .map(|row| (row.get::<i64, _>(0), row.get::<i64, _>(1), row.get::<i64, _>(2)))
    })
    .expect("counts");
    db.close().await;
    row
}
