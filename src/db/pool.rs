//! The connection pools, without the round trip sqlx's own pool makes on every release.
//!
//! sqlx 0.8's `Pool` pings each connection as it goes back to the pool, whatever its
//! options (`PoolConnection::return_to_pool`; sqlx issue #1025): on SQLite a second
//! hand-off to the connection's thread for every statement, on PostgreSQL a second round
//! trip to the server, and a task spawned for each. Measured without it, SQLite's `/balance`
//! served about a third more requests a second and `/chat` at 32 connections 14% more
//! (BENCHMARKS.md, issue 23, sessions 35 and 36). The ping is there for the connections
//! given back unsettled: a statement or transaction abandoned half-way (its future
//! dropped), whose rollback must run before anyone else uses the connection, or a
//! connection that broke. Here only those are pinged, as sqlx does, in a task of their own
//! before they go back (see [`PooledConnection`]); a connection left settled goes back at
//! once. deadpool keeps the connections.
//!
//! [`Connections`] is an [`Executor`] like `&Pool` (each statement takes a connection and
//! gives it back) and has a [`begin`](Connections::begin) like the pool's, so the queries of
//! this crate read as they did with sqlx's pool.

use std::{
    fmt,
    ops::{Deref, DerefMut},
    time::Duration,
};

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};
use futures_util::{future::BoxFuture, stream::BoxStream, TryStreamExt};
use sqlx::{
    ConnectOptions, Connection, Database, Describe, Either, Execute, Executor, TransactionManager,
};

mod statements;

use self::statements::{first_row_of_all, reads_only};
use super::ACQUIRE_TIMEOUT;

/// How long a connection serves before it is closed and another opened in its place when
/// next needed (sqlx's pool's default): a server-side session's memory does not grow for
/// ever, and a PostgreSQL fail-over is followed.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// How long a connection given back unsettled may take to answer its ping: an abandoned
/// statement still runs to its end on the database, and its connection is not counted free
/// until then. One that takes longer is closed, and another opened when needed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection type of `DB`'s connect options.
type Options<DB> = <<DB as Database>::Connection as Connection>::Options;

/// A pool of connections to one database, opened when first needed. Cloning it is one
/// reference count.
pub struct Connections<DB: Database> {
    pool: managed::Pool<Opener<DB>>,
}

impl<DB: Database> Clone for Connections<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
        }
    }
}

impl<DB: Database> fmt::Debug for Connections<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connections")
            .field("status", &self.pool.status())
            .finish_non_exhaustive()
    }
}

/// Opens the pool's connections and checks each one it hands out again.
pub struct Opener<DB: Database> {
    options: Options<DB>,
}

/// One connection of the pool, and whether it was left ready for the next statement.
pub struct Pooled<DB: Database> {
    connection: DB::Connection,
    /// False from the moment the connection is handed out until what it was taken for has
    /// finished; a connection given back unsettled is pinged before it goes back.
    settled: bool,
    /// True while a `BEGIN` is on its way: abandoned then, the connection may be in a
    /// transaction that sqlx does not know of (PostgreSQL counts it only once answered), so
    /// it is closed rather than given back.
    in_doubt: bool,
}

impl<DB: Database> managed::Manager for Opener<DB> {
    type Type = Pooled<DB>;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Pooled<DB>, sqlx::Error> {
        Ok(Pooled {
            connection: self.options.connect().await?,
            settled: true,
            in_doubt: false,
        })
    }

    async fn recycle(
        &self,
        pooled: &mut Pooled<DB>,
        metrics: &Metrics,
    ) -> RecycleResult<sqlx::Error> {
        if metrics.age() > MAX_LIFETIME {
            return Err(RecycleError::message("served its time"));
        }
        // Only a settled connection goes back (see `PooledConnection`'s drop); this is a
        // last check that costs nothing.
        let depth = DB::TransactionManager::get_transaction_depth(&pooled.connection);
        if !pooled.settled || pooled.in_doubt || depth != 0 {
            return Err(RecycleError::message("given back unsettled"));
        }
        Ok(())
    }
}

impl<DB: Database> Deref for Pooled<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.connection
    }
}

impl<DB: Database> DerefMut for Pooled<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.connection
    }
}

impl<DB: Database> Pooled<DB> {
    /// Marks the connection ready for the next user if what it ran finished: succeeded, or
    /// was refused by the database itself (a constraint, a syntax error), which leaves the
    /// connection as it was.
    fn settle<T>(&mut self, outcome: &Result<T, sqlx::Error>) {
        self.settled = match outcome {
            Ok(_) => true,
            // Not PostgreSQL's "terminating connection" and the like, which are errors of
            // the database too.
            Err(err @ sqlx::Error::Database(_)) => !super::is_unreachable(err),
            Err(_) => false,
        };
    }
}

/// A connection taken from the pool. Dropped, it goes back at once if it was left settled;
/// otherwise a task of its own pings it first (which waits for an abandoned statement to
/// end and a dropped transaction's rollback to run), and it goes back if it answers and is
/// in no transaction, or is closed. A connection whose `BEGIN` was abandoned is closed.
pub struct PooledConnection<DB: Database> {
    lent: Option<Object<Opener<DB>>>,
}

impl<DB: Database> Drop for PooledConnection<DB> {
    fn drop(&mut self) {
        let Some(object) = self.lent.take() else {
            return;
        };
        if object.settled {
            return;
        }
        if object.in_doubt {
            drop(Object::take(object));
            return;
        }
        // As sqlx's pool does with every connection: the task is short (bounded by
        // SETTLE_TIMEOUT), and holds nothing but the connection. With no runtime left (the
        // process is ending), the connection is closed.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(settle_then_give_back(object))),
            Err(_) => drop(Object::take(object)),
        }
    }
}

async fn settle_then_give_back<DB: Database>(mut object: Object<Opener<DB>>) {
    let answered = tokio::time::timeout(SETTLE_TIMEOUT, object.connection.ping()).await;
    if matches!(answered, Ok(Ok(())))
        && DB::TransactionManager::get_transaction_depth(&object.connection) == 0
    {
        object.settled = true;
    } else {
        drop(Object::take(object));
    }
}

impl<DB: Database> Deref for PooledConnection<DB> {
    type Target = Pooled<DB>;

    fn deref(&self) -> &Pooled<DB> {
        self.lent
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only by drop"))
    }
}

impl<DB: Database> DerefMut for PooledConnection<DB> {
    fn deref_mut(&mut self) -> &mut Pooled<DB> {
        self.lent
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only by drop"))
    }
}

impl<DB: Database> Connections<DB> {
    /// A pool of at most `max` connections opened with `options`. Nothing is opened yet.
    pub fn new(options: Options<DB>, max: u32) -> Self {
        let pool = managed::Pool::builder(Opener { options })
            .max_size(usize::try_from(max).unwrap_or(usize::MAX))
            // The connection used last, whose pages are most likely still in its cache.
            .queue_mode(managed::QueueMode::Lifo)
            .build()
            // Only timeouts without a runtime fail the build, and none are set: `acquire`
            // bounds the whole wait itself.
            .unwrap_or_else(|err| unreachable!("the pool's settings are fixed: {err}"));
        Self { pool }
    }

    /// Takes a connection, waiting at most [`ACQUIRE_TIMEOUT`] in all for one to be free or
    /// opened (then [`sqlx::Error::PoolTimedOut`], as sqlx's pool answers).
    pub async fn acquire(&self) -> Result<PooledConnection<DB>, sqlx::Error> {
        let mut object = match tokio::time::timeout(ACQUIRE_TIMEOUT, self.pool.get()).await {
            Ok(Ok(object)) => object,
            Ok(Err(PoolError::Backend(err))) => return Err(err),
            Ok(Err(PoolError::Closed)) => return Err(sqlx::Error::PoolClosed),
            Ok(Err(
                PoolError::Timeout(_)
                | PoolError::NoRuntimeSpecified
                | PoolError::PostCreateHook(_),
            ))
            | Err(_) => return Err(sqlx::Error::PoolTimedOut),
        };
        object.settled = false;
        Ok(PooledConnection { lent: Some(object) })
    }

    /// Opens a connection now (if none is open), and leaves it in the pool.
    pub async fn open_one(&self) -> Result<(), sqlx::Error> {
        let mut connection = self.acquire().await?;
        connection.settled = true;
        Ok(())
    }

    /// Begins a transaction on a connection of its own, which goes back to the pool when
    /// the transaction is committed or dropped (rolled back).
    pub async fn begin(&self) -> Result<PooledTransaction<DB>, sqlx::Error> {
        let mut connection = self.acquire().await?;
        connection.in_doubt = true;
        DB::TransactionManager::begin(&mut connection, None).await?;
        connection.in_doubt = false;
        Ok(PooledTransaction {
            connection,
            open: true,
        })
    }

    /// How the connections open.
    pub fn connect_options(&self) -> &Options<DB> {
        &self.pool.manager().options
    }

    /// Connections open (busy or idle), idle, and the most there may be.
    pub fn usage(&self) -> (usize, usize, usize) {
        let status = self.pool.status();
        (status.size, status.available, status.max_size)
    }

    /// Refuses every later [`acquire`](Self::acquire) and closes the idle connections,
    /// waiting for each to finish (so the last one's close checkpoints the log). A
    /// connection still in use is closed when it is given back.
    pub async fn close(&self) {
        let idle = self.pool.retain(|_, _| false).removed;
        self.pool.close();
        for pooled in idle {
            if let Err(err) = pooled.connection.close().await {
                tracing::warn!(error = %err, "closing a database connection failed");
            }
        }
    }
}

/// A transaction from [`Connections::begin`]: rolled back unless
/// [`commit`](Self::commit)ted. Its statements run on `&mut *transaction`.
pub struct PooledTransaction<DB: Database> {
    connection: PooledConnection<DB>,
    /// Until the commit is acknowledged. As in sqlx's own `Transaction`, a transaction
    /// still open when dropped sends a rollback, even if its commit may have run: the
    /// connection's thread ignores the rollback that follows a commit it ran but could not
    /// acknowledge.
    open: bool,
}

impl<DB: Database> PooledTransaction<DB> {
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        DB::TransactionManager::commit(&mut self.connection).await?;
        self.open = false;
        self.connection.settled = true;
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        DB::TransactionManager::rollback(&mut self.connection).await?;
        self.open = false;
        self.connection.settled = true;
        Ok(())
    }
}

impl<DB: Database> Drop for PooledTransaction<DB> {
    fn drop(&mut self) {
        if self.open {
            // Queued on the connection, not awaited (a drop cannot wait); the connection's
            // ping, in the task its drop starts, waits for it before it goes back.
            DB::TransactionManager::start_rollback(&mut self.connection);
            self.connection.settled = false;
        }
    }
}

impl<DB: Database> Deref for PooledTransaction<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.connection
    }
}

impl<DB: Database> DerefMut for PooledTransaction<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.connection
    }
}

/// Each statement takes a connection and gives it back, as on `&Pool`. `execute`,
/// `fetch_all` and `fetch_optional` are futures of their own rather than the trait's
/// defaults over a stream.
impl<'c, DB: Database> Executor<'c> for &'c Connections<DB>
where
    for<'x> &'x mut DB::Connection: Executor<'x, Database = DB>,
{
    type Database = DB;

    fn execute<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<DB::QueryResult, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = (&mut connection.connection).execute(query).await;
            connection.settle(&outcome);
            outcome
        })
    }

    fn fetch_all<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Vec<DB::Row>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = (&mut connection.connection).fetch_all(query).await;
            connection.settle(&outcome);
            outcome
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let read_to_the_end = DB::NAME == "SQLite" && !reads_only(query.sql());
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = if read_to_the_end {
                first_row_of_all(&mut connection.connection, query).await
            } else {
                (&mut connection.connection).fetch_optional(query).await
            };
            connection.settle(&outcome);
            outcome
        })
    }

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<DB::QueryResult, DB::Row>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        // A stream that owns the connection it reads from: written as a generator, since
        // the rows borrow the connection (what sqlx's own pool does with its internal
        // `try_stream!`).
        Box::pin(async_stream::try_stream! {
            let mut connection = self.acquire().await?;
            {
                let mut rows = (&mut connection.connection).fetch_many(query);
                while let Some(row) = rows.try_next().await? {
                    yield row;
                }
            }
            // Read to the end; a stream dropped before that leaves the connection unsettled.
            connection.settled = true;
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = (&mut connection.connection)
                .prepare_with(sql, parameters)
                .await;
            connection.settle(&outcome);
            outcome
        })
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<DB>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = (&mut connection.connection).describe(sql).await;
            connection.settle(&outcome);
            outcome
        })
    }
}
