//! Whether a database error is the database being away for a while, rather than a
//! statement failing: answered 503 `database_unavailable`, not 500.

use sqlx::sqlite::SqliteError;

/// Whether `err` says the database could not be reached (down, restarting, the network
/// gone, a SQLite file another process holds locked), which passes by itself, rather than
/// that a statement failed.
pub fn is_unreachable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // SQLITE_BUSY and SQLITE_LOCKED, and their extended codes: past the busy timeout,
        // another process still holds the file (a backup, an operator's `sqlite3`);
        // SQLITE_IOERR and SQLITE_FULL, its disk failing or full, until room is made.
        sqlx::Error::Database(db) if db.try_downcast_ref::<SqliteError>().is_some() => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13)),
        // PostgreSQL's connection exceptions (class 08) and operator interventions such as
        // a shutdown or a restart (57P01 to 57P03).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}
