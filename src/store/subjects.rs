//! The forget ledger (`forgotten_subjects`) and per-subject counts.

use super::{EventStore, StoreError, now_us, on_db};

/// A subject's entry in the forget ledger.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ForgottenRow {
    pub subject: String,
    pub forgotten_at: i64,
    pub keys_destroyed: i64,
    pub completed_at: Option<i64>,
}

impl EventStore {
    /// Records the intent to forget `subject` (step 1) unless it is recorded
    /// already; returns the ledger entry either way.
    pub async fn record_forget(
        &self,
        subject: &str,
        reason: Option<&str>,
    ) -> Result<ForgottenRow, StoreError> {
        const INSERT: &str =
            "insert into forgotten_subjects (subject, forgotten_at, reason) values ($1, $2, $3)
             on conflict (subject) do nothing";
        match &self.db {
            super::Db::Sqlite(pool) => {
                sqlx::query(INSERT)
                    .bind(subject)
                    .bind(now_us())
                    .bind(reason)
                    .execute(pool)
                    .await?;
            }
            super::Db::Postgres(pool) => {
                // With its notice, in one transaction: other processes drop
                // the rows they hold for subscribers if and only if the
                // entry committed.
                let mut tx = pool.begin().await?;
                sqlx::query(INSERT)
                    .bind(subject)
                    .bind(now_us())
                    .bind(reason)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("select pg_notify($1, $2)")
                    .bind(super::feed::COMMIT_CHANNEL)
                    .bind(super::feed::FORGET_NOTICE)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
        }
        self.forgotten(subject)
            .await?
            .ok_or_else(|| StoreError::Corrupt("a recorded forget vanished".into()))
    }

    pub async fn forgotten(&self, subject: &str) -> Result<Option<ForgottenRow>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select subject, forgotten_at, keys_destroyed, completed_at from forgotten_subjects where subject = $1",
            )
            .bind(subject)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// Which of `subjects` the forget ledger lists (a key manager
    /// reconciling its caches after it may have missed evictions).
    pub async fn forgotten_among(&self, subjects: &[String]) -> Result<Vec<String>, StoreError> {
        if subjects.is_empty() {
            return Ok(vec![]);
        }
        Ok(match &self.db {
            super::Db::Sqlite(pool) => {
                sqlx::query_scalar(
                    "select subject from forgotten_subjects where subject in (select value from json_each($1))",
                )
                .bind(serde_json::to_string(subjects).expect("strings serialise"))
                .fetch_all(pool)
                .await?
            }
            super::Db::Postgres(pool) => {
                sqlx::query_scalar("select subject from forgotten_subjects where subject = any($1)")
                    .bind(subjects)
                    .fetch_all(pool)
                    .await?
            }
        })
    }

    /// The first of `subjects` (in name order) that is in the forget
    /// ledger, if any.
    pub async fn first_forgotten(&self, subjects: &[String]) -> Result<Option<String>, StoreError> {
        Ok(self.forgotten_among(subjects).await?.into_iter().min())
    }

    /// Adds keys destroyed by a forget to its ledger entry.
    pub async fn add_keys_destroyed(&self, subject: &str, n: u64) -> Result<(), StoreError> {
        on_db!(&self.db, |pool| {
            sqlx::query(
                "update forgotten_subjects set keys_destroyed = keys_destroyed + $2 where subject = $1",
            )
            .bind(subject)
            .bind(n as i64)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(())
    }

    /// Marks a forget as carried out to the end.
    pub async fn complete_forget(&self, subject: &str) -> Result<(), StoreError> {
        on_db!(&self.db, |pool| {
            sqlx::query(
                "update forgotten_subjects set completed_at = $2 where subject = $1 and completed_at is null",
            )
            .bind(subject)
            .bind(now_us())
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(())
    }

    /// Forgotten subjects after `after` in name order, `limit` at a time
    /// (for the re-shred at start).
    pub async fn forgotten_page(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<Vec<ForgottenRow>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select subject, forgotten_at, keys_destroyed, completed_at from forgotten_subjects
                 where subject > $1 order by subject limit $2",
            )
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?)
    }

    /// How many events name `subject`, up to position `until` (`u64::MAX`:
    /// all of them).
    pub async fn subject_event_count(&self, subject: &str, until: u64) -> Result<u64, StoreError> {
        let n: i64 = on_db!(&self.db, |pool| {
            sqlx::query_scalar("select count(*) from events where subject = $1 and position <= $2")
                .bind(subject)
                .bind(i64::try_from(until).unwrap_or(i64::MAX))
                .fetch_one(pool)
                .await
        })?;
        Ok(n as u64)
    }
}
