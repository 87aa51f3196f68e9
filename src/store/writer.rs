//! The group-commit writer: the only code that inserts events.
//!
//! Request handlers validate, classify and encrypt in parallel, then send an
//! [`AppendCommand`] here. One writer task per process takes whatever commands
//! are waiting, checks each against the stream versions and event ids it
//! reads once for the whole group (and against the commands before it in the
//! same group), writes all accepted events in one transaction, commits once,
//! and only then answers every waiter. Under load a single fsync thus serves
//! many requests; alone, a request pays for one commit as before.
//!
//! Audit records travel the same path: an append carries its record into the
//! transaction of its events (so an append and its audit record commit or
//! fail together), and a read hands its record over and waits until it is
//! durable before the response leaves. The records of a group are numbered
//! and hash-chained here, after the last record stored.
//!
//! Positions (and audit sequence numbers) are assigned here, in commit order and without gaps: on SQLite
//! `BEGIN IMMEDIATE` makes the transaction the only writer of the file; on
//! PostgreSQL a transaction-level advisory lock serialises the writers of all
//! eventvault processes sharing the database. The lock is released only after
//! the commit is visible, so a reader following positions can never see a
//! later position before an earlier one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{PgConnection, SqliteConnection};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::feed::{COMMIT_CHANNEL, Feed};
use super::tx::Tx;
use super::{Db, Fault, StoreError, audit, data_keys, now_us};
use crate::audit::{AuditEntry, AuditRecord, Outcome, seal_records};
use crate::domain::{AppendResult, ExpectedVersion, StreamId};
use crate::metrics::{Committed, Metrics};

/// Upper bound of events gathered into one transaction: keeps a commit's
/// latency and memory bounded however deep the queue gets.
const MAX_GROUP_EVENTS: usize = 10_000;

/// Capacity of the queue in front of the writer; senders wait when it is full
/// (back-pressure instead of unbounded memory).
const QUEUE_DEPTH: usize = 4096;

/// Key of the PostgreSQL advisory lock taken by every writer transaction.
/// Any constant works as long as every eventvault process uses the same one.
const PG_WRITER_LOCK: i64 = 0x6576_7661_756c_7401; // "evvault" + 1

/// One event ready to be stored: classified and, where personal, sealed.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub id: Uuid,
    pub event_type: String,
    pub subject: Option<String>,
    /// Id of the data key that sealed `sealed`; `None` when nothing is sealed.
    pub key_id: Option<String>,
    /// The clear fields of `data`, as JSON text.
    pub data: String,
    /// The personal fields, sealed under `key_id`.
    pub sealed: Option<Vec<u8>>,
    pub metadata: String,
}

/// One append request as the writer sees it.
#[derive(Debug)]
pub struct AppendCommand {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<PendingEvent>,
}

/// A successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Written now.
    Created(AppendResult),
    /// The very same event ids were appended before, in this order, to this
    /// stream: nothing was written, this is the original result.
    AlreadyAppended(AppendResult),
}

/// Why an append was refused; the group's other requests are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendRejection {
    #[error("stream is at version {current}")]
    WrongVersion { current: u64 },
    #[error("{0}")]
    IdsInUse(String),
    /// An event is about a subject that has been forgotten.
    #[error("subject {0:?} has been forgotten; no event about it is accepted")]
    Forgotten(String),
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Rejected(#[from] AppendRejection),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the writer has stopped")]
    Stopped,
}

/// One unit of work for the writer: an audit record, and the append it
/// describes if it describes one (the writer then fills in its outcome and
/// event count).
#[derive(Debug)]
pub struct Job {
    pub append: Option<AppendCommand>,
    pub audit: AuditEntry,
    /// The writer sets the record's outcome and event count from the append
    /// (`false`: the record says what it says, e.g. for a forget).
    pub describe_append: bool,
}

impl Job {
    fn size(&self) -> usize {
        1 + self.append.as_ref().map_or(0, |a| a.events.len())
    }
}

/// `None` for a job without an append.
type Reply = oneshot::Sender<Result<Option<Appended>, WriteError>>;

/// Whether the writer's transactions commit, as of its last group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The last group committed (or none was tried yet).
    Committing,
    /// The last group failed, because of this condition of the store if
    /// it was one.
    Failing(Option<Fault>),
}

/// The handle through which requests reach the writer task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<(Job, Reply)>,
    /// The longest a request waits for its group (queue and commit): past
    /// it the request is answered 503, while its work may still commit.
    timeout: std::time::Duration,
    /// As of the last group.
    health: watch::Receiver<Health>,
    /// Whether a group is in progress, since when.
    busy: Busy,
    /// The writer's database, for [`Writer::probe`].
    db: Db,
    /// Held by the one probe that may run at a time.
    probing: Arc<tokio::sync::Semaphore>,
    feed: Feed,
    /// Counts commits, their groups and each request's wait.
    metrics: Metrics,
    /// The sequence number of the newest audit record this writer committed
    /// (0: none yet); moves before the waiters of its group are answered.
    audit_head: watch::Receiver<u64>,
}

impl Writer {
    /// Starts the writer task on `db`; it ends once every handle is dropped
    /// and the queue is drained, so in-flight appends finish on shutdown.
    /// Every commit that writes events advances `feed`.
    /// A request waits at most `timeout` for its group.
    pub fn spawn(
        db: Db,
        feed: Feed,
        metrics: Metrics,
        timeout: std::time::Duration,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (head_tx, audit_head) = watch::channel(0);
        let (health_tx, health) = watch::channel(Health::Committing);
        let busy = Busy::default();
        let watches = Watches {
            busy: busy.clone(),
            audit_head: head_tx,
            health: health_tx,
        };
        let task = tokio::spawn(run(db.clone(), rx, feed.clone(), metrics.clone(), watches));
        let writer = Self {
            tx,
            timeout,
            health,
            busy,
            db,
            probing: Arc::new(tokio::sync::Semaphore::new(1)),
            feed,
            metrics,
            audit_head,
        };
        (writer, task)
    }

    /// The newest audit record this writer committed: `changed()`
    /// completes when another group with audit records has committed.
    pub fn audit_head(&self) -> watch::Receiver<u64> {
        self.audit_head.clone()
    }

    /// Whether the writer's last group committed; `Failing(None)` too
    /// while the current group has taken longer than a request may wait.
    pub fn health(&self) -> Health {
        if self.busy.for_longer_than(self.timeout) {
            return Health::Failing(None);
        }
        *self.health.borrow()
    }

    /// Whether a write commits now ([`probe_write`]), waiting at most
    /// `patience`: `None` when it did not finish in time, or an earlier
    /// probe is still waiting. The probe runs in a task of its own that is
    /// never cancelled midway, so that no connection goes back to the pool
    /// inside its transaction.
    pub async fn probe(&self, patience: std::time::Duration) -> Option<Result<(), StoreError>> {
        let permit = self.probing.clone().try_acquire_owned().ok()?;
        let db = self.db.clone();
        let probe = tokio::spawn(async move {
            let done = probe_write(&db).await;
            drop(permit);
            done
        });
        tokio::time::timeout(patience, probe).await.ok()?.ok()
    }

    /// The commit feed this writer advances.
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    async fn submit(&self, job: Job) -> Result<Option<Appended>, WriteError> {
        let (reply, answer) = oneshot::channel();
        // From the moment the request queues (a full queue is waiting too)
        // until its group is answered.
        let queued = std::time::Instant::now();
        let deadline = tokio::time::Instant::from_std(queued) + self.timeout;
        // A writer stuck on a store that does not answer (a commit waiting
        // on a server that stopped responding) must not hold requests for
        // as long as it is stuck: past the deadline they are told so, while
        // what they queued stays queued and may still commit.
        let late = |maybe_committed| {
            WriteError::Store(StoreError::GroupCommit {
                fault: Some(Fault::Unreachable),
                maybe_committed,
            })
        };
        match tokio::time::timeout_at(deadline, self.tx.send((job, reply))).await {
            Err(_) => return Err(late(false)),
            Ok(sent) => sent.map_err(|_| WriteError::Stopped)?,
        }
        let answer = match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => return Err(late(true)),
            Ok(answer) => answer.map_err(|_| WriteError::Stopped)?,
        };
        self.metrics.commit_waited(queued.elapsed());
        answer
    }

    /// Queues `cmd` with its audit record and waits until its group has
    /// committed (or failed). A rejected append's record is committed too,
    /// with outcome `error`.
    pub async fn append(
        &self,
        cmd: AppendCommand,
        audit: AuditEntry,
    ) -> Result<Appended, WriteError> {
        self.append_job(cmd, audit, true).await
    }

    /// Appends `cmd` (a system event) with an audit record that describes
    /// something else (the request that caused it), in one transaction.
    pub async fn append_recorded(
        &self,
        cmd: AppendCommand,
        audit: AuditEntry,
    ) -> Result<Appended, WriteError> {
        self.append_job(cmd, audit, false).await
    }

    async fn append_job(
        &self,
        cmd: AppendCommand,
        audit: AuditEntry,
        describe_append: bool,
    ) -> Result<Appended, WriteError> {
        let appended = self
            .submit(Job {
                append: Some(cmd),
                audit,
                describe_append,
            })
            .await?;
        Ok(appended.expect("an append job is answered with its outcome"))
    }

    /// Queues an audit record and waits until it is durable.
    pub async fn audit(&self, audit: AuditEntry) -> Result<(), WriteError> {
        self.submit(Job {
            append: None,
            audit,
            describe_append: false,
        })
        .await
        .map(|_| ())
    }
}

/// Since when the writer has been working on its current group, if it is:
/// a group that takes far longer than any should (a lock held by another
/// connection, a server that stopped answering) makes the writer
/// unavailable before it has failed.
#[derive(Debug, Clone, Default)]
struct Busy(Arc<AtomicU64>);

impl Busy {
    /// Microseconds since the epoch; 0: idle.
    fn begin(&self) {
        self.0.store(now_us().max(1) as u64, Ordering::Release);
    }

    fn end(&self) {
        self.0.store(0, Ordering::Release);
    }

    fn for_longer_than(&self, limit: std::time::Duration) -> bool {
        let since = self.0.load(Ordering::Acquire);
        since != 0 && (now_us() as u64).saturating_sub(since) > limit.as_micros() as u64
    }
}

/// What the writer task tells the handles after every group.
struct Watches {
    /// Set while a group is in progress.
    busy: Busy,
    /// The newest audit record committed.
    audit_head: watch::Sender<u64>,
    health: watch::Sender<Health>,
}

async fn run(
    db: Db,
    mut rx: mpsc::Receiver<(Job, Reply)>,
    feed: Feed,
    metrics: Metrics,
    watches: Watches,
) {
    // The last audit record this process committed (or found): the chain
    // must still hold it when the next group is written.
    let mut anchor: Option<(u64, [u8; 32])> = None;
    while let Some(first) = rx.recv().await {
        let mut size = first.0.size();
        let mut group = vec![first];
        while size < MAX_GROUP_EVENTS {
            match rx.try_recv() {
                Ok(next) => {
                    size += next.0.size();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let (jobs, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let began = std::time::Instant::now();
        watches.busy.begin();
        let done = commit_group(&db, jobs, &mut anchor).await;
        watches.busy.end();
        match done {
            Ok((outcomes, head, mut counts)) => {
                if let Some(head) = head {
                    feed.advance(head);
                }
                if let Some((seq, _)) = anchor {
                    watches
                        .audit_head
                        .send_if_modified(|h| std::mem::replace(h, seq) != seq);
                }
                watches.health.send_if_modified(|h| {
                    std::mem::replace(h, Health::Committing) != Health::Committing
                });
                counts.took = began.elapsed();
                metrics.committed(counts);
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome.map_err(WriteError::from));
                }
            }
            Err(e) => {
                metrics.commit_failed(began.elapsed());
                tracing::error!(error = %e, requests = replies.len(), "group commit failed");
                let (fault, maybe_committed) = (e.error.fault(), e.maybe_committed);
                watches.health.send_replace(Health::Failing(fault));
                for reply in replies {
                    let _ = reply.send(Err(WriteError::Store(StoreError::GroupCommit {
                        fault,
                        maybe_committed,
                    })));
                }
            }
        }
    }
}

/// What the group's transaction found before deciding.
struct Snapshot {
    /// Number and hash of the last audit record.
    audit_head: (u64, [u8; 32]),
    head_position: u64,
    last_recorded_at: i64,
    versions: HashMap<String, u64>,
    existing: HashMap<Uuid, Existing>,
    /// Subjects of the group's events that are in the forget ledger.
    forgotten: std::collections::HashSet<String>,
}

/// Where an already stored (or already planned) event sits.
#[derive(Debug, Clone)]
struct Existing {
    stream_id: String,
    version: u64,
    position: u64,
    /// Index within its original append, and that append's size.
    append_index: u32,
    append_size: u32,
}

/// The rows one group will insert, column by column.
#[derive(Default)]
struct Rows {
    position: Vec<i64>,
    stream_id: Vec<String>,
    version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<String>,
    subject: Vec<Option<String>>,
    key_id: Vec<Option<String>>,
    data: Vec<String>,
    sealed: Vec<Option<Vec<u8>>>,
    metadata: Vec<String>,
    append_index: Vec<i32>,
    append_size: Vec<i32>,
}

impl Rows {
    /// The data keys the group's sealed events refer to, for the key
    /// registry (written in the group's transaction).
    fn key_refs(&self) -> Vec<data_keys::KeyRef<'_>> {
        self.key_id
            .iter()
            .zip(&self.subject)
            .filter_map(|(k, s)| {
                Some(data_keys::KeyRef {
                    key_id: k.as_deref()?,
                    subject: s.as_deref()?,
                })
            })
            .collect()
    }
}

/// One job's outcome: `None` for a job without an append.
type Outcomes = Vec<Result<Option<Appended>, AppendRejection>>;

/// The group's decisions: one outcome per job, the rows to insert, each
/// touched stream's new version and the chained audit records.
struct Plan {
    outcomes: Outcomes,
    rows: Rows,
    streams: Vec<(String, i64)>,
    recorded_at: i64,
    audit: Vec<AuditRecord>,
}

/// Decides every job of the group in order, as if each had been its own
/// transaction: later appends see the versions and ids of earlier ones.
fn plan(jobs: Vec<Job>, mut snap: Snapshot) -> Plan {
    let mut rows = Rows::default();
    let mut touched: Vec<String> = Vec::new();
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut entries = Vec::with_capacity(jobs.len());
    for job in jobs {
        let Job {
            append,
            mut audit,
            describe_append,
        } = job;
        let Some(cmd) = append else {
            outcomes.push(Ok(None));
            entries.push(audit);
            continue;
        };
        let cmd = &cmd;
        let outcome = decide(cmd, &snap);
        if describe_append {
            (audit.outcome, audit.event_count) = match &outcome {
                Ok(Appended::Created(_)) => (Outcome::Ok, cmd.events.len() as u64),
                Ok(Appended::AlreadyAppended(_)) => (Outcome::Ok, 0),
                Err(_) => (Outcome::Error, 0),
            };
        }
        entries.push(audit);
        if let Ok(Appended::Created(r)) = &outcome {
            let stream = cmd.stream.as_str();
            for (i, e) in cmd.events.iter().enumerate() {
                let (version, position) = (r.first_version + i as u64, r.first_position + i as u64);
                let (append_index, append_size) = (i as u32, cmd.events.len() as u32);
                snap.existing.insert(
                    e.id,
                    Existing {
                        stream_id: stream.to_owned(),
                        version,
                        position,
                        append_index,
                        append_size,
                    },
                );
                rows.position.push(position as i64);
                rows.stream_id.push(stream.to_owned());
                rows.version.push(version as i64);
                rows.event_id.push(e.id);
                rows.event_type.push(e.event_type.clone());
                rows.subject.push(e.subject.clone());
                rows.key_id.push(e.key_id.clone());
                rows.data.push(e.data.clone());
                rows.sealed.push(e.sealed.clone());
                rows.metadata.push(e.metadata.clone());
                rows.append_index.push(append_index as i32);
                rows.append_size.push(append_size as i32);
            }
            snap.versions.insert(stream.to_owned(), r.last_version);
            if !touched.iter().any(|s| s == stream) {
                touched.push(stream.to_owned());
            }
            snap.head_position = r.last_position;
        }
        outcomes.push(outcome.map(Some));
    }
    let streams = touched
        .into_iter()
        .map(|s| {
            let v = snap.versions[&s] as i64;
            (s, v)
        })
        .collect();
    // Times strictly increase along the log, even if the clock steps back, so
    // that an `as_of` read is always a prefix of the log and every commit's
    // time names exactly the state after it.
    let recorded_at = now_us().max(snap.last_recorded_at + 1);
    let (head_seq, head_hash) = snap.audit_head;
    Plan {
        outcomes,
        rows,
        streams,
        recorded_at,
        audit: seal_records(head_seq, head_hash, recorded_at, entries),
    }
}

fn decide(cmd: &AppendCommand, snap: &Snapshot) -> Result<Appended, AppendRejection> {
    let known: Vec<&Existing> = cmd
        .events
        .iter()
        .filter_map(|e| snap.existing.get(&e.id))
        .collect();
    if !known.is_empty() {
        return replay(cmd, &known);
    }
    if let Some(s) = cmd
        .events
        .iter()
        .filter_map(|e| e.subject.as_ref())
        .find(|s| snap.forgotten.contains(*s))
    {
        return Err(AppendRejection::Forgotten(s.clone()));
    }
    let current = snap.versions.get(cmd.stream.as_str()).copied().unwrap_or(0);
    if !cmd.expected.admits(current) {
        return Err(AppendRejection::WrongVersion { current });
    }
    let n = cmd.events.len() as u64;
    let first_position = snap.head_position + 1;
    Ok(Appended::Created(AppendResult {
        first_version: current + 1,
        last_version: current + n,
        first_position,
        last_position: first_position + n - 1,
    }))
}

/// Some of the command's ids exist already: it is an idempotent retry only if
/// all of them do, in this stream, in this order, one after the other.
fn replay(cmd: &AppendCommand, known: &[&Existing]) -> Result<Appended, AppendRejection> {
    let stream = cmd.stream.as_str();
    // The other stream is not named: the caller may have no right to know it.
    if known.iter().any(|e| e.stream_id != stream) {
        return Err(AppendRejection::IdsInUse(
            "event ids of this append are already used in another stream".into(),
        ));
    }
    if known.len() != cmd.events.len() {
        return Err(AppendRejection::IdsInUse(format!(
            "{} of the {} event ids of this append were appended before; a retry must repeat the original append exactly",
            known.len(),
            cmd.events.len()
        )));
    }
    let first = known[0];
    let in_order = known.iter().enumerate().all(|(i, e)| {
        e.append_index as usize == i
            && e.append_size as usize == known.len()
            && e.version == first.version + i as u64
            && e.position == first.position + i as u64
    });
    if !in_order {
        return Err(AppendRejection::IdsInUse(
            "these event ids were appended before in another order or grouping; a retry must repeat the original append exactly".into(),
        ));
    }
    let last = known[known.len() - 1];
    Ok(Appended::AlreadyAppended(AppendResult {
        first_version: first.version,
        last_version: last.version,
        first_position: first.position,
        last_position: last.position,
    }))
}

/// Why a group's transaction failed.
#[derive(Debug)]
struct GroupFailure {
    error: StoreError,
    /// The failure came while committing and the connection was lost: the
    /// commit may have reached the database (PostgreSQL). On SQLite a
    /// failed commit has not committed.
    maybe_committed: bool,
}

impl std::fmt::Display for GroupFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)?;
        if self.maybe_committed {
            f.write_str(" (while committing: the outcome is unknown)")?;
        }
        Ok(())
    }
}

impl From<StoreError> for GroupFailure {
    fn from(error: StoreError) -> Self {
        Self {
            error,
            maybe_committed: false,
        }
    }
}

impl From<sqlx::Error> for GroupFailure {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from(e).into()
    }
}

/// Commits one small write (a row of `write_probe`) in a transaction of its
/// own, as the writer would: whether writes can commit now. Readiness asks
/// it while the writer's last group failed, so that it reports recovery
/// (space freed, the database back) without waiting for an append.
async fn probe_write(db: &Db) -> Result<(), StoreError> {
    const PROBE: &str = "insert into write_probe (id, probed_at) values (1, $1)
         on conflict (id) do update set probed_at = excluded.probed_at";
    match db {
        Db::Sqlite(pool) => {
            let mut tx = Tx::begin(pool, "begin immediate").await?;
            sqlx::query(PROBE).bind(now_us()).execute(tx.conn()).await?;
            tx.commit().await?;
        }
        Db::Postgres(pool) => {
            let mut tx = Tx::begin(pool, "begin").await?;
            // The writer's lock too: a writer stuck holding it means writes
            // do not commit, whatever else the database still does.
            sqlx::query("select pg_advisory_xact_lock($1)")
                .bind(PG_WRITER_LOCK)
                .execute(tx.conn())
                .await?;
            sqlx::query(PROBE).bind(now_us()).execute(tx.conn()).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

/// The group's transaction on SQLite: `begin immediate` makes it the only
/// writer of the file from its first statement.
async fn sqlite_group(
    pool: &sqlx::SqlitePool,
    jobs: Vec<Job>,
    anchor: Option<(u64, [u8; 32])>,
) -> Result<Plan, GroupFailure> {
    let mut tx = Tx::begin(pool, "begin immediate").await?;
    let c = tx.conn();
    let cmds: Vec<&AppendCommand> = jobs.iter().filter_map(|j| j.append.as_ref()).collect();
    let snap = sqlite_snapshot(c, &cmds).await?;
    let kept = match anchor {
        Some((seq, _)) if seq < snap.audit_head.0 => audit::sqlite_hash_at(c, seq).await?,
        _ => None,
    };
    audit::check_anchor(anchor, snap.audit_head, kept)?;
    let plan = plan(jobs, snap);
    sqlite_write(c, &plan).await?;
    audit::sqlite_insert(c, &plan.audit).await?;
    // A SQLite commit that fails has not committed.
    tx.commit().await?;
    Ok(plan)
}

/// The group's transaction on PostgreSQL, under the writers' advisory lock.
async fn pg_group(
    pool: &sqlx::PgPool,
    jobs: Vec<Job>,
    anchor: Option<(u64, [u8; 32])>,
) -> Result<Plan, GroupFailure> {
    let mut tx = Tx::begin(pool, "begin").await?;
    let c = tx.conn();
    let cmds: Vec<&AppendCommand> = jobs.iter().filter_map(|j| j.append.as_ref()).collect();
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(PG_WRITER_LOCK)
        .execute(&mut *c)
        .await?;
    let snap = pg_snapshot(c, &cmds).await?;
    let kept = match anchor {
        Some((seq, _)) if seq < snap.audit_head.0 => audit::pg_hash_at(c, seq).await?,
        _ => None,
    };
    audit::check_anchor(anchor, snap.audit_head, kept)?;
    let plan = plan(jobs, snap);
    pg_write(c, &plan).await?;
    audit::pg_insert(c, &plan.audit).await?;
    if let Some(head) = plan.rows.position.last() {
        // Delivered to the other processes only if this commits.
        sqlx::query("select pg_notify($1, $2)")
            .bind(COMMIT_CHANNEL)
            .bind(head.to_string())
            .execute(&mut *c)
            .await?;
    }
    if let Err(e) = tx.commit().await {
        // An answer the server gave means it did not commit; a lost
        // connection leaves the outcome unknown.
        let error = StoreError::from(e);
        let maybe_committed = error.fault() == Some(Fault::Unreachable);
        return Err(GroupFailure {
            error,
            maybe_committed,
        });
    }
    Ok(plan)
}

/// Decides and writes one group in one transaction. A failed group's
/// transaction is rolled back and its connection closed (see
/// [`super::tx`]): the writer goes on with the next group.
async fn commit_group(
    db: &Db,
    jobs: Vec<Job>,
    anchor: &mut Option<(u64, [u8; 32])>,
) -> Result<(Outcomes, Option<u64>, Committed), GroupFailure> {
    let plan = match db {
        Db::Sqlite(pool) => sqlite_group(pool, jobs, *anchor).await?,
        Db::Postgres(pool) => pg_group(pool, jobs, *anchor).await?,
    };
    if let Some(last) = plan.audit.last() {
        *anchor = Some((last.seq, last.hash));
    }
    let head = plan.rows.position.last().map(|p| *p as u64);
    let mut counts = Committed {
        events: plan.rows.position.len() as u64,
        audit_records: plan.audit.len() as u64,
        requests: plan.outcomes.len() as u64,
        ..Committed::default()
    };
    for outcome in &plan.outcomes {
        match outcome {
            Ok(Some(Appended::Created(_))) => counts.created += 1,
            Ok(Some(Appended::AlreadyAppended(_))) => counts.already_appended += 1,
            Err(_) => counts.rejected += 1,
            Ok(None) => {}
        }
    }
    Ok((plan.outcomes, head, counts))
}

fn distinct_streams(cmds: &[&AppendCommand]) -> Vec<String> {
    let mut s: Vec<String> = cmds.iter().map(|c| c.stream.as_str().to_owned()).collect();
    s.sort();
    s.dedup();
    s
}

fn all_subjects(cmds: &[&AppendCommand]) -> Vec<String> {
    let mut s: Vec<String> = cmds
        .iter()
        .flat_map(|c| c.events.iter().filter_map(|e| e.subject.clone()))
        .collect();
    s.sort();
    s.dedup();
    s
}

fn all_ids(cmds: &[&AppendCommand]) -> Vec<Uuid> {
    cmds.iter()
        .flat_map(|c| c.events.iter().map(|e| e.id))
        .collect()
}

const HEAD_SQL: &str = "select position, recorded_at from events order by position desc limit 1";

/// An already stored event as the snapshot queries return it.
type ExistingRow = (String, String, i64, i64, i32, i32);

fn snapshot_from(
    audit_head: (u64, [u8; 32]),
    head: Option<(i64, i64)>,
    versions: Vec<(String, i64)>,
    existing: Vec<ExistingRow>,
    forgotten: Vec<String>,
) -> Result<Snapshot, StoreError> {
    let (head_position, last_recorded_at) = head.unwrap_or((0, 0));
    let existing = existing
        .into_iter()
        .map(
            |(id, stream_id, version, position, append_index, append_size)| {
                let id = Uuid::parse_str(&id)
                    .map_err(|_| StoreError::Corrupt(format!("event id {id:?} is not a uuid")))?;
                let (version, position) = (version as u64, position as u64);
                let (append_index, append_size) = (append_index as u32, append_size as u32);
                Ok((
                    id,
                    Existing {
                        stream_id,
                        version,
                        position,
                        append_index,
                        append_size,
                    },
                ))
            },
        )
        .collect::<Result<_, StoreError>>()?;
    Ok(Snapshot {
        audit_head,
        head_position: head_position as u64,
        last_recorded_at,
        versions: versions.into_iter().map(|(s, v)| (s, v as u64)).collect(),
        existing,
        forgotten: forgotten.into_iter().collect(),
    })
}

async fn sqlite_snapshot(
    tx: &mut SqliteConnection,
    cmds: &[&AppendCommand],
) -> Result<Snapshot, StoreError> {
    let audit_head = audit::sqlite_head(tx).await?;
    if cmds.is_empty() {
        // Only audit records: no event position or time is needed.
        return snapshot_from(audit_head, None, vec![], vec![], vec![]);
    }
    let head = sqlx::query_as(HEAD_SQL).fetch_optional(&mut *tx).await?;
    // SQLite has no array parameters: the id lists travel as one JSON array.
    let streams = serde_json::to_string(&distinct_streams(cmds)).expect("strings serialise");
    let versions = sqlx::query_as("select stream_id, version from streams where stream_id in (select value from json_each($1))")
        .bind(streams)
        .fetch_all(&mut *tx)
        .await?;
    let ids: Vec<String> = all_ids(cmds).iter().map(Uuid::to_string).collect();
    let existing = sqlx::query_as(
        "select event_id, stream_id, version, position, append_index, append_size
         from events where event_id in (select value from json_each($1))",
    )
    .bind(serde_json::to_string(&ids).expect("strings serialise"))
    .fetch_all(&mut *tx)
    .await?;
    let subjects = all_subjects(cmds);
    let forgotten = if subjects.is_empty() {
        vec![]
    } else {
        sqlx::query_scalar(
            "select subject from forgotten_subjects where subject in (select value from json_each($1))",
        )
        .bind(serde_json::to_string(&subjects).expect("strings serialise"))
        .fetch_all(&mut *tx)
        .await?
    };
    snapshot_from(audit_head, head, versions, existing, forgotten)
}

/// Two statements for the whole group, like the PostgreSQL path: the rows
/// travel as one JSON array, unpacked by `json_each`. Each statement is a
/// round trip to sqlx's SQLite worker thread, so one statement per row made
/// thread hand-offs, not SQLite, the cost of a group.
async fn sqlite_write(tx: &mut SqliteConnection, plan: &Plan) -> Result<(), StoreError> {
    if plan.streams.is_empty() {
        return Ok(());
    }
    let streams = serde_json::to_string(&plan.streams).expect("rows serialise");
    sqlx::query(
        "insert into streams (stream_id, version, created_at, updated_at)
         select value ->> 0, value ->> 1, $2, $2 from json_each($1) where true
         on conflict (stream_id) do update set version = excluded.version, updated_at = excluded.updated_at",
    )
    .bind(streams)
    .bind(plan.recorded_at)
    .execute(&mut *tx)
    .await?;
    let r = &plan.rows;
    let rows: Vec<serde_json::Value> = (0..r.position.len())
        .map(|i| {
            serde_json::json!([
                r.position[i],
                r.stream_id[i],
                r.version[i],
                r.event_id[i].to_string(),
                r.event_type[i],
                r.subject[i],
                r.key_id[i],
                r.data[i],
                r.sealed[i].as_ref().map(hex::encode),
                r.metadata[i],
                r.append_index[i],
                r.append_size[i],
            ])
        })
        .collect();
    sqlx::query(
        "insert into events (position, stream_id, version, event_id, event_type, subject, key_id, data, sealed, metadata,
                             recorded_at, append_index, append_size)
         select value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7,
                unhex(value ->> 8), value ->> 9, $2, value ->> 10, value ->> 11
         from json_each($1)",
    )
    .bind(serde_json::to_string(&rows).expect("rows serialise"))
    .bind(plan.recorded_at)
    .execute(&mut *tx)
    .await?;
    data_keys::register_key_refs(data_keys::Conn::Sqlite(tx), &plan.rows.key_refs()).await
}

async fn pg_snapshot(
    tx: &mut PgConnection,
    cmds: &[&AppendCommand],
) -> Result<Snapshot, StoreError> {
    let audit_head = audit::pg_head(tx).await?;
    if cmds.is_empty() {
        // Only audit records: no event position or time is needed.
        return snapshot_from(audit_head, None, vec![], vec![], vec![]);
    }
    let head = sqlx::query_as(HEAD_SQL).fetch_optional(&mut *tx).await?;
    let versions =
        sqlx::query_as("select stream_id, version from streams where stream_id = any($1)")
            .bind(distinct_streams(cmds))
            .fetch_all(&mut *tx)
            .await?;
    let existing = sqlx::query_as(
        "select event_id::text, stream_id, version, position, append_index, append_size
         from events where event_id = any($1)",
    )
    .bind(all_ids(cmds))
    .fetch_all(&mut *tx)
    .await?;
    let subjects = all_subjects(cmds);
    let forgotten = if subjects.is_empty() {
        vec![]
    } else {
        sqlx::query_scalar("select subject from forgotten_subjects where subject = any($1)")
            .bind(subjects)
            .fetch_all(&mut *tx)
            .await?
    };
    snapshot_from(audit_head, head, versions, existing, forgotten)
}

async fn pg_write(tx: &mut PgConnection, plan: &Plan) -> Result<(), StoreError> {
    if plan.streams.is_empty() {
        return Ok(());
    }
    let (names, versions): (Vec<&str>, Vec<i64>) =
        plan.streams.iter().map(|(s, v)| (s.as_str(), *v)).unzip();
    sqlx::query(
        "insert into streams (stream_id, version, created_at, updated_at)
         select s, v, $3, $3 from unnest($1::text[], $2::bigint[]) as t(s, v)
         on conflict (stream_id) do update set version = excluded.version, updated_at = excluded.updated_at",
    )
    .bind(names)
    .bind(versions)
    .bind(plan.recorded_at)
    .execute(&mut *tx)
    .await?;
    // One statement for the whole group: arrays per column, unnested.
    let r = &plan.rows;
    sqlx::query(
        "insert into events (position, stream_id, version, event_id, event_type, subject, key_id, data, sealed, metadata,
                             recorded_at, append_index, append_size)
         select p, s, v, i, t, sub, k, d, x, m, $11, ai, an
         from unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::bytea[], $10::text[], $12::int[], $13::int[])
              as u(p, s, v, i, t, sub, k, d, x, m, ai, an)",
    )
    .bind(&r.position)
    .bind(&r.stream_id)
    .bind(&r.version)
    .bind(&r.event_id)
    .bind(&r.event_type)
    .bind(&r.subject)
    .bind(&r.key_id)
    .bind(&r.data)
    .bind(&r.sealed)
    .bind(&r.metadata)
    .bind(plan.recorded_at)
    .bind(&r.append_index)
    .bind(&r.append_size)
    .execute(&mut *tx)
    .await?;
    data_keys::register_key_refs(data_keys::Conn::Postgres(tx), &r.key_refs()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(stream: &str, expected: ExpectedVersion, ids: &[u128]) -> AppendCommand {
        AppendCommand {
            stream: StreamId::parse(stream).unwrap(),
            expected,
            events: ids
                .iter()
                .map(|i| PendingEvent {
                    id: Uuid::from_u128(*i),
                    event_type: "T".into(),
                    subject: None,
                    key_id: None,
                    data: "{}".into(),
                    sealed: None,
                    metadata: "{}".into(),
                })
                .collect(),
        }
    }

    fn jobs(cmds: Vec<AppendCommand>) -> Vec<Job> {
        cmds.into_iter()
            .map(|c| Job {
                append: Some(c),
                audit: AuditEntry {
                    principal: None,
                    action: "events.append".into(),
                    resource: "stream".into(),
                    outcome: Outcome::Ok,
                    event_count: 0,
                    personal_data: false,
                    correlation_id: None,
                    causation_id: None,
                    purpose: None,
                    request_id: None,
                },
                describe_append: true,
            })
            .collect()
    }

    fn empty() -> Snapshot {
        Snapshot {
            audit_head: (0, crate::audit::GENESIS),
            head_position: 0,
            last_recorded_at: 0,
            versions: HashMap::new(),
            existing: HashMap::new(),
            forgotten: Default::default(),
        }
    }

    #[test]
    fn a_group_is_decided_in_order() {
        let cmds = vec![
            cmd("a", ExpectedVersion::Exact(0), &[1, 2]),
            cmd("a", ExpectedVersion::Exact(0), &[3]), // conflicts with the first
            cmd("a", ExpectedVersion::Exact(2), &[4]),
            cmd("b", ExpectedVersion::Exists, &[5]), // b does not exist
            cmd("a", ExpectedVersion::Any, &[1, 2]), // retry of the first
            cmd("b", ExpectedVersion::Any, &[2]),    // id used in a
        ];
        let p = plan(jobs(cmds), empty());
        assert_eq!(
            p.outcomes[0],
            Ok(Some(Appended::Created(AppendResult {
                first_version: 1,
                last_version: 2,
                first_position: 1,
                last_position: 2
            })))
        );
        assert_eq!(
            p.outcomes[1],
            Err(AppendRejection::WrongVersion { current: 2 })
        );
        assert_eq!(
            p.outcomes[2],
            Ok(Some(Appended::Created(AppendResult {
                first_version: 3,
                last_version: 3,
                first_position: 3,
                last_position: 3
            })))
        );
        assert_eq!(
            p.outcomes[3],
            Err(AppendRejection::WrongVersion { current: 0 })
        );
        assert_eq!(
            p.outcomes[4],
            Ok(Some(Appended::AlreadyAppended(AppendResult {
                first_version: 1,
                last_version: 2,
                first_position: 1,
                last_position: 2
            })))
        );
        assert!(matches!(p.outcomes[5], Err(AppendRejection::IdsInUse(_))));
        assert_eq!(p.rows.position, vec![1, 2, 3]);
        assert_eq!(p.streams, vec![("a".to_owned(), 3)]);
    }

    #[test]
    fn events_about_forgotten_subjects_are_refused_in_the_transaction() {
        let mut forgotten = cmd("a", ExpectedVersion::Any, &[1]);
        forgotten.events[0].subject = Some("gone".into());
        let mut other = cmd("a", ExpectedVersion::Any, &[2]);
        other.events[0].subject = Some("here".into());
        let mut snap = empty();
        snap.forgotten.insert("gone".into());
        let p = plan(jobs(vec![forgotten, other]), snap);
        assert_eq!(
            p.outcomes[0],
            Err(AppendRejection::Forgotten("gone".into()))
        );
        assert!(matches!(p.outcomes[1], Ok(Some(Appended::Created(_)))));
        assert_eq!(p.rows.position, vec![1]);
    }

    #[test]
    fn partial_or_reordered_retries_conflict() {
        let first = plan(
            jobs(vec![cmd("a", ExpectedVersion::Any, &[1, 2, 3])]),
            empty(),
        );
        assert!(first.outcomes[0].is_ok());
        let mut snap = empty();
        snap.head_position = 3;
        snap.versions.insert("a".into(), 3);
        for (i, id) in [1u128, 2, 3].iter().enumerate() {
            let (version, position) = (i as u64 + 1, i as u64 + 1);
            let e = Existing {
                stream_id: "a".into(),
                version,
                position,
                append_index: i as u32,
                append_size: 3,
            };
            snap.existing.insert(Uuid::from_u128(*id), e);
        }
        let p = plan(
            jobs(vec![
                cmd("a", ExpectedVersion::Any, &[1, 2]),
                cmd("a", ExpectedVersion::Any, &[2, 1, 3]),
                cmd("a", ExpectedVersion::Any, &[3, 9]),
                cmd("a", ExpectedVersion::Exact(0), &[1, 2, 3]),
            ]),
            snap,
        );
        assert!(
            matches!(p.outcomes[0], Err(AppendRejection::IdsInUse(_))),
            "a prefix of the original append is not a retry"
        );
        assert!(matches!(p.outcomes[1], Err(AppendRejection::IdsInUse(_))));
        assert!(matches!(p.outcomes[2], Err(AppendRejection::IdsInUse(_))));
        assert!(
            matches!(p.outcomes[3], Ok(Some(Appended::AlreadyAppended(_)))),
            "a retry wins over its stale expected version"
        );
        assert!(p.rows.position.is_empty());
        assert_eq!(
            p.audit
                .iter()
                .map(|r| (r.seq, r.entry.outcome))
                .collect::<Vec<_>>(),
            vec![
                (1, Outcome::Error),
                (2, Outcome::Error),
                (3, Outcome::Error),
                (4, Outcome::Ok)
            ],
            "every append is audited, rejected ones as errors"
        );
    }
}
