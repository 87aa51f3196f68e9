use std::collections::HashMap;

use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::{Events, INLINE_CRYPTO_EVENTS, ServiceError};
use crate::audit::AuditEntry;
use crate::crypto::EventAad;
use crate::domain::{EventBatch, EventId, ExpectedVersion, ProposedEvent, StreamId, Subject};
use crate::keys::{ActiveKey, KeyError};
use crate::metrics::Sealed;
use crate::policy::Policies;
use crate::store::writer::{AppendCommand, AppendRejection, Appended, PendingEvent, WriteError};

/// Splits `data` into clear and personal fields and seals the personal ones.
fn seal_event(
    policies: &Policies,
    stream: &StreamId,
    keys: &HashMap<Subject, ActiveKey>,
    e: ProposedEvent,
) -> Result<PendingEvent, ServiceError> {
    let to_json = |m: &Map<String, Value>| serde_json::to_string(m).expect("JSON values serialise");
    let metadata = to_json(&e.metadata);
    let event_type = e.event_type.as_str().to_owned();
    // Without a subject nothing is personal: everything is stored as given
    // (for a classified type, `append` has checked that all of it is clear).
    let key = e.subject.as_ref().map(|s| &keys[s]);
    let (clear, personal) = match key {
        None => (e.data, Map::new()),
        Some(_) => policies.classification.split(&event_type, e.data),
    };
    let (key_id, sealed) = match key.filter(|_| !personal.is_empty()) {
        None => (None, None),
        Some(key) => {
            let plaintext =
                Zeroizing::new(serde_json::to_vec(&personal).expect("JSON values serialise"));
            let at = EventAad {
                event_id: e.id.as_bytes(),
                stream_id: stream.as_str(),
                event_type: &event_type,
                key_id: &key.key_id,
            };
            let sealed = key
                .dek
                .seal_event(&plaintext, &at)
                .map_err(KeyError::from)?;
            (Some(key.key_id.to_string()), Some(sealed))
        }
    };
    Ok(PendingEvent {
        id: EventId::new(e.id),
        event_type,
        subject: e.subject,
        key_id,
        data: to_json(&clear),
        sealed,
        metadata,
    })
}

impl Events {
    /// Classifies, seals and appends a batch atomically, with its audit
    /// record in the same transaction.
    pub async fn append(
        &self,
        stream: StreamId,
        expected: ExpectedVersion,
        batch: EventBatch,
        audit: AuditEntry,
    ) -> Result<Appended, ServiceError> {
        let events = batch.into_inner();
        // Checked before any key is looked up: a refused batch makes none.
        for (index, e) in events.iter().enumerate() {
            if e.subject.is_none()
                && let Some(path) = self
                    .policies
                    .classification
                    .personal_path(e.event_type.as_str(), &e.data)
            {
                return Err(ServiceError::PersonalWithoutSubject {
                    index,
                    event_type: e.event_type.as_str().to_owned(),
                    path,
                });
            }
        }
        let inline = events.len() <= INLINE_CRYPTO_EVENTS;
        // Each subject's key, with as many encryptions as it has events here.
        let mut per_subject: HashMap<&Subject, u64> = HashMap::new();
        for s in events.iter().filter_map(|e| e.subject.as_ref()) {
            *per_subject.entry(s).or_default() += 1;
        }
        // A subject without a cached key may need one made: not for a
        // forgotten subject, whose key would otherwise exist again until the
        // writer refuses the append (one look-up, only on a cache miss; the
        // writer checks again in its transaction, for a forget that races).
        let uncached: Vec<Subject> = per_subject
            .keys()
            .filter(|s| !self.keys.has_active_key_cached(s))
            .map(|s| (*s).clone())
            .collect();
        if let Some(s) = self.store.first_forgotten(&uncached).await? {
            return Err(ServiceError::Rejected(AppendRejection::Forgotten(s)));
        }
        let mut keys: HashMap<Subject, ActiveKey> = HashMap::new();
        for (s, n) in per_subject {
            keys.insert(s.clone(), self.keys.key_for_subject(s.as_str(), n).await?);
        }
        let policies = self.policies.clone();
        let stream_name = stream.clone();
        let seal_all = move || -> Result<Vec<PendingEvent>, ServiceError> {
            events
                .into_iter()
                .map(|e| seal_event(&policies, &stream_name, &keys, e))
                .collect()
        };
        let pending = if inline {
            seal_all()?
        } else {
            tokio::task::spawn_blocking(seal_all)
                .await
                .map_err(|_| ServiceError::Unavailable)??
        };
        self.metrics.sealed(
            Sealed::Event,
            pending.iter().filter(|p| p.sealed.is_some()).count() as u64,
        );
        let appended = self
            .writer
            .append(
                AppendCommand {
                    stream,
                    expected,
                    events: pending,
                },
                audit,
            )
            .await;
        if let Err(WriteError::Rejected(AppendRejection::Forgotten(s))) = &appended {
            // The writer refused a forgotten subject (checked in its
            // transaction); a key this request may have made for it sealed
            // nothing that was stored: delete it at once.
            // Best effort: what is left is removed at the next start.
            self.discard_keys(s).await;
        }
        Ok(appended?)
    }
}
