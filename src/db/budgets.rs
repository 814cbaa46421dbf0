//! What a call's reservation writes and reads of its budgets, shared by chats and
//! embeddings: the budget columns of its row, the period expressions of its statement (a
//! budget's period never goes back), and whose budget the database refused it for.

use crate::domain::{BudgetOwner, Budgets};

/// A reservation's statement text for the backend of `$db`, from `$template` (a macro
/// taking the row macro of the backend, [`sqlite_row!`] or [`postgres_row!`], and with
/// budgets the key-period and user-period expressions): a budget's period never goes back.
/// On SQLite, whose one writer makes the read exact, the statement records the later of the
/// call's period and the budget's ([`later_key_period!`], [`later_user_period!`]); on
/// PostgreSQL the counting triggers do it under the row lock, so the statement passes the
/// call's own and saves a look-up of the key.
macro_rules! by_backend {
    ($db:expr, $template:ident!($key:literal, $key_period:literal, $user_period:literal)) => {
        match $db {
            $crate::db::Db::Sqlite(_) => $template!(
                sqlite_row,
                later_key_period!($key, $key_period),
                later_user_period!($user_period)
            ),
            $crate::db::Db::Postgres(_) => $template!(postgres_row, $key_period, $user_period),
        }
    };
    // A reservation without budgets.
    ($db:expr, $template:ident!()) => {
        match $db {
            $crate::db::Db::Sqlite(_) => $template!(sqlite_row),
            $crate::db::Db::Postgres(_) => $template!(postgres_row),
        }
    };
}

/// A reservation's row on SQLite, whose first column is `cost` (`$3`, the user `$1`), then
/// `$values`: one row of `VALUES`, with a cost the balance does not cover (what the user's
/// priced calls in flight hold is not theirs to spend: `tokens - held`) written as -1,
/// which the table's `CHECK (cost >= 0)` refuses before any trigger runs ([`reserved_id!`]
/// reads that refusal as a short balance, as on PostgreSQL). Not `INSERT ... SELECT ...
/// WHERE tokens >= $3`: SQLite gathers the rows of that form in a temporary B-tree first
/// when the table has triggers, about 20k instructions a call (BENCHMARKS.md, issue 23).
macro_rules! sqlite_row {
    ($values:expr) => {
        concat!(
            "VALUES (CASE WHEN (SELECT tokens - held FROM users WHERE id = $1) >= $3 THEN $3 ELSE -1 END, ",
            $values,
            ")"
        )
    };
}

/// A reservation's row on PostgreSQL (as [`sqlite_row!`]): selected only when the balance
/// covers the cost, and its id returned.
macro_rules! postgres_row {
    ($values:expr) => {
        concat!(
            "SELECT $3, ",
            $values,
            " FROM users WHERE id = $1 AND tokens - held >= $3 RETURNING id"
        )
    };
}

/// Runs a reservation's `INSERT` (`$sql`, from [`by_backend!`], bound by `$binds` on
/// `$query`): the new row's id, or `None` when the balance did not cover it (no row, or the
/// cost refused by `CHECK`: on SQLite as [`sqlite_row!`] writes it, on PostgreSQL when a
/// concurrent reservation took the balance first and the ledger's or the held tokens'
/// `CHECK` refused it under the row lock); a budget's refusal is an error the caller reads
/// with [`budget_exceeded`]. SQLite reads the id from the connection rather than by
/// `RETURNING`, which it would gather in a temporary B-tree for every statement
/// (BENCHMARKS.md, issue 23); the triggers' own inserts do not change it once they are
/// over.
macro_rules! reserved_id {
    ($db:expr, $sql:expr, |$query:ident| $binds:expr) => {
        match match $db {
            $crate::db::Db::Sqlite(sqlite) => {
                let $query = sqlx::query($sql);
                $binds
                    .execute(&sqlite.writer)
                    .await
                    .map(|done| (done.rows_affected() == 1).then(|| done.last_insert_rowid()))
            }
            $crate::db::Db::Postgres(pool) => {
                let $query = sqlx::query_scalar($sql);
                $binds.fetch_optional(pool).await
            }
        } {
            Err(sqlx::Error::Database(err)) if err.is_check_violation() => Ok(None),
            reserved => reserved,
        }
    };
}

/// The period a call of the key `$key` counts in on SQLite: the later of `$period` (its
/// instance's clock's) and the key budget's own.
macro_rules! later_key_period {
    ($key:literal, $period:literal) => {
        concat!(
            "(SELECT CASE WHEN k.budget_period_start > ",
            $period,
            " THEN k.budget_period_start ELSE ",
            $period,
            " END FROM api_keys k WHERE k.id = ",
            $key,
            ")"
        )
    };
}

/// As [`later_key_period!`], of the user budget (the user `$1`).
macro_rules! later_user_period {
    ($period:literal) => {
        concat!(
            "(SELECT CASE WHEN u.budget_period_start > ",
            $period,
            " THEN u.budget_period_start ELSE ",
            $period,
            " END FROM users u WHERE u.id = $1)"
        )
    };
}

/// Whose budget, if any, the database refused a reservation for (the budget triggers raise
/// `budget_exceeded` for a key's, `user_budget_exceeded` for a user's).
pub(super) fn budget_exceeded(err: &dyn sqlx::error::DatabaseError) -> Option<BudgetOwner> {
    let message = err.message();
    if message.contains("user_budget_exceeded") {
        Some(BudgetOwner::User)
    } else if message.contains("budget_exceeded") {
        Some(BudgetOwner::Key)
    } else {
        None
    }
}

/// The budget columns of a call's row: the key and its period, the user's budget in force
/// and its period.
pub(super) struct BudgetColumns {
    pub key: Option<i64>,
    pub key_period: Option<i64>,
    pub user_tokens: Option<i64>,
    pub user_period: Option<i64>,
}

impl BudgetColumns {
    pub(super) fn of(budgets: Budgets) -> Self {
        Self {
            key: budgets.key.map(|(key_id, _)| key_id),
            key_period: budgets.key.map(|(_, key)| key.period_start),
            user_tokens: budgets.user.map(|user| user.tokens),
            user_period: budgets.user.map(|user| user.period_start),
        }
    }
}
