//! The keystore's SQL: master-key check values and wrapped data keys. It
//! stores and returns only wrapped bytes; unwrapping is the key manager's.

use super::{Db, StoreError, now_us, on_db};

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

impl Keystore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Every master key the keystore knows: `(kek_id, check_blob)`.
    pub async fn keks(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as("select kek_id, check_blob from keks order by created_at")
                .fetch_all(pool)
                .await
        })?)
    }

    pub async fn insert_kek(&self, kek_id: &str, check_blob: &[u8]) -> Result<(), StoreError> {
        on_db!(&self.db, |pool| {
            sqlx::query("insert into keks (kek_id, check_blob, created_at) values ($1, $2, $3) on conflict (kek_id) do nothing")
                .bind(kek_id)
                .bind(check_blob)
                .bind(now_us())
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })?;
        Ok(())
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
    pub async fn insert_dek_if_none(&self, dek: &WrappedDek) -> Result<bool, StoreError> {
        let done = on_db!(&self.db, |pool| {
            sqlx::query(
                "insert into deks (key_id, subject, kek_id, wrapped, created_at) values ($1, $2, $3, $4, $5)
                 on conflict (subject) where retired_at is null do nothing",
            )
            .bind(&dek.key_id)
            .bind(&dek.subject)
            .bind(&dek.kek_id)
            .bind(&dek.wrapped)
            .bind(now_us())
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(done == 1)
    }
}
