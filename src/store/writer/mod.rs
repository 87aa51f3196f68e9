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

mod plan;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::{mpsc, oneshot, watch};

use self::plan::{Found, Outcomes, Plan, plan, snapshot_from};
use super::feed::Feed;
use super::tx::{Conn, DbTx, on_conn};
use super::{Db, Fault, StoreError, audit, now_us};
use crate::audit::AuditEntry;
use crate::domain::{AppendResult, EventId, ExpectedVersion, StreamId, Subject};
use crate::metrics::{Committed, Metrics};
use crate::shutdown::Shutdown;

/// Upper bound of events gathered into one transaction: keeps a commit's
/// latency and memory bounded however deep the queue gets.
const MAX_GROUP_EVENTS: usize = 10_000;

/// Capacity of the queue in front of the writer; senders wait when it is full
/// (back-pressure instead of unbounded memory).
const QUEUE_DEPTH: usize = 4096;

/// One event ready to be stored: classified and, where personal, sealed.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub id: EventId,
    pub event_type: String,
    pub subject: Option<Subject>,
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
    #[error("subject {:?} has been forgotten; no event about it is accepted", .0.as_str())]
    Forgotten(Subject),
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
    /// Starts the writer task on `db`; at the writer's stage of `shutdown`
    /// it stops taking writes, commits what is queued and ends, so in-flight
    /// appends finish on shutdown (it ends too once every handle is
    /// dropped). Every commit that writes events advances `feed`.
    /// A request waits at most `timeout` for its group.
    pub fn spawn(
        db: Db,
        feed: Feed,
        metrics: Metrics,
        timeout: std::time::Duration,
        shutdown: &Shutdown,
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
        let stop = shutdown.writer_stops();
        let task = tokio::spawn(run(
            db.clone(),
            rx,
            feed.clone(),
            metrics.clone(),
            watches,
            stop,
        ));
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
struct Busy(Arc<AtomicI64>);

impl Busy {
    /// Microseconds since the epoch; 0: idle.
    fn begin(&self) {
        self.0.store(now_us().max(1), Ordering::Release);
    }

    fn end(&self) {
        self.0.store(0, Ordering::Release);
    }

    fn for_longer_than(&self, limit: std::time::Duration) -> bool {
        let since = self.0.load(Ordering::Acquire);
        let limit = i64::try_from(limit.as_micros()).unwrap_or(i64::MAX);
        since != 0 && now_us().saturating_sub(since) > limit
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
    stop: impl Future<Output = ()>,
) {
    // The last audit record this process committed (or found): the chain
    // must still hold it when the next group is written.
    let mut anchor: Option<(u64, [u8; 32])> = None;
    let mut stop = std::pin::pin!(stop);
    let mut stopping = false;
    loop {
        let next = if stopping {
            rx.recv().await
        } else {
            tokio::select! {
                next = rx.recv() => next,
                () = &mut stop => {
                    // No write is taken any more; what is queued commits.
                    rx.close();
                    stopping = true;
                    continue;
                }
            }
        };
        let Some(first) = next else { break };
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
/// own, as the writer would (with the writers' lock on PostgreSQL: a writer
/// stuck holding it means writes do not commit, whatever else the database
/// still does): whether writes can commit now. Readiness asks it while the
/// writer's last group failed, so that it reports recovery (space freed,
/// the database back) without waiting for an append.
async fn probe_write(db: &Db) -> Result<(), StoreError> {
    let mut tx = DbTx::begin_writing(db).await?;
    if let Conn::Postgres(c) = tx.conn() {
        postgres::lock_writers(c).await?;
    }
    const PROBE: &str = "insert into write_probe (id, probed_at) values (1, $1)
         on conflict (id) do update set probed_at = excluded.probed_at";
    on_conn!(tx.conn(), |c| {
        sqlx::query(PROBE).bind(now_us()).execute(c).await?;
    });
    tx.commit().await?;
    Ok(())
}

/// The newest event's position and time, read by both backends' snapshots.
const HEAD_SQL: &str = "select position, recorded_at from events order by position desc limit 1";

/// One group's transaction: read what the decisions need, decide, write,
/// commit. On SQLite `begin immediate` makes it the only writer of the file
/// from its first statement; on PostgreSQL the writers' advisory lock does.
async fn group(
    db: &Db,
    jobs: Vec<Job>,
    anchor: Option<(u64, [u8; 32])>,
) -> Result<Plan, GroupFailure> {
    let mut tx = DbTx::begin_writing(db).await?;
    let cmds: Vec<&AppendCommand> = jobs.iter().filter_map(|j| j.append.as_ref()).collect();
    if let Conn::Postgres(c) = tx.conn() {
        postgres::lock_writers(c).await?;
    }
    let audit_head = audit::head(tx.conn()).await?;
    let snap = if cmds.is_empty() {
        // Only audit records: no event position or time is needed.
        snapshot_from(audit_head, None, Found::default())?
    } else {
        let head = on_conn!(tx.conn(), |c| sqlx::query_as(HEAD_SQL)
            .fetch_optional(c)
            .await?);
        let found = match tx.conn() {
            Conn::Sqlite(c) => sqlite::find(c, &cmds).await?,
            Conn::Postgres(c) => postgres::find(c, &cmds).await?,
        };
        snapshot_from(audit_head, head, found)?
    };
    let kept = match anchor {
        Some((seq, _)) if seq < snap.audit_head.0 => audit::hash_at(tx.conn(), seq).await?,
        _ => None,
    };
    audit::check_anchor(anchor, snap.audit_head, kept)?;
    let plan = plan(jobs, snap);
    match tx.conn() {
        Conn::Sqlite(c) => sqlite::write(c, &plan).await?,
        Conn::Postgres(c) => postgres::write(c, &plan).await?,
    }
    audit::insert(tx.conn(), &plan.audit).await?;
    if let (Conn::Postgres(c), Some(head)) = (tx.conn(), plan.rows.position.last()) {
        postgres::announce(c, *head).await?;
    }
    // A SQLite commit that fails has not committed; on PostgreSQL an
    // answer the server gave means it did not commit, but a lost
    // connection leaves the outcome unknown.
    let may_survive = matches!(tx, DbTx::Postgres(_));
    if let Err(e) = tx.commit().await {
        let error = StoreError::from(e);
        let maybe_committed = may_survive && error.fault() == Some(Fault::Unreachable);
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
    let plan = group(db, jobs, *anchor).await?;
    if let Some(last) = plan.audit.last() {
        *anchor = Some((last.seq, last.hash));
    }
    let head = plan.rows.position.last().map(|p| p.get());
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
