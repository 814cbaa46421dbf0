//! A budget whose period is changed (or that is set anew) starts its period over: the calls
//! its owner made since the new period began count in it, as the audit adds them, and those
//! before stay in the periods they counted in. Run in the transaction that changes the
//! budget, after the owner's row is locked, so no reservation comes between.

/// Whose budget: an API key's or a user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spender {
    Key,
    User,
}

impl Spender {
    /// The owners' table, the column by which a call names its owner, and the call's
    /// column of the period it counted in.
    fn columns(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Key => ("api_keys", "api_key_id", "budget_period_start"),
            Self::User => ("users", "user_id", "user_budget_period_start"),
        }
    }

    /// The statements that move owner `$1`'s calls made since `$2` into the period that
    /// began at `$2`: chats, then embeddings.
    fn restamps(self) -> [String; 2] {
        let (_, owner, period) = self.columns();
        ["chats", "embeddings"].map(|calls| {
            format!("UPDATE {calls} SET {period} = $2 WHERE {owner} = $1 AND created_at >= $2")
        })
    }

    /// An expression of what owner `$1`'s calls of the period that began at `$2` hold, as
    /// the audit adds it (`db::audit::budget_mismatches`): reserved while pending, charged
    /// once settled, nothing once refunded.
    fn spent_since(self) -> String {
        let (_, owner, period) = self.columns();
        format!(
            "CAST(COALESCE((SELECT SUM(CASE WHEN c.status = 'failed' OR c.refunded
                                            THEN 0 ELSE c.cost END)
                            FROM chats c WHERE c.{owner} = $1 AND c.{period} = $2), 0)
                  + COALESCE((SELECT SUM(CASE WHEN e.status = 'failed' THEN 0 ELSE e.cost END)
                              FROM embeddings e WHERE e.{owner} = $1 AND e.{period} = $2), 0)
                  AS BIGINT)"
        )
    }

    /// The statements that start owner `$1`'s budget period over at `$2`, in order: its
    /// calls since `$2` are moved into that period, and its spending becomes what they hold.
    pub(super) fn start_over(self) -> [String; 3] {
        let (owners, _, _) = self.columns();
        let [chats, embeddings] = self.restamps();
        let spent = self.spent_since();
        let reset = format!(
            "UPDATE {owners} SET budget_period_start = $2, budget_spent = {spent} WHERE id = $1"
        );
        [chats, embeddings, reset]
    }
}
