use super::read::{Decision, KeyFate};

use serde_json::Value;
use zeroize::Zeroizing;

use super::{Events, ServiceError};
use crate::crypto::{self, Dek, SnapshotAad, SnapshotLayers};
use crate::domain::{PersonalData, StreamId, Subject, Version};
use crate::keys::KeyError;
use crate::metrics::Sealed;
use crate::policy::{Grants, ReadKind, View};
use crate::store::StoreError;
use crate::store::snapshots::{NewSnapshot, SnapshotLayer, SnapshotRefusal, StoredSnapshot};
use crate::store::writer::AppendRejection;

/// A snapshot as a reader sees it.
#[derive(Debug)]
pub struct SnapshotRead {
    pub version: u64,
    pub subject: Option<String>,
    /// `None` unless decrypted or stored in clear.
    pub state: Option<Value>,
    pub personal_data: PersonalData,
    pub recorded_at_us: i64,
}

/// The answer to a snapshot the store did not save.
fn snapshot_refusal(r: SnapshotRefusal) -> ServiceError {
    match r {
        SnapshotRefusal::NoSuchVersion { current } => ServiceError::NoSuchVersion {
            current: current.get(),
        },
        SnapshotRefusal::Older { stored } => ServiceError::OlderSnapshot {
            stored: stored.get(),
        },
        SnapshotRefusal::Forgotten(s) => ServiceError::Rejected(AppendRejection::Forgotten(s)),
    }
}

impl Events {
    /// Saves the stream's snapshot at `version`. If the stream's events up
    /// to `version` name data subjects, the state is sealed for all of
    /// them ([`crypto::seal_snapshot_for`]): a key of its own, wrapped under
    /// each one's data key in turn, so that the forget of any one erases
    /// it. `subject`, if given, is kept as the client's label; it must be
    /// one of those subjects (when the events name none, the state is
    /// sealed for it alone). With no subject at all it is stored in clear.
    pub async fn save_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        subject: Option<&Subject>,
        state: &Value,
    ) -> Result<(), ServiceError> {
        let text = Zeroizing::new(serde_json::to_string(state).expect("JSON values serialise"));
        let version = Version::new(version);
        let forgotten = |s: Subject| ServiceError::Rejected(AppendRejection::Forgotten(s));
        let mut subjects = match self.store.snapshot_subjects(stream, version).await? {
            Ok(subjects) => subjects,
            Err(refusal) => return Err(snapshot_refusal(refusal)),
        };
        if let Some(s) = subject {
            if subjects.is_empty() {
                subjects.push(s.clone());
            } else if !subjects.contains(s) {
                return Err(ServiceError::SnapshotSubject);
            }
        }
        let mut layers = Vec::with_capacity(subjects.len());
        let (clear, sealed) = if subjects.is_empty() {
            (Some(text.to_string()), None)
        } else {
            // Refused before a key is made for a forgotten subject; the
            // save's transaction checks again, for a forget that races.
            if let Some(s) = self.store.first_forgotten(&subjects).await? {
                return Err(forgotten(s));
            }
            let mut keys = Vec::with_capacity(subjects.len());
            for s in subjects {
                let key = self.keys.key_for_subject(s.as_str(), 1).await?;
                layers.push(SnapshotLayer {
                    subject: s,
                    key_id: key.key_id.to_string(),
                });
                keys.push(key);
            }
            let key_ids: Vec<&str> = layers.iter().map(|l| l.key_id.as_str()).collect();
            let deks: Vec<&Dek> = keys.iter().map(|k| &*k.dek).collect();
            let at = SnapshotLayers {
                stream_id: stream.as_str(),
                version: version.get(),
                key_ids: &key_ids,
            };
            let sealed =
                crypto::seal_snapshot_for(&deks, &at, text.as_bytes()).map_err(KeyError::from)?;
            self.metrics.sealed(Sealed::Snapshot, 1);
            (None, Some(sealed))
        };
        let refusal = self
            .store
            .save_snapshot(NewSnapshot {
                stream_id: stream,
                version,
                subject,
                state: clear,
                wrapped_key: sealed.as_ref().map(|s| s.wrapped_key.clone()),
                sealed: sealed.map(|s| s.sealed),
                layers: &layers,
            })
            .await?;
        match refusal {
            Ok(()) => Ok(()),
            Err(SnapshotRefusal::Forgotten(s)) => {
                // A key this request made for the subject sealed nothing
                // that was stored: delete it at once (best effort: what is
                // left is removed at the next start).
                self.discard_keys(&s).await;
                Err(forgotten(s))
            }
            Err(other) => Err(snapshot_refusal(other)),
        }
    }

    /// The stream's snapshot as the caller may see it: the state decrypted,
    /// or left out (`redacted`; `erased` once any subject it is sealed for
    /// is forgotten). The caller must have been allowed to read `stream`.
    pub async fn load_snapshot(
        &self,
        stream: &StreamId,
        grants: &Grants,
    ) -> Result<Option<SnapshotRead>, ServiceError> {
        let Some(row) = self.store.load_snapshot(stream).await? else {
            return Ok(None);
        };
        let reveal = grants.read_view(stream.as_str()) == Some(View::Revealed);
        Ok(Some(self.open_snapshot(row, reveal).await?))
    }

    /// The snapshots sealed for `subject` whose stream the caller may
    /// export, after stream `after`, up to `limit` of them, as an export
    /// shows them (decrypted, or erased once any of their subjects is
    /// forgotten). Returns them with their streams, and the stream to pass
    /// as `after` next (`None`: there are no more).
    pub async fn export_snapshots(
        &self,
        subject: &Subject,
        after: &str,
        limit: u32,
        grants: &Grants,
    ) -> Result<(Vec<(String, SnapshotRead)>, Option<String>), ServiceError> {
        let streams = self.store.snapshots_of(subject, after, limit).await?;
        let next = (streams.len() == limit as usize)
            .then(|| streams.last().map(|s| s.as_str().to_owned()))
            .flatten();
        let mut out = Vec::with_capacity(streams.len());
        for stream in streams {
            let Some(view) = grants.view(ReadKind::Export, stream.as_str()) else {
                continue;
            };
            let Some(row) = self.store.load_snapshot(&stream).await? else {
                continue;
            };
            // Replaced since it was listed, by one not sealed for them.
            if !row.layers.iter().any(|l| l.subject == *subject) {
                continue;
            }
            let read = self.open_snapshot(row, view == View::Revealed).await?;
            out.push((stream.into_string(), read));
        }
        Ok((out, next))
    }

    /// Decides and opens one stored snapshot for a reader, like an event.
    async fn open_snapshot(
        &self,
        row: StoredSnapshot,
        reveal: bool,
    ) -> Result<SnapshotRead, ServiceError> {
        let corrupt = || corrupt_snapshot(&row.stream_id);
        let (state, personal_data) = match (&row.sealed, &row.state) {
            (Some(_), _) if row.layers.is_empty() => return Err(corrupt()),
            (Some(blob), _) => {
                // Every layer's key: one the keystore lacks is erased (its
                // subject forgotten meanwhile), lost (accepted so), or an
                // integrity failure — never passed off as a forget.
                let mut fates = Vec::with_capacity(row.layers.len());
                if Decision::needs_keys(row.forgotten, reveal) {
                    for layer in &row.layers {
                        let fate = self.key_fate(&layer.key_id, &layer.subject, 0).await?;
                        let erased = matches!(fate, KeyFate::Erased);
                        fates.push(fate);
                        if erased {
                            break;
                        }
                    }
                }
                match Decision::of(row.forgotten, reveal, &fates) {
                    Decision::Withheld(why) => (None, why),
                    Decision::Open(deks) => {
                        let state = self.open_sealed_snapshot(&row, blob, &deks)?;
                        (Some(state), PersonalData::Decrypted)
                    }
                }
            }
            (None, Some(text)) => (
                Some(serde_json::from_str(text).map_err(|_| corrupt())?),
                PersonalData::None,
            ),
            (None, None) => return Err(corrupt()),
        };
        Ok(SnapshotRead {
            version: row.version.get(),
            subject: row.subject.map(Subject::into_string),
            state,
            personal_data,
            recorded_at_us: row.recorded_at,
        })
    }

    /// Opens a snapshot's sealed state with the keys of all its layers.
    fn open_sealed_snapshot(
        &self,
        row: &StoredSnapshot,
        blob: &[u8],
        deks: &[&Dek],
    ) -> Result<Value, ServiceError> {
        let broken = || ServiceError::SnapshotIntegrity(row.stream_id.as_str().to_owned());
        let version = row.version.get();
        let plain = match &row.wrapped_key {
            Some(wrapped) => {
                let key_ids: Vec<&str> = row.layers.iter().map(|l| l.key_id.as_str()).collect();
                let at = SnapshotLayers {
                    stream_id: row.stream_id.as_str(),
                    version,
                    key_ids: &key_ids,
                };
                crypto::open_snapshot_for(deks, &at, wrapped, blob)
            }
            // Saved before snapshots had layers: under its one subject's key
            // directly.
            None if deks.len() == 1 => deks[0].open_snapshot(
                blob,
                &SnapshotAad {
                    stream_id: row.stream_id.as_str(),
                    version,
                    key_id: &row.layers[0].key_id,
                },
            ),
            None => return Err(corrupt_snapshot(&row.stream_id)),
        }
        .map_err(|_| {
            self.metrics.open_failed(Sealed::Snapshot);
            broken()
        })?;
        self.metrics.opened(Sealed::Snapshot, 1);
        serde_json::from_slice(&plain).map_err(|_| broken())
    }
}

/// A stored snapshot row that does not hold together.
fn corrupt_snapshot(stream_id: &StreamId) -> ServiceError {
    ServiceError::Store(StoreError::Corrupt(format!("the snapshot of {stream_id}")))
}
