//! Liveness, readiness and metrics. No authentication, no data: the
//! metrics carry counts and timings under route templates and outcome
//! names, never an id, a subject, a principal or a token.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;

use super::AppState;
use crate::service::LedgerState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Prometheus metrics in the text exposition format.
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

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(json!({"status": "ok"}))
}

/// Ready when the forget ledger has been re-applied at start and both the
/// event store and the keystore answer; the body says which part is not.
async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let ledger = *state.ledger.borrow();
    let events = state.store.db.ping().await.is_ok();
    let keystore = state.keys.keystore().db.ping().await.is_ok();
    let ready = events && keystore && ledger == LedgerState::Applied;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    (
        status,
        axum::Json(json!({
            "status": if ready { "ready" } else { "not ready" },
            "event_store": word(events),
            "keystore": word(keystore),
            "forget_ledger": ledger.as_str(),
        })),
    )
}
