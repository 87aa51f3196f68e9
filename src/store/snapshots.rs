//! Snapshots: one per stream, the newest a client saved, and the data keys
//! each is sealed under (`snapshot_keys`, one row per layer).

use super::data_keys::{KeyRef, register_key_refs};
use super::tx::{Conn, Tx};
use super::{Db, EventStore, StoreError, count, now_us, on_db};
use crate::domain::{StreamId, Subject, Version};

/// One layer of a sealed snapshot's key: a subject of the stream and the
/// id of the data key of theirs that wraps it. Layer 0 is the innermost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLayer {
    pub subject: Subject,
    pub key_id: String,
}

/// A snapshot as stored, read in one statement with its layers and the
/// forget ledger's answer for each, so that no save in between can pair a
/// state with another snapshot's layers.
///
/// Three forms: in clear (`state`; no layer); sealed for the subjects of
/// its stream (`sealed` under a key of its own, `wrapped_key` that key
/// wrapped under every layer's data key); or, saved before snapshots had
/// layers, `sealed` directly under its one layer's data key (`wrapped_key`
/// absent, `key_id` the layer's).
#[derive(Debug, Clone)]
pub struct StoredSnapshot {
    pub stream_id: StreamId,
    pub version: Version,
    /// The subject the client named, if any.
    pub subject: Option<Subject>,
    pub state: Option<String>,
    pub sealed: Option<Vec<u8>>,
    pub wrapped_key: Option<Vec<u8>>,
    pub recorded_at: i64,
    /// In layer order (innermost first).
    pub layers: Vec<SnapshotLayer>,
    /// A subject of some layer is in the forget ledger.
    pub forgotten: bool,
}

/// One row of the load statement: the snapshot's columns (its blobs on the
/// first row only) and one layer.
#[derive(sqlx::FromRow)]
struct LoadRow {
    stream_id: StreamId,
    version: Version,
    subject: Option<Subject>,
    key_id: Option<String>,
    state: Option<String>,
    sealed: Option<Vec<u8>>,
    wrapped_key: Option<Vec<u8>>,
    recorded_at: i64,
    layer_subject: Option<Subject>,
    layer_key_id: Option<String>,
    layer_forgotten: bool,
}

/// A snapshot to save.
#[derive(Debug)]
pub struct NewSnapshot<'a> {
    pub stream_id: &'a StreamId,
    pub version: Version,
    /// The subject the client named, if any (kept and shown as given).
    pub subject: Option<&'a Subject>,
    /// The state in clear, for a stream without subjects.
    pub state: Option<String>,
    pub sealed: Option<Vec<u8>>,
    pub wrapped_key: Option<Vec<u8>>,
    /// The subjects and data keys `wrapped_key` is wrapped under.
    pub layers: &'a [SnapshotLayer],
}

impl NewSnapshot<'_> {
    /// Every data key id this snapshot refers to: the keys that must exist
    /// for it to open. The one place a snapshot's key ids are enumerated.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|l| l.key_id.as_str())
    }

    /// The same keys with their subjects, for the key registry.
    fn key_refs(&self) -> Vec<KeyRef<'_>> {
        self.layers
            .iter()
            .map(|l| KeyRef {
                key_id: &l.key_id,
                subject: &l.subject,
            })
            .collect()
    }
}

/// Why a snapshot was not saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRefusal {
    /// The stream has not reached the version (0: no such stream).
    NoSuchVersion { current: Version },
    /// A subject the snapshot is sealed for is forgotten (it is named).
    Forgotten(Subject),
    /// A snapshot of a later version is stored; it is kept.
    Older { stored: Version },
}

impl EventStore {
    /// The subjects whose events `stream` holds up to `version`, sorted:
    /// those a snapshot of it at `version` must be sealed for. Events up
    /// to a version the stream has are never added to or changed, so the
    /// answer is final once the stream has `version`. The stored snapshot,
    /// when it is of an earlier version, saves the walk over the events it
    /// covers: its layers are the subjects up to its version (and perhaps
    /// one its client named, kept). `Err`: the stream lacks the version,
    /// or a later snapshot is stored.
    pub async fn snapshot_subjects(
        &self,
        stream: &StreamId,
        version: Version,
    ) -> Result<Result<Vec<Subject>, SnapshotRefusal>, StoreError> {
        let current: Option<Version> = on_db!(&self.db, |pool| {
            sqlx::query_scalar("select version from streams where stream_id = $1")
                .bind(stream)
                .fetch_optional(pool)
                .await
        })?;
        let current = current.unwrap_or(Version::ZERO);
        if current < version {
            return Ok(Err(SnapshotRefusal::NoSuchVersion { current }));
        }
        let (mut subjects, from) = match self.load_snapshot(stream).await? {
            Some(s) if s.version > version => {
                return Ok(Err(SnapshotRefusal::Older { stored: s.version }));
            }
            Some(s) => (
                s.layers.into_iter().map(|l| l.subject).collect::<Vec<_>>(),
                s.version,
            ),
            None => (Vec::new(), Version::ZERO),
        };
        let more: Vec<Subject> = on_db!(&self.db, |pool| {
            sqlx::query_scalar(
                "select distinct subject from events
                 where stream_id = $1 and version > $2 and version <= $3 and subject is not null",
            )
            .bind(stream)
            .bind(from)
            .bind(version)
            .fetch_all(pool)
            .await
        })?;
        subjects.extend(more);
        subjects.sort();
        subjects.dedup();
        Ok(Ok(subjects))
    }

    /// Saves `s` as the stream's snapshot, with its layers, in one
    /// transaction, unless the stream lacks its version, a later snapshot
    /// is stored, or the subject of a layer is forgotten (checked after
    /// the layers are written, inside the transaction: a forget recorded
    /// before it commits refuses it; one recorded after finds the layer
    /// and destroys its key).
    pub async fn save_snapshot(
        &self,
        s: NewSnapshot<'_>,
    ) -> Result<Result<(), SnapshotRefusal>, StoreError> {
        let saved = match &self.db {
            Db::Sqlite(pool) => save_sqlite(pool, &s).await?,
            Db::Postgres(pool) => save_postgres(pool, &s).await?,
        };
        match saved {
            Saved::Yes => Ok(Ok(())),
            Saved::Forgotten(subject) => Ok(Err(SnapshotRefusal::Forgotten(subject))),
            // Nothing written: the stream lacks the version, or a later
            // snapshot is stored (it may have been saved meanwhile).
            Saved::Not => match self.snapshot_subjects(s.stream_id, s.version).await? {
                Err(refusal) => Ok(Err(refusal)),
                Ok(_) => Err(StoreError::Corrupt(format!(
                    "the snapshot of {} was neither saved nor refused",
                    s.stream_id
                ))),
            },
        }
    }

    /// The stream's snapshot, if one was saved, with its layers and whether
    /// a subject of theirs is forgotten.
    pub async fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        // One statement (one consistent view); the blobs come with the
        // first row only. A snapshot without layers has one row of nulls.
        let rows: Vec<LoadRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select s.stream_id, s.version, s.subject, s.key_id, s.state,
                   case when k.layer is null or k.layer = 0 then s.sealed end as sealed,
                   case when k.layer is null or k.layer = 0 then s.wrapped_key end as wrapped_key,
                   s.recorded_at, k.subject as layer_subject, k.key_id as layer_key_id,
                   exists (select 1 from forgotten_subjects f where f.subject = k.subject) as layer_forgotten
                 from snapshots s left join snapshot_keys k on k.stream_id = s.stream_id
                 where s.stream_id = $1
                 order by k.layer",
            )
            .bind(stream)
            .fetch_all(pool)
            .await
        })?;
        let mut rows = rows.into_iter();
        let Some(first) = rows.next() else {
            return Ok(None);
        };
        let mut snapshot = StoredSnapshot {
            stream_id: first.stream_id,
            version: first.version,
            subject: first.subject,
            state: first.state,
            sealed: first.sealed,
            wrapped_key: first.wrapped_key,
            recorded_at: first.recorded_at,
            layers: Vec::new(),
            forgotten: false,
        };
        let legacy_key = first.key_id;
        for (subject, key_id, forgotten) in std::iter::once((
            first.layer_subject,
            first.layer_key_id,
            first.layer_forgotten,
        ))
        .chain(rows.map(|r| (r.layer_subject, r.layer_key_id, r.layer_forgotten)))
        {
            if let (Some(subject), Some(key_id)) = (subject, key_id) {
                snapshot.forgotten |= forgotten;
                snapshot.layers.push(SnapshotLayer { subject, key_id });
            }
        }
        // A snapshot saved before layers existed has its one key in the
        // row too; the migration listed it as its layer.
        if let Some(k) = legacy_key
            && snapshot.layers.iter().all(|l| l.key_id != k)
        {
            return Err(StoreError::Corrupt(format!(
                "the snapshot of {} names a key it has no layer for",
                snapshot.stream_id
            )));
        }
        Ok(Some(snapshot))
    }

    /// Up to `limit` streams after `after` (in id order) whose snapshot is
    /// sealed for `subject`: the snapshots that hold their data.
    pub async fn snapshots_of(
        &self,
        subject: &Subject,
        after: &str,
        limit: u32,
    ) -> Result<Vec<StreamId>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_scalar(
                "select stream_id from snapshot_keys where subject = $1 and stream_id > $2
                 order by stream_id limit $3",
            )
            .bind(subject)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?)
    }

    /// How many snapshots are sealed for `subject`.
    pub async fn subject_snapshot_count(&self, subject: &Subject) -> Result<u64, StoreError> {
        let n: i64 = on_db!(&self.db, |pool| {
            sqlx::query_scalar("select count(*) from snapshot_keys where subject = $1")
                .bind(subject)
                .fetch_one(pool)
                .await
        })?;
        count(n)
    }

    /// Up to `limit` distinct data key ids after `after` (in id order) that
    /// stored snapshots are sealed under: every key a snapshot needs.
    pub async fn snapshot_key_ids(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_scalar(
                "select distinct key_id from snapshot_keys where key_id > $1
                 order by key_id limit $2",
            )
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?)
    }
}

/// What the save's transaction did.
enum Saved {
    Yes,
    /// Rolled back: this subject of a layer is forgotten.
    Forgotten(Subject),
    /// Nothing written (no such version, or a later snapshot).
    Not,
}

/// Writes the row unless the stream lacks the version or a later snapshot
/// is stored (an equal one is replaced). Same text on both backends.
const UPSERT: &str = "insert into snapshots (stream_id, version, subject, key_id, state, sealed, wrapped_key, recorded_at)
     select $1, $2, $3, null, $4, $5, $6, $7
     where exists (select 1 from streams where stream_id = $1 and version >= $2)
     on conflict (stream_id) do update set
       version = excluded.version, subject = excluded.subject, key_id = null,
       state = excluded.state, sealed = excluded.sealed,
       wrapped_key = excluded.wrapped_key, recorded_at = excluded.recorded_at
     where excluded.version >= snapshots.version";

const DELETE_LAYERS: &str = "delete from snapshot_keys where stream_id = $1";

async fn save_sqlite(pool: &sqlx::SqlitePool, s: &NewSnapshot<'_>) -> Result<Saved, StoreError> {
    // The only writer of the file from the first statement on, like the
    // group-commit writer: no upgrade from reader to writer to fail.
    let mut tx = Tx::begin(pool, "begin immediate").await?;
    let written = sqlx::query(UPSERT)
        .bind(s.stream_id)
        .bind(s.version)
        .bind(s.subject)
        .bind(s.state.as_deref())
        .bind(s.sealed.as_deref())
        .bind(s.wrapped_key.as_deref())
        .bind(now_us())
        .execute(tx.conn())
        .await?
        .rows_affected();
    if written == 0 {
        tx.rollback().await;
        return Ok(Saved::Not);
    }
    sqlx::query(DELETE_LAYERS)
        .bind(s.stream_id)
        .execute(tx.conn())
        .await?;
    // The layers travel as one JSON array of [subject, key id] pairs; the
    // array index is the layer.
    let pairs: Vec<(&str, &str)> = s
        .layers
        .iter()
        .map(|l| (l.subject.as_str(), l.key_id.as_str()))
        .collect();
    let layers = serde_json::to_string(&pairs).expect("strings serialise");
    sqlx::query(
        "insert into snapshot_keys (stream_id, layer, subject, key_id)
         select $1, key, json_extract(value, '$[0]'), json_extract(value, '$[1]')
         from json_each($2)",
    )
    .bind(s.stream_id)
    .bind(&layers)
    .execute(tx.conn())
    .await?;
    let forgotten: Option<Subject> = sqlx::query_scalar(
        "select subject from forgotten_subjects
         where subject in (select json_extract(value, '$[0]') from json_each($1))
         order by subject limit 1",
    )
    .bind(&layers)
    .fetch_optional(tx.conn())
    .await?;
    if let Some(subject) = forgotten {
        tx.rollback().await;
        return Ok(Saved::Forgotten(subject));
    }
    // Its keys go into the key registry in the snapshot's transaction.
    register_key_refs(Conn::from(tx.conn()), &s.key_refs()).await?;
    tx.commit().await?;
    Ok(Saved::Yes)
}

async fn save_postgres(pool: &sqlx::PgPool, s: &NewSnapshot<'_>) -> Result<Saved, StoreError> {
    let mut tx = Tx::begin(pool, "begin").await?;
    let written = sqlx::query(UPSERT)
        .bind(s.stream_id)
        .bind(s.version)
        .bind(s.subject)
        .bind(s.state.as_deref())
        .bind(s.sealed.as_deref())
        .bind(s.wrapped_key.as_deref())
        .bind(now_us())
        .execute(tx.conn())
        .await?
        .rows_affected();
    if written == 0 {
        tx.rollback().await;
        return Ok(Saved::Not);
    }
    sqlx::query(DELETE_LAYERS)
        .bind(s.stream_id)
        .execute(tx.conn())
        .await?;
    let subjects: Vec<&Subject> = s.layers.iter().map(|l| &l.subject).collect();
    let key_ids: Vec<&str> = s.key_ids().collect();
    sqlx::query(
        "insert into snapshot_keys (stream_id, layer, subject, key_id)
         select $1, t.layer - 1, t.subject, t.key_id
         from unnest($2::text[], $3::text[]) with ordinality as t(subject, key_id, layer)",
    )
    .bind(s.stream_id)
    .bind(&subjects)
    .bind(&key_ids)
    .execute(tx.conn())
    .await?;
    let forgotten: Option<Subject> = sqlx::query_scalar(
        "select subject from forgotten_subjects where subject = any($1)
         order by subject limit 1",
    )
    .bind(&subjects)
    .fetch_optional(tx.conn())
    .await?;
    if let Some(subject) = forgotten {
        tx.rollback().await;
        return Ok(Saved::Forgotten(subject));
    }
    // Its keys go into the key registry in the snapshot's transaction.
    register_key_refs(Conn::from(tx.conn()), &s.key_refs()).await?;
    tx.commit().await?;
    Ok(Saved::Yes)
}
