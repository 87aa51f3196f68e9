//! The one transaction type of the store: a transaction driven by plain
//! `begin` / `commit` / `rollback` statements on a pool connection of its
//! own, for both backends.
//!
//! Why not sqlx's own `Transaction`: after some errors (`SQLITE_FULL`,
//! `SQLITE_IOERR`) SQLite rolls a transaction back by itself. sqlx's
//! transaction object then still counts itself open, its `ROLLBACK` fails,
//! and the connection goes back to the pool believing it is inside a
//! transaction: every later `BEGIN` on it is refused ("attempted to call
//! begin_with at non-zero transaction depth"), which is how a full disk
//! once wedged the writer until a restart. Here a transaction that is not
//! committed is rolled back, and a connection whose state is in any doubt
//! (a failed commit or rollback, a transaction dropped midway: an error,
//! a cancelled future) is closed instead of going back to the pool; the
//! database rolls back what it held.

use sqlx::pool::PoolConnection;
use sqlx::{Database, Executor, PgConnection, Pool, Postgres, Sqlite, SqliteConnection};

use super::Db;

/// An open transaction; see the module documentation.
pub struct Tx<DB: Database> {
    /// `None` once committed or rolled back.
    conn: Option<PoolConnection<DB>>,
}

impl<DB> Tx<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Takes a connection from `pool` and runs `begin` on it (`begin`, or
    /// `begin immediate` for a SQLite writer). A `begin` that fails leaves
    /// no transaction: the connection goes back to the pool.
    pub async fn begin(pool: &Pool<DB>, begin: &'static str) -> Result<Self, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        sqlx::raw_sql(begin).execute(&mut *conn).await?;
        Ok(Self { conn: Some(conn) })
    }

    /// The connection the transaction runs on.
    pub fn conn(&mut self) -> &mut DB::Connection {
        self.conn
            .as_mut()
            .expect("a transaction is open until it ends")
    }

    /// Commits. On failure the connection is closed (whether the commit
    /// reached the database is then for the caller to judge by the error).
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let mut conn = self.conn.take().expect("a transaction ends once");
        match sqlx::raw_sql("commit").execute(&mut *conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = conn.close().await;
                Err(e)
            }
        }
    }

    /// Rolls back what the transaction did (a decision not to write, not a
    /// failure); the connection goes back to the pool, or is closed if the
    /// rollback fails.
    pub async fn rollback(mut self) {
        let mut conn = self.conn.take().expect("a transaction ends once");
        if sqlx::raw_sql("rollback").execute(&mut *conn).await.is_err() {
            let _ = conn.close().await;
        }
    }
}

impl<DB: Database> Drop for Tx<DB> {
    /// Dropped open (an error returned early, a cancelled future): the
    /// connection is closed, never returned inside its transaction.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// A connection inside a transaction, on either backend: what the store's
/// functions that write within a caller's transaction take.
pub enum Conn<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

impl<'c> From<&'c mut SqliteConnection> for Conn<'c> {
    fn from(c: &'c mut SqliteConnection) -> Self {
        Self::Sqlite(c)
    }
}

impl<'c> From<&'c mut PgConnection> for Conn<'c> {
    fn from(c: &'c mut PgConnection) -> Self {
        Self::Postgres(c)
    }
}

/// Runs the same expression on whichever connection `conn` holds; for
/// statements whose SQL and types are the same on both backends (as
/// [`super::on_db`] does for pools).
macro_rules! on_conn {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::tx::Conn::Sqlite($c) => $body,
            $crate::store::tx::Conn::Postgres($c) => $body,
        }
    };
}
pub(crate) use on_conn;

/// A [`Tx`] on whichever database a [`Db`] is.
pub enum DbTx {
    Sqlite(Tx<Sqlite>),
    Postgres(Tx<Postgres>),
}

impl DbTx {
    /// Begins a transaction that is going to write: on SQLite with `begin
    /// immediate`, which makes it the only writer of the file from its
    /// first statement (rather than failing at its first write when
    /// another connection wrote meanwhile).
    pub async fn begin_writing(db: &Db) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Db::Sqlite(pool) => Self::Sqlite(Tx::begin(pool, "begin immediate").await?),
            Db::Postgres(pool) => Self::Postgres(Tx::begin(pool, "begin").await?),
        })
    }

    /// The connection the transaction runs on.
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Sqlite(tx) => Conn::Sqlite(tx.conn()),
            Self::Postgres(tx) => Conn::Postgres(tx.conn()),
        }
    }

    /// Commits; see [`Tx::commit`]. An error means the transaction did not
    /// commit, except on PostgreSQL when the connection was lost while
    /// committing: the commit may then have reached the server.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(tx) => tx.commit().await,
            Self::Postgres(tx) => tx.commit().await,
        }
    }
}
