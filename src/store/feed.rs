//! The commit feed: the newest committed position of the global log, for
//! everything that follows the log live (subscriptions, the broker relay).
//!
//! One feed per process. The group-commit writer advances it after each
//! commit; on PostgreSQL the writer also sends `NOTIFY` in its transaction
//! (delivered only if it commits) and one listener per process advances the
//! feed for the commits of other processes. Followers wait on the feed and
//! read the store only when it moved: an idle follower costs nothing, and no
//! follower polls the database.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Db, EventStore};

/// The PostgreSQL channel of commit notices; the payload is the position.
pub const COMMIT_CHANNEL: &str = "eventvault_commits";

/// The newest committed position, shared by the writer and the followers.
#[derive(Clone, Debug)]
pub struct Feed {
    tx: Arc<watch::Sender<u64>>,
}

impl Feed {
    /// A feed starting at `head` (the store's newest position).
    pub fn new(head: u64) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(head)),
        }
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

    /// How many followers there are now.
    pub fn followers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// On a PostgreSQL event store, advances `feed` with the commits of every
/// process sharing the database (`LISTEN`). While the connection is down
/// notices are lost, so after every (re)connection the feed is set from the
/// store's head and every follower is woken to look. The task ends with the
/// last handle of the pool.
pub fn follow_other_processes(store: &EventStore, feed: &Feed) {
    let Db::Postgres(pool) = &store.db else {
        return;
    };
    let pool = pool.clone();
    let store = store.clone();
    let feed = feed.clone();
    tokio::spawn(async move {
        loop {
            if pool.is_closed() {
                return;
            }
            let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(COMMIT_CHANNEL).await {
                    Ok(()) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for commits; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
                Err(_) if pool.is_closed() => return,
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
    match store.head_position().await {
        Ok(head) => feed.advance(head),
        Err(e) => tracing::warn!(error = %e, "cannot read the head of the log"),
    }
    feed.nudge();
}
