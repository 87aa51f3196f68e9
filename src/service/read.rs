use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Events, INLINE_CRYPTO_EVENTS, MAX_LOG_SCAN, ServiceError};
use crate::crypto::{Dek, EventAad};
use crate::domain::{PersonalData, Position, ReadEvent, StreamId, Subject, Version};
use crate::metrics::Sealed;
use crate::policy::{Grants, ReadKind, View};
use crate::store::{Direction, StoreError, StoredEvent};

/// A page of one stream.
#[derive(Debug)]
pub struct StreamPage {
    pub current_version: u64,
    pub events: Vec<ReadEvent>,
    /// The `from` of the next page, if there may be one.
    pub next: Option<u64>,
}

/// Where in history a stream read looks: as it was at a time, at a
/// version, or both (the version must exist at that time); the present when
/// both are `None`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AsOf {
    pub as_of_us: Option<i64>,
    pub to_version: Option<u64>,
}

/// A page of the global log.
#[derive(Debug)]
pub struct LogPage {
    pub events: Vec<ReadEvent>,
    /// The position to pass as `after` for the next page.
    pub next: u64,
}

fn corrupt(what: &str, position: Position) -> ServiceError {
    ServiceError::Store(StoreError::Corrupt(format!(
        "{what} of the event at position {position}"
    )))
}

/// What became of a data key a reader needs.
pub(super) enum KeyFate {
    /// Here it is.
    Open(Arc<Dek>),
    /// Destroyed by a forget.
    Erased,
    /// Missing from the keystore; an operator accepted the loss.
    Lost,
}

/// What a reader gets of a sealed value (an event's personal fields, a
/// snapshot's state): decided here once, for events and snapshots alike.
pub(super) enum Decision<'k> {
    /// Not shown, and why.
    Withheld(PersonalData),
    /// Shown: open it with these keys (one per subject it is sealed for).
    Open(Vec<&'k Dek>),
}

impl<'k> Decision<'k> {
    /// Whether the keys must be looked up at all: only where personal data
    /// would be shown. A subject in the forget ledger is erased whatever a
    /// cache or a not yet finished key deletion still holds.
    pub(super) fn needs_keys(forgotten: bool, reveal: bool) -> bool {
        reveal && !forgotten
    }

    /// Forgotten: erased. Not to be revealed to this reader: redacted.
    /// Otherwise by the fates of its keys (looked up where
    /// [`Decision::needs_keys`]): erased if any was destroyed by a forget,
    /// lost if any was accepted lost, else open.
    pub(super) fn of(forgotten: bool, reveal: bool, fates: &'k [KeyFate]) -> Self {
        if forgotten {
            return Self::Withheld(PersonalData::Erased);
        }
        if !reveal {
            return Self::Withheld(PersonalData::Redacted);
        }
        let mut deks = Vec::with_capacity(fates.len());
        let mut lost = false;
        for fate in fates {
            match fate {
                KeyFate::Open(dek) => deks.push(&**dek),
                KeyFate::Erased => return Self::Withheld(PersonalData::Erased),
                KeyFate::Lost => lost = true,
            }
        }
        if lost {
            Self::Withheld(PersonalData::Lost)
        } else {
            Self::Open(deks)
        }
    }
}

/// Opens one stored event for a reader. `deks` holds the fate of the key of
/// every row that [`Decision::needs_keys`].
fn open_event(
    r: StoredEvent,
    reveal: bool,
    deks: &HashMap<String, KeyFate>,
) -> Result<ReadEvent, ServiceError> {
    let mut data: Map<String, Value> =
        serde_json::from_str(&r.data).map_err(|_| corrupt("data", r.position))?;
    let metadata: Map<String, Value> =
        serde_json::from_str(&r.metadata).map_err(|_| corrupt("metadata", r.position))?;
    let personal_data = match (&r.sealed, &r.key_id) {
        (Some(blob), Some(key_id)) => {
            let fate = if Decision::needs_keys(r.forgotten, reveal) {
                // Looked up for every such row.
                let fate = deks
                    .get(key_id)
                    .ok_or_else(|| corrupt("key of", r.position))?;
                std::slice::from_ref(fate)
            } else {
                &[]
            };
            match Decision::of(r.forgotten, reveal, fate) {
                Decision::Withheld(why) => why,
                Decision::Open(deks) => {
                    let broken = || ServiceError::Integrity {
                        position: r.position.get(),
                    };
                    let at = EventAad {
                        event_id: r.event_id.as_bytes(),
                        stream_id: r.stream_id.as_str(),
                        event_type: &r.event_type,
                        key_id,
                    };
                    let plain = deks[0].open_event(blob, &at).map_err(|_| broken())?;
                    let personal: Map<String, Value> =
                        serde_json::from_slice(&plain).map_err(|_| broken())?;
                    // Nested values were split member by member: put each
                    // piece back where it was.
                    crate::policy::merge(&mut data, personal).map_err(|_| broken())?;
                    PersonalData::Decrypted
                }
            }
        }
        _ => PersonalData::None,
    };
    Ok(ReadEvent {
        id: r.event_id,
        stream_id: r.stream_id,
        version: r.version,
        position: r.position,
        event_type: r.event_type,
        subject: r.subject,
        data,
        metadata,
        recorded_at_us: r.recorded_at,
        personal_data,
    })
}

impl Events {
    /// A page of a stream, as it was at `at.as_of_us` and at version
    /// `at.to_version` if given. The caller must have been allowed to read
    /// `stream` (checked before any data is read).
    pub async fn read_stream(
        &self,
        stream: &StreamId,
        from: Option<u64>,
        limit: u32,
        direction: Direction,
        at: AsOf,
        grants: &Grants,
    ) -> Result<StreamPage, ServiceError> {
        let mut current = self
            .store
            .stream_version(stream, at.as_of_us)
            .await?
            .ok_or(ServiceError::StreamNotFound)?;
        if let Some(v) = at.to_version {
            if v == 0 || v > current.get() {
                return Err(ServiceError::NoSuchVersion {
                    current: current.get(),
                });
            }
            current = Version::new(v);
        }
        let current = current.get();
        let from = from.unwrap_or(match direction {
            Direction::Forward => 1,
            Direction::Backward => current,
        });
        let rows = self
            .store
            .read_stream(stream, (from, current), limit, direction, at.as_of_us)
            .await?;
        let full = rows.len() == limit as usize;
        let next = rows.last().and_then(|last| {
            let v = last.version.get();
            match direction {
                Direction::Forward if full && v < current => Some(v + 1),
                Direction::Backward if full && v > 1 => Some(v - 1),
                _ => None,
            }
        });
        let events = self.open_all(rows, grants, ReadKind::Read).await?;
        Ok(StreamPage {
            current_version: current,
            events,
            next,
        })
    }

    /// A page of the global log after `after`: only events of streams the
    /// caller may read. `next` moves past what was scanned, hidden or not,
    /// so a caller who may read little still walks the log to its end.
    pub async fn read_all(
        &self,
        after: u64,
        limit: u32,
        as_of_us: Option<i64>,
        grants: &Grants,
    ) -> Result<LogPage, ServiceError> {
        let limit_rows = limit as usize;
        let mut visible = Vec::new();
        let mut cursor = after;
        let mut scanned = 0;
        loop {
            let rows = self.store.read_all(cursor, limit, as_of_us).await?;
            let fetched = rows.len();
            scanned += fetched;
            if let Some(last) = rows.last() {
                cursor = last.position.get();
            }
            visible.extend(
                rows.into_iter()
                    .filter(|r| grants.read_view(r.stream_id.as_str()).is_some()),
            );
            if visible.len() >= limit_rows || fetched < limit_rows || scanned >= MAX_LOG_SCAN {
                break;
            }
        }
        if visible.len() > limit_rows {
            visible.truncate(limit_rows);
            cursor = visible.last().map_or(cursor, |r| r.position.get());
        }
        let events = self.open_all(visible, grants, ReadKind::Read).await?;
        Ok(LogPage {
            events,
            next: cursor,
        })
    }

    /// Up to `limit` events about `subject` after position `after`, in
    /// position order, across all streams, as the caller's `export` shows
    /// them (decrypted, or erased after a forget).
    /// Returns the events, how many rows were read and the position of the
    /// last one (the cursor goes by rows, not by what the caller may see).
    pub async fn export_page(
        &self,
        subject: &Subject,
        after: u64,
        until: u64,
        limit: u32,
        grants: &Grants,
    ) -> Result<(Vec<ReadEvent>, usize, u64), ServiceError> {
        let rows = self
            .store
            .read_subject(subject, after, until, limit)
            .await?;
        let (read, last) = (rows.len(), rows.last().map_or(after, |r| r.position.get()));
        Ok((
            self.open_all(rows, grants, ReadKind::Export).await?,
            read,
            last,
        ))
    }

    /// [`Events::read_all`] for a live follower: from the rows the tail
    /// holds in memory (read once for every follower) when it holds the
    /// next one, from the store otherwise.
    /// `(rows, bytes, store_rows)`: at most `rows` events and about `bytes`
    /// of them from the tail, or `store_rows` from the store.
    pub async fn read_all_live(
        &self,
        after: u64,
        (rows, bytes, store_rows): (u32, usize, u32),
        grants: &Grants,
    ) -> Result<LogPage, ServiceError> {
        let tail = self.writer.feed().tail();
        let Some(rows) = tail.after(after, rows as usize, bytes) else {
            return self.read_all(after, store_rows, None, grants).await;
        };
        let next = rows.last().map_or(after, |r| r.position.get());
        let visible = rows
            .iter()
            .filter(|r| grants.read_view(r.stream_id.as_str()).is_some())
            .map(|r| StoredEvent::clone(r))
            .collect();
        Ok(LogPage {
            events: self.open_all(visible, grants, ReadKind::Read).await?,
            next,
        })
    }

    /// Whether an event of `stream` may lie after position `after`: `false`
    /// only when the tail holds every row after it and none is of `stream`.
    pub fn may_have_news(&self, stream: &StreamId, after: u64) -> bool {
        self.writer
            .feed()
            .tail()
            .mentions(stream, after)
            .unwrap_or(true)
    }

    /// The position of the newest event.
    pub async fn head_position(&self) -> Result<u64, ServiceError> {
        Ok(self.store.head_position().await?)
    }

    /// The key with id `key_id` of `subject`, or what its absence from the
    /// keystore means: the subject was forgotten meanwhile (`Erased`), an
    /// operator accepted its loss (`Lost`), or else an integrity failure of
    /// the stores ([`ServiceError::KeyMissing`], logged and counted): a key
    /// the keystore lost is never passed off as a forget. `position` names
    /// the first row that needs it (0: a snapshot).
    pub(super) async fn key_fate(
        &self,
        key_id: &str,
        subject: &Subject,
        position: u64,
    ) -> Result<KeyFate, ServiceError> {
        if let Some(dek) = self.keys.key_by_id(key_id).await? {
            return Ok(KeyFate::Open(dek));
        }
        // The ledger was read with the row; a forget since then deleted it.
        if self.store.forgotten(subject).await?.is_some() {
            return Ok(KeyFate::Erased);
        }
        if self.store.key_lost(key_id).await? {
            return Ok(KeyFate::Lost);
        }
        self.metrics.key_missing();
        tracing::error!(
            position,
            key_id,
            "a data key the event store refers to is missing from the keystore, and its subject was not forgotten; nothing was disclosed"
        );
        Err(ServiceError::KeyMissing { position })
    }

    /// Turns stored rows into events for a reader: decides per event what
    /// the caller sees ([`Grants::view`]: rows it may not see are dropped),
    /// opens the sealed fields it may see, and says for each what became of
    /// its personal data.
    pub(super) async fn open_all(
        &self,
        rows: Vec<StoredEvent>,
        grants: &Grants,
        how: ReadKind,
    ) -> Result<Vec<ReadEvent>, ServiceError> {
        let rows: Vec<(StoredEvent, bool)> = rows
            .into_iter()
            .filter_map(|r| {
                let view = grants.view(how, r.stream_id.as_str())?;
                Some((r, view == View::Revealed))
            })
            .collect();
        let mut deks: HashMap<String, KeyFate> = HashMap::new();
        for (r, _) in rows
            .iter()
            .filter(|(r, reveal)| Decision::needs_keys(r.forgotten, *reveal))
        {
            if let (Some(k), Some(subject)) = (&r.key_id, &r.subject)
                && !deks.contains_key(k)
            {
                let fate = self.key_fate(k, subject, r.position.get()).await?;
                deks.insert(k.clone(), fate);
            }
        }
        let inline = rows.len() <= INLINE_CRYPTO_EVENTS;
        let open = move || {
            rows.into_iter()
                .map(|(r, reveal)| open_event(r, reveal, &deks))
                .collect::<Result<Vec<_>, _>>()
        };
        let opened = if inline {
            open()
        } else {
            tokio::task::spawn_blocking(open)
                .await
                .map_err(|_| ServiceError::Unavailable)?
        };
        match &opened {
            Ok(events) => self.metrics.opened(
                Sealed::Event,
                events
                    .iter()
                    .filter(|e| e.personal_data == PersonalData::Decrypted)
                    .count() as u64,
            ),
            Err(ServiceError::Integrity { .. }) => self.metrics.open_failed(Sealed::Event),
            Err(_) => {}
        }
        opened
    }
}
