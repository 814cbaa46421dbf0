//! SQLite's statements read to their end where they may write: sqlx's SQLite
//! `fetch_optional` stops after the first row and resets the statement, ignoring what the
//! reset says, and a write outside a transaction commits only as it ends.

use futures_util::TryStreamExt;
use sqlx::{Database, Either, Execute, Executor};

/// Whether `sql` only reads: its first word, past white space and comments, is `SELECT`
/// (or `PRAGMA`, `EXPLAIN`, `VALUES`). Anything else may write (`WITH ... UPDATE` too).
pub(super) fn reads_only(sql: &str) -> bool {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(comment) = rest.strip_prefix("--") {
            rest = comment.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(comment) = rest.strip_prefix("/*") {
            rest = comment.split_once("*/").map_or("", |(_, after)| after);
        } else {
            break;
        }
    }
    let word = rest
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    ["SELECT", "PRAGMA", "EXPLAIN", "VALUES"]
        .iter()
        .any(|read| word.eq_ignore_ascii_case(read))
}

/// The first row of a statement read to its end. sqlx's SQLite `fetch_optional` stops
/// after the first row and resets the statement, ignoring what the reset says; a write
/// outside a transaction commits only as it ends, so a commit that fails there (a full
/// disk) went unseen: the row `RETURNING` gave was taken for a stored write.
pub(super) async fn first_row_of_all<'q, DB: Database>(
    connection: &mut DB::Connection,
    query: impl 'q + Execute<'q, DB>,
) -> Result<Option<DB::Row>, sqlx::Error>
where
    for<'x> &'x mut DB::Connection: Executor<'x, Database = DB>,
{
    let mut rows = connection.fetch_many(query);
    let mut first = None;
    while let Some(row) = rows.try_next().await? {
        if let Either::Right(row) = row {
            first.get_or_insert(row);
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::reads_only;

    #[test]
    fn only_a_statement_that_begins_by_reading_is_taken_to_read_only() {
        for read in [
            "SELECT 1",
            "  select x FROM t",
            "-- why\nSELECT 1",
            "/* a */ PRAGMA x",
        ] {
            assert!(reads_only(read), "{read}");
        }
        let with = "WITH a AS (SELECT 1) UPDATE t SET x = 1 RETURNING x";
        let (line, block) = ("-- SELECT\nDELETE FROM t", "/* SELECT */ REPLACE INTO t");
        for write in [
            "UPDATE t SET x = 1",
            "\n insert into t",
            with,
            line,
            block,
            "/* never",
        ] {
            assert!(!reads_only(write), "{write}");
        }
    }
}
