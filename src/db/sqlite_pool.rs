//! SQLite's connection pools, without the round trip sqlx's own pool makes on every release.
//!
//! sqlx 0.8's `Pool` pings each connection as it goes back to the pool, whatever its
//! options (`PoolConnection::return_to_pool`; sqlx issue #1025): on SQLite a second
//! hand-off to the connection's thread for every statement, and a task spawned for it.
//! Measured without it, `/balance` served a third more requests a second and `/chat` at 32
//! connections 11 to 22% more (BENCHMARKS.md, issue 23, sessions 35 and 36). The ping is
//! there for one case: a statement or transaction abandoned half-way (its future dropped),
//! whose rollback must run before the next user's statements. deadpool, which keeps the
//! connections here, runs [`Opener::recycle`] as it hands a connection out, and that pings
//! exactly the connections that were not left settled: those whose last statement did not
//! finish, failed other than by the database refusing it, or left a transaction open.
//!
//! [`SqliteConnections`] is an [`Executor`] like `&SqlitePool` (each statement takes a
//! connection and gives it back) and has a [`begin`](SqliteConnections::begin) like the
//! pool's, so the queries of this crate read the same on both backends.

use std::ops::{Deref, DerefMut};

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};
use futures_util::{future::BoxFuture, stream::BoxStream, TryStreamExt};
use sqlx::{
    sqlite::{
        Sqlite, SqliteConnectOptions, SqliteConnection, SqliteQueryResult, SqliteRow,
        SqliteStatement, SqliteTypeInfo,
    },
    ConnectOptions, Connection, Database, Describe, Either, Execute, Executor, TransactionManager,
};

use super::ACQUIRE_TIMEOUT;

/// A pool of SQLite connections to one database, opened when first needed. Cloning it is
/// one reference count.
#[derive(Clone, Debug)]
pub struct SqliteConnections {
    pool: managed::Pool<Opener>,
}

/// Opens the pool's connections and checks each one it hands out again.
#[derive(Debug)]
pub struct Opener {
    options: SqliteConnectOptions,
}

/// One connection of the pool, and whether it was left ready for the next statement.
#[derive(Debug)]
pub struct Pooled {
    connection: SqliteConnection,
    /// False from the moment the connection is handed out until what it was taken for has
    /// finished; a connection given back unsettled is pinged before its next use.
    settled: bool,
}

/// A connection taken from the pool, given back when dropped.
pub type PooledConnection = Object<Opener>;

impl managed::Manager for Opener {
    type Type = Pooled;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Pooled, sqlx::Error> {
        Ok(Pooled {
            connection: self.options.connect().await?,
            settled: true,
        })
    }

    async fn recycle(&self, pooled: &mut Pooled, _: &Metrics) -> RecycleResult<sqlx::Error> {
        let depth =
            <Sqlite as Database>::TransactionManager::get_transaction_depth(&pooled.connection);
        if pooled.settled && depth == 0 {
            return Ok(());
        }
        // Waits until the connection's thread has run everything queued on it, a dropped
        // transaction's rollback included; a connection that cannot answer is replaced.
        pooled
            .connection
            .ping()
            .await
            .map_err(RecycleError::Backend)?;
        let depth =
            <Sqlite as Database>::TransactionManager::get_transaction_depth(&pooled.connection);
        if depth != 0 {
            return Err(RecycleError::message("a transaction was left open"));
        }
        pooled.settled = true;
        Ok(())
    }
}

impl Deref for Pooled {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.connection
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.connection
    }
}

impl Pooled {
    /// Marks the connection ready for the next user if what it ran finished: succeeded, or
    /// was refused by the database itself (a constraint, a syntax error), which leaves the
    /// connection as it was.
    fn settle<T>(&mut self, outcome: &Result<T, sqlx::Error>) {
        self.settled = matches!(outcome, Ok(_) | Err(sqlx::Error::Database(_)));
    }
}

impl SqliteConnections {
    /// A pool of at most `max` connections opened with `options`. Nothing is opened yet.
    pub fn new(options: SqliteConnectOptions, max: u32) -> Self {
        let pool = managed::Pool::builder(Opener { options })
            .max_size(usize::try_from(max).unwrap_or(usize::MAX))
            .wait_timeout(Some(ACQUIRE_TIMEOUT))
            .create_timeout(Some(ACQUIRE_TIMEOUT))
            .recycle_timeout(Some(ACQUIRE_TIMEOUT))
            // The connection used last, whose pages are most likely still in its cache.
            .queue_mode(managed::QueueMode::Lifo)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            // Only a missing runtime fails the build, and one is named above.
            .unwrap_or_else(|err| unreachable!("the pool's settings are fixed: {err}"));
        Self { pool }
    }

    /// Takes a connection, waiting at most [`ACQUIRE_TIMEOUT`] for one to be free or
    /// opened (then [`sqlx::Error::PoolTimedOut`], as sqlx's pool answers).
    pub async fn acquire(&self) -> Result<PooledConnection, sqlx::Error> {
        let mut connection = self.pool.get().await.map_err(|err| match err {
            PoolError::Backend(err) => err,
            PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                sqlx::Error::PoolClosed
            }
        })?;
        connection.settled = false;
        Ok(connection)
    }

    /// Begins a transaction on a connection of its own, which goes back to the pool when
    /// the transaction is committed or dropped (rolled back).
    pub async fn begin(&self) -> Result<SqliteTransaction, sqlx::Error> {
        let mut connection = self.acquire().await?;
        <Sqlite as Database>::TransactionManager::begin(&mut connection, None).await?;
        Ok(SqliteTransaction {
            connection,
            open: true,
        })
    }

    /// How the connections open.
    pub fn connect_options(&self) -> &SqliteConnectOptions {
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

/// A transaction from [`SqliteConnections::begin`]: rolled back unless
/// [`commit`](Self::commit)ted. Its statements run on `&mut *transaction`.
#[derive(Debug)]
pub struct SqliteTransaction {
    connection: PooledConnection,
    /// Until the commit is acknowledged. As in sqlx's own `Transaction`, a transaction
    /// still open when dropped sends a rollback, even if its commit may have run: the
    /// connection's thread ignores the rollback that follows a commit it ran but could not
    /// acknowledge.
    open: bool,
}

impl SqliteTransaction {
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        <Sqlite as Database>::TransactionManager::commit(&mut self.connection).await?;
        self.open = false;
        self.connection.settled = true;
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        <Sqlite as Database>::TransactionManager::rollback(&mut self.connection).await?;
        self.open = false;
        self.connection.settled = true;
        Ok(())
    }
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        if self.open {
            // Queued on the connection's thread; the next user's recycle waits for it.
            <Sqlite as Database>::TransactionManager::start_rollback(&mut self.connection);
            self.connection.settled = false;
        }
    }
}

impl Deref for SqliteTransaction {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.connection
    }
}

impl DerefMut for SqliteTransaction {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.connection
    }
}

/// Each statement takes a connection and gives it back, as on `&SqlitePool`. `execute`,
/// `fetch_all` and `fetch_optional` are futures of their own rather than the trait's
/// defaults over a stream.
impl<'c> Executor<'c> for &'c SqliteConnections {
    type Database = Sqlite;

    fn execute<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<SqliteQueryResult, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Sqlite>,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = connection.execute(query).await;
            connection.settle(&outcome);
            outcome
        })
    }

    fn fetch_all<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Vec<SqliteRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Sqlite>,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = connection.fetch_all(query).await;
            connection.settle(&outcome);
            outcome
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<SqliteRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Sqlite>,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = connection.fetch_optional(query).await;
            connection.settle(&outcome);
            outcome
        })
    }

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<SqliteQueryResult, SqliteRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Sqlite>,
    {
        // A stream that owns the connection it reads from: written as a generator, since
        // the rows borrow the connection (what sqlx's own pool does with its internal
        // `try_stream!`).
        Box::pin(async_stream::try_stream! {
            let mut connection = self.acquire().await?;
            {
                let mut rows = connection.fetch_many(query);
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
        parameters: &'e [SqliteTypeInfo],
    ) -> BoxFuture<'e, Result<SqliteStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = connection.prepare_with(sql, parameters).await;
            connection.settle(&outcome);
            outcome
        })
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Sqlite>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async move {
            let mut connection = self.acquire().await?;
            let outcome = connection.describe(sql).await;
            connection.settle(&outcome);
            outcome
        })
    }
}
