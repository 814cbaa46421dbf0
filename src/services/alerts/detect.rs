//! Whether a key's budget or a user's balance has crossed a threshold, read from the database
//! as it stands after a charge settled; each crossing claimed before it becomes an event.

use std::{collections::HashSet, str::FromStr};

use serde::Serialize;

use crate::{
    clock::{rfc3339, unix_now},
    config::Threshold,
    db::{
        self,
        alerts::{BalanceState, Crossing, KeyBudgetState},
        Db,
    },
    domain::BudgetPeriod,
};

/// One alert, as the webhook receives it (the JSON body).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A key's budget crossed a threshold in its current period.
    KeyBudget {
        id: i64,
        created_at: String,
        threshold: f64,
        key_id: i64,
        key_name: String,
        username: String,
        /// Spent this period, reservations in flight included (as `GET /keys` shows it).
        spent: i64,
        budget_tokens: i64,
        period: String,
        period_start: String,
        /// `None` for a `total` budget.
        resets_at: Option<String>,
    },
    /// A user's balance crossed a threshold of the balance their latest credit left.
    Balance {
        id: i64,
        created_at: String,
        threshold: f64,
        user_id: i64,
        username: String,
        balance: i64,
        spent: i64,
        /// The balance right after the latest credit (registration or grant).
        cycle_start_balance: i64,
        cycle_started_at: String,
    },
}

impl Event {
    pub fn id(&self) -> i64 {
        match self {
            Self::KeyBudget { id, .. } | Self::Balance { id, .. } => *id,
        }
    }
}

/// The crossings this process already claimed or found claimed: a subject that stays past
/// a threshold is checked on every charge, and this spares the database a claim that can
/// only conflict. Bounded by emptying it now and then; the database still decides.
#[derive(Default)]
pub(super) struct Claimed(HashSet<Crossing>);

const MAX_REMEMBERED: usize = 100_000;

impl Claimed {
    /// Claims `crossing` unless this process already did: its new alert id when the claim is
    /// this call's.
    async fn claim(&mut self, db: &Db, crossing: Crossing) -> Result<Option<i64>, sqlx::Error> {
        if self.0.contains(&crossing) {
            return Ok(None);
        }
        let claimed = db::alerts::claim(db, crossing).await?;
        if self.0.len() >= MAX_REMEMBERED {
            self.0.clear();
        }
        self.0.insert(crossing);
        Ok(claimed)
    }
}

/// The events of the key `key_id`'s budget: one for each threshold its current period has
/// crossed and no instance claimed before.
pub(super) async fn key_budget(
    db: &Db,
    thresholds: &[Threshold],
    claimed: &mut Claimed,
    key_id: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    let Some(state) = db::alerts::key_budget(db, key_id).await? else {
        return Ok(Vec::new());
    };
    let KeyBudgetState {
        key_name,
        username,
        budget_tokens,
        budget_period,
        budget_spent,
        budget_period_start,
    } = state;
    let Ok(period) = BudgetPeriod::from_str(&budget_period) else {
        return Ok(Vec::new());
    };
    // What was spent in a period that is over says nothing of this one, which starts empty.
    // (A later one than this instance's clock says is this one: the counting triggers'
    // rule.)
    if budget_period_start < period.start_of(unix_now()) {
        return Ok(Vec::new());
    }
    // The stamp may be later than the period's start (a budget given a longer period keeps
    // its stored one): the period is the one that holds it.
    let period_start = period.start_of(budget_period_start);
    let mut events = Vec::new();
    for &threshold in thresholds {
        if !threshold.reached(budget_spent, budget_tokens) {
            break;
        }
        let crossing = Crossing {
            kind: "key_budget",
            subject_id: key_id,
            threshold_ppm: i64::from(threshold.ppm()),
            cycle: budget_period_start,
            of_tokens: budget_tokens,
        };
        if let Some(id) = claimed.claim(db, crossing).await? {
            events.push(Event::KeyBudget {
                id,
                created_at: rfc3339(unix_now()),
                threshold: threshold.fraction(),
                key_id,
                key_name: key_name.clone(),
                username: username.clone(),
                spent: budget_spent,
                budget_tokens,
                period: period.as_str().to_string(),
                period_start: rfc3339(period_start),
                resets_at: period.next_start(period_start).map(rfc3339),
            });
        }
    }
    Ok(events)
}

/// The events of the user `user_id`'s balance: one for each threshold crossed since their
/// latest credit and not claimed before.
pub(super) async fn balance(
    db: &Db,
    thresholds: &[Threshold],
    claimed: &mut Claimed,
    user_id: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    let Some(state) = db::alerts::balance(db, user_id).await? else {
        return Ok(Vec::new());
    };
    let BalanceState {
        username,
        tokens,
        credit_id: Some(credit_id),
        credited_balance: Some(start),
        credited_at: Some(started_at),
    } = state
    else {
        return Ok(Vec::new());
    };
    let spent = start - tokens;
    let mut events = Vec::new();
    for &threshold in thresholds {
        if !threshold.reached(spent, start) {
            break;
        }
        let crossing = Crossing {
            kind: "balance",
            subject_id: user_id,
            threshold_ppm: i64::from(threshold.ppm()),
            cycle: credit_id,
            of_tokens: start,
        };
        if let Some(id) = claimed.claim(db, crossing).await? {
            events.push(Event::Balance {
                id,
                created_at: rfc3339(unix_now()),
                threshold: threshold.fraction(),
                user_id,
                username: username.clone(),
                balance: tokens,
                spent,
                cycle_start_balance: start,
                cycle_started_at: rfc3339(started_at),
            });
        }
    }
    Ok(events)
}
