//! Snapshots: one per stream, the newest a client saved.

use super::data_keys::{Conn, KeyRef, register_key_refs};
use super::{EventStore, StoreError, now_us, on_db};

/// A snapshot as stored: the state in clear (`state`) when it has no
/// subject, sealed under the subject's key (`sealed`, `key_id`) otherwise.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredSnapshot {
    pub stream_id: String,
    pub version: i64,
    pub subject: Option<String>,
    pub key_id: Option<String>,
    pub state: Option<String>,
    pub sealed: Option<Vec<u8>>,
    pub recorded_at: i64,
    /// The subject is in the forget ledger (read with the row).
    pub forgotten: bool,
}

/// A snapshot to save.
#[derive(Debug)]
pub struct NewSnapshot<'a> {
    pub stream_id: &'a str,
    pub version: u64,
    pub subject: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub state: Option<String>,
    pub sealed: Option<Vec<u8>>,
}

/// Why a snapshot was not saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotRefusal {
    /// The stream has not reached the version (0: no such stream).
    NoSuchVersion { current: u64 },
    /// The snapshot's subject is forgotten.
    Forgotten,
    /// The stream's events are about data subjects, and the snapshot does
    /// not name one of them (its state would escape their forgets).
    NotOfItsSubjects,
    /// A snapshot of a later version is stored; it is kept.
    Older { stored: u64 },
}

impl EventStore {
    /// Saves `s` as the stream's snapshot unless the stream lacks its
    /// version, its subject is forgotten, the stream's events are about
    /// subjects and it names none of them, or a later snapshot is stored:
    /// the checks and the write are one statement, so a forget recorded
    /// before it commits refuses it.
    pub async fn save_snapshot(
        &self,
        s: NewSnapshot<'_>,
    ) -> Result<Result<(), SnapshotRefusal>, StoreError> {
        let version = i64::try_from(s.version).unwrap_or(i64::MAX);
        const SAVE: &str = "insert into snapshots (stream_id, version, subject, key_id, state, sealed, recorded_at)
                 select $1, $2, $3, $4, $5, $6, $7
                 where exists (select 1 from streams where stream_id = $1 and version >= $2)
                   and not exists (select 1 from forgotten_subjects where subject = $3)
                   and (not exists (select 1 from events where stream_id = $1 and subject is not null)
                        or exists (select 1 from events where stream_id = $1 and subject = $3))
                 on conflict (stream_id) do update set
                   version = excluded.version, subject = excluded.subject, key_id = excluded.key_id,
                   state = excluded.state, sealed = excluded.sealed, recorded_at = excluded.recorded_at
                 where excluded.version >= snapshots.version";
        // The snapshot's key goes into the key registry in the snapshot's
        // transaction (and stays out of it if nothing is written).
        let refs: Vec<KeyRef<'_>> = match (s.key_id, s.subject) {
            (Some(key_id), Some(subject)) => vec![KeyRef { key_id, subject }],
            _ => vec![],
        };
        let written = on_db!(&self.db, |pool| {
            async {
                let mut tx = pool.begin().await?;
                let written = sqlx::query(SAVE)
                    .bind(s.stream_id)
                    .bind(version)
                    .bind(s.subject)
                    .bind(s.key_id)
                    .bind(s.state.as_deref())
                    .bind(s.sealed.as_deref())
                    .bind(now_us())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if written > 0 {
                    register_key_refs(Conn::from(&mut *tx), &refs).await?;
                    tx.commit().await?;
                }
                Ok::<_, StoreError>(written)
            }
            .await
        })?;
        if written > 0 {
            return Ok(Ok(()));
        }
        // Nothing written: find out why (for the caller's answer).
        let current: Option<i64> = on_db!(&self.db, |pool| {
            sqlx::query_scalar("select version from streams where stream_id = $1")
                .bind(s.stream_id)
                .fetch_optional(pool)
                .await
        })?;
        let current = current.unwrap_or(0) as u64;
        if current < s.version {
            return Ok(Err(SnapshotRefusal::NoSuchVersion { current }));
        }
        if let Some(subject) = s.subject
            && self.forgotten(subject).await?.is_some()
        {
            return Ok(Err(SnapshotRefusal::Forgotten));
        }
        let (personal, of_subject): (bool, bool) = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select exists (select 1 from events where stream_id = $1 and subject is not null),
                        exists (select 1 from events where stream_id = $1 and subject = $2)",
            )
            .bind(s.stream_id)
            .bind(s.subject)
            .fetch_one(pool)
            .await
        })?;
        if personal && !of_subject {
            return Ok(Err(SnapshotRefusal::NotOfItsSubjects));
        }
        let stored = self
            .load_snapshot(s.stream_id)
            .await?
            .map_or(0, |r| r.version as u64);
        Ok(Err(SnapshotRefusal::Older { stored }))
    }

    /// The stream's snapshot, if one was saved.
    pub async fn load_snapshot(&self, stream: &str) -> Result<Option<StoredSnapshot>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select stream_id, version, subject, key_id, state, sealed, recorded_at,
                   exists (select 1 from forgotten_subjects f where f.subject = snapshots.subject) as forgotten
                 from snapshots where stream_id = $1",
            )
            .bind(stream)
            .fetch_optional(pool)
            .await
        })?)
    }
}
