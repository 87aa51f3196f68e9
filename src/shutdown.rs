//! One way for the service's background tasks to stop: a [`Shutdown`]
//! every task is spawned on and watches, and one tracker of them that
//! [`crate::app::Application::run_until`] waits on.
//!
//! A stop goes through three stages, in this order, each a cancellation
//! token (tokio-util's) that the tasks of that stage watch:
//!
//! 1. [`Shutdown::serving_ends`]: no new connection. Subscriptions end (so
//!    their connections can close); requests already received are still
//!    answered.
//! 2. [`Shutdown::connections_closed`]: the last connection is closed. The
//!    followers stop (the relay, the completion of forgets, the commit
//!    feed's and the key evictions' `LISTEN`, the log's tail reader), and
//!    the tasks that write what requests left to write finish it: the
//!    requests' own tasks (one answered 503 goes on), the aggregate audit
//!    records of requests without a valid token, the closing records of
//!    subscriptions, records written late.
//! 3. The writer, once every tracked task has ended (nobody can queue a
//!    write any more), commits what is queued and stops.
//!
//! Dropping the [`Application`](crate::app::Application) (or a start that
//! fails half-way) cancels all three at once: no task outlives it.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// The stop signal and the tracker of the background tasks.
#[derive(Clone, Debug)]
pub struct Shutdown {
    /// Cancels every stage: held by the application as a drop guard.
    all: CancellationToken,
    serving: CancellationToken,
    closed: CancellationToken,
    writer: CancellationToken,
    tasks: TaskTracker,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let all = CancellationToken::new();
        Self {
            serving: all.child_token(),
            closed: all.child_token(),
            writer: all.child_token(),
            all,
            tasks: TaskTracker::new(),
        }
    }

    /// Cancels every stage when dropped (unless [`DropGuard::disarm`]ed).
    pub fn guard(&self) -> DropGuard {
        self.all.clone().drop_guard()
    }

    /// Spawns a tracked task: [`Shutdown::finish`] waits for it.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Spawns a tracked task that is dropped where it waits once the last
    /// connection is closed (stage 2): for followers, which any await point
    /// may stop.
    pub fn spawn_follower<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.connections_closed();
        self.tasks.spawn(async move {
            tokio::select! {
                () = stop => {}
                () = task => {}
            }
        })
    }

    /// Stage 1: completes once serving ends.
    pub fn serving_ends(&self) -> WaitForCancellationFutureOwned {
        self.serving.clone().cancelled_owned()
    }

    /// Whether serving has ended.
    pub fn is_stopping(&self) -> bool {
        self.serving.is_cancelled()
    }

    /// Stage 2: completes once the last connection is closed.
    pub fn connections_closed(&self) -> WaitForCancellationFutureOwned {
        self.closed.clone().cancelled_owned()
    }

    /// Whether the last connection is closed.
    pub fn connections_are_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Stage 3: completes when the writer is to commit what is queued and
    /// stop.
    pub(crate) fn writer_stops(&self) -> WaitForCancellationFutureOwned {
        self.writer.clone().cancelled_owned()
    }

    /// Ends serving (stage 1).
    pub fn stop_serving(&self) {
        self.serving.cancel();
    }

    /// Every stage at once, as dropping the application does.
    pub fn stop_all(&self) {
        self.all.cancel();
    }

    /// After the last connection closed: stage 2, then waits for every
    /// tracked task, then stage 3, and waits for `writer`.
    pub async fn finish(&self, writer: JoinHandle<()>) {
        self.serving.cancel();
        self.closed.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.writer.cancel();
        if writer.await.is_err() {
            tracing::error!("the writer task panicked");
        }
    }
}
