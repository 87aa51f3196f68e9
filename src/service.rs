//! Commands and queries on events: the layer between HTTP and the store.
//!
//! On the way in it classifies each event's fields (clear or personal, per
//! `policies/classification.toml`), seals the personal ones under the
//! subject's key and hands the batch to the group-commit writer. On the way
//! out it opens sealed fields for readers allowed to see them and marks every
//! event with what happened to its personal data.
//!
//! Bulk crypto and JSON work runs on the blocking pool, off the async threads.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use serde_json::{Map, Value};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::audit::AuditEntry;
use crate::crypto::{self, Dek, EventAad, SnapshotAad, SnapshotLayers};
use crate::domain::{
    EventBatch, ExpectedVersion, PersonalData, ProposedEvent, ReadEvent, StreamId, Subject,
};
use crate::keys::{ActiveKey, DestructionLedger, KeyError, KeyManager};
use crate::metrics::{Metrics, Sealed};
use crate::policy::{Grants, Policies, ReadKind, View};
use crate::store::snapshots::{NewSnapshot, SnapshotLayer, SnapshotRefusal, StoredSnapshot};
use crate::store::writer::{
    AppendCommand, AppendRejection, Appended, PendingEvent, WriteError, Writer,
};
use crate::store::{Direction, EventStore, StoreError, StoredEvent};

/// Batches larger than this are sealed or opened on the blocking pool.
const INLINE_CRYPTO_EVENTS: usize = 16;

/// Most rows of the global log one request scans for a caller who may read
/// only some streams; the page then ends early and `next` moves past them.
const MAX_LOG_SCAN: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Rejected(#[from] AppendRejection),
    #[error("stream not found")]
    StreamNotFound,
    /// A version the stream does not have (yet): `current` is its version.
    #[error("the stream has no such version (its version is {current})")]
    NoSuchVersion { current: u64 },
    /// A snapshot that names a subject its stream's events (up to its
    /// version) are not about.
    #[error(
        "the snapshot names a subject the stream's events up to its version are not about: name one of them, or none (the state is sealed for all of them either way)"
    )]
    SnapshotSubject,
    /// An event of a classified type without a subject carries a value the
    /// classification makes personal: there is no key to seal it under.
    /// Names the event's index in its batch and the field's path, never a
    /// value.
    #[error(
        "events[{index}]: data.{path} is personal for the type {event_type} (not one of its clear fields, or not a scalar); an event without a subject may carry only its type's clear fields: give the event a subject, or leave the field out"
    )]
    PersonalWithoutSubject {
        index: usize,
        event_type: String,
        path: String,
    },
    /// A snapshot older than the one stored.
    #[error("a snapshot of version {stored} is stored; an older one does not replace it")]
    OlderSnapshot { stored: u64 },
    /// A stored ciphertext failed to open: it was moved, altered or damaged.
    /// Never carries plaintext or key material.
    #[error("integrity check failed for the event at position {position}")]
    Integrity { position: u64 },
    /// A stored snapshot failed to open (names the stream).
    #[error("integrity check failed for the snapshot of {0}")]
    SnapshotIntegrity(String),
    /// A data key the event store refers to is not in the keystore, and its
    /// subject was not forgotten: the keystore lost it (restored from a
    /// backup older than the event store, a replica that was behind, a
    /// deletion behind the service's back). Never shown as `erased`.
    /// Names the position of the first event (0: a snapshot) that needs it.
    #[error("the data key of the event at position {position} is missing from the keystore")]
    KeyMissing { position: u64 },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the service is shutting down")]
    Unavailable,
}

impl ServiceError {
    /// The condition of a store behind this error, if that is its cause
    /// (retrying later may succeed).
    pub fn fault(&self) -> Option<crate::store::Fault> {
        match self {
            Self::Store(e) | Self::Key(KeyError::Store(e)) => e.fault(),
            _ => None,
        }
    }
}

impl From<WriteError> for ServiceError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Rejected(r) => Self::Rejected(r),
            WriteError::Store(s) => Self::Store(s),
            WriteError::Stopped => Self::Unavailable,
        }
    }
}

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

/// A page of the global log.
#[derive(Debug)]
pub struct LogPage {
    pub events: Vec<ReadEvent>,
    /// The position to pass as `after` for the next page.
    pub next: u64,
}

/// The result of a forget.
#[derive(Debug, Clone, Copy)]
pub struct ForgetReport {
    /// `Forgotten` once every step has run; `Forgetting` while the keys are
    /// still to be destroyed (the service finishes it by itself): either way
    /// the subject is forgotten for every reader.
    pub state: SubjectState,
    pub forgotten_at_us: i64,
    /// Keys recorded as destroyed by this subject's forget, over all
    /// attempts (final once the state is `Forgotten`).
    pub keys_destroyed: u64,
    pub events_affected: u64,
}

/// What a start found to re-apply in the forget ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reapplied {
    /// Forgotten subjects that had keys again (a restored keystore).
    pub reshredded: u64,
    /// Forgets that had not run to their end and were completed.
    pub completed: u64,
}

/// Where the start-up re-apply of the forget ledger stands. Until it is
/// `Applied` a keystore restored from a backup may still hold keys of
/// forgotten subjects, so no data request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerState {
    /// The ledger is being re-applied: not ready.
    Reapplying,
    /// Every recorded forget holds again: ready.
    Applied,
    /// The re-apply failed: the service stops without becoming ready.
    Failed,
}

impl LedgerState {
    /// The word `GET /readyz` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reapplying => "reapplying",
            Self::Applied => "applied",
            Self::Failed => "failed",
        }
    }
}

/// What a subject's state is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectState {
    Active,
    /// In the forget ledger, and every step of the forget has run.
    Forgotten,
    /// In the forget ledger (erased for every reader), its keys not yet all
    /// destroyed: the service is finishing the forget.
    Forgetting,
    Unknown,
}

/// Where the start-up check of the data keys stands: every key the event
/// store refers to, of a subject not forgotten, must be in the keystore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// Not done yet: not ready.
    Checking,
    /// Every key is there (or its loss was accepted): ready.
    Complete,
    /// So many keys are missing and their loss was not accepted: the
    /// service does not become ready.
    Missing(u64),
}

impl KeyCheck {
    /// The word `GET /readyz` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Checking => "checking",
            Self::Complete => "ok",
            Self::Missing(_) => "missing",
        }
    }
}

/// What the start-up check of the data keys found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeysChecked {
    /// Keys the event store refers to that the keystore must hold.
    pub expected: u64,
    /// Of those, missing from the keystore (their loss not accepted before).
    pub missing: u64,
    /// Of the missing, whose loss was accepted now.
    pub accepted: u64,
}

/// Forgets whose ledger entry is durable but whose later steps failed (the
/// keystore did not answer), waiting to be finished in the background, and
/// one turn per subject, so that a retried request and the background never
/// carry out the same forget at once in this process.
#[derive(Debug)]
struct PendingForgets {
    subjects: Mutex<BTreeSet<String>>,
    /// Wakes the background task when a subject is added.
    wake: tokio::sync::Notify,
    /// How many are pending, for whoever waits for it to change.
    count: watch::Sender<usize>,
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Shows the count as `eventvault_forgets_pending`.
    metrics: Metrics,
}

/// A subject's turn to carry out its forget; given back when dropped.
struct ForgetTurn<'a> {
    pending: &'a PendingForgets,
    subject: String,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for ForgetTurn<'_> {
    fn drop(&mut self) {
        let mut turns = self.pending.turns.lock().expect("turns lock");
        // The map's and this guard's: nobody else waits for the turn.
        if turns
            .get(&self.subject)
            .is_some_and(|t| Arc::strong_count(t) <= 2)
        {
            turns.remove(&self.subject);
        }
    }
}

impl PendingForgets {
    fn new(metrics: Metrics) -> Self {
        Self {
            subjects: Mutex::new(BTreeSet::new()),
            wake: tokio::sync::Notify::new(),
            count: watch::Sender::new(0),
            turns: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn counted(&self, n: usize) {
        self.metrics.forgets_pending(n);
        self.count.send_replace(n);
    }

    async fn turn(&self, subject: &str) -> ForgetTurn<'_> {
        let lock = self
            .turns
            .lock()
            .expect("turns lock")
            .entry(subject.to_owned())
            .or_default()
            .clone();
        ForgetTurn {
            pending: self,
            subject: subject.to_owned(),
            _held: lock.lock_owned().await,
        }
    }

    fn push(&self, subject: &str) {
        let n = {
            let mut s = self.subjects.lock().expect("pending lock");
            s.insert(subject.to_owned());
            s.len()
        };
        self.counted(n);
        self.wake.notify_one();
    }

    fn done(&self, subject: &str) {
        let n = {
            let mut s = self.subjects.lock().expect("pending lock");
            s.remove(subject);
            s.len()
        };
        self.counted(n);
    }

    /// The pending subject after `after` in name order, wrapping round to
    /// the first.
    fn next(&self, after: &str) -> Option<String> {
        use std::ops::Bound::{Excluded, Unbounded};
        let s = self.subjects.lock().expect("pending lock");
        s.range::<str, _>((Excluded(after), Unbounded))
            .next()
            .or_else(|| s.iter().next())
            .cloned()
    }
}

/// The namespace of the ids of `$subjects` events (UUID v5 of the subject).
const SUBJECTS_LEDGER_IDS: Uuid = Uuid::from_u128(0x6576_7661_756c_7424_7375_626a_6563_7473);

/// How often the background completion looks in the forget ledger for
/// forgets that no process finished (one that stopped, in a deployment of
/// several): whichever process sees one finishes it.
const FORGET_SWEEP: Duration = Duration::from_secs(60);

/// The first wait of the background completion after a failure, and the
/// longest: the keystore is tried again at most this long after it answers.
const FORGET_RETRY_FIRST: Duration = Duration::from_millis(100);
const FORGET_RETRY_MAX: Duration = Duration::from_secs(5);

/// The event store records the keys a forget destroys.
impl DestructionLedger for EventStore {
    fn record_destroyed(
        &self,
        subject: &str,
        key_ids: &[String],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.record_destroyed_keys(subject, key_ids)
    }
}

/// Keys deleted without being counted as a forget's (discarded keys that a
/// refused request made, which sealed nothing).
struct Uncounted;

impl DestructionLedger for Uncounted {
    async fn record_destroyed(&self, _: &str, _: &[String]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Told, after every round of keys recorded as destroyed, how many the
/// subject's forget has destroyed in all (a request's early answer keeps
/// up with it).
type DestroyedSoFar<'a> = &'a (dyn Fn(u64) + Send + Sync);

/// The event store as the ledger of destroyed keys, telling `then` the
/// count after each round.
struct Noting<'a> {
    store: &'a EventStore,
    then: DestroyedSoFar<'a>,
}

impl DestructionLedger for Noting<'_> {
    async fn record_destroyed(&self, subject: &str, key_ids: &[String]) -> Result<(), StoreError> {
        self.store.record_destroyed_keys(subject, key_ids).await?;
        if let Some(entry) = self.store.forgotten(subject).await? {
            (self.then)(entry.keys_destroyed as u64);
        }
        Ok(())
    }
}

/// The event services shared by all handlers.
#[derive(Clone, Debug)]
pub struct Events {
    store: EventStore,
    writer: Writer,
    keys: Arc<KeyManager>,
    policies: Arc<Policies>,
    /// Counts seals, opens and forgets.
    metrics: Metrics,
    /// Forgets to finish in the background.
    forgets: Arc<PendingForgets>,
}

impl Events {
    pub fn new(
        store: EventStore,
        writer: Writer,
        keys: Arc<KeyManager>,
        policies: Arc<Policies>,
        metrics: Metrics,
    ) -> Self {
        let forgets = Arc::new(PendingForgets::new(metrics.clone()));
        Self {
            store,
            writer,
            keys,
            policies,
            metrics,
            forgets,
        }
    }

    /// How many recorded forgets wait to be finished in the background:
    /// `changed()` completes when one is added or finished.
    pub fn pending_forgets(&self) -> watch::Receiver<usize> {
        self.forgets.count.subscribe()
    }

    /// The newest committed position this process knows of.
    pub fn commit_head(&self) -> u64 {
        self.writer.feed().head()
    }

    /// Whether the writer's last group committed.
    pub fn writer_health(&self) -> crate::store::writer::Health {
        self.writer.health()
    }

    /// Whether a write commits now (see [`Writer::probe`]).
    pub async fn probe_write(
        &self,
        patience: std::time::Duration,
    ) -> Option<Result<(), StoreError>> {
        self.writer.probe(patience).await
    }

    /// The application's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

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
        let mut per_subject: HashMap<&str, u64> = HashMap::new();
        for s in events.iter().filter_map(|e| e.subject.as_ref()) {
            *per_subject.entry(s.as_str()).or_default() += 1;
        }
        // A subject without a cached key may need one made: not for a
        // forgotten subject, whose key would otherwise exist again until the
        // writer refuses the append (one look-up, only on a cache miss; the
        // writer checks again in its transaction, for a forget that races).
        let uncached: Vec<String> = per_subject
            .keys()
            .filter(|s| !self.keys.has_active_key_cached(s))
            .map(|s| (*s).to_owned())
            .collect();
        if let Some(s) = self.store.first_forgotten(&uncached).await? {
            return Err(ServiceError::Rejected(AppendRejection::Forgotten(s)));
        }
        let mut keys: HashMap<String, ActiveKey> = HashMap::new();
        for (s, n) in per_subject {
            keys.insert(s.to_owned(), self.keys.key_for_subject(s, n).await?);
        }
        let policies = self.policies.clone();
        let stream_name = stream.as_str().to_owned();
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

    /// Forgets `subject` by crypto-shredding, in the order of DESIGN.md:
    /// (1) record the intent in the ledger, (2) delete and scrub its keys,
    /// (3) evict them from every cache, (4) append a `$subjects` event with
    /// `audit` (the request's record) in one transaction, then mark the
    /// forget complete. Idempotent: a second call finds the ledger entry,
    /// destroys what might have appeared since (nothing, normally) and
    /// returns the first call's time.
    ///
    /// Once (1) is durable the subject is forgotten for every reader: if a
    /// later step fails (the keystore does not answer), the report says
    /// `Forgetting` and the forget is finished in the background
    /// ([`Events::complete_pending_forgets`]); only a failure of (1) is an
    /// error. Returns the report and whether `audit` was written (only when
    /// step 4 ran).
    ///
    /// `recorded` is told the report as it stands once the ledger entry is
    /// durable (`forgetting`, unless the forget was completed before): from
    /// then on that is the truthful answer, whatever the later steps do or
    /// however long they take.
    pub async fn forget(
        &self,
        subject: &str,
        reason: Option<&str>,
        audit: AuditEntry,
        recorded: impl Fn(&ForgetReport) + Send + Sync,
    ) -> Result<(ForgetReport, bool), ServiceError> {
        let recorded_now = self.store.record_forget(subject, reason).await;
        // Rows held in memory for subscribers may predate the ledger entry:
        // dropped whatever the answer (an error may follow a commit).
        self.writer.feed().forget_recorded();
        let (entry, events_affected) = match recorded_now {
            Ok(done) => done,
            Err(e @ StoreError::RecordedOrNot(_)) => {
                // Perhaps recorded: then the background finishes it (it
                // does nothing for a subject the ledger does not list).
                self.forgets.push(subject);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        // From here on the forget has happened for every reader; whatever
        // fails later, the answer says so (202 `forgetting`), and the
        // background finishes it.
        let early = ForgetReport {
            state: if entry.completed_at.is_some() {
                SubjectState::Forgotten
            } else {
                SubjectState::Forgetting
            },
            forgotten_at_us: entry.forgotten_at,
            keys_destroyed: entry.keys_destroyed as u64,
            events_affected,
        };
        recorded(&early);
        let destroyed = std::sync::atomic::AtomicU64::new(early.keys_destroyed);
        let so_far = |keys_destroyed| {
            destroyed.store(keys_destroyed, std::sync::atomic::Ordering::Relaxed);
            recorded(&ForgetReport {
                keys_destroyed,
                ..early
            })
        };
        let carried = {
            let _turn = self.forgets.turn(subject).await;
            self.carry_out(subject, audit, &so_far).await
        };
        let (state, written) = match carried {
            Ok(written) => (SubjectState::Forgotten, written),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "a forget is recorded (its subject reads erased) but its keys could not be destroyed yet; it is finished in the background"
                );
                self.forgets.push(subject);
                (SubjectState::Forgetting, false)
            }
        };
        let report = ForgetReport {
            state,
            keys_destroyed: destroyed.load(std::sync::atomic::Ordering::Relaxed),
            ..early
        };
        Ok((report, written))
    }

    /// Steps 2 to 4 of a recorded forget (the caller holds the subject's
    /// turn): the keys destroyed (again: a key restored meanwhile goes too)
    /// and, unless the forget was completed before, the `$subjects` event
    /// with `audit` and the completion mark. Returns whether `audit` was
    /// written.
    async fn carry_out(
        &self,
        subject: &str,
        audit: AuditEntry,
        so_far: DestroyedSoFar<'_>,
    ) -> Result<bool, ServiceError> {
        // Only a subject the ledger lists: a forget whose recording was in
        // doubt may not have happened, and its subject's keys must stay.
        if self.store.forgotten(subject).await?.is_none() {
            return Ok(false);
        }
        self.destroy_keys(subject, so_far).await?;
        let entry = self
            .store
            .forgotten(subject)
            .await?
            .ok_or_else(|| StoreError::Corrupt("a recorded forget vanished".into()))?;
        if entry.completed_at.is_some() {
            return Ok(false);
        }
        let events_affected = self.store.subject_event_count(subject, u64::MAX).await?;
        let audit = AuditEntry {
            event_count: events_affected,
            ..audit
        };
        self.finish_forget(subject, entry.keys_destroyed as u64, events_affected, audit)
            .await?;
        Ok(true)
    }

    /// Step 4: the `$subjects` event (no personal data: the pseudonymous
    /// subject id and counts) with its audit record, then the forget is
    /// marked complete.
    async fn finish_forget(
        &self,
        subject: &str,
        keys_destroyed: u64,
        events_affected: u64,
        audit: AuditEntry,
    ) -> Result<(), ServiceError> {
        let data = serde_json::json!({
            "subject": subject,
            "keys_destroyed": keys_destroyed,
            "events_affected": events_affected,
        });
        let event = PendingEvent {
            // One id per subject: a forget finished twice (by two
            // processes, or again after its completion mark failed) is an
            // idempotent retry of the same append, not a second event.
            id: Uuid::new_v5(&SUBJECTS_LEDGER_IDS, subject.as_bytes()),
            event_type: "SubjectForgotten".into(),
            subject: None,
            key_id: None,
            data: data.to_string(),
            sealed: None,
            metadata: "{}".into(),
        };
        self.writer
            .append_recorded(
                AppendCommand {
                    stream: StreamId::subjects_ledger(),
                    expected: ExpectedVersion::Any,
                    events: vec![event],
                },
                audit,
            )
            .await?;
        self.store.complete_forget(subject).await?;
        self.metrics.forgot();
        Ok(())
    }

    /// Steps 2 and 3: every key recorded as destroyed in the event store,
    /// then deleted, evicted and scrubbed.
    async fn destroy_keys(
        &self,
        subject: &str,
        so_far: DestroyedSoFar<'_>,
    ) -> Result<u64, ServiceError> {
        let ledger = Noting {
            store: &self.store,
            then: so_far,
        };
        let destroyed = self.keys.destroy_subject(subject, &ledger, true).await?;
        self.metrics.keys_destroyed(destroyed);
        Ok(destroyed)
    }

    /// Deletes and evicts the keys of a forgotten subject that a refused
    /// request (an append, a snapshot) made; they sealed nothing stored. No
    /// scrub, which a flood of such requests could otherwise turn into a
    /// flood of checkpoints. Best effort: what is left is removed at the
    /// next start.
    async fn discard_keys(&self, subject: &str) {
        // Not counted as destroyed by the forget: they sealed nothing.
        if let Err(e) = self.keys.destroy_subject(subject, &Uncounted, false).await {
            tracing::warn!(error = %e, "could not discard a key made for a forgotten subject");
        }
    }

    /// The audit record of a forget finished without a request (at start,
    /// or in the background).
    fn resume_record(subject: &str) -> AuditEntry {
        AuditEntry {
            principal: None,
            action: "subject.forget.resume".into(),
            resource: format!("subject:{subject}"),
            outcome: crate::audit::Outcome::Ok,
            event_count: 0,
            personal_data: false,
            correlation_id: None,
            causation_id: None,
            purpose: None,
            request_id: None,
        }
    }

    /// At start: every forgotten subject whose keys exist again (a keystore
    /// restored from a backup) is shredded again, and every forget that did
    /// not reach its end is completed, before the service serves data.
    pub async fn reapply_forgets(&self) -> Result<Reapplied, ServiceError> {
        const PAGE: u32 = 1000;
        let mut done = Reapplied::default();
        let mut after = String::new();
        loop {
            let page = self.store.forgotten_page(&after, PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(done);
            };
            after = last.subject.clone();
            let names: Vec<String> = page.iter().map(|e| e.subject.clone()).collect();
            let with_keys = self.keys.keystore().subjects_with_keys(&names).await?;
            for e in &page {
                let _turn = self.forgets.turn(&e.subject).await;
                let step = if e.completed_at.is_none() {
                    // Interrupted: every step again (the scrub too).
                    self.carry_out(&e.subject, Self::resume_record(&e.subject), &|_| {})
                        .await
                        .map(|finished| done.completed += u64::from(finished))
                } else if with_keys.contains(&e.subject) {
                    self.destroy_keys(&e.subject, &|_| {})
                        .await
                        .map(|_| done.reshredded += 1)
                } else {
                    Ok(())
                };
                if let Err(err) = step {
                    // What must hold before serving is that no forgotten
                    // subject has a key: if its keys are gone and only a
                    // later step failed for the stores' condition (a scrub
                    // kept waiting), the background finishes it.
                    let keys_gone = err.fault().is_some()
                        && self
                            .keys
                            .keystore()
                            .subjects_with_keys(std::slice::from_ref(&e.subject))
                            .await
                            .is_ok_and(|left| left.is_empty());
                    if !keys_gone {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "a forget's keys are gone but it could not be finished at start; it is finished in the background");
                    self.forgets.push(&e.subject);
                }
            }
            if page.len() < PAGE as usize {
                return Ok(done);
            }
        }
    }

    /// Finishes, in the background, every forget whose later steps failed
    /// after its ledger entry was recorded, until `stop` turns `true`. The
    /// pending subjects are taken in turn, round-robin; after a failure the
    /// next attempt waits, 100 ms at first and twice as long after each
    /// failure in a row, at most 5 s, so that a keystore that does not
    /// answer costs one attempt (and one log line) per wait, and the
    /// forgets go on within 5 s of its return; after a success the next one
    /// follows at once. A subject that keeps failing does not hold up the
    /// others: each attempt moves past it. Finished forgets are audited as
    /// `subject.forget.resume`, like those the start completes. Cancelling
    /// it at any point is safe: every step is idempotent, and the next
    /// start completes what is left.
    pub async fn complete_pending_forgets(self, mut stop: watch::Receiver<bool>) {
        let mut wait = FORGET_RETRY_FIRST;
        let mut cursor = String::new();
        loop {
            if *stop.borrow_and_update() {
                return;
            }
            let Some(subject) = self.forgets.next(&cursor) else {
                tokio::select! {
                    () = self.forgets.wake.notified() => continue,
                    () = tokio::time::sleep(FORGET_SWEEP) => {
                        self.sweep_unfinished_forgets().await;
                        continue;
                    }
                    _ = stop.changed() => return,
                }
            };
            cursor.clone_from(&subject);
            let attempt = async {
                let _turn = self.forgets.turn(&subject).await;
                self.carry_out(&subject, Self::resume_record(&subject), &|_| {})
                    .await
            };
            let outcome = tokio::select! {
                r = attempt => r,
                _ = stop.changed() => return,
            };
            match outcome {
                Ok(_) => {
                    self.forgets.done(&subject);
                    wait = FORGET_RETRY_FIRST;
                    tracing::info!(
                        pending = *self.forgets.count.borrow(),
                        "finished a recorded forget whose keys could not be destroyed before"
                    );
                }
                Err(e) => {
                    self.metrics.forget_retried();
                    tracing::warn!(
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        pending = *self.forgets.count.borrow(),
                        "a recorded forget cannot be finished yet; retrying"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return,
                    }
                    wait = (wait * 2).min(FORGET_RETRY_MAX);
                }
            }
        }
    }

    /// Adds to the pending set every forget of the ledger that no process
    /// finished (a page at a time); a failure to read is logged, and the
    /// next sweep tries again.
    async fn sweep_unfinished_forgets(&self) {
        const PAGE: u32 = 1000;
        let mut after = String::new();
        loop {
            match self.store.unfinished_forgets(&after, PAGE).await {
                Ok(page) => {
                    for s in &page {
                        self.forgets.push(s);
                    }
                    match page.last() {
                        Some(last) if page.len() == PAGE as usize => after.clone_from(last),
                        _ => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for unfinished forgets; trying again later");
                    return;
                }
            }
        }
    }

    /// At start: checks that the keystore holds every data key the event
    /// store refers to, but those of forgotten subjects and those whose
    /// loss was accepted before; one pass over the key registry, a page at
    /// a time. With `accept`, the keys found missing are recorded as lost
    /// (their events then read `lost`) and an audit record says how many.
    pub async fn check_data_keys(&self, accept: bool) -> Result<KeysChecked, ServiceError> {
        const PAGE: u32 = 1000;
        let mut found = KeysChecked::default();
        // With `accept`: the missing keys, accepted once they are all known.
        let mut lost: Vec<String> = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.store.expected_keys_page(&after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.clone();
            found.expected += page.len() as u64;
            let present = self.keys.keystore().existing_key_ids(&page).await?;
            let missing: Vec<String> = page
                .iter()
                .filter(|k| !present.contains(k))
                .cloned()
                .collect();
            // A forget elsewhere may have destroyed some since the page was read.
            let missing = self.store.still_expected(&missing).await?;
            found.missing += missing.len() as u64;
            if accept {
                lost.extend(missing);
            }
            if page.len() < PAGE as usize {
                break;
            }
        }
        if !lost.is_empty() {
            // The record first: an acceptance is never without its record
            // (a failure after it makes the next start accept, and record,
            // what is left).
            let record = AuditEntry {
                principal: None,
                action: "keys.accept_missing".into(),
                resource: "keystore".into(),
                outcome: crate::audit::Outcome::Ok,
                event_count: lost.len() as u64,
                personal_data: false,
                correlation_id: None,
                causation_id: None,
                purpose: None,
                request_id: None,
            };
            self.audit(record).await?;
            for chunk in lost.chunks(PAGE as usize) {
                found.accepted += self.store.accept_lost_keys(chunk).await?;
            }
        }
        self.metrics
            .data_keys_missing(found.missing - found.accepted);
        Ok(found)
    }

    /// A subject's state and how many events name it, up to position
    /// `until` (`u64::MAX`: all of them).
    pub async fn subject_state(
        &self,
        subject: &str,
        until: u64,
    ) -> Result<(SubjectState, u64), ServiceError> {
        let events = self.store.subject_event_count(subject, until).await?;
        let state = match self.store.forgotten(subject).await? {
            Some(f) if f.completed_at.is_some() => SubjectState::Forgotten,
            Some(_) => SubjectState::Forgetting,
            None if events > 0 => SubjectState::Active,
            None => SubjectState::Unknown,
        };
        Ok((state, events))
    }

    /// How many snapshots are sealed for `subject`.
    pub async fn subject_snapshot_count(&self, subject: &str) -> Result<u64, ServiceError> {
        Ok(self.store.subject_snapshot_count(subject).await?)
    }

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
        let forgotten = |s: String| ServiceError::Rejected(AppendRejection::Forgotten(s));
        let mut subjects = match self
            .store
            .snapshot_subjects(stream.as_str(), version)
            .await?
        {
            Ok(subjects) => subjects,
            Err(refusal) => return Err(snapshot_refusal(refusal)),
        };
        if let Some(s) = subject {
            if subjects.is_empty() {
                subjects.push(s.as_str().to_owned());
            } else if !subjects.iter().any(|x| x == s.as_str()) {
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
                let key = self.keys.key_for_subject(&s, 1).await?;
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
                version,
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
                stream_id: stream.as_str(),
                version,
                subject: subject.map(Subject::as_str),
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
        let Some(row) = self.store.load_snapshot(stream.as_str()).await? else {
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
        subject: &str,
        after: &str,
        limit: u32,
        grants: &Grants,
    ) -> Result<(Vec<(String, SnapshotRead)>, Option<String>), ServiceError> {
        let streams = self.store.snapshots_of(subject, after, limit).await?;
        let next = (streams.len() == limit as usize)
            .then(|| streams.last().cloned())
            .flatten();
        let mut out = Vec::with_capacity(streams.len());
        for stream in streams {
            let Some(view) = grants.view(ReadKind::Export, &stream) else {
                continue;
            };
            let Some(row) = self.store.load_snapshot(&stream).await? else {
                continue;
            };
            // Replaced since it was listed, by one not sealed for them.
            if !row.layers.iter().any(|l| l.subject == subject) {
                continue;
            }
            let read = self.open_snapshot(row, view == View::Revealed).await?;
            out.push((stream, read));
        }
        Ok((out, next))
    }

    /// Decides and opens one stored snapshot for a reader, like an event.
    async fn open_snapshot(
        &self,
        row: StoredSnapshot,
        reveal: bool,
    ) -> Result<SnapshotRead, ServiceError> {
        let broken = || ServiceError::SnapshotIntegrity(row.stream_id.clone());
        let corrupt = || {
            ServiceError::Store(StoreError::Corrupt(format!(
                "the snapshot of {}",
                row.stream_id
            )))
        };
        let (state, personal_data) = match (&row.sealed, &row.state) {
            (Some(_), _) if row.layers.is_empty() => return Err(corrupt()),
            (Some(_), _) if row.forgotten => (None, PersonalData::Erased),
            (Some(_), _) if !reveal => (None, PersonalData::Redacted),
            (Some(blob), _) => {
                // Every layer's key: one the keystore lacks is erased (its
                // subject forgotten meanwhile), lost (accepted so), or an
                // integrity failure — never passed off as a forget.
                let mut deks = Vec::with_capacity(row.layers.len());
                let mut gone = None;
                for layer in &row.layers {
                    match self.key_fate(&layer.key_id, &layer.subject, 0).await? {
                        KeyFate::Open(dek) => deks.push(dek),
                        KeyFate::Erased => {
                            gone = Some(PersonalData::Erased);
                            break;
                        }
                        KeyFate::Lost => {
                            gone.get_or_insert(PersonalData::Lost);
                        }
                    }
                }
                if let Some(gone) = gone {
                    (None, gone)
                } else {
                    let deks: Vec<&Dek> = deks.iter().map(|d| &**d).collect();
                    let version = row.version as u64;
                    let plain = match &row.wrapped_key {
                        Some(wrapped) => {
                            let key_ids: Vec<&str> =
                                row.layers.iter().map(|l| l.key_id.as_str()).collect();
                            let at = SnapshotLayers {
                                stream_id: &row.stream_id,
                                version,
                                key_ids: &key_ids,
                            };
                            crypto::open_snapshot_for(&deks, &at, wrapped, blob)
                        }
                        // Saved before snapshots had layers: under its one
                        // subject's key directly.
                        None if deks.len() == 1 => deks[0].open_snapshot(
                            blob,
                            &SnapshotAad {
                                stream_id: &row.stream_id,
                                version,
                                key_id: &row.layers[0].key_id,
                            },
                        ),
                        None => return Err(corrupt()),
                    }
                    .map_err(|_| {
                        self.metrics.open_failed(Sealed::Snapshot);
                        broken()
                    })?;
                    self.metrics.opened(Sealed::Snapshot, 1);
                    let state = serde_json::from_slice(&plain).map_err(|_| broken())?;
                    (Some(state), PersonalData::Decrypted)
                }
            }
            (None, Some(text)) => (
                Some(serde_json::from_str(text).map_err(|_| corrupt())?),
                PersonalData::None,
            ),
            (None, None) => return Err(corrupt()),
        };
        Ok(SnapshotRead {
            version: row.version as u64,
            subject: row.subject,
            state,
            personal_data,
            recorded_at_us: row.recorded_at,
        })
    }

    /// Writes an audit record; returns once it is durable.
    pub async fn audit(&self, entry: AuditEntry) -> Result<(), ServiceError> {
        Ok(self.writer.audit(entry).await?)
    }

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
            if v == 0 || v > current {
                return Err(ServiceError::NoSuchVersion { current });
            }
            current = v;
        }
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
            let v = last.version as u64;
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
                cursor = last.position as u64;
            }
            visible.extend(
                rows.into_iter()
                    .filter(|r| grants.read_view(&r.stream_id).is_some()),
            );
            if visible.len() >= limit_rows || fetched < limit_rows || scanned >= MAX_LOG_SCAN {
                break;
            }
        }
        if visible.len() > limit_rows {
            visible.truncate(limit_rows);
            cursor = visible.last().map_or(cursor, |r| r.position as u64);
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
        subject: &str,
        after: u64,
        until: u64,
        limit: u32,
        grants: &Grants,
    ) -> Result<(Vec<ReadEvent>, usize, u64), ServiceError> {
        let rows = self
            .store
            .read_subject(subject, after, until, limit)
            .await?;
        let (read, last) = (rows.len(), rows.last().map_or(after, |r| r.position as u64));
        Ok((
            self.open_all(rows, grants, ReadKind::Export).await?,
            read,
            last,
        ))
    }

    /// A handle on the log's tail: it moves when committed events (by this
    /// process or, on PostgreSQL, any other) have been read into it.
    pub fn follow(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writer.feed().tail().follow()
    }

    /// The newest audit record this process committed: `changed()`
    /// completes when another one has.
    pub fn audit_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writer.audit_head()
    }

    /// Moves whenever a forget (here or, on PostgreSQL, in another process)
    /// has dropped the rows of the log held in memory.
    pub fn tail_clears(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writer.feed().tail_clears()
    }

    /// A handle on the commit feed: it moves as soon as events commit (the
    /// broker relay follows it).
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writer.feed().follow()
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
        let next = rows.last().map_or(after, |r| r.position as u64);
        let visible = rows
            .iter()
            .filter(|r| grants.read_view(&r.stream_id).is_some())
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
            .mentions(stream.as_str(), after)
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
    async fn key_fate(
        &self,
        key_id: &str,
        subject: &str,
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
    async fn open_all(
        &self,
        rows: Vec<StoredEvent>,
        grants: &Grants,
        how: ReadKind,
    ) -> Result<Vec<ReadEvent>, ServiceError> {
        let rows: Vec<(StoredEvent, bool)> = rows
            .into_iter()
            .filter_map(|r| {
                let view = grants.view(how, &r.stream_id)?;
                Some((r, view == View::Revealed))
            })
            .collect();
        let mut deks: HashMap<String, KeyFate> = HashMap::new();
        // Keys are needed only where personal data is shown; a subject in the
        // forget ledger is erased whatever a cache or a not yet finished key
        // deletion still holds, so its keys are not even looked up.
        for (r, _) in rows.iter().filter(|(r, reveal)| *reveal && !r.forgotten) {
            if let (Some(k), Some(subject)) = (&r.key_id, &r.subject)
                && !deks.contains_key(k)
            {
                let fate = self.key_fate(k, subject, r.position as u64).await?;
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

/// The answer to a snapshot the store did not save.
fn snapshot_refusal(r: SnapshotRefusal) -> ServiceError {
    match r {
        SnapshotRefusal::NoSuchVersion { current } => ServiceError::NoSuchVersion { current },
        SnapshotRefusal::Older { stored } => ServiceError::OlderSnapshot { stored },
        SnapshotRefusal::Forgotten(s) => ServiceError::Rejected(AppendRejection::Forgotten(s)),
    }
}

/// Splits `data` into clear and personal fields and seals the personal ones.
fn seal_event(
    policies: &Policies,
    stream: &str,
    keys: &HashMap<String, ActiveKey>,
    e: ProposedEvent,
) -> Result<PendingEvent, ServiceError> {
    let to_json = |m: &Map<String, Value>| serde_json::to_string(m).expect("JSON values serialise");
    let metadata = to_json(&e.metadata);
    let event_type = e.event_type.as_str().to_owned();
    // Without a subject nothing is personal: everything is stored as given
    // (for a classified type, `append` has checked that all of it is clear).
    let key = e.subject.as_ref().map(|s| &keys[s.as_str()]);
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
                stream_id: stream,
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
        id: e.id,
        event_type,
        subject: e.subject.map(|s| s.as_str().to_owned()),
        key_id,
        data: to_json(&clear),
        sealed,
        metadata,
    })
}

fn corrupt(what: &str, position: i64) -> ServiceError {
    ServiceError::Store(StoreError::Corrupt(format!(
        "{what} of the event at position {position}"
    )))
}

/// What became of a data key a reader needs.
enum KeyFate {
    /// Here it is.
    Open(Arc<Dek>),
    /// Destroyed by a forget.
    Erased,
    /// Missing from the keystore; an operator accepted the loss.
    Lost,
}

/// Opens one stored event for a reader. `deks` holds the fate of the key of
/// every revealed row of a subject not forgotten.
fn open_event(
    r: StoredEvent,
    reveal: bool,
    deks: &HashMap<String, KeyFate>,
) -> Result<ReadEvent, ServiceError> {
    let mut data: Map<String, Value> =
        serde_json::from_str(&r.data).map_err(|_| corrupt("data", r.position))?;
    let metadata: Map<String, Value> =
        serde_json::from_str(&r.metadata).map_err(|_| corrupt("metadata", r.position))?;
    let id = Uuid::parse_str(&r.event_id).map_err(|_| corrupt("id", r.position))?;
    let personal_data = match (&r.sealed, &r.key_id) {
        (Some(_), Some(_)) if r.forgotten => PersonalData::Erased,
        (Some(_), Some(_)) if !reveal => PersonalData::Redacted,
        (Some(blob), Some(key_id)) => match deks.get(key_id) {
            // Looked up for every revealed row of a subject not forgotten.
            None => return Err(corrupt("key of", r.position)),
            Some(KeyFate::Erased) => PersonalData::Erased,
            Some(KeyFate::Lost) => PersonalData::Lost,
            Some(KeyFate::Open(dek)) => {
                let at = EventAad {
                    event_id: id.as_bytes(),
                    stream_id: &r.stream_id,
                    event_type: &r.event_type,
                    key_id,
                };
                let plain = dek
                    .open_event(blob, &at)
                    .map_err(|_| ServiceError::Integrity {
                        position: r.position as u64,
                    })?;
                let broken = || ServiceError::Integrity {
                    position: r.position as u64,
                };
                let personal: Map<String, Value> =
                    serde_json::from_slice(&plain).map_err(|_| broken())?;
                // Nested values were split member by member: put each piece
                // back where it was.
                crate::policy::merge(&mut data, personal).map_err(|_| broken())?;
                PersonalData::Decrypted
            }
        },
        _ => PersonalData::None,
    };
    Ok(ReadEvent {
        id,
        stream_id: StreamId::from_store(r.stream_id),
        version: r.version as u64,
        position: r.position as u64,
        event_type: r.event_type,
        subject: r.subject,
        data,
        metadata,
        recorded_at_us: r.recorded_at,
        personal_data,
    })
}
