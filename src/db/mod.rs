//! The database layer: connecting, migrating, and every query the service runs.

pub mod alerts;
pub mod api_keys;
pub mod audit;
mod budget_periods;
#[macro_use]
mod budgets;
#[macro_use]
pub mod chats;
mod columns;
pub mod conversations;
pub mod embeddings;
pub mod idempotency;
pub mod ledger;
mod pool;
pub mod rates;
mod tls;
pub mod tokens;
mod unreachable;
pub mod user_limits;
pub mod users;

use std::{str::FromStr, time::Duration};

/// Where every time column's value comes from.
pub use crate::clock::unix_now;

use sqlx::{
    postgres::PgConnectOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous},
    ConnectOptions, Postgres, Sqlite,
};

pub use pool::{Connections, PooledTransaction};
pub use unreachable::is_unreachable;

/// The connection pool every layer above passes around: SQLite or PostgreSQL, chosen at run
/// time by the scheme of `DATABASE_URL`.
///
/// An enum rather than a trait with two implementations: the functions of this module keep
/// one signature each and everything above them stays free of generics, while
/// [`db_run!`](crate::db_run) expands one query body for each backend, so only the
/// statements that truly differ are written twice.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqliteDb),
    Postgres(Connections<Postgres>),
}

/// SQLite's two pools: the one connection that writes, and the connections that only read.
///
/// In WAL mode a reader never waits for the writer, nor the writer for readers, so the
/// reads of a request (its credential, a balance, a page of history) do not queue behind
/// other requests' writes on the writer's connection (BENCHMARKS.md, issue 13).
#[derive(Clone, Debug)]
pub struct SqliteDb {
    pub writer: Connections<Sqlite>,
    /// For an in-memory database (each connection would be a database of its own), the
    /// writer's pool again.
    pub readers: Connections<Sqlite>,
}

/// Runs `$body` with `$pool` bound to the backend's pool for writing (`&Connections<Sqlite>`
/// or `&Connections<Postgres>`): the same code, compiled once for each backend, so sqlx
/// checks the types for both. Statements that write, and reads that must see the writer's
/// own transaction, use this one.
#[macro_export]
macro_rules! db_run {
    ($db:expr, $pool:ident => $body:expr) => {
        $crate::db_on!(writer, $db, $pool => $body)
    };
}
pub use db_run;

/// [`db_run!`] for statements that only read: on SQLite they run on the readers' pool, so
/// they never queue behind a write. Every committed write is visible to them.
#[macro_export]
macro_rules! db_read {
    ($db:expr, $pool:ident => $body:expr) => {
        $crate::db_on!(readers, $db, $pool => $body)
    };
}
pub use db_read;

/// What a page query binds for "no cursor" (the first page): its `id < $2` then holds for
/// every row, in one range seek of the index, where `$2 IS NULL OR id < $2` made SQLite walk
/// all the user's newer rows first (BENCHMARKS.md, issue 13).
pub const NO_CURSOR: i64 = i64::MAX;

/// Reads a page of one user's rows, newest first: `$sql` selects them by `user_id = $1`,
/// `id < $2` (the page's cursor, or [`NO_CURSOR`] for the first page) and `LIMIT $3`.
macro_rules! db_page {
    ($db:expr, $user_id:expr, $page:expr => $sql:expr) => {
        $crate::db_read!($db, pool => sqlx::query_as($sql)
            .bind($user_id)
            .bind($page.before.unwrap_or($crate::db::NO_CURSOR))
            .bind($page.limit)
            .fetch_all(pool)
            .await)
    };
}
pub(crate) use db_page;

/// Runs one statement that returns no rows (built by `$query`, binds and all) on the pool
/// for writing of either backend: how many rows it changed.
macro_rules! db_execute {
    ($db:expr, $query:expr) => {
        $crate::db_run!($db, pool => $query.execute(pool).await.map(|done| done.rows_affected()))
    };
}
pub(crate) use db_execute;

/// The body of [`db_run!`] and [`db_read!`]: `$side` names SQLite's pool.
#[doc(hidden)]
#[macro_export]
macro_rules! db_on {
    ($side:ident, $db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite(sqlite) => {
                let $pool = &sqlite.$side;
                $body
            }
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}

impl Db {
    pub async fn close(&self) {
        match self {
            Self::Sqlite(sqlite) => {
                sqlite.readers.close().await;
                sqlite.writer.close().await;
            }
            Self::Postgres(pool) => pool.close().await,
        }
    }

    /// How many connections each pool holds, busy and idle, and may hold.
    pub fn pool_use(&self) -> Vec<PoolUse> {
        fn of<DB: sqlx::Database>(name: &'static str, pool: &Connections<DB>) -> PoolUse {
            let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            let (open, idle, max) = pool.usage();
            PoolUse {
                name,
                in_use: count(open.saturating_sub(idle)),
                idle: count(idle),
                max: count(max),
            }
        }
        match self {
            Self::Sqlite(sqlite) => vec![
                of("sqlite_writer", &sqlite.writer),
                of("sqlite_readers", &sqlite.readers),
            ],
            Self::Postgres(pool) => vec![of("postgres", pool)],
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }
}

/// One database pool's connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolUse {
    pub name: &'static str,
    pub in_use: u32,
    pub idle: u32,
    pub max: u32,
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend of a `DATABASE_URL`, by its scheme; `None` for any other scheme.
    pub fn of_url(url: &str) -> Option<Self> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }
}

/// Whether opening a database may create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Serving and `migrate`: a missing SQLite file is created (readable by its owner only).
    /// A PostgreSQL database is never created: its operator does that (see the README).
    CreateIfMissing,
    /// Every other command: a missing file is an error, never a new empty database.
    ExistingOnly,
}

/// Pool settings beyond the URL.
#[derive(Debug, Clone, Default)]
pub struct PoolSettings {
    /// `None`: one connection for SQLite (see [`connect_sqlite`]), ten for PostgreSQL.
    pub max_connections: Option<u32>,
    /// PostgreSQL's `statement_timeout` for every connection; `None` leaves the server's.
    pub statement_timeout: Option<Duration>,
}

/// How long a request waits for a pooled connection before the database counts as
/// unavailable (503) rather than slow.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the database at `url` with the default pool settings.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn connect(url: &str, open: Open) -> Result<Db, sqlx::Error> {
    connect_with(url, open, &PoolSettings::default()).await
}

/// Opens the database at `url`, SQLite or PostgreSQL by its scheme.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn connect_with(
    url: &str,
    open: Open,
    settings: &PoolSettings,
) -> Result<Db, sqlx::Error> {
    match Backend::of_url(url) {
        Some(Backend::Sqlite) => connect_sqlite(url, open, settings).await.map(Db::Sqlite),
        Some(Backend::Postgres) => connect_postgres(url, settings).await.map(Db::Postgres),
        None => Err(sqlx::Error::Configuration(
            "DATABASE_URL must start with sqlite:, postgres: or postgresql:".into(),
        )),
    }
}

async fn connect_postgres(
    url: &str,
    settings: &PoolSettings,
) -> Result<Connections<Postgres>, sqlx::Error> {
    // sqlx warns of a parameter it does not know with its value, which may be a password
    // (`PASSWORD=`, the rest of one holding `&`): read with no subscriber, so unlogged. (A
    // filter directive would cost every request's events a look at their target.)
    let quiet = tracing::subscriber::NoSubscriber::default();
    let mut options = tracing::subscriber::with_default(quiet, || PgConnectOptions::from_str(url))?;
    options = tls::with_default_sslmode(url, options);
    if let Some(timeout) = settings.statement_timeout {
        options = options.options([("statement_timeout", timeout.as_millis().to_string())]);
    }
    // No ping before each statement nor after it (see `pool`): a connection that broke fails
    // its next statement (503 for that request) and is then replaced, so the pool heals once
    // the database is back.
    let pool = Connections::new(options, settings.max_connections.unwrap_or(10));
    // Opened now, so that a database that cannot be reached stops start-up.
    pool.open_one().await?;
    Ok(pool)
}

async fn connect_sqlite(
    url: &str,
    open: Open,
    settings: &PoolSettings,
) -> Result<SqliteDb, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?;
    let file = options.get_filename();
    let in_memory = file.as_os_str().is_empty() || file.to_string_lossy().starts_with(':');
    if !in_memory && !file.exists() {
        match open {
            Open::ExistingOnly => {
                return Err(sqlx::Error::Configuration(
                    format!("no database file at {}", file.display()).into(),
                ))
            }
            Open::CreateIfMissing => create_private_file(file)?,
        }
    }
    let options = options
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        // In WAL mode NORMAL survives a process crash; a power cut can lose the last
        // commits, never corrupt the file, and a lost refund is redone by recovery.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        // Deleted and overwritten content is zeroed in the file, so an erased conversation's
        // text does not linger in free pages until a VACUUM (issue 21).
        .pragma("secure_delete", "ON")
        // `checkpoint_periodically` copies the log into the file in the background, but under
        // continuous writes it cannot start the log over (the writer does that only when it
        // begins a write with everything copied). This one, run by the writer after the
        // commit that reaches it, is what bounds the log under load; the requests queued on
        // the writer wait for what is left to copy and its fsyncs (BENCHMARKS.md, issue 23).
        .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
        // After a burst, the log file is cut back to this size once it is checkpointed.
        .pragma("journal_size_limit", WAL_SIZE_LIMIT_BYTES.to_string());
    // One connection: SQLite takes one writer at a time anyway, and a lone connection keeps
    // its page cache (which any other connection's write would invalidate) and never waits
    // on SQLite's file locks (BENCHMARKS.md: chat throughput ~4,400/s with 8, ~5,200/s with 1).
    // Nothing may use the pool while holding a transaction from it.
    let writer = Connections::new(options.clone(), settings.max_connections.unwrap_or(1));
    // Opened now, so that a database that cannot be opened stops start-up.
    writer.open_one().await?;
    if in_memory {
        return Ok(SqliteDb {
            readers: writer.clone(),
            writer,
        });
    }
    // Opened when first needed: a command that only writes never opens one. No memory map
    // (`mmap_size`): measured, it made a big audit query 15 times slower on this kind of
    // machine (BENCHMARKS.md, issue 13).
    let readers = Connections::new(options.pragma("query_only", "ON"), SQLITE_READERS);
    Ok(SqliteDb { writer, readers })
}

/// Connections of SQLite's readers' pool. Reads are short, so a few are enough for each of
/// them to find one free while others read; more would only add threads (sqlx runs each
/// SQLite connection on a thread of its own).
const SQLITE_READERS: u32 = 4;

/// Creates an empty database file that only its owner may read or write: it holds
/// password hashes. SQLite gives its -wal and -shm files the same permissions.
fn create_private_file(path: &std::path::Path) -> Result<(), sqlx::Error> {
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    match file.open(path) {
        Ok(_) => Ok(()),
        // Another process created it meanwhile: theirs is as good.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(sqlx::Error::Io(err)),
    }
}

/// Pages of write-ahead log (about 165 MB) at which a committing request runs a checkpoint
/// itself and the log starts over: the log's bound under load. Each time, the requests
/// queued on the writer wait, so the bound sets how often: at 10,000 pages, several times a
/// second at full load, `/chat`'s p99 at 32 connections was 30 ms against 16 to 20 ms at
/// 40,000 (BENCHMARKS.md, issue 23).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 40_000;

/// Bytes of write-ahead log file kept after a checkpoint (192 MiB): above the bound, so that
/// a log starting over is not cut back and grown again every time (which, measured at a
/// 64 MiB limit, cost more than the checkpoint); a log grown past it is cut back to it.
const WAL_SIZE_LIMIT_BYTES: u64 = 192 * 1024 * 1024;

/// How often the background checkpoint runs: it copies the log as it grows, so that the
/// writer's own checkpoint finds little left to copy (one a second left it more, and cost
/// throughput and tail: BENCHMARKS.md, issue 23).
pub const CHECKPOINT_PERIOD: Duration = Duration::from_millis(200);

/// Copies the write-ahead log into the database file (PASSIVE: it never waits for a reader
/// or the writer) every [`CHECKPOINT_PERIOD`], on a connection of its own. Frequent
/// checkpoints are short and none holds the writer's connection: with the checkpoint queued
/// on it, every request waited out its fsyncs, five times a second (BENCHMARKS.md, issue
/// 13). What it copies, the writer's own checkpoint at `wal_autocheckpoint` need not.
pub async fn checkpoint_periodically(db: Db) {
    // PostgreSQL checkpoints by itself.
    let Db::Sqlite(db) = db else {
        return;
    };
    let mut connection = None;
    let mut ticks = tokio::time::interval(CHECKPOINT_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let checkpointer = match &mut connection {
            Some(connection) => connection,
            None => match db.writer.connect_options().connect().await {
                Ok(opened) => connection.insert(opened),
                Err(err) => {
                    tracing::warn!(error = %err, "background checkpoint could not connect");
                    continue;
                }
            },
        };
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut *checkpointer)
            .await
        {
            tracing::warn!(error = %err, "background checkpoint failed");
            connection = None;
        }
    }
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Applies the migrations embedded from `migrations/sqlite` or `migrations/postgres`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn migrate(db: &Db) -> Result<(), sqlx::migrate::MigrateError> {
    let migrator = match db {
        Db::Sqlite(_) => &SQLITE_MIGRATIONS,
        Db::Postgres(_) => &POSTGRES_MIGRATIONS,
    };
    run_migrator(db, migrator).await
}

/// Applies `migrator`'s migrations, on the writer's connection.
pub async fn run_migrator(
    db: &Db,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), sqlx::migrate::MigrateError> {
    match db {
        Db::Sqlite(sqlite) => {
            let mut connection = sqlite.writer.acquire().await?;
            migrator.run(&mut **connection).await
        }
        Db::Postgres(pool) => {
            // The server's notice that the migrations' table "already exists", on every start
            // and command, is noise in an operator's log; its warnings still come. Set here,
            // for this one session, not as a startup option, which poolers such as PgBouncer
            // refuse.
            let mut connection = pool.acquire().await?;
            let quiet = "SET client_min_messages = warning";
            sqlx::query(quiet).execute(&mut **connection).await?;
            let migrated = migrator.run(&mut **connection).await;
            let reset = sqlx::query("RESET client_min_messages");
            let reset = reset.execute(&mut **connection).await;
            // A migration's failure is the one to tell, before the reset's.
            migrated?;
            reset.map(drop).map_err(Into::into)
        }
    }
}

/// How far the database's schema is from this build's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationState {
    /// This build's migrations that the database has applied.
    pub applied: usize,
    /// This build's migrations.
    pub known: usize,
}

impl MigrationState {
    pub fn complete(&self) -> bool {
        self.applied == self.known
    }
}

/// Which of this build's migrations the database has applied (an error when it has no
/// migrations table at all).
#[tracing::instrument(level = "debug", skip_all)]
pub async fn migration_state(db: &Db) -> Result<MigrationState, sqlx::Error> {
    let known = match db {
        Db::Sqlite(_) => &SQLITE_MIGRATIONS,
        Db::Postgres(_) => &POSTGRES_MIGRATIONS,
    };
    let applied: Vec<i64> = db_read!(db, pool => {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
    })?;
    Ok(MigrationState {
        applied: known
            .iter()
            .filter(|migration| applied.contains(&migration.version))
            .count(),
        known: known.iter().count(),
    })
}

#[cfg(test)]
mod tests {
    /// Every schema change must be written for both backends, under one version.
    #[test]
    fn both_backends_have_the_same_migrations() {
        let versions = |migrator: sqlx::migrate::Migrator| -> Vec<(i64, String)> {
            migrator
                .iter()
                .map(|migration| (migration.version, migration.description.to_string()))
                .collect()
        };
        let sqlite = versions(sqlx::migrate!("migrations/sqlite"));
        let postgres = versions(sqlx::migrate!("migrations/postgres"));
        assert!(!sqlite.is_empty());
        assert_eq!(sqlite, postgres);
    }
}
