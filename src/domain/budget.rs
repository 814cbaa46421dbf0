//! A budget of an API key or of a user: at most so many tokens charged in each period (a
//! day, a week or a month in UTC, or in total), and which period a moment falls in.

use time::{Date, Month, OffsetDateTime, Time};

/// How often a key's budget starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    /// From Monday 00:00 UTC.
    Week,
    /// From the first of the month, 00:00 UTC.
    Month,
    /// Never: the budget is for the key's whole life.
    Total,
}

/// A key's or a user's budget: `tokens` at most in each `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBudget {
    pub tokens: i64,
    pub period: BudgetPeriod,
}

/// What a call counts against under one budget: the budget's tokens, the period the call
/// falls in (its start, Unix seconds) and when the next begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetUse {
    pub tokens: i64,
    pub period_start: i64,
    pub resets_at: Option<i64>,
}

impl BudgetUse {
    /// What this period has spent, by the owner's stored counter and the start of the
    /// period it counts (`stored_start`): its spending when that period is this one or a
    /// later one (the counting triggers' rule: an instance whose clock is ahead may have
    /// begun the next already, and a budget given a longer period keeps a later stamp),
    /// else nothing yet.
    pub fn spent(&self, stored_start: Option<i64>, stored_spent: i64) -> i64 {
        match stored_start {
            Some(stored) if stored >= self.period_start => stored_spent,
            _ => 0,
        }
    }
}

/// The budgets one call counts against: its API key's (with the key's id) and its user's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budgets {
    pub key: Option<(i64, BudgetUse)>,
    pub user: Option<BudgetUse>,
}

/// Whose budget refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetOwner {
    Key,
    User,
}

impl BudgetOwner {
    /// Whose budget, as a refusal names it.
    pub fn words(self) -> &'static str {
        match self {
            Self::Key => "this API key's budget",
            Self::User => "your budget",
        }
    }
}

impl Budgets {
    /// The key whose budget the call counts against, if any.
    pub fn key_id(&self) -> Option<i64> {
        self.key.map(|(key_id, _)| key_id)
    }

    /// When the budget `owner` refused with begins again (`None`: a total budget).
    pub fn resets_at(&self, owner: BudgetOwner) -> Option<i64> {
        match owner {
            BudgetOwner::Key => self.key.and_then(|(_, key)| key.resets_at),
            BudgetOwner::User => self.user.and_then(|user| user.resets_at),
        }
    }
}

impl TokenBudget {
    /// What a call at `now` counts against.
    pub fn use_at(self, now: i64) -> BudgetUse {
        let period_start = self.period.start_of(now);
        BudgetUse {
            tokens: self.tokens,
            period_start,
            resets_at: self.period.next_start(period_start),
        }
    }
}

const DAY_SECS: i64 = 24 * 60 * 60;

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// When the period holding the Unix time `now` began (Unix seconds; 0 for `Total`).
    pub fn start_of(self, now: i64) -> i64 {
        let day = now.div_euclid(DAY_SECS) * DAY_SECS;
        match self {
            Self::Day => day,
            Self::Week => {
                // 1970-01-01 was a Thursday: three days after a Monday.
                let days = now.div_euclid(DAY_SECS);
                (days - (days + 3).rem_euclid(7)) * DAY_SECS
            }
            Self::Month => {
                let date = OffsetDateTime::from_unix_timestamp(now)
                    .map_or(Date::MIN, OffsetDateTime::date);
                first_of(date.year(), date.month())
            }
            Self::Total => 0,
        }
    }

    /// When the period that began at `start` ends and the next begins; `None` for `Total`.
    pub fn next_start(self, start: i64) -> Option<i64> {
        match self {
            Self::Day => Some(start + DAY_SECS),
            Self::Week => Some(start + 7 * DAY_SECS),
            Self::Month => {
                let date = OffsetDateTime::from_unix_timestamp(start)
                    .map_or(Date::MIN, OffsetDateTime::date);
                let (year, month) = match date.month() {
                    Month::December => (date.year() + 1, Month::January),
                    month => (date.year(), month.next()),
                };
                Some(first_of(year, month))
            }
            Self::Total => None,
        }
    }
}

/// 00:00 UTC on the first of `month`, in Unix seconds.
fn first_of(year: i32, month: Month) -> i64 {
    Date::from_calendar_date(year, month, 1).map_or(0, |date| {
        date.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-06 (a Sunday) 19:28:46 UTC.
    const NOW: i64 = 1_796_585_326;

    #[test]
    fn each_period_begins_where_the_calendar_says_in_utc() {
        let at = |text: &str| crate::clock::parse_rfc3339(text).unwrap();
        assert_eq!(NOW, at("2026-12-06T19:28:46Z"));
        assert_eq!(BudgetPeriod::Day.start_of(NOW), at("2026-12-06T00:00:00Z"));
        assert_eq!(BudgetPeriod::Week.start_of(NOW), at("2026-11-30T00:00:00Z"));
        assert_eq!(
            BudgetPeriod::Month.start_of(NOW),
            at("2026-12-01T00:00:00Z")
        );
        assert_eq!(BudgetPeriod::Total.start_of(NOW), 0);
        let month = BudgetPeriod::Month.start_of(NOW);
        assert_eq!(
            BudgetPeriod::Month.next_start(month),
            Some(at("2027-01-01T00:00:00Z"))
        );
        let week = BudgetPeriod::Week.start_of(NOW);
        assert_eq!(
            BudgetPeriod::Week.next_start(week),
            Some(at("2026-12-07T00:00:00Z"))
        );
        assert_eq!(
            BudgetPeriod::Week.start_of(at("2026-11-30T00:00:00Z")),
            week
        );
        assert_eq!(BudgetPeriod::Total.next_start(0), None);
        assert_eq!("week".parse::<BudgetPeriod>(), Ok(BudgetPeriod::Week));
        assert!("fortnight".parse::<BudgetPeriod>().is_err());
    }
}
