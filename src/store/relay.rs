//! The outbox relay's share of the event store: its checkpoint row in
//! `relay_checkpoints` and the lease that lets one process publish at a time.
//!
//! On PostgreSQL several eventvault processes may share the database, and
//! only one of them may publish, or two relays would interleave their
//! messages. The lease is a session-level advisory lock held by a connection
//! of its own, outside the pool, for as long as the relay publishes. The
//! checkpoint is read and written through that same connection: a relay
//! whose connection (and with it the lock) is gone cannot move the
//! checkpoint, and learns at its next statement that it must stop. SQLite
//! serves a single process, so there the lease is the pool itself.

use sqlx::Connection as _;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqlitePool;

use super::{Db, StoreError, now_us};

/// First key of the session-level advisory lock of the publishing relay; the
/// second is a hash of the relay's name, so relays to different streams do
/// not wait for each other. Not the writer's lock (`PG_WRITER_LOCK`, a
/// single 64-bit key taken per transaction): the two never wait for each
/// other.
const PG_RELAY_LOCK: i32 = 0x6576_7402; // "ev" + "t" + 2

/// The checkpoint only moves forward: a relay cannot undo progress it did
/// not see (an operator who wants a replay sets the row by hand).
const SAVE_CHECKPOINT: &str =
    "insert into relay_checkpoints (name, position, updated_at) values ($1, $2, $3)
     on conflict (name) do update set position = excluded.position, updated_at = excluded.updated_at
     where relay_checkpoints.position < excluded.position";

const LOAD_CHECKPOINT: &str = "select position from relay_checkpoints where name = $1";

/// The right to publish for the relay named `name`, and its checkpoint.
pub struct RelayLease {
    name: String,
    holder: Holder,
}

enum Holder {
    Sqlite(SqlitePool),
    /// Holds `PG_RELAY_LOCK` while it lives; dropping it ends the session
    /// and so releases the lock.
    Postgres(PgConnection),
}

impl RelayLease {
    /// Takes the lease, or `None` while another process holds it.
    pub async fn try_acquire(db: &Db, name: &str) -> Result<Option<Self>, StoreError> {
        let holder = match db {
            Db::Sqlite(pool) => Holder::Sqlite(pool.clone()),
            Db::Postgres(pool) => {
                let options = pool.connect_options();
                let mut conn = PgConnection::connect_with(&options).await?;
                let locked: bool =
                    sqlx::query_scalar("select pg_try_advisory_lock($1, hashtext($2))")
                        .bind(PG_RELAY_LOCK)
                        .bind(name)
                        .fetch_one(&mut conn)
                        .await?;
                if !locked {
                    let _ = conn.close().await;
                    return Ok(None);
                }
                Holder::Postgres(conn)
            }
        };
        Ok(Some(Self {
            name: name.to_owned(),
            holder,
        }))
    }

    /// The last position the relay saved (0 before its first save).
    pub async fn checkpoint(&mut self) -> Result<u64, StoreError> {
        let position: Option<i64> = match &mut self.holder {
            Holder::Sqlite(pool) => {
                sqlx::query_scalar(LOAD_CHECKPOINT)
                    .bind(&self.name)
                    .fetch_optional(&*pool)
                    .await?
            }
            Holder::Postgres(conn) => {
                sqlx::query_scalar(LOAD_CHECKPOINT)
                    .bind(&self.name)
                    .fetch_optional(&mut *conn)
                    .await?
            }
        };
        u64::try_from(position.unwrap_or(0))
            .map_err(|_| StoreError::Corrupt("a relay checkpoint is negative".into()))
    }

    /// Records that everything up to `position` has been published.
    pub async fn save_checkpoint(&mut self, position: u64) -> Result<(), StoreError> {
        let position = i64::try_from(position)
            .map_err(|_| StoreError::Corrupt("a position beyond i64".into()))?;
        match &mut self.holder {
            Holder::Sqlite(pool) => {
                sqlx::query(SAVE_CHECKPOINT)
                    .bind(&self.name)
                    .bind(position)
                    .bind(now_us())
                    .execute(&*pool)
                    .await?;
            }
            Holder::Postgres(conn) => {
                sqlx::query(SAVE_CHECKPOINT)
                    .bind(&self.name)
                    .bind(position)
                    .bind(now_us())
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Fails if the lease has been lost (its connection, and with it the
    /// lock, is gone).
    pub async fn confirm(&mut self) -> Result<(), StoreError> {
        if let Holder::Postgres(conn) = &mut self.holder {
            conn.ping().await?;
        }
        Ok(())
    }

    /// Gives the lease up, so that another process may take over at once.
    pub async fn release(self) {
        if let Holder::Postgres(conn) = self.holder {
            let _ = conn.close().await;
        }
    }
}
