//! One audit record per data request, whatever its outcome.
//!
//! The [`record_requests`] middleware wraps every data route. Before the
//! handler runs it reads the request's audit headers and puts an
//! [`AuditSlot`] into the request; the `Caller` extractor writes the
//! principal into it and the handler the resource details. The handler's
//! answer, an [`Audited`](super::disclosure::Audited), carries the event
//! count and whether personal data is disclosed (see `disclosure`: a
//! handler cannot answer without saying). When the response is ready the
//! middleware writes the record through the group-commit writer and waits
//! until it is durable: only then does the response leave. If the record
//! cannot be written the caller gets a 503 instead, and no data.
//!
//! An append hands its record to the writer itself, to commit it in the same
//! transaction as its events, and answers that it is recorded.
//!
//! A request that ends without an authenticated principal (401 and the
//! like) has a record of its own only when it is its client address's first
//! in the current window; the others are counted, and their address's
//! aggregate record is written when the window ends (`unauthenticated`).

use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::disclosure::{Recorded, Told};
use super::problem::ApiError;
use crate::audit::{AuditEntry, Outcome};
use crate::domain::{StreamId, Subject};

/// Longest accepted value of an audit header.
pub const MAX_HEADER_CHARS: usize = 200;

/// The headers recorded with every request, as the API document describes
/// them.
pub const AUDIT_HEADERS: [(&str, &str); 4] = [
    (
        "X-Correlation-Id",
        "Ties the requests of one business operation together; recorded in the audit log",
    ),
    (
        "X-Causation-Id",
        "The request or event that caused this one; recorded in the audit log",
    ),
    (
        "X-Purpose",
        "Why personal data is read (some roles must say); recorded in the audit log",
    ),
    (
        "X-Request-Id",
        "The request's id (one is assigned when absent and returned in the response)",
    ),
];

/// The audit headers of a request, and its request id.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub purpose: Option<String>,
    pub request_id: Option<String>,
}

/// Reads one optional header: printable text of at most
/// [`MAX_HEADER_CHARS`] characters.
fn header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, String> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.chars().count() <= MAX_HEADER_CHARS)
        .filter(|s| s.chars().all(|c| !c.is_control()))
        .ok_or_else(|| {
            format!("header {name} must be 1 to {MAX_HEADER_CHARS} printable ASCII characters")
        })?;
    Ok(Some(s.to_owned()))
}

impl RequestContext {
    /// The context, or the first malformed header (the request is then
    /// refused, and recorded without it).
    fn from_headers(headers: &HeaderMap) -> (Self, Option<String>) {
        let mut bad = None;
        let mut take = |name| {
            header(headers, name).unwrap_or_else(|e| {
                bad.get_or_insert(e);
                None
            })
        };
        let [correlation, causation, purpose, request] = AUDIT_HEADERS.map(|(name, _)| name);
        let ctx = Self {
            correlation_id: take(correlation),
            causation_id: take(causation),
            purpose: take(purpose),
            request_id: take(request),
        };
        (ctx, bad)
    }
}

/// What the record of one request will say; filled in as the request runs.
#[derive(Debug)]
struct Draft {
    principal: Option<String>,
    resource: String,
    /// The principal's turn (see `auth::Turns`), held until the record is
    /// written.
    turn: Option<super::auth::Turn>,
    /// Decided when the request was refused for want of a valid token (see
    /// `unauthenticated`): whether it gets a record of its own.
    unauthenticated: Option<super::unauthenticated::Verdict>,
}

/// When a request that waits for the stores is answered 503 at the latest:
/// `--store-timeout-secs` after it began, plus whatever time the client
/// itself took to send its body (which is the body deadline's business,
/// not the stores').
#[derive(Debug, Clone)]
pub struct Deadline(Arc<Mutex<Due>>);

#[derive(Debug)]
struct Due {
    at: tokio::time::Instant,
    /// What to answer when it passes, if not the 503: set once the handler
    /// has done what that answer says (a forget's ledger entry).
    fallback: Option<(axum::http::StatusCode, serde_json::Value)>,
}

impl Deadline {
    fn after(budget: std::time::Duration) -> Self {
        Self(Arc::new(Mutex::new(Due {
            at: tokio::time::Instant::now() + budget,
            fallback: None,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Due> {
        self.0.lock().expect("deadline lock")
    }

    fn at(&self) -> tokio::time::Instant {
        self.lock().at
    }

    /// Moves the deadline by time spent waiting for the client.
    pub fn add_client_time(&self, waited: std::time::Duration) {
        self.lock().at += waited;
    }

    /// Whether the handler has done what its answer will say for certain
    /// (it set what to answer at the deadline).
    fn committed(&self) -> bool {
        self.lock().fallback.is_some()
    }

    /// The answer when the deadline has passed.
    fn passed(&self, budget: std::time::Duration) -> Response {
        match self.lock().fallback.clone() {
            Some((status, body)) => super::views::json_response(status, &body),
            None => ApiError::StoreTimeout(budget.as_secs()).into_response(),
        }
    }
}

/// The audit record of the current request, shared by the middleware, the
/// `Caller` extractor and the handler.
#[derive(Debug, Clone)]
pub struct AuditSlot {
    /// When the request is answered 503 if it has not been answered.
    pub deadline: Deadline,
    action: &'static str,
    ctx: Arc<RequestContext>,
    /// A malformed audit header: the request is refused with this problem
    /// once the caller is authenticated (and recorded without the header).
    bad_header: Option<String>,
    /// The client's address (the connection's peer), by which requests
    /// without a valid token are limited and their records aggregated.
    client: Option<std::net::IpAddr>,
    draft: Arc<Mutex<Draft>>,
}

impl AuditSlot {
    pub fn context(&self) -> &RequestContext {
        &self.ctx
    }

    pub fn bad_header(&self) -> Option<&str> {
        self.bad_header.as_deref()
    }

    pub fn client(&self) -> Option<std::net::IpAddr> {
        self.client
    }

    /// The request was refused for want of a valid token; `verdict` says
    /// whether it has a record of its own.
    pub fn refused_unauthenticated(&self, verdict: super::unauthenticated::Verdict) {
        self.draft().unauthenticated = Some(verdict);
    }

    fn draft(&self) -> std::sync::MutexGuard<'_, Draft> {
        self.draft.lock().expect("audit draft lock")
    }

    pub fn set_principal(&self, name: &str) {
        self.draft().principal = Some(name.to_owned());
    }

    /// Holds the principal's turn until the request's record is written.
    pub fn hold_turn(&self, turn: super::auth::Turn) {
        self.draft().turn = Some(turn);
    }

    /// Replaces the resource named from the path (e.g. with a position range).
    pub fn set_resource(&self, resource: String) {
        self.draft().resource = resource;
    }

    /// What the request is answered should its deadline pass from now on,
    /// instead of a 503 that would claim nothing.
    pub fn set_fallback(&self, status: axum::http::StatusCode, body: serde_json::Value) {
        self.deadline.lock().fallback = Some((status, body));
    }

    /// The record was committed by the handler's own write (the writer's
    /// with its append, a forget's with its ledger entry, an export's
    /// before its body): the answer says so with
    /// [`Audited::recorded`](super::disclosure::Audited::recorded).
    pub fn recorded(&self) -> Recorded {
        Recorded(())
    }

    /// The record as it stands, with `outcome`, disclosing nothing (the
    /// writer fills in an append's count).
    pub fn entry(&self, outcome: Outcome) -> AuditEntry {
        self.entry_disclosing(outcome, 0, false)
    }

    /// The record as it stands, with `outcome`, for an answer of `events`
    /// events, some with personal data in clear when `personal_data`.
    pub fn entry_disclosing(
        &self,
        outcome: Outcome,
        events: u64,
        personal_data: bool,
    ) -> AuditEntry {
        let d = self.draft();
        AuditEntry {
            principal: d.principal.clone(),
            action: self.action.to_owned(),
            resource: d.resource.clone(),
            outcome,
            event_count: events,
            personal_data,
            correlation_id: self.ctx.correlation_id.clone(),
            causation_id: self.ctx.causation_id.clone(),
            purpose: self.ctx.purpose.clone(),
            request_id: self.ctx.request_id.clone(),
        }
    }
}

/// The audit action of a route.
fn action_of(method: &Method, route: &str) -> &'static str {
    // HEAD runs the GET handler (the body is dropped on the way out).
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    match (method, route) {
        ("POST", "/streams/{stream}/events") => "stream.append",
        ("GET", "/streams/{stream}/events") => "stream.read",
        ("GET", "/events") => "log.read",
        ("PUT", "/streams/{stream}/snapshot") => "snapshot.save",
        ("GET", "/streams/{stream}/snapshot") => "snapshot.read",
        ("GET", "/events/subscribe") => "log.subscribe",
        ("GET", "/streams/{stream}/subscribe") => "stream.subscribe",
        ("GET", "/audit") => "audit.read",
        ("GET", "/audit/verify") => "audit.verify",
        ("GET", "/subjects/{subject}") => "subject.read",
        ("POST", "/subjects/{subject}/forget") => "subject.forget",
        ("GET", "/subjects/{subject}/export") => "subject.export",
        _ => "request",
    }
}

/// The resource a request names in its path: a stream or a subject id (ids
/// that are not valid are not copied into the log), or the route itself.
fn resource_of(route: &str, params: Option<&RawPathParams>) -> String {
    for (name, value) in params.into_iter().flat_map(|p| p.iter()) {
        match name {
            "stream" => {
                return match StreamId::parse_to_read(value) {
                    Ok(s) => format!("stream:{}", s.as_str()),
                    Err(_) => "stream:(invalid id)".into(),
                };
            }
            "subject" => {
                return match Subject::parse(value) {
                    Ok(s) => format!("subject:{}", s.as_str()),
                    Err(_) => "subject:(invalid id)".into(),
                };
            }
            _ => {}
        }
    }
    route.trim_start_matches('/').replace('/', ":")
}

/// Writes `entry` once the store takes it: tried again and again, further
/// apart (up to a minute), for about an hour, then logged as lost.
async fn record_later(events: crate::service::Events, entry: AuditEntry) {
    let mut wait = std::time::Duration::from_secs(1);
    for _ in 0..70 {
        tokio::time::sleep(wait).await;
        match events.audit(entry.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "an audit record still cannot be written; trying again")
            }
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(60));
    }
    tracing::error!(action = %entry.action, "an audit record could not be written within an hour and is lost");
}

/// The middleware: see the module documentation. The handler and the audit
/// write run in a task of their own, so a client that goes away cannot
/// cancel the record, and a handler that panics is recorded as an error
/// (and answered with a 500).
///
/// A request not answered within `--store-timeout-secs` (a store that does
/// not answer) is answered 503 at that moment; its task goes on, so that
/// what it does is still recorded as done (an append may still commit, and
/// its retry with the same event ids is then answered with its result).
pub async fn record_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let budget = state.config.store_timeout;
    let deadline = Deadline::after(budget);
    // Tracked: the writer outlives it, so that what a request answered
    // late still does is written with its record when the service stops.
    let task = state
        .shutdown
        .clone()
        .spawn(audited(state, req, next, deadline.clone()).instrument(tracing::Span::current()));
    tokio::pin!(task);
    loop {
        let at = deadline.at();
        tokio::select! {
            done = &mut task => {
                return done.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "request task failed");
                    ApiError::Internal.into_response()
                });
            }
            () = tokio::time::sleep_until(at) => {
                // The deadline may have moved meanwhile (a slow body).
                if deadline.at() <= at {
                    tracing::warn!(
                        timeout_secs = budget.as_secs(),
                        "a request was not served within the store timeout; answered (503, or what it has done for certain) while it goes on"
                    );
                    return deadline.passed(budget);
                }
            }
        }
    }
}

async fn audited(state: AppState, req: Request, next: Next, deadline: Deadline) -> Response {
    use futures::FutureExt;
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_owned(), |m| m.as_str().to_owned());
    let action = action_of(req.method(), &route);
    let (mut parts, body) = req.into_parts();
    let params = {
        use axum::extract::FromRequestParts;
        RawPathParams::from_request_parts(&mut parts, &state)
            .await
            .ok()
    };
    let (ctx, bad_header) = RequestContext::from_headers(&parts.headers);
    let client = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    let slot = AuditSlot {
        deadline,
        action,
        ctx: Arc::new(ctx),
        bad_header,
        client,
        draft: Arc::new(Mutex::new(Draft {
            principal: None,
            resource: resource_of(&route, params.as_ref()),
            turn: None,
            unauthenticated: None,
        })),
    };
    let mut req = Request::from_parts(parts, body);
    req.extensions_mut().insert(slot.clone());
    let response = std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!("the handler panicked");
            ApiError::Internal.into_response()
        });
    let told = response.extensions().get::<Told>().copied();
    let response = match told {
        None if response.status().is_success() => {
            // A handler that did not say what it disclosed: nothing leaves.
            tracing::error!(
                action = slot.action,
                "a data route answered without saying what it disclosed; answered 500 instead"
            );
            ApiError::Internal.into_response()
        }
        _ => response,
    };
    let outcome = Outcome::from_status(response.status().as_u16());
    let recorded = told == Some(Told::Recorded);
    let (events, personal_data) = match told {
        Some(Told::Counted {
            events,
            personal_data,
        }) => (events, personal_data),
        _ => (0, false),
    };
    let (principal, refused) = {
        let d = slot.draft();
        (d.principal.is_some(), d.unauthenticated)
    };
    // A request that ends without a principal has a record of its own only
    // if it is its address's first of the window; the others are counted
    // into the address's aggregate record (see `unauthenticated`).
    let counted = !recorded
        && !principal
        && !refused
            .unwrap_or_else(|| {
                state
                    .unauthenticated
                    .unattributed(slot.client(), slot.context().request_id.as_deref())
            })
            .record;
    let response = if recorded || counted {
        response
    } else {
        let entry = slot.entry_disclosing(outcome, events, personal_data);
        match state.events.audit(entry.clone()).await {
            Ok(()) => response,
            // A response that discloses nothing and states what was done
            // for certain (a forget that took effect) is not withdrawn:
            // its record is written as soon as the store takes it.
            Err(e) if slot.deadline.committed() && !entry.personal_data => {
                tracing::warn!(error = %e, "the audit record of a request that took effect could not be written yet; writing it in the background");
                state
                    .shutdown
                    .spawn(record_later(state.events.clone(), entry));
                response
            }
            Err(e) => {
                tracing::error!(error = %e, "the audit record could not be written; the response is withheld");
                ApiError::not_audited().into_response()
            }
        }
    };
    // The principal's next request may go on (a subscription's or an
    // export's body is still to come: it no longer counts).
    slot.draft().turn.take();
    tracing::info!(
        status = response.status().as_u16(),
        outcome = Outcome::from_status(response.status().as_u16()).as_str(),
        "request"
    );
    response
}
