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

/// Opens (creating the file when missing) the database at `url`.
pub async fn connect(url: &str) -> Result<Db, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // In WAL mode NORMAL survives a process crash; a power cut can lose the last
        // commits, never corrupt the file, and a lost refund is redone by recovery.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        // Checkpoints (which fsync) normally run off the request path, in
        // `checkpoint_periodically`; this only bounds the log if that falls behind.
        .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string());
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
}

/// Pages of write-ahead log at which a committing request runs a checkpoint itself.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// How often the background checkpoint runs.
pub const CHECKPOINT_PERIOD: Duration = Duration::from_millis(200);

/// Copies the write-ahead log into the database file without blocking anyone (PASSIVE),
/// every [`CHECKPOINT_PERIOD`], so that requests never wait for a checkpoint's fsync.
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
