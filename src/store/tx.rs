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
use sqlx::{Database, Executor, Pool};

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
