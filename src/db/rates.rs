//! Rates shared by every instance: one upsert a request on `rate_limits`, by GCRA (the
//! generic cell rate algorithm): each admitted request moves the name's theoretical arrival
//! time on by one interval, and a request is admitted while that time stays within the
//! window ahead of now.

use super::{db_execute, db_read, db_run, Db};

/// What checking one request against a rate found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Admitted and counted; the theoretical arrival time it left (milliseconds).
    Admitted { tat_ms: i64 },
    /// Refused, nothing counted; the theoretical arrival time as it stands.
    Refused { tat_ms: i64 },
}

/// How a rate counts: each request takes `interval_ms` of a `window_ms` that may be filled
/// ahead of now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub interval_ms: i64,
    pub window_ms: i64,
}

/// The conflict clause of [`admit`]'s upsert, the same on both backends: `CASE` rather than
/// SQLite's `MAX` or PostgreSQL's `GREATEST`. Admitted while the theoretical arrival time it
/// leaves stays within the window ahead of now.
macro_rules! admitted_on_conflict {
    () => {
        "ON CONFLICT (name) DO UPDATE
         SET tat_ms = CASE WHEN rate_limits.tat_ms > $2 THEN rate_limits.tat_ms ELSE $2 END + $3
         WHERE CASE WHEN rate_limits.tat_ms > $2 THEN rate_limits.tat_ms ELSE $2 END + $3 - $2
               <= $4
         RETURNING tat_ms"
    };
}

/// Checks and counts one request of `name` at `now_ms`, by its rate's `step`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn admit(db: &Db, name: &str, now_ms: i64, step: Step) -> Result<Rate, sqlx::Error> {
    // A count is not money: on PostgreSQL its commit does not wait for the WAL to reach
    // the disk (a crash of the database forgets at most the last fraction of a second of
    // counts). `set_config(.., true)` holds for this statement's own transaction only.
    let sql = match db {
        Db::Sqlite(_) => concat!(
            "INSERT INTO rate_limits (name, tat_ms) VALUES ($1, $2 + $3) ",
            admitted_on_conflict!()
        ),
        Db::Postgres(_) => concat!(
            "INSERT INTO rate_limits (name, tat_ms)
             SELECT $1, $2 + $3 FROM (SELECT set_config('synchronous_commit', 'off', true))
                 AS without_waiting_for_the_disk ",
            admitted_on_conflict!()
        ),
    };
    let admitted: Option<i64> = db_run!(db, pool => sqlx::query_scalar(sql)
        .bind(name)
        .bind(now_ms)
        .bind(step.interval_ms)
        .bind(step.window_ms)
        .fetch_optional(pool)
        .await)?;
    match admitted {
        Some(tat_ms) => Ok(Rate::Admitted { tat_ms }),
        None => refused(db, name, now_ms, step).await,
    }
}

/// A request of `name` the upsert refused at `now_ms`, with the time as it stands, read
/// for how long to wait.
pub async fn refused(db: &Db, name: &str, now_ms: i64, step: Step) -> Result<Rate, sqlx::Error> {
    let tat_ms = tat(db, name).await?;
    // Gone since the upsert (cleared, or swept by an instance whose clock runs ahead): as
    // full as it was refused at, freeing up within the interval.
    let tat_ms = tat_ms.unwrap_or(now_ms + step.window_ms - step.interval_ms);
    Ok(Rate::Refused { tat_ms })
}

/// The theoretical arrival time of `name` (milliseconds), if anything was counted for it.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn tat(db: &Db, name: &str) -> Result<Option<i64>, sqlx::Error> {
    db_read!(db, pool => sqlx::query_scalar("SELECT tat_ms FROM rate_limits WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await)
}

/// How far ahead of now [`add`] moves a time at most: a week. A huge count (a model that
/// reports absurd usage) holds its rate shut for that long, and the time never overflows.
pub const ADD_HORIZON_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// Counts `cost_ms` of `name` at `now_ms`, whatever the window, never past
/// [`ADD_HORIZON_MS`] ahead of now: for an amount known only once a call is over (its model
/// tokens), checked before the next call by [`tat`].
#[tracing::instrument(level = "debug", skip_all)]
pub async fn add(db: &Db, name: &str, now_ms: i64, cost_ms: i64) -> Result<(), sqlx::Error> {
    let cost_ms = cost_ms.clamp(0, ADD_HORIZON_MS);
    db_run!(db, pool => sqlx::query(
        "INSERT INTO rate_limits (name, tat_ms) VALUES ($1, $2 + $3)
         ON CONFLICT (name) DO UPDATE
         SET tat_ms = CASE WHEN rate_limits.tat_ms - $2 > $4 - $3 THEN $2 + $4
                           WHEN rate_limits.tat_ms > $2 THEN rate_limits.tat_ms + $3
                           ELSE $2 + $3 END",
    )
    .bind(name)
    .bind(now_ms)
    .bind(cost_ms)
    .bind(ADD_HORIZON_MS)
    .execute(pool)
    .await
    .map(|_| ()))
}

/// Takes back one request of `name` counted by [`admit`]: its time moves back by
/// `interval_ms`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn take_back(db: &Db, name: &str, interval_ms: i64) -> Result<(), sqlx::Error> {
    db_execute!(
        db,
        sqlx::query("UPDATE rate_limits SET tat_ms = tat_ms - $2 WHERE name = $1")
            .bind(name)
            .bind(interval_ms)
    )?;
    Ok(())
}

/// A rate of `before` a minute given `after` instead, at `now_ms`: what it counted stands,
/// in the new rate's units (so raising a spent `rpm` of 2 to 600 leaves 598 for the
/// minute, where the time kept as it was would have let one through every 100 ms), at most
/// `cap_ms` ahead of now. A rate set anew or removed starts from nothing.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn rescale(
    db: &Db,
    name: &str,
    now_ms: i64,
    (before, after): (Option<i64>, Option<i64>),
    cap_ms: i64,
) -> Result<(), sqlx::Error> {
    match (before, after) {
        (Some(before), Some(after)) if before != after && before > 0 && after > 0 => {
            db_execute!(
                db,
                sqlx::query(
                    // The time ahead taken at most `cap_ms` before it is scaled: the
                    // product stays within 64 bits (SQLite would make it a float).
                    "UPDATE rate_limits
                     SET tat_ms = $2 + CASE
                         WHEN (CASE WHEN tat_ms - $2 > $5 THEN $5 ELSE tat_ms - $2 END) * $3 / $4
                              > $5 THEN $5
                         ELSE (CASE WHEN tat_ms - $2 > $5 THEN $5 ELSE tat_ms - $2 END) * $3 / $4
                         END
                     WHERE name = $1 AND tat_ms > $2",
                )
                .bind(name)
                .bind(now_ms)
                .bind(before)
                .bind(after)
                .bind(cap_ms)
            )?;
            Ok(())
        }
        (Some(_), None) | (None, Some(_)) => clear(db, name).await,
        _ => Ok(()),
    }
}

/// Forgets every request counted for `name`.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn clear(db: &Db, name: &str) -> Result<(), sqlx::Error> {
    db_execute!(
        db,
        sqlx::query("DELETE FROM rate_limits WHERE name = $1").bind(name)
    )?;
    Ok(())
}

/// Deletes the rows whose time is before `before_ms`: [`admit`] treats a time in the past
/// as now, so a missing row counts the same. How many went.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn forget_before(db: &Db, before_ms: i64) -> Result<u64, sqlx::Error> {
    db_execute!(
        db,
        sqlx::query("DELETE FROM rate_limits WHERE tat_ms < $1").bind(before_ms)
    )
}
