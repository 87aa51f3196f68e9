//! Liveness, readiness and metrics. No authentication, no data: the
//! metrics carry counts and timings under route templates and outcome
//! names, never an id, a subject, a principal or a token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::problem::Problem;
use crate::service::{KeyCheck, LedgerState};
use crate::store::Fault;
use crate::store::writer;
use std::time::Duration;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi))
}

/// The OpenAPI document, serialised once.
#[derive(Clone)]
pub struct Document(Arc<String>);

impl Document {
    pub fn new(api: utoipa::openapi::OpenApi) -> Self {
        Self(Arc::new(
            api.to_pretty_json().expect("the API document serialises"),
        ))
    }
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
)]
async fn openapi(
    axum::Extension(doc): axum::Extension<Document>,
) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc.0.as_str().to_owned(),
    )
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String,
        content_type = "text/plain")),
)]
async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    let head = state.events.commit_head();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        state.metrics.render(head),
    )
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Health)),
)]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

/// `{"status":"ok"}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    #[schema(value_type = String, pattern = "^ok$")]
    status: &'static str,
}

/// Readiness: which stores answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Readiness {
    /// `ready` or `not ready`.
    #[schema(value_type = String, pattern = "^(ready|not ready)$")]
    status: &'static str,
    /// `ok`; `unreachable` (no answer within the probe's time); `full`
    /// (writes cannot commit: the database or its disk is full); or
    /// `unavailable` (writes cannot commit for another reason).
    #[schema(value_type = String, pattern = "^(ok|unreachable|full|unavailable)$")]
    event_store: &'static str,
    /// `ok` or `unreachable`.
    #[schema(value_type = String, pattern = "^(ok|unreachable)$")]
    keystore: &'static str,
    /// The start-up re-apply of the forget ledger: `reapplying`, `applied`
    /// or `failed`.
    #[schema(value_type = String, pattern = "^(reapplying|applied|failed)$")]
    forget_ledger: &'static str,
    /// The start-up check that the keystore holds every data key the event
    /// store refers to: `checking`, `ok`, or `missing` (the service does not
    /// become ready; see the log).
    #[schema(value_type = String, pattern = "^(checking|ok|missing)$")]
    data_keys: &'static str,
    /// With `missing`: how many.
    #[serde(skip_serializing_if = "Option::is_none")]
    missing_data_keys: Option<u64>,
}

/// How long readiness waits for the stores, in all: a probe's own timeout
/// (2 s, say) must see an answer, not a hang.
const READINESS_PATIENCE: Duration = Duration::from_millis(1500);

/// The event store's word: does it answer, and do writes commit? While the
/// writer's last group failed, a probe write tells whether they commit
/// again (space freed, the database back) before the next append does.
async fn event_store_word(state: &AppState, until: tokio::time::Instant) -> &'static str {
    let ping = tokio::time::timeout_at(until, state.store.db.ping()).await;
    if !matches!(ping, Ok(Ok(()))) {
        return "unreachable";
    }
    if state.events.writer_health() == writer::Health::Committing {
        return "ok";
    }
    let patience = until.saturating_duration_since(tokio::time::Instant::now());
    match state.events.probe_write(patience).await {
        Some(Ok(())) => "ok",
        Some(Err(e)) if e.fault() == Some(Fault::Full) => "full",
        Some(Err(e)) if e.fault() == Some(Fault::Unreachable) => "unreachable",
        _ => "unavailable",
    }
}

/// Ready when the forget ledger has been re-applied at start, the keystore
/// holds every data key the event store refers to, both the event store
/// and the keystore answer and writes commit; the body says which part is
/// not. Answers within 1.5 s whatever the stores do.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready: the body says which part is not; beyond \
            `--max-connections`, a `too-many-connections` problem with `Retry-After`",
            content(
                (Readiness = "application/json"),
                (Problem = "application/problem+json"),
            )),
    ),
)]
async fn readyz(
    State(state): State<AppState>,
) -> (StatusCode, axum::http::HeaderMap, axum::Json<Readiness>) {
    let ledger = *state.ledger.borrow();
    let keys = *state.data_keys.borrow();
    let until = tokio::time::Instant::now() + READINESS_PATIENCE;
    let keystore = async {
        match tokio::time::timeout_at(until, state.keys.keystore().db.ping()).await {
            Ok(Ok(())) => "ok",
            _ => "unreachable",
        }
    };
    let (events, keystore) = tokio::join!(event_store_word(&state, until), keystore);
    let ready = events == "ok"
        && keystore == "ok"
        && ledger == LedgerState::Applied
        && keys == KeyCheck::Complete;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Like every 503: when to ask again.
    let mut retry = axum::http::HeaderMap::new();
    if !ready {
        retry.insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    (
        status,
        retry,
        axum::Json(Readiness {
            status: if ready { "ready" } else { "not ready" },
            event_store: events,
            keystore,
            forget_ledger: ledger.as_str(),
            data_keys: keys.as_str(),
            missing_data_keys: match keys {
                KeyCheck::Missing(n) => Some(n),
                _ => None,
            },
        }),
    )
}
