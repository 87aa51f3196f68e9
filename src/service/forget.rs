use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use uuid::Uuid;

use super::{Events, ServiceError};
use crate::audit::AuditEntry;
use crate::domain::{EventId, ExpectedVersion, StreamId, Subject};
use crate::keys::DestructionLedger;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::writer::{AppendCommand, PendingEvent};
use crate::store::{EventStore, StoreError};

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
pub(super) struct PendingForgets {
    subjects: Mutex<BTreeSet<String>>,
    /// Wakes the background task when a subject is added.
    wake: tokio::sync::Notify,
    /// How many are pending, for whoever waits for it to change.
    pub(super) count: watch::Sender<usize>,
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
    pub(super) fn new(metrics: Metrics) -> Self {
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

    async fn turn(&self, subject: &Subject) -> ForgetTurn<'_> {
        let lock = self
            .turns
            .lock()
            .expect("turns lock")
            .entry(subject.as_str().to_owned())
            .or_default()
            .clone();
        ForgetTurn {
            pending: self,
            subject: subject.as_str().to_owned(),
            _held: lock.lock_owned().await,
        }
    }

    fn push(&self, subject: &Subject) {
        let n = {
            let mut s = self.subjects.lock().expect("pending lock");
            s.insert(subject.as_str().to_owned());
            s.len()
        };
        self.counted(n);
        self.wake.notify_one();
    }

    fn done(&self, subject: &Subject) {
        let n = {
            let mut s = self.subjects.lock().expect("pending lock");
            s.remove(subject.as_str());
            s.len()
        };
        self.counted(n);
    }

    /// The pending subject after `after` in name order, wrapping round to
    /// the first.
    fn next(&self, after: &str) -> Option<Subject> {
        use std::ops::Bound::{Excluded, Unbounded};
        let s = self.subjects.lock().expect("pending lock");
        s.range::<str, _>((Excluded(after), Unbounded))
            .next()
            .or_else(|| s.iter().next())
            .cloned()
            .map(Subject::from_store)
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
        subject: &Subject,
        key_ids: &[String],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.record_destroyed_keys(subject, key_ids)
    }
}

/// Keys deleted without being counted as a forget's (discarded keys that a
/// refused request made, which sealed nothing).
struct Uncounted;

impl DestructionLedger for Uncounted {
    async fn record_destroyed(&self, _: &Subject, _: &[String]) -> Result<(), StoreError> {
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
    async fn record_destroyed(
        &self,
        subject: &Subject,
        key_ids: &[String],
    ) -> Result<(), StoreError> {
        self.store.record_destroyed_keys(subject, key_ids).await?;
        if let Some(entry) = self.store.forgotten(subject).await? {
            (self.then)(entry.keys_destroyed());
        }
        Ok(())
    }
}

impl Events {
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
        subject: &Subject,
        reason: Option<&str>,
        audit: AuditEntry,
        recorded: impl Fn(&ForgetReport) + Send + Sync,
    ) -> Result<(ForgetReport, bool), ServiceError> {
        let recorded_now = self.store.record_forget(subject.as_str(), reason).await;
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
            keys_destroyed: entry.keys_destroyed(),
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
        subject: &Subject,
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
        self.finish_forget(subject, entry.keys_destroyed(), events_affected, audit)
            .await?;
        Ok(true)
    }

    /// Step 4: the `$subjects` event (no personal data: the pseudonymous
    /// subject id and counts) with its audit record, then the forget is
    /// marked complete.
    async fn finish_forget(
        &self,
        subject: &Subject,
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
            id: EventId::new(Uuid::new_v5(
                &SUBJECTS_LEDGER_IDS,
                subject.as_str().as_bytes(),
            )),
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
        subject: &Subject,
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
    pub(super) async fn discard_keys(&self, subject: &Subject) {
        // Not counted as destroyed by the forget: they sealed nothing.
        if let Err(e) = self.keys.destroy_subject(subject, &Uncounted, false).await {
            tracing::warn!(error = %e, "could not discard a key made for a forgotten subject");
        }
    }

    /// The audit record of a forget finished without a request (at start,
    /// or in the background).
    fn resume_record(subject: &Subject) -> AuditEntry {
        AuditEntry::by_the_service(
            "subject.forget.resume",
            format!("subject:{subject}"),
            crate::audit::Outcome::Ok,
            0,
        )
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
            after = last.subject.as_str().to_owned();
            let names: Vec<Subject> = page.iter().map(|e| e.subject.clone()).collect();
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
    pub async fn complete_pending_forgets(self, shutdown: Shutdown) {
        let mut wait = FORGET_RETRY_FIRST;
        let mut cursor = String::new();
        loop {
            if shutdown.connections_are_closed() {
                return;
            }
            let Some(subject) = self.forgets.next(&cursor) else {
                tokio::select! {
                    () = self.forgets.wake.notified() => continue,
                    () = tokio::time::sleep(FORGET_SWEEP) => {
                        self.sweep_unfinished_forgets().await;
                        continue;
                    }
                    () = shutdown.connections_closed() => return,
                }
            };
            cursor = subject.as_str().to_owned();
            let attempt = async {
                let _turn = self.forgets.turn(&subject).await;
                self.carry_out(&subject, Self::resume_record(&subject), &|_| {})
                    .await
            };
            let outcome = tokio::select! {
                r = attempt => r,
                () = shutdown.connections_closed() => return,
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
                        () = shutdown.connections_closed() => return,
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
                        Some(last) if page.len() == PAGE as usize => {
                            last.as_str().clone_into(&mut after);
                        }
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
            let record = AuditEntry::by_the_service(
                "keys.accept_missing",
                "keystore".into(),
                crate::audit::Outcome::Ok,
                lost.len() as u64,
            );
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
        subject: &Subject,
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
    pub async fn subject_snapshot_count(&self, subject: &Subject) -> Result<u64, ServiceError> {
        Ok(self.store.subject_snapshot_count(subject).await?)
    }
}
