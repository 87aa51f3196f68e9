//! Live subscriptions as Server-Sent Events: `GET /events/subscribe` (the
//! global log; `id:` is the position) and `GET /streams/{stream}/subscribe`
//! (one stream; `id:` is the stream version).
//!
//! A subscription first catches up from the store, then waits on the
//! process's commit feed and reads what is new each time it moves (from the
//! tail of the log the feed keeps in memory, read once for all
//! subscribers, when it holds the rows). Both
//! phases read by cursor (position or version) from the store, so there is
//! no seam: nothing is skipped and nothing delivered twice. Every event goes
//! through the same read decision as `GET /events` (filtered, decrypted,
//! redacted or erased for this caller). The body is produced only as fast as
//! the client reads it; a client that stops reading is cut off by the
//! connection's write deadline (see `conn.rs`) and resumes with
//! `Last-Event-ID`.
//!
//! Audit: the request's record (`log.subscribe` / `stream.subscribe`) is
//! written when the subscription opens; every batch that carries personal
//! data in clear is recorded (`….deliver`) before it leaves; the close is
//! recorded (`….close`) with the number of events delivered.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::Deserialize;
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::disclosure::Audited;
use super::openapi::ReadStreamPath;
use super::problem::{ApiError, Problem};
use super::views::EventView;
use super::{AppState, MAX_CURSOR, cursor_param, path_id};
use crate::audit::{AuditEntry, Outcome};
use crate::domain::{PersonalData, ReadEvent, StreamId};
use crate::policy::{Grants, Permission, Policies};
use crate::principals::Principals;
use crate::service::{AsOf, Events, ServiceError};
use crate::shutdown::Shutdown;
use crate::store::Direction;

/// Events read at a time: from the tail in memory (and at most
/// [`PAGE_BYTES`] of them), or from the store.
const PAGE: u32 = 500;
const STORE_PAGE: u32 = 100;
const PAGE_BYTES: usize = 1 << 20;

/// A comment line is sent after this long without an event, so that
/// proxies and load balancers keep an idle subscription open.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(subscribe_log))
        .routes(routes!(subscribe_stream))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LogParams {
    /// Start after this position (default 0: from the start).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamParams {
    /// Start at this version (default 1).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    from: Option<u64>,
}

/// What the document says of a subscription's body: a generated client
/// cannot read it (it would wait for the end of an endless body), an SSE
/// client can.
const SSE_BODY: &str = "An endless `text/event-stream` (Server-Sent Events): read it with \
    an SSE client, not a generated one, which would wait for its end. Each event is an \
    `id:` line (the position; the version on a stream's subscription; send it back as \
    `Last-Event-ID` to resume) and a `data:` line holding \
    one `Event` as JSON; a `:heartbeat` comment comes every 15 s while nothing happens.";

// The document gives this as the schema of each event of a subscription,
// under `x-itemSchema` (see `item_schema`).
/// One Server-Sent Event of a subscription, as an SSE client reads it (the
/// stream itself is `id:`, `data:` and blank lines; heartbeats are
/// comments).
#[derive(ToSchema)]
#[allow(dead_code)]
struct SseEvent {
    /// The position (`/events/subscribe`) or the stream version
    /// (`/streams/{stream}/subscribe`): send it back as `Last-Event-ID`.
    #[schema(pattern = "^[0-9]{1,19}$")]
    id: String,
    /// Always `message`.
    event: Option<String>,
    /// The event, as JSON (the `Event` schema).
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// The schema of one event of a subscription, inline (an extension may
/// not refer to a component).
pub fn item_schema() -> serde_json::Value {
    serde_json::to_value(<SseEvent as utoipa::PartialSchema>::schema())
        .expect("a schema serialises")
}

/// The header a reconnecting client sends.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct ResumeHeaders {
    /// The `id:` of the last event received; wins over the query.
    #[param(rename = "Last-Event-ID", value_type = String, required = false, pattern = "^[0-9]{1,19}$")]
    last_event_id: Option<String>,
}

/// The `Last-Event-ID` header: the id of the last event the client got.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|id| *id <= MAX_CURSOR)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Last-Event-ID must be the id of an event (a number)".into(),
                    )
                })
        })
        .transpose()
}

/// Follows the global log live, as Server-Sent Events: each event's `id:`
/// is its position and its `data:` the event as `GET /events` shows it.
#[utoipa::path(
    get,
    path = "/events/subscribe",
    tag = "log",
    params(LogParams, ResumeHeaders),
    security(("bearer" = [])),
    responses(
        (status = 200, description = SSE_BODY, body = String,
            content_type = "text/event-stream"),
        (status = 503, description = "Too many open subscriptions, or the request could not \
            be audited", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn subscribe_log(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<LogParams>, QueryRejection>,
) -> Result<Audited, ApiError> {
    caller.require(Permission::Read, None)?;
    caller.require_purpose(None)?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    // The header wins over the query: it is what a reconnecting client sends.
    let after = cursor_param("after", p.after)?;
    let after = last_event_id(&headers)?.or(after).unwrap_or(0);
    caller.audit.set_resource(format!("positions:>{after}"));
    open(&state, caller, "log.subscribe", Cursor::Log { after })
}

/// Follows one stream live, as Server-Sent Events: each event's `id:` is its
/// version in the stream.
#[utoipa::path(
    get,
    path = "/streams/{stream}/subscribe",
    tag = "streams",
    params(ReadStreamPath, StreamParams, ResumeHeaders),
    security(("bearer" = [])),
    responses(
        (status = 200, description = SSE_BODY, body = String,
            content_type = "text/event-stream"),
        (status = 503, description = "Too many open subscriptions, or the request could not \
            be audited", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn subscribe_stream(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    params: Result<Query<StreamParams>, QueryRejection>,
) -> Result<Audited, ApiError> {
    let stream = path_id(path, StreamId::parse_to_read)?;
    caller.require(Permission::Read, Some(stream.as_str()))?;
    caller.require_purpose(Some(stream.as_str()))?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let from = cursor_param("from", p.from)?;
    let from = match last_event_id(&headers)? {
        Some(v) => v + 1,
        None => from.unwrap_or(1).max(1),
    };
    open(
        &state,
        caller,
        "stream.subscribe",
        Cursor::Stream {
            stream,
            from,
            checked: 0,
        },
    )
}

/// Where a subscription stands.
enum Cursor {
    /// The global log after this position.
    Log { after: u64 },
    /// One stream from this version on; every event of it up to position
    /// `checked` has been read.
    Stream {
        stream: StreamId,
        from: u64,
        checked: u64,
    },
}

fn open(
    state: &AppState,
    caller: Caller,
    action: &str,
    cursor: Cursor,
) -> Result<Audited, ApiError> {
    // Each subscription holds a slot until it ends; none left is a 503.
    let slot = state
        .subscriptions
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Unavailable("too many open subscriptions; retry later"))?;
    let counted = state.metrics.subscription_opened();
    let sub = Subscription {
        events: state.events.clone(),
        principals: state.principals.clone(),
        policies: state.policies.clone(),
        recheck: state.config.subscription_recheck,
        checked_at: Instant::now(),
        grants: caller.grants.clone(),
        cursor,
        feed: state.events.follow(),
        forgets: state.events.tail_clears(),
        shutdown: state.shutdown.clone(),
        queue: VecDeque::new(),
        caught_up: false,
        trail: Trail {
            events: state.events.clone(),
            shutdown: state.shutdown.clone(),
            template: caller.audit.entry(Outcome::Ok),
            action: action.to_owned(),
            delivered: 0,
            personal: false,
            ended: Outcome::Ok,
            _slot: slot,
            _open: counted,
        },
        caller,
    };
    let body = futures::stream::unfold(sub, |mut sub| async move {
        let event = sub.next().await?;
        Some((Ok::<_, Infallible>(event), sub))
    });
    Ok(Audited::subscription(
        Sse::new(body)
            .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
            .into_response(),
    ))
}

struct Subscription {
    events: Events,
    principals: Arc<Principals>,
    policies: Arc<Policies>,
    /// How often the caller is authenticated again.
    recheck: Duration,
    checked_at: Instant,
    caller: Caller,
    /// What the caller may read, as of the last check.
    grants: Grants,
    cursor: Cursor,
    feed: watch::Receiver<u64>,
    shutdown: Shutdown,
    /// Moves when a forget is recorded (here, or on PostgreSQL in another
    /// process): what is queued was decided before it.
    forgets: watch::Receiver<u64>,
    /// Read, audited, not yet sent.
    queue: VecDeque<ReadEvent>,
    /// The queue holds the last read before the head: once it is sent, wait.
    caught_up: bool,
    trail: Trail,
}

impl Subscription {
    /// The next event to send; `None` ends the subscription (shutdown, or a
    /// failure that is logged and recorded).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.forgets.has_changed().unwrap_or(false) {
                self.forgets.borrow_and_update();
                self.reread_queue();
            }
            if let Some(e) = self.queue.pop_front() {
                self.trail.delivered += 1;
                // Behind the newest commit by this much as it leaves; read
                // from the feed, not the store.
                let head = self.events.commit_head();
                self.events
                    .metrics()
                    .delivered(head.saturating_sub(e.position.get()));
                return Some(sse_event(&e, &self.cursor));
            }
            if self.shutdown.is_stopping() {
                return None;
            }
            if !self.still_allowed().await {
                return None;
            }
            if std::mem::take(&mut self.caught_up) {
                // The last read reached the head it was told of: no need to
                // ask the store again before the feed moves.
                if !self.wait().await {
                    return None;
                }
                continue;
            }
            // Marked seen before reading: a commit after this point wakes
            // the wait below even if the read already saw it.
            let seen = *self.feed.borrow_and_update();
            match self.fetch(seen).await {
                Ok(Fetched::More) => continue,
                Ok(Fetched::CaughtUp) if self.queue.is_empty() => {}
                // What was read is sent first; the wait comes after.
                Ok(Fetched::CaughtUp) => {
                    self.caught_up = true;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "a subscription failed and was closed");
                    self.trail.ended = Outcome::Error;
                    return None;
                }
            }
            if !self.wait().await {
                return None;
            }
        }
    }

    /// Drops what is queued and moves the cursor back to its first event,
    /// so that it is read again: a forget recorded since it was read may
    /// erase some of it, and a queued event would leave as it was decided
    /// before (its delivery record, already written, says more was shown
    /// than will be: on the safe side).
    fn reread_queue(&mut self) {
        let Some(first) = self.queue.front() else {
            return;
        };
        match &mut self.cursor {
            Cursor::Log { after } => *after = first.position.get() - 1,
            Cursor::Stream { from, checked, .. } => {
                *from = first.version.get();
                *checked = first.position.get() - 1;
            }
        }
        self.queue.clear();
        self.caught_up = false;
    }

    /// Waits until the feed moves or the caller is due to be checked again;
    /// `false` when the service stops.
    async fn wait(&mut self) -> bool {
        let due = self.recheck.saturating_sub(self.checked_at.elapsed());
        tokio::select! {
            moved = self.feed.changed() => moved.is_ok(),
            () = self.shutdown.serving_ends() => false,
            () = tokio::time::sleep(due) => true,
        }
    }

    /// Authenticates the caller again when due: a removed principal, or
    /// one whose roles no longer allow this subscription, is cut off (and
    /// the close recorded as `denied`); changed roles apply from now on.
    /// When the principals cannot be read, the subscription ends too (the
    /// close recorded as `error`): access that cannot be confirmed is not
    /// kept. The client resumes with `Last-Event-ID` once it can be.
    async fn still_allowed(&mut self) -> bool {
        if self.checked_at.elapsed() < self.recheck {
            return true;
        }
        self.checked_at = Instant::now();
        let stream = match &self.cursor {
            Cursor::Log { .. } => None,
            Cursor::Stream { stream, .. } => Some(stream.as_str()),
        };
        match self
            .caller
            .grants_now(&self.principals, &self.policies)
            .await
        {
            Ok(Some(grants)) if grants.allows(Permission::Read, stream) => {
                self.grants = grants;
                true
            }
            Ok(_) => {
                self.trail.ended = Outcome::Denied;
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not authenticate a subscriber again; the subscription ends");
                self.trail.ended = Outcome::Error;
                false
            }
        }
    }

    /// Reads what is new into the queue; `seen` is the feed's head when the
    /// read began, so every event up to it is visible to the read.
    async fn fetch(&mut self, seen: u64) -> Result<Fetched, ServiceError> {
        let batch = match &mut self.cursor {
            Cursor::Log { after } => {
                let page = self
                    .events
                    .read_all_live(*after, (PAGE, PAGE_BYTES, STORE_PAGE), &self.grants)
                    .await?;
                if page.next == *after {
                    return Ok(Fetched::CaughtUp);
                }
                // Rows of streams the caller may not read move the cursor
                // too, and are never sent.
                *after = page.next;
                let caught_up = page.next >= seen;
                (page.events, caught_up)
            }
            Cursor::Stream {
                stream,
                from,
                checked,
            } => {
                // Nothing of this stream committed since the last look:
                // the store need not be asked.
                if !self.events.may_have_news(stream, *checked) {
                    *checked = seen;
                    return Ok(Fetched::CaughtUp);
                }
                let page = self
                    .events
                    .read_stream(
                        stream,
                        Some(*from),
                        STORE_PAGE,
                        Direction::Forward,
                        AsOf::default(),
                        &self.grants,
                    )
                    .await;
                let events = match page {
                    Ok(p) => p.events,
                    // Not created yet: it may be, later.
                    Err(ServiceError::StreamNotFound) => {
                        *checked = seen;
                        return Ok(Fetched::CaughtUp);
                    }
                    Err(e) => return Err(e),
                };
                let Some(last) = events.last() else {
                    *checked = seen;
                    return Ok(Fetched::CaughtUp);
                };
                *from = last.version.get() + 1;
                // A short page ends at the stream's head, and the read saw
                // every commit up to `seen`.
                let caught_up = events.len() < STORE_PAGE as usize;
                if caught_up {
                    *checked = seen;
                }
                (events, caught_up)
            }
        };
        let (batch, caught_up) = batch;
        self.trail.deliver(&batch).await?;
        self.queue.extend(batch);
        Ok(if caught_up {
            Fetched::CaughtUp
        } else {
            Fetched::More
        })
    }
}

/// What a read of the store found.
enum Fetched {
    /// There may be more to read at once.
    More,
    /// Everything up to the head the read was told of has been read.
    CaughtUp,
}

fn sse_event(e: &ReadEvent, cursor: &Cursor) -> Event {
    let id = match cursor {
        Cursor::Log { .. } => e.position.get(),
        Cursor::Stream { .. } => e.version.get(),
    };
    let data = serde_json::to_string(&EventView::from(e)).expect("events serialise");
    Event::default().id(id.to_string()).data(data)
}

/// The audit records of a subscription after its opening one.
struct Trail {
    events: Events,
    /// Tracks the closing record's task, so that the service writes it
    /// before it stops.
    shutdown: Shutdown,
    /// The opening record, as the base of the later ones.
    template: AuditEntry,
    action: String,
    /// Events handed to the connection.
    delivered: u64,
    personal: bool,
    /// How the subscription ended: `ok`, or `denied` (the caller lost its
    /// access) or `error` (a failure).
    ended: Outcome,
    /// The subscription's slot, given back when it ends.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Counts the subscription as open until it ends.
    _open: crate::metrics::SubscriptionGuard,
}

impl Trail {
    /// Records a batch that shows personal data in clear, before it leaves;
    /// a batch without is only counted (and in the closing record).
    async fn deliver(&mut self, batch: &[ReadEvent]) -> Result<(), ServiceError> {
        let personal = batch
            .iter()
            .any(|e| e.personal_data == PersonalData::Decrypted);
        if personal {
            let (first, last) = (batch[0].position, batch[batch.len() - 1].position);
            let entry = AuditEntry {
                action: format!("{}.deliver", self.action),
                resource: match self.template.resource.strip_prefix("stream:") {
                    Some(_) => self.template.resource.clone(),
                    None => format!("positions:{first}-{last}"),
                },
                event_count: batch.len() as u64,
                personal_data: true,
                ..self.template.clone()
            };
            self.events.audit(entry).await?;
            self.personal = true;
        }
        Ok(())
    }
}

impl Drop for Trail {
    /// The closing record, however the subscription ended (the client left,
    /// was cut off, the service stops, or a failure).
    fn drop(&mut self) {
        let entry = AuditEntry {
            action: format!("{}.close", self.action),
            outcome: self.ended,
            event_count: self.delivered,
            personal_data: self.personal,
            ..self.template.clone()
        };
        let events = self.events.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            self.shutdown.spawn(async move {
                if let Err(e) = events.audit(entry).await {
                    tracing::error!(error = %e, "the close of a subscription could not be audited");
                }
            });
        }
    }
}
