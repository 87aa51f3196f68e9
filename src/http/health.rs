//! Liveness, readiness and metrics. No authentication, no data: the
//! metrics carry counts and timings under route templates and outcome
//! names, never an id, a subject, a principal or a token.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;

use super::AppState;

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

/// Ready when both the event store and the keystore answer.
async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let events = state.store.db.ping().await.is_ok();
    let keystore = state.keys.keystore().db.ping().await.is_ok();
    let status = if events && keystore {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    (
        status,
        axum::Json(json!({
            "status": if events && keystore { "ready" } else { "not ready" },
            "event_store": word(events),
            "keystore": word(keystore),
        })),
    )
}
