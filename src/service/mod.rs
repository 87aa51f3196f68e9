//! Commands and queries on events: the layer between HTTP and the store.
//!
//! On the way in it classifies each event's fields (clear or personal, per
//! `policies/classification.toml`), seals the personal ones under the
//! subject's key and hands the batch to the group-commit writer. On the way
//! out it opens sealed fields for readers allowed to see them and marks every
//! event with what happened to its personal data.
//!
//! Bulk crypto and JSON work runs on the blocking pool, off the async threads.

use std::sync::Arc;

use tokio::sync::watch;

use crate::audit::AuditEntry;
use crate::keys::{KeyError, KeyManager};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::store::writer::{AppendRejection, WriteError, Writer};
use crate::store::{EventStore, StoreError};

mod append;
mod forget;
mod read;
mod snapshot;

use self::forget::PendingForgets;
pub use self::forget::{ForgetReport, KeyCheck, KeysChecked, LedgerState, Reapplied, SubjectState};
pub use self::read::{AsOf, LogPage, StreamPage};
pub use self::snapshot::SnapshotRead;

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

    /// Writes an audit record; returns once it is durable.
    pub async fn audit(&self, entry: AuditEntry) -> Result<(), ServiceError> {
        Ok(self.writer.audit(entry).await?)
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
}
