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
        .foreign_keys(true);
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
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
