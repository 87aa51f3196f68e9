//! The HTTP API (axum): one module per resource, each with its own
//! `router()`. Only this module knows the JSON shapes of the API.

mod audit;
mod auth;
mod body;
pub mod conn;
pub mod cors;
mod disclosure;
mod health;
mod log;
pub mod openapi;
mod problem;
mod snapshots;
mod streams;
mod subjects;
mod subscribe;
mod trail;
pub mod unauthenticated;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::{MatchedPath, State};
use axum::http::{HeaderName, HeaderValue, Request, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

pub use auth::Turns;
pub use problem::ApiError;

use crate::keys::KeyManager;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::principals::Principals;
use crate::service::{Events, KeyCheck, LedgerState};
use crate::store::EventStore;

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest accepted request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Time a whole request body may take to arrive (408 beyond).
    pub body_read_timeout: std::time::Duration,
    /// How often a subscription authenticates its caller again.
    pub subscription_recheck: std::time::Duration,
    /// The longest a request waits for the stores before it is answered
    /// 503 (see `trail::record_requests`).
    pub store_timeout: std::time::Duration,
}

/// Everything a handler may use. Cheap to clone: all shared parts are behind
/// `Arc`s or are pools.
#[derive(Clone, Debug)]
pub struct AppState {
    pub events: Events,
    pub store: EventStore,
    pub keys: Arc<KeyManager>,
    pub principals: Arc<Principals>,
    /// Callers from the identity provider (bearer JWTs); `None`: not
    /// configured.
    pub jwt: Option<Arc<crate::jwt::Verifier>>,
    pub policies: Arc<Policies>,
    pub config: Arc<HttpConfig>,
    /// The stop signal (subscriptions end when serving does) and the
    /// tracker of the tasks a request leaves behind (records written late,
    /// a subscription's closing record).
    pub shutdown: crate::shutdown::Shutdown,
    /// One permit per open subscription.
    pub subscriptions: Arc<tokio::sync::Semaphore>,
    /// Requests per principal; `None`: unlimited.
    pub rate_limit: Option<Arc<governor::DefaultKeyedRateLimiter<String>>>,
    /// This application's metrics (`GET /metrics`).
    pub metrics: Metrics,
    /// Requests per principal served at once; `None`: unlimited.
    pub turns: Option<Arc<auth::Turns>>,
    /// Requests without a valid token, per client address: their limit
    /// and the aggregation of their audit records.
    pub unauthenticated: Arc<unauthenticated::Unauthenticated>,
    /// Where the start-up re-apply of the forget ledger stands: no data
    /// route serves before it is `Applied` (see [`starting`]).
    pub ledger: tokio::sync::watch::Receiver<LedgerState>,
    /// Where the start-up check of the data keys stands: no data route
    /// serves before it is `Complete`.
    pub data_keys: tokio::sync::watch::Receiver<KeyCheck>,
    /// The browser origins allowed to call the API; `None`: no CORS.
    pub cors: Option<cors::Cors>,
}

/// The id in a request path (a stream or a subject), checked by `parse`:
/// 400 with its message otherwise.
fn path_id<T>(
    path: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    parse: fn(&str) -> Result<T, crate::domain::InvalidInput>,
) -> Result<T, ApiError> {
    let axum::extract::Path(raw) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    parse(&raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Largest cursor accepted (positions and versions are stored as `i64`).
pub const MAX_CURSOR: u64 = i64::MAX as u64;

/// A position or version from the request: at most [`MAX_CURSOR`].
fn cursor_param(name: &str, v: Option<u64>) -> Result<Option<u64>, ApiError> {
    match v {
        Some(v) if v > MAX_CURSOR => Err(ApiError::BadRequest(format!(
            "{name} must be at most {MAX_CURSOR}"
        ))),
        v => Ok(v),
    }
}

/// Free text from a request (a filter, a reason): no control characters,
/// which no stored value holds and PostgreSQL cannot take (NUL).
fn plain_text(name: &str, v: Option<String>) -> Result<Option<String>, ApiError> {
    match v {
        Some(s) if s.chars().any(char::is_control) => Err(ApiError::BadRequest(format!(
            "{name} must not contain control characters"
        ))),
        v => Ok(v),
    }
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Times every request and counts it under its route template (the path as
/// routed, `/streams/{stream}/events`): the path itself holds stream ids and
/// subjects, which must not reach a metric.
async fn observe_request(
    State(metrics): State<Metrics>,
    req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(req).await;
    metrics.request(
        method.as_str(),
        route.as_deref(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Refuses every data request (503, problem `starting`, `Retry-After`)
/// until the forget ledger has been re-applied at start: until then a
/// keystore restored from a backup may still hold the keys of forgotten
/// subjects; and until the data keys have been checked (503 `unavailable`
/// for good if some are missing and their loss was not accepted). Deny by
/// default: whatever the state is, if it is not `Applied` and `Complete`,
/// nothing is served. It runs inside the audit middleware, so each refusal
/// is recorded like any other.
async fn starting(
    State(state): State<AppState>,
    req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    use axum::response::IntoResponse;
    let ledger = *state.ledger.borrow();
    let keys = *state.data_keys.borrow();
    match ledger {
        LedgerState::Applied => match keys {
            KeyCheck::Complete => next.run(req).await,
            KeyCheck::Checking => ApiError::Starting.into_response(),
            KeyCheck::Missing(_) => ApiError::Unavailable(
                "the keystore lacks data keys the event store refers to; the service is not ready (see /readyz and the log)",
            )
            .into_response(),
        },
        LedgerState::Reapplying => ApiError::Starting.into_response(),
        LedgerState::Failed => {
            ApiError::Unavailable("the service could not start and is stopping").into_response()
        }
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let request_id = REQUEST_ID.clone();
    let (data, mut api) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(streams::router())
        .merge(snapshots::router())
        .merge(log::router())
        .merge(audit::router())
        .merge(subjects::router())
        .merge(subscribe::router())
        .split_for_parts();
    // Every data route writes one audit record per request, refused or not;
    // none serves before the forget ledger is re-applied.
    let data = data
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            starting,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            trail::record_requests,
        ));
    let (operations, operations_api) = health::router().split_for_parts();
    api.merge(operations_api);
    let document = health::Document::new(openapi::finish(api));
    let metrics = state.metrics.clone();
    let cross_origin = state.cors.clone();
    let router = Router::new()
        .merge(data)
        .merge(operations)
        // A path served with other methods: problem+json, and the router
        // adds `Allow` with the methods it is served with. After every
        // route, which it applies to.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::Extension(document))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(state)
        // A layer of the router, so it runs after routing (the route
        // template is known) and around every route and the fallback:
        // refusals (401, 403) and unknown paths are counted too.
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            observe_request,
        ))
        // Nothing this service answers may be kept by a cache: a decrypted
        // copy must not outlive a forget.
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        // The trace span names the request id, method and path; never
        // headers or bodies (tokens, personal data).
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!(
                    "request",
                    request_id = %id,
                    method = %req.method(),
                    path = %req.uri().path(),
                    principal = tracing::field::Empty,
                )
            }),
        )
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid));
    // Outermost: a preflight is answered before anything else, and every
    // answer to an allowed origin, refusals included, carries the headers.
    match cross_origin {
        Some(c) => router.layer(axum::middleware::from_fn_with_state(c, cors::cross_origin)),
        None => router,
    }
}
