//! The commit feed: the newest committed position of the global log, for
//! everything that follows the log live (subscriptions, the broker relay).
//!
//! One feed per process. The group-commit writer advances it after each
//! commit; on PostgreSQL the writer also sends `NOTIFY` in its transaction
//! (delivered only if it commits) and one listener per process advances the
//! feed for the commits of other processes. Followers wait on the feed and
//! read the store only when it moved: an idle follower costs nothing, and no
//! follower polls the database.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{Db, EventStore, StoredEvent};
use crate::domain::StreamId;
use crate::shutdown::Shutdown;

/// The PostgreSQL channel of commit notices; the payload is the position.
pub const COMMIT_CHANNEL: &str = "eventvault_commits";

/// Rows the tail keeps in memory, and about how many bytes at most.
const TAIL_ROWS: usize = 8192;
const TAIL_BYTES: usize = 64 << 20;

/// The newest committed position, shared by the writer and the followers,
/// and the [`Tail`] of the log.
#[derive(Clone, Debug)]
pub struct Feed {
    tx: Arc<watch::Sender<u64>>,
    tail: Arc<Tail>,
}

impl Feed {
    /// A feed starting at `head` (the store's newest position).
    pub fn new(head: u64) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(head)),
            tail: Arc::new(Tail {
                inner: Mutex::new(TailRows::default()),
                ready: watch::Sender::new(head),
                clears: watch::Sender::new(0),
            }),
        }
    }

    /// The newest rows of the log, read once for every follower.
    pub fn tail(&self) -> &Tail {
        &self.tail
    }

    /// A forget was recorded: rows in memory carry an older answer to "is
    /// the subject forgotten", so they are dropped and followers read the
    /// store (which reads the ledger with the rows) until the tail refills.
    pub fn forget_recorded(&self) {
        self.tail.clear();
        self.tail.clears.send_modify(|n| *n += 1);
    }

    /// Moves the feed to `position` if that is newer; wakes every follower.
    pub fn advance(&self, position: u64) {
        self.tx.send_if_modified(|head| {
            if position > *head {
                *head = position;
                true
            } else {
                false
            }
        });
    }

    /// Wakes every follower without news: they re-read the store. Used when
    /// notices from other processes may have been lost.
    pub fn nudge(&self) {
        self.tx.send_modify(|_| {});
    }

    /// A follower's handle: `changed()` completes when the feed moves.
    pub fn follow(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// The newest committed position.
    pub fn head(&self) -> u64 {
        *self.tx.borrow()
    }

    /// `changed()` completes when a forget (or a possibly missed one) has
    /// dropped the tail since the last look: every follower reads what the
    /// ledger says from then on.
    pub fn tail_clears(&self) -> watch::Receiver<u64> {
        self.tail.clears.subscribe()
    }

    /// How many followers there are now.
    pub fn followers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// On a PostgreSQL event store, advances `feed` with the commits of every
/// process sharing the database (`LISTEN`). While the connection is down
/// notices are lost, so after every (re)connection the feed is set from the
/// store's head and every follower is woken to look. The task ends with
/// the last connection.
pub fn follow_other_processes(store: &EventStore, feed: &Feed, shutdown: &Shutdown) {
    let Db::Postgres(pool) = &store.db else {
        return;
    };
    let pool = pool.clone();
    let store = store.clone();
    let feed = feed.clone();
    shutdown.spawn_follower(async move {
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(COMMIT_CHANNEL).await {
                    Ok(()) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for commits; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for commits; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            catch_up(&store, &feed).await;
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => match n.payload().parse::<u64>() {
                        Ok(p) => feed.advance(p),
                        // A forget recorded by another process.
                        Err(_) if n.payload() == FORGET_NOTICE => feed.forget_recorded(),
                        Err(_) => catch_up(&store, &feed).await,
                    },
                    // The connection was lost and re-made: notices sent
                    // meanwhile are gone.
                    Ok(None) => catch_up(&store, &feed).await,
                    Err(_) => break,
                }
            }
        }
    });
}

async fn catch_up(store: &EventStore, feed: &Feed) {
    // A forget may have been missed too.
    feed.forget_recorded();
    match store.head_position().await {
        Ok(head) => feed.advance(head),
        Err(e) => tracing::warn!(error = %e, "cannot read the head of the log"),
    }
    feed.nudge();
}

/// The payload of the notice a forget sends on [`COMMIT_CHANNEL`].
pub const FORGET_NOTICE: &str = "forget";

/// The newest rows of the global log, read from the store once per commit
/// by one task ([`Tail::follow`]) for all subscribers: two hundred
/// subscribers cost one read per commit, not two hundred. A subscriber
/// whose cursor is older than the tail, or finds it cleared, reads the store.
#[derive(Debug)]
pub struct Tail {
    inner: Mutex<TailRows>,
    /// The newest position read into the tail; followers wait on it.
    ready: watch::Sender<u64>,
    /// How many times the tail was dropped because a forget may have been
    /// recorded (here, in another process, or while the notices of the
    /// other processes were not heard).
    clears: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct TailRows {
    /// Consecutive positions, oldest first.
    rows: VecDeque<Arc<StoredEvent>>,
    /// Bumped by every clear: a read that began before it is dropped.
    generation: u64,
    /// About how much memory the rows hold.
    bytes: usize,
}

/// About how much memory a row holds.
fn row_bytes(r: &StoredEvent) -> usize {
    200 + r.data.len()
        + r.metadata.len()
        + r.stream_id.as_str().len()
        + r.event_type.len()
        + r.sealed.as_ref().map_or(0, Vec::len)
}

impl Tail {
    /// A follower's handle: `changed()` completes when rows were added.
    pub fn follow(&self) -> watch::Receiver<u64> {
        self.ready.subscribe()
    }

    /// Up to `limit` rows after position `after`, ending once they hold
    /// `max_bytes` (at least one row), or `None` when the tail does not
    /// hold the row after `after` (too old, or cleared).
    pub fn after(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Option<Vec<Arc<StoredEvent>>> {
        let inner = self.inner.lock().expect("tail lock");
        let first = inner.rows.front()?.position.get();
        let last = inner.rows.back()?.position.get();
        if after.saturating_add(1) < first || after > last {
            return None;
        }
        let skip = (after + 1 - first) as usize;
        let mut bytes = 0;
        Some(
            inner
                .rows
                .iter()
                .skip(skip)
                .take(limit)
                .take_while(|r| {
                    let fits = bytes == 0 || bytes + row_bytes(r) <= max_bytes;
                    bytes += row_bytes(r);
                    fits
                })
                .cloned()
                .collect(),
        )
    }

    /// Whether a row of `stream` lies after position `after`; `None` when
    /// the tail does not hold every row after it.
    pub fn mentions(&self, stream: &StreamId, after: u64) -> Option<bool> {
        let inner = self.inner.lock().expect("tail lock");
        let first = inner.rows.front().map_or(u64::MAX, |r| r.position.get());
        if after.saturating_add(1) < first && after < *self.ready.borrow() {
            return None;
        }
        Some(
            inner
                .rows
                .iter()
                .rev()
                .take_while(|r| r.position.get() > after)
                .any(|r| r.stream_id == *stream),
        )
    }

    fn clear(&self) {
        let mut inner = self.inner.lock().expect("tail lock");
        inner.rows.clear();
        inner.bytes = 0;
        inner.generation += 1;
    }

    /// Reads every commit into the tail, as `feed` announces them, until
    /// the last connection is closed (or the feed is dropped). A failed
    /// read is retried after a second.
    pub fn spawn_reader(feed: &Feed, store: EventStore, shutdown: &Shutdown) {
        let mut moved = feed.follow();
        let tail = feed.tail.clone();
        shutdown.spawn_follower(async move {
            let mut cursor = *tail.ready.borrow();
            loop {
                let head = *moved.borrow_and_update();
                if tail.ready.receiver_count() == 0 {
                    // Nobody follows: nothing is read. A subscriber that
                    // comes later reads the store until the tail refills.
                    tail.clear();
                    cursor = head;
                    tail.ready.send_replace(cursor);
                }
                while cursor < head {
                    let generation = tail.inner.lock().expect("tail lock").generation;
                    let rows = match store.read_all(cursor, 1000, None).await {
                        Ok(rows) => rows,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read new events; retrying in 1 s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    let Some(last) = rows.last().map(|r| r.position.get()) else {
                        break;
                    };
                    {
                        let mut inner = tail.inner.lock().expect("tail lock");
                        // Rows read before a clear may say "not forgotten"
                        // of a subject that now is: they are not kept.
                        if inner.generation == generation {
                            let contiguous =
                                inner.rows.back().is_none_or(|b| b.position.get() == cursor);
                            if !contiguous {
                                inner.rows.clear();
                                inner.bytes = 0;
                            }
                            for r in rows {
                                inner.bytes += row_bytes(&r);
                                inner.rows.push_back(Arc::new(r));
                            }
                            while inner.rows.len() > TAIL_ROWS || inner.bytes > TAIL_BYTES {
                                let Some(old) = inner.rows.pop_front() else {
                                    break;
                                };
                                inner.bytes -= row_bytes(&old);
                            }
                        }
                    }
                    cursor = last;
                    tail.ready.send_replace(cursor);
                }
                if moved.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventId, Position, Version};

    fn row(position: u64, stream: &str) -> StoredEvent {
        StoredEvent {
            position: Position::new(position),
            stream_id: id(stream),
            version: Version::new(position),
            event_id: EventId::new(uuid::Uuid::new_v4()),
            event_type: "Note".into(),
            subject: None,
            key_id: None,
            data: "{}".into(),
            sealed: None,
            metadata: "{}".into(),
            recorded_at: 0,
            forgotten: false,
        }
    }

    fn id(stream: &str) -> StreamId {
        StreamId::parse(stream).unwrap()
    }

    fn tail_with(head: u64, rows: &[(u64, &str)]) -> Tail {
        let tail = Tail {
            inner: Mutex::new(TailRows::default()),
            ready: watch::Sender::new(head),
            clears: watch::Sender::new(0),
        };
        tail.inner
            .lock()
            .unwrap()
            .rows
            .extend(rows.iter().map(|(p, s)| Arc::new(row(*p, s))));
        tail
    }

    fn positions(rows: Option<Vec<Arc<StoredEvent>>>) -> Option<Vec<u64>> {
        rows.map(|r| r.iter().map(|e| e.position.get()).collect())
    }

    #[test]
    fn the_tail_answers_only_for_what_it_holds() {
        let tail = tail_with(13, &[(10, "a"), (11, "b"), (12, "a"), (13, "c")]);
        let all = usize::MAX;
        assert_eq!(
            positions(tail.after(9, 10, all)),
            Some(vec![10, 11, 12, 13])
        );
        assert_eq!(positions(tail.after(11, 1, all)), Some(vec![12]));
        assert_eq!(positions(tail.after(13, 10, all)), Some(vec![]));
        // A byte budget ends the page, after at least one row.
        assert_eq!(positions(tail.after(9, 10, 1)), Some(vec![10]));
        assert_eq!(
            positions(tail.after(9, 10, 2 * row_bytes(&row(1, "a")))),
            Some(vec![10, 11])
        );
        // Older than the tail, or newer than it: the store must answer.
        assert_eq!(positions(tail.after(8, 10, all)), None);
        assert_eq!(positions(tail.after(14, 10, all)), None);
        assert_eq!(positions(tail.after(u64::MAX, 10, all)), None);

        assert_eq!(tail.mentions(&id("a"), 11), Some(true));
        assert_eq!(tail.mentions(&id("b"), 11), Some(false));
        assert_eq!(tail.mentions(&id("b"), 9), Some(true));
        assert_eq!(tail.mentions(&id("c"), 13), Some(false));
        assert_eq!(tail.mentions(&id("a"), 5), None, "rows 6..=9 are not held");

        tail.clear();
        assert_eq!(positions(tail.after(12, 10, usize::MAX)), None);
        assert_eq!(tail.mentions(&id("a"), 12), None);
        assert_eq!(
            tail.mentions(&id("a"), 13),
            Some(false),
            "nothing after the head"
        );
    }

    #[test]
    fn the_feed_only_moves_forward() {
        let feed = Feed::new(5);
        let mut f = feed.follow();
        feed.advance(3);
        assert!(!f.has_changed().unwrap());
        feed.advance(7);
        assert!(f.has_changed().unwrap());
        assert_eq!(*f.borrow_and_update(), 7);
        feed.nudge();
        assert!(f.has_changed().unwrap());
    }
}
