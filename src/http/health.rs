//! Liveness, readiness and metrics. No authentication, no data: the
//! metrics carry counts and timings under route templates and outcome
//! names, never an id, a subject, a principal or a token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::service::{KeyCheck, LedgerState};

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
    /// `ok` or `unreachable`.
    #[schema(value_type = String, pattern = "^(ok|unreachable)$")]
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

/// Ready when the forget ledger has been re-applied at start, the keystore
/// holds every data key the event store refers to, and both the event store
/// and the keystore answer; the body says which part is not.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready", body = Readiness),
    ),
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<Readiness>) {
    let ledger = *state.ledger.borrow();
    let keys = *state.data_keys.borrow();
    let events = state.store.db.ping().await.is_ok();
    let keystore = state.keys.keystore().db.ping().await.is_ok();
    let ready = events && keystore && ledger == LedgerState::Applied && keys == KeyCheck::Complete;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    (
        status,
        axum::Json(Readiness {
            status: if ready { "ready" } else { "not ready" },
            event_store: word(events),
            keystore: word(keystore),
            forget_ledger: ledger.as_str(),
            data_keys: keys.as_str(),
            missing_data_keys: match keys {
                KeyCheck::Missing(n) => Some(n),
                _ => None,
            },
        }),
    )
}
