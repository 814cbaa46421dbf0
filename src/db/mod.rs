//! The database layer: connecting, migrating, and every query the service runs.

pub mod audit;
pub mod chats;
pub mod idempotency;
pub mod ledger;
pub mod tokens;
pub mod users;

use std::{str::FromStr, time::Duration};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The connection pool every layer above passes around.
pub type Db = sqlx::SqlitePool;

/// Whether opening a database may create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Serving and `migrate`: a missing SQLite file is created (readable by its owner only).
    CreateIfMissing,
    /// Every other command: a missing file is an error, never a new empty database.
    ExistingOnly,
}

/// Opens the database at `url`.
pub async fn connect(url: &str, open: Open) -> Result<Db, sqlx::Error> {
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
        // Checkpoints (which fsync) normally run in `checkpoint_periodically`; this only
        // bounds the log if that falls behind.
        .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
        // After a burst, the log file is cut back to this size once it is checkpointed.
        .pragma("journal_size_limit", WAL_SIZE_LIMIT_BYTES.to_string());
    // One connection: SQLite takes one writer at a time anyway, and a lone connection keeps
    // its page cache (which any other connection's write would invalidate) and never waits
    // on SQLite's file locks (BENCHMARKS.md: chat throughput ~4,400/s with 8, ~5,200/s with 1).
    // Nothing may use the pool while holding a transaction from it.
    SqlitePoolOptions::new()
        .max_connections(1)
        // sqlx would otherwise ping the connection's thread before every query: a second
        // round trip each time, for a file that cannot hang up.
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

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

/// Pages of write-ahead log at which a committing request runs a checkpoint itself.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// Bytes of write-ahead log file kept after a checkpoint (64 MiB).
const WAL_SIZE_LIMIT_BYTES: u64 = 64 * 1024 * 1024;

/// How often the background checkpoint runs. Each chat writes about ten 4 KiB pages to the
/// log, so at full load this keeps it near 40 MB; rarer checkpoints let it grow past
/// 250 MB for no gain in throughput.
pub const CHECKPOINT_PERIOD: Duration = Duration::from_millis(200);

/// Copies the write-ahead log into the database file (PASSIVE: it never waits for other
/// processes) every [`CHECKPOINT_PERIOD`]. Frequent checkpoints are short, and none runs
/// inside a request's commit, where SQLite's automatic one would. It queues on the pool's
/// one connection like any query: a connection of its own was measured slower overall
/// (it competed for the file and the disk), though its pauses were shorter.
pub async fn checkpoint_periodically(db: Db) {
    let mut ticks = tokio::time::interval(CHECKPOINT_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&db)
            .await
        {
            tracing::warn!(error = %err, "background checkpoint failed");
        }
    }
}

/// Applies the migrations embedded from `migrations/`.
pub async fn migrate(db: &Db) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!().run(db).await
}

/// Seconds since the Unix epoch: the unit of every time column.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}
