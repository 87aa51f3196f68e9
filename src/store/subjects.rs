//! The forget ledger (`forgotten_subjects`), what each forget has done
//! (`destroyed_keys`, `forgets_completed`) and per-subject counts.
//!
//! The ledger entry is written once and never changed: the progress of a
//! forget lives in tables of its own, into which rows are only inserted, so
//! that the serving database role needs no UPDATE on the ledger.

use super::{Db, EventStore, StoreError, count, now_us, on_db};
use crate::domain::Subject;

/// A subject's entry in the forget ledger, with its progress.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ForgottenRow {
    pub subject: Subject,
    pub forgotten_at: i64,
    /// Keys recorded as destroyed by this subject's forget, over all its
    /// attempts (each recorded before the keystore deletes it).
    pub keys_destroyed: i64,
    /// When the forget ran to its end; `None` while it is under way.
    pub completed_at: Option<i64>,
}

impl ForgottenRow {
    /// [`ForgottenRow::keys_destroyed`], a count (never negative).
    pub fn keys_destroyed(&self) -> u64 {
        u64::try_from(self.keys_destroyed).unwrap_or(0)
    }
}

/// The ledger's columns with the forget's progress. Forgets made before
/// progress had tables of its own kept their count in the ledger's
/// `keys_destroyed` (no longer written): both are added.
macro_rules! select_forgotten {
    ($rest:literal) => {
        concat!(
            "select f.subject, f.forgotten_at,
                f.keys_destroyed + (select count(*) from destroyed_keys d where d.subject = f.subject) as keys_destroyed,
                (select c.completed_at from forgets_completed c where c.subject = f.subject) as completed_at
             from forgotten_subjects f ",
            $rest
        )
    };
}

impl EventStore {
    /// Records the intent to forget `subject` (step 1) unless it is recorded
    /// already; returns the ledger entry either way, with how many events
    /// name the subject, read in the same transaction: once this returns,
    /// the caller knows all it needs to tell the truth about the forget
    /// without asking the database again. An error means the entry was not
    /// written, except [`RecordedOrNot`] (the commit's outcome is unknown).
    pub async fn record_forget(
        &self,
        subject: &str,
        reason: Option<&str>,
    ) -> Result<(ForgottenRow, u64), StoreError> {
        const INSERT: &str =
            "insert into forgotten_subjects (subject, forgotten_at, reason) values ($1, $2, $3)
             on conflict (subject) do nothing";
        const COUNT: &str = "select count(*) from events where subject = $1";
        macro_rules! record {
            ($pool:expr, $begin:literal, $notify:expr) => {{
                let mut tx = super::tx::Tx::begin($pool, $begin).await?;
                sqlx::query(INSERT)
                    .bind(subject)
                    .bind(now_us())
                    .bind(reason)
                    .execute(tx.conn())
                    .await?;
                if $notify {
                    // With its notice, in one transaction: other processes
                    // drop the rows they hold for subscribers if and only if
                    // the entry committed.
                    sqlx::query("select pg_notify($1, $2)")
                        .bind(super::feed::COMMIT_CHANNEL)
                        .bind(super::feed::FORGET_NOTICE)
                        .execute(tx.conn())
                        .await?;
                }
                let row: Option<ForgottenRow> =
                    sqlx::query_as(select_forgotten!("where f.subject = $1"))
                        .bind(subject)
                        .fetch_optional(tx.conn())
                        .await?;
                let events: i64 = sqlx::query_scalar(COUNT)
                    .bind(subject)
                    .fetch_one(tx.conn())
                    .await?;
                let row =
                    row.ok_or_else(|| StoreError::Corrupt("a recorded forget vanished".into()))?;
                if let Err(e) = tx.commit().await {
                    let e = StoreError::from(e);
                    // A SQLite commit that fails has not committed; a
                    // PostgreSQL connection lost at commit leaves it unknown.
                    return Err(if $notify && e.fault() == Some(super::Fault::Unreachable) {
                        StoreError::RecordedOrNot(Box::new(e))
                    } else {
                        e
                    });
                }
                (row, count(events)?)
            }};
        }
        Ok(match &self.db {
            Db::Sqlite(pool) => record!(pool, "begin immediate", false),
            Db::Postgres(pool) => record!(pool, "begin", true),
        })
    }

    /// Forgotten subjects after `after` in name order whose forget has not
    /// run to its end (no completion mark), `limit` at a time.
    pub async fn unfinished_forgets(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<Vec<Subject>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_scalar(
                "select f.subject from forgotten_subjects f
                 where f.subject > $1
                   and not exists (select 1 from forgets_completed c where c.subject = f.subject)
                 order by f.subject limit $2",
            )
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?)
    }

    pub async fn forgotten(&self, subject: &Subject) -> Result<Option<ForgottenRow>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(select_forgotten!("where f.subject = $1"))
                .bind(subject)
                .fetch_optional(pool)
                .await
        })?)
    }

    /// Which of `subjects` the forget ledger lists (a key manager
    /// reconciling its caches after it may have missed evictions).
    pub async fn forgotten_among(&self, subjects: &[Subject]) -> Result<Vec<Subject>, StoreError> {
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
    pub async fn first_forgotten(
        &self,
        subjects: &[Subject],
    ) -> Result<Option<Subject>, StoreError> {
        Ok(self.forgotten_among(subjects).await?.into_iter().min())
    }

    /// Records, before the keystore deletes them, that the forget of
    /// `subject` destroys the keys `key_ids` (those recorded before are left
    /// as they are): the count survives a failure of any later step.
    pub async fn record_destroyed_keys(
        &self,
        subject: &Subject,
        key_ids: &[String],
    ) -> Result<(), StoreError> {
        if key_ids.is_empty() {
            return Ok(());
        }
        match &self.db {
            Db::Sqlite(pool) => {
                sqlx::query(
                    "insert into destroyed_keys (key_id, subject, destroyed_at)
                     select value, $2, $3 from json_each($1) where true
                     on conflict (key_id) do nothing",
                )
                .bind(serde_json::to_string(key_ids).expect("strings serialise"))
                .bind(subject)
                .bind(now_us())
                .execute(pool)
                .await?;
            }
            Db::Postgres(pool) => {
                sqlx::query(
                    "insert into destroyed_keys (key_id, subject, destroyed_at)
                     select k, $2, $3 from unnest($1::text[]) as t(k)
                     on conflict (key_id) do nothing",
                )
                .bind(key_ids)
                .bind(subject)
                .bind(now_us())
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Marks a forget as carried out to the end (once: a second mark keeps
    /// the first time).
    pub async fn complete_forget(&self, subject: &Subject) -> Result<(), StoreError> {
        on_db!(&self.db, |pool| {
            sqlx::query(
                "insert into forgets_completed (subject, completed_at) values ($1, $2)
                 on conflict (subject) do nothing",
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
            sqlx::query_as(select_forgotten!(
                "where f.subject > $1 order by f.subject limit $2"
            ))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?)
    }

    /// How many events name `subject`, up to position `until` (`u64::MAX`:
    /// all of them).
    pub async fn subject_event_count(
        &self,
        subject: &Subject,
        until: u64,
    ) -> Result<u64, StoreError> {
        let n: i64 = on_db!(&self.db, |pool| {
            sqlx::query_scalar("select count(*) from events where subject = $1 and position <= $2")
                .bind(subject)
                .bind(i64::try_from(until).unwrap_or(i64::MAX))
                .fetch_one(pool)
                .await
        })?;
        count(n)
    }
}
