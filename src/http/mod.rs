//! The HTTP API (axum): one module per resource, each with its own
//! `router()`. Only this module knows the JSON shapes of the API.

mod audit;
mod auth;
mod body;
pub mod conn;
mod health;
mod log;
mod problem;
mod snapshots;
mod streams;
mod subjects;
mod subscribe;
mod trail;
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

pub use problem::ApiError;

use crate::keys::KeyManager;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::principals::Principals;
use crate::service::Events;
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
}

/// Everything a handler may use. Cheap to clone: all shared parts are behind
/// `Arc`s or are pools.
#[derive(Clone, Debug)]
pub struct AppState {
    pub events: Events,
    pub store: EventStore,
    pub keys: Arc<KeyManager>,
    pub principals: Arc<Principals>,
    pub policies: Arc<Policies>,
    pub config: Arc<HttpConfig>,
    /// Becomes `true` when the service begins to stop: subscriptions end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// One permit per open subscription.
    pub subscriptions: Arc<tokio::sync::Semaphore>,
    /// Requests per principal; `None`: unlimited.
    pub rate_limit: Option<Arc<governor::DefaultKeyedRateLimiter<String>>>,
    /// This application's metrics (`GET /metrics`).
    pub metrics: Metrics,
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

/// The whole API.
pub fn router(state: AppState) -> Router {
    let request_id = REQUEST_ID.clone();
    // Every data route writes one audit record per request, refused or not.
    let data = Router::new()
        .merge(streams::router())
        .merge(snapshots::router())
        .merge(log::router())
        .merge(audit::router())
        .merge(subjects::router())
        .merge(subscribe::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            trail::record_requests,
        ));
    let metrics = state.metrics.clone();
    Router::new()
        .merge(data)
        .merge(health::router())
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
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}
