//! A budget whose period is changed (or that is set anew) starts its period over: the
//! budgeted calls its owner made since the new period began count in it, as the audit adds
//! them, and those before stay in the periods they counted in. Run in the transaction that
//! changes the budget, after the owner's row is locked, so no reservation comes between;
//! one already looked up keeps counting in the period (see [`Spender::restamps`]).

/// Whose budget: an API key's or a user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spender {
    Key,
    User,
}

impl Spender {
    /// The owners' table, the column by which a call names its owner, and the call's
    /// column of the period it counted in.
    pub(super) fn columns(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Key => ("api_keys", "api_key_id", "budget_period_start"),
            Self::User => ("users", "user_id", "user_budget_period_start"),
        }
    }

    /// The statements that move owner `$1`'s budgeted calls made since `$2` into the
    /// budget's present period: chats, then embeddings. That period is known by the later
    /// of `$2` and the owner's stored start ([`Self::label`]), never an earlier one: a call
    /// in flight was stamped with the period its look-up found, and one later than the
    /// stored start would have the counting triggers start the period afresh, forgetting
    /// its spending.
    fn restamps(self) -> [String; 2] {
        let (owners, owner, period) = self.columns();
        let label = Self::label(owners);
        ["chats", "embeddings"].map(|calls| {
            format!(
                "UPDATE {calls} SET {period} = (SELECT {label} FROM {owners} WHERE id = $1)
                 WHERE {owner} = $1 AND created_at >= $2 AND {period} IS NOT NULL"
            )
        })
    }

    /// On PostgreSQL, the statements that lock the calls [`Self::restamps`] moves, in the
    /// order of their ids, before the owner's row: a call settling locks its row, then
    /// (by its triggers) its owner's, so the change must take them in that order too, or
    /// the two would wait on each other.
    pub(super) fn locks(self) -> [String; 2] {
        let (_, owner, period) = self.columns();
        ["chats", "embeddings"].map(|calls| {
            format!(
                "SELECT id FROM {calls}
                 WHERE {owner} = $1 AND created_at >= $2 AND {period} IS NOT NULL
                 ORDER BY id FOR UPDATE"
            )
        })
    }

    /// The stamp of the period that began at `$2` for the row `owners`: its stored start
    /// when that is later (a day's start, the budget now a month's: the same month).
    fn label(owners: &str) -> String {
        format!(
            "CASE WHEN {owners}.budget_period_start > $2 THEN {owners}.budget_period_start \
             ELSE $2 END"
        )
    }

    /// An expression of what owner `$1`'s calls stamped `stamp` hold, as the audit adds
    /// it.
    fn spent_in(self, stamp: &str) -> String {
        let (_, owner, period) = self.columns();
        calls_hold(owner, period, "$1", stamp)
    }

    /// The statements that start owner `$1`'s budget period over at `$2`, in order: its
    /// budgeted calls since `$2` are moved into that period, and its spending becomes what
    /// they hold. (An `UPDATE`'s `SET` reads the row as it was: the stored start.)
    pub(super) fn start_over(self) -> [String; 3] {
        let (owners, _, _) = self.columns();
        let [chats, embeddings] = self.restamps();
        let label = Self::label(owners);
        let spent = self.spent_in(&label);
        let reset = format!(
            "UPDATE {owners} SET budget_period_start = {label}, budget_spent = {spent}
             WHERE id = $1"
        );
        [chats, embeddings, reset]
    }
}

/// An expression of what the calls of `owner_id` (by the calls' column `owner`) stamped
/// `stamp` (in their column `period`) hold: reserved while pending, charged once settled,
/// nothing once refunded. The audit's equation for a budget's spending, and what a period
/// started over is given: one text, so the two cannot part.
pub(super) fn calls_hold(owner: &str, period: &str, owner_id: &str, stamp: &str) -> String {
    format!(
        "CAST(COALESCE((SELECT SUM(CASE WHEN c.status = 'failed' OR c.refunded
                                        THEN 0 ELSE c.cost END)
                        FROM chats c WHERE c.{owner} = {owner_id} AND c.{period} = {stamp}), 0)
              + COALESCE((SELECT SUM(CASE WHEN e.status = 'failed' THEN 0 ELSE e.cost END)
                          FROM embeddings e WHERE e.{owner} = {owner_id}
                            AND e.{period} = {stamp}), 0)
              AS BIGINT)"
    )
}

/// Whether `err` is PostgreSQL giving up a lock: a deadlock found (40P01), or a wait past
/// the transaction's `lock_timeout` (55P03).
fn is_lock_conflict(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|code| matches!(&*code, "40P01" | "55P03")))
}

/// Runs `change` (a transaction that moves many rows under an owner's lock: a budget
/// period's change) again when PostgreSQL gave up one of its locks, a few times. Such a
/// change sets a short `lock_timeout` ([`SHORT_LOCK_WAIT`]), so that where it and a call's
/// reservation wait on each other, the change gives way and is tried again, never the call.
pub(super) async fn retried<T, F, Fut>(mut change: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 1;
    loop {
        match change().await {
            Err(err) if attempt < 5 && is_lock_conflict(&err) => {
                tokio::time::sleep(std::time::Duration::from_millis(25 * attempt)).await;
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// What [`retried`]'s changes set first, on PostgreSQL: far below `deadlock_timeout`'s
/// second, so the change is the one that gives way.
pub(super) const SHORT_LOCK_WAIT: &str = "SET LOCAL lock_timeout = '200ms'";
