//! The keystore's SQL: master-key check values and wrapped data keys. It
//! stores and returns only wrapped bytes; unwrapping is the key manager's.

use super::{Db, StoreError, count, now_us, on_db};
use crate::domain::Subject;

/// A wrapped data key as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WrappedDek {
    pub key_id: String,
    pub subject: String,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
}

/// The keystore database (separate from the events).
#[derive(Clone, Debug)]
pub struct Keystore {
    pub db: Db,
}

/// A master key the keystore knows, where it lives, and how many data keys
/// it wraps.
#[derive(Debug, Clone)]
pub struct KekUse {
    pub kek_id: String,
    /// `file:…` or `pkcs11:…`; `None` if never recorded.
    pub uri: Option<String>,
    pub data_keys: u64,
}

impl Keystore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Every master key the keystore knows: `(kek_id, check_blob, uri)`,
    /// oldest first. Reads `keks` alone: a start must not wait for a lock on
    /// the data keys (a forget's deletion, a maintenance job).
    pub async fn keks(&self) -> Result<Vec<(String, Vec<u8>, Option<String>)>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as("select kek_id, check_blob, uri from keks order by created_at")
                .fetch_all(pool)
                .await
        })?)
    }

    /// Registers a master key and where it lives (`uri`, never a secret);
    /// a key registered already keeps its check and has its URI updated,
    /// since the operator may have moved it (a file renamed, a token
    /// relabelled) and `keys status` should say where it is now.
    pub async fn insert_kek(
        &self,
        kek_id: &str,
        check_blob: &[u8],
        uri: &str,
    ) -> Result<(), StoreError> {
        on_db!(&self.db, |pool| {
            sqlx::query(
                "insert into keks (kek_id, check_blob, created_at, uri) values ($1, $2, $3, $4)
                 on conflict (kek_id) do update set uri = excluded.uri",
            )
            .bind(kek_id)
            .bind(check_blob)
            .bind(now_us())
            .bind(uri)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(())
    }

    /// A master key other than `kek_id` that still wraps a data key, with
    /// where it lives if that is recorded: an unfinished rotation.
    pub async fn other_kek_in_use(
        &self,
        kek_id: &str,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select k.kek_id, k.uri from keks k
                 where k.kek_id <> $1 and exists (select 1 from deks d where d.kek_id = k.kek_id)
                 order by k.created_at limit 1",
            )
            .bind(kek_id)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// The subject's active (not retired) data key, if any.
    pub async fn active_dek(&self, subject: &str) -> Result<Option<WrappedDek>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select key_id, subject, kek_id, wrapped from deks where subject = $1 and retired_at is null",
            )
            .bind(subject)
            .fetch_optional(pool)
            .await
        })?)
    }

    pub async fn dek_by_id(&self, key_id: &str) -> Result<Option<WrappedDek>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as("select key_id, subject, kek_id, wrapped from deks where key_id = $1")
                .bind(key_id)
                .fetch_optional(pool)
                .await
        })?)
    }

    /// Stores a new active key for its subject unless the subject already has
    /// one (a concurrent request won the race); returns whether it was stored.
    /// `reserved` encryptions are counted for the new key at once (the
    /// creator's first reservation).
    pub async fn insert_dek_if_none(
        &self,
        dek: &WrappedDek,
        reserved: u64,
    ) -> Result<bool, StoreError> {
        let done = on_db!(&self.db, |pool| {
            sqlx::query(
                "insert into deks (key_id, subject, kek_id, wrapped, created_at, encryptions) values ($1, $2, $3, $4, $5, $6)
                 on conflict (subject) where retired_at is null do nothing",
            )
            .bind(&dek.key_id)
            .bind(&dek.subject)
            .bind(&dek.kek_id)
            .bind(&dek.wrapped)
            .bind(now_us())
            .bind(reserved as i64)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(done == 1)
    }

    /// The ids of every data key of `subject`, retired ones included.
    pub async fn subject_key_ids(&self, subject: &Subject) -> Result<Vec<String>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_scalar("select key_id from deks where subject = $1 order by key_id")
                .bind(subject)
                .fetch_all(pool)
                .await
        })?)
    }

    /// Deletes the data keys `key_ids` of `subject` (step 2 of a forget);
    /// returns how many this call deleted.
    pub async fn delete_keys(
        &self,
        subject: &Subject,
        key_ids: &[String],
    ) -> Result<u64, StoreError> {
        if key_ids.is_empty() {
            return Ok(0);
        }
        Ok(match &self.db {
            Db::Sqlite(pool) => {
                sqlx::query(
                    "delete from deks where subject = $1 and key_id in (select value from json_each($2))",
                )
                .bind(subject)
                .bind(serde_json::to_string(key_ids).expect("strings serialise"))
                .execute(pool)
                .await?
                .rows_affected()
            }
            Db::Postgres(pool) => {
                sqlx::query("delete from deks where subject = $1 and key_id = any($2)")
                    .bind(subject)
                    .bind(key_ids)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        })
    }

    /// Which of `key_ids` the keystore holds.
    pub async fn existing_key_ids(&self, key_ids: &[String]) -> Result<Vec<String>, StoreError> {
        if key_ids.is_empty() {
            return Ok(vec![]);
        }
        Ok(match &self.db {
            Db::Sqlite(pool) => {
                sqlx::query_scalar(
                    "select key_id from deks where key_id in (select value from json_each($1))",
                )
                .bind(serde_json::to_string(key_ids).expect("strings serialise"))
                .fetch_all(pool)
                .await?
            }
            Db::Postgres(pool) => {
                sqlx::query_scalar("select key_id from deks where key_id = any($1)")
                    .bind(key_ids)
                    .fetch_all(pool)
                    .await?
            }
        })
    }

    /// Whether this connection's role may `VACUUM deks` (PostgreSQL: only
    /// the table's owner may before version 17, or a role granted MAINTAIN
    /// since; PostgreSQL skips the table with a warning otherwise). Always
    /// on SQLite.
    pub async fn can_vacuum(&self) -> Result<bool, StoreError> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(true);
        };
        let (owner, version): (bool, i32) = sqlx::query_as(
            "select pg_has_role(current_user, c.relowner, 'USAGE'),
                    current_setting('server_version_num')::int
             from pg_class c where c.oid = to_regclass('deks')",
        )
        .fetch_one(pool)
        .await?;
        if owner || version < 170000 {
            return Ok(owner);
        }
        Ok(
            sqlx::query_scalar("select has_table_privilege(current_user, 'deks', 'MAINTAIN')")
                .fetch_one(pool)
                .await?,
        )
    }

    /// Removes deleted keys' bytes from the files as far as the backend
    /// allows. SQLite: deleted cells are overwritten (`secure_delete`) and a
    /// truncating WAL checkpoint drops the log that held the inserted keys.
    /// PostgreSQL: `VACUUM` reclaims the dead rows; it does not overwrite
    /// them, nor reach WAL archives (see SECURITY.md).
    pub async fn scrub_deleted_keys(&self) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(pool) => {
                // One checkpoint, which waits for readers and writers as
                // long as the busy timeout allows (four fifths of the store
                // timeout): within a request's budget, so that a forget
                // whose scrub is kept waiting is answered 202 `forgetting`
                // by the forget itself, and retried in the background.
                let (busy, _, _): (i64, i64, i64) =
                    sqlx::query_as("pragma wal_checkpoint(truncate)")
                        .fetch_one(pool)
                        .await?;
                if busy != 0 {
                    return Err(StoreError::Busy(
                        "the keystore's WAL could not be checkpointed after a key deletion (other connections kept it busy); retry the forget",
                    ));
                }
            }
            Db::Postgres(pool) => {
                sqlx::query("vacuum deks").execute(pool).await?;
            }
        }
        Ok(())
    }

    /// Which of `subjects` still have a data key.
    pub async fn subjects_with_keys(
        &self,
        subjects: &[Subject],
    ) -> Result<Vec<Subject>, StoreError> {
        if subjects.is_empty() {
            return Ok(vec![]);
        }
        Ok(match &self.db {
            Db::Sqlite(pool) => {
                sqlx::query_scalar(
                    "select distinct subject from deks where subject in (select value from json_each($1))",
                )
                .bind(serde_json::to_string(subjects).expect("strings serialise"))
                .fetch_all(pool)
                .await?
            }
            Db::Postgres(pool) => {
                sqlx::query_scalar("select distinct subject from deks where subject = any($1)")
                    .bind(subjects)
                    .fetch_all(pool)
                    .await?
            }
        })
    }

    /// Whether other processes can be told of changes (a PostgreSQL keystore).
    pub fn can_announce(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// `NOTIFY` on a PostgreSQL keystore; nothing on SQLite.
    pub async fn announce(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        if let Db::Postgres(pool) = &self.db {
            sqlx::query("select pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// A listener on `channel` (PostgreSQL keystore only).
    pub async fn listen(
        &self,
        channel: &str,
    ) -> Result<Option<sqlx::postgres::PgListener>, StoreError> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(channel).await?;
        Ok(Some(listener))
    }

    /// How many data keys each master key wraps, every known master key
    /// listed (0 when it wraps none), oldest first.
    pub async fn dek_counts_by_kek(&self) -> Result<Vec<KekUse>, StoreError> {
        let rows: Vec<(String, Option<String>, i64)> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select k.kek_id, k.uri, (select count(*) from deks d where d.kek_id = k.kek_id)
                 from keks k order by k.created_at",
            )
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter()
            .map(|(kek_id, uri, n)| {
                Ok(KekUse {
                    kek_id,
                    uri,
                    data_keys: count(n)?,
                })
            })
            .collect()
    }

    /// Up to `limit` data keys wrapped by master key `kek_id`.
    pub async fn deks_wrapped_by(
        &self,
        kek_id: &str,
        limit: u32,
    ) -> Result<Vec<WrappedDek>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select key_id, subject, kek_id, wrapped from deks where kek_id = $1 order by key_id limit $2",
            )
            .bind(kek_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?)
    }

    /// Stores re-wrapped data keys in one transaction: each `(key_id, wrapped)`
    /// moves from master key `from` to master key `to` (a key no longer
    /// wrapped by `from`, e.g. forgotten meanwhile, is left alone).
    pub async fn store_rewrapped(
        &self,
        from: &str,
        to: &str,
        keys: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        const SQL: &str =
            "update deks set wrapped = $1, kek_id = $2 where key_id = $3 and kek_id = $4";
        on_db!(&self.db, |pool| {
            async {
                let mut tx = super::tx::Tx::begin(pool, "begin").await?;
                for (id, wrapped) in keys {
                    sqlx::query(SQL)
                        .bind(wrapped)
                        .bind(to)
                        .bind(id)
                        .bind(from)
                        .execute(tx.conn())
                        .await?;
                }
                tx.commit().await
            }
            .await
        })?;
        Ok(())
    }

    /// Forgets every master key but `keep` that wraps nothing any more: the
    /// old key of a finished rotation, and those of earlier rotations that
    /// were interrupted after their last data key moved.
    pub async fn delete_unused_keks(&self, keep: &str) -> Result<(), StoreError> {
        on_db!(&self.db, |pool| {
            sqlx::query(
                "delete from keks where kek_id <> $1
                 and not exists (select 1 from deks where deks.kek_id = keks.kek_id)",
            )
            .bind(keep)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(())
    }

    /// Adds `n` to the key's encryption count if it stays within `max` and
    /// the key is active; `false` when it would not (the key must retire).
    pub async fn reserve_encryptions(
        &self,
        key_id: &str,
        n: u64,
        max: u64,
    ) -> Result<bool, StoreError> {
        let done = on_db!(&self.db, |pool| {
            sqlx::query(
                "update deks set encryptions = encryptions + $1
                 where key_id = $2 and retired_at is null and encryptions + $1 <= $3",
            )
            .bind(n as i64)
            .bind(key_id)
            .bind(max as i64)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(done == 1)
    }

    /// Retires a data key: it still opens what it sealed, but seals nothing
    /// more; the subject gets a new active key.
    pub async fn retire_dek(&self, key_id: &str) -> Result<(), StoreError> {
        on_db!(&self.db, |pool| {
            sqlx::query("update deks set retired_at = $1 where key_id = $2 and retired_at is null")
                .bind(now_us())
                .bind(key_id)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })?;
        Ok(())
    }
}
