//! `/subjects/{subject}`: a subject's state, and the right to erasure
//! (`POST …/forget`, crypto-shredding).

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Caller;
use super::problem::ApiError;
use super::views::{json_response, rfc3339};
use crate::audit::Outcome;
use crate::domain::Subject;
use crate::policy::Permission;
use crate::service::SubjectState;

/// Longest accepted reason of a forget.
const MAX_REASON_CHARS: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/subjects/{subject}", get(state))
        .route("/subjects/{subject}/forget", post(forget))
}

fn subject(path: Result<Path<String>, PathRejection>) -> Result<Subject, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    Subject::parse(&raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[derive(Serialize)]
struct StateView<'a> {
    subject: &'a str,
    state: &'static str,
    events: u64,
}

async fn state(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    if !caller.grants.allows(Permission::Export, None) {
        caller.require(Permission::Forget, None)?;
    }
    let subject = subject(path)?;
    let (s, events) = state.events.subject_state(subject.as_str()).await?;
    Ok(json_response(
        StatusCode::OK,
        &StateView {
            subject: subject.as_str(),
            state: match s {
                SubjectState::Active => "active",
                SubjectState::Forgotten => "forgotten",
                SubjectState::Unknown => "unknown",
            },
            events,
        },
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetBody {
    /// Why (e.g. a ticket number). Kept in the forget ledger; must not carry
    /// personal data.
    reason: Option<String>,
}

#[derive(Serialize)]
struct ForgetView<'a> {
    subject: &'a str,
    forgotten_at: String,
    keys_destroyed: u64,
    events_affected: u64,
}

async fn forget(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Permission::Forget, None)?;
    let subject = subject(path)?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<ForgetBody>(&body)
            .map_err(|e| ApiError::BadRequest(format!("body: {e}")))?
            .reason
    };
    if reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
    {
        return Err(ApiError::BadRequest(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    let (report, recorded) = state
        .events
        .forget(
            subject.as_str(),
            reason.as_deref(),
            caller.audit.entry(Outcome::Ok),
        )
        .await?;
    caller.audit.disclosed(report.events_affected, false);
    if recorded {
        caller.audit.mark_recorded();
    }
    Ok(json_response(
        StatusCode::OK,
        &ForgetView {
            subject: subject.as_str(),
            forgotten_at: rfc3339(report.forgotten_at_us),
            keys_destroyed: report.keys_destroyed,
            events_affected: report.events_affected,
        },
    ))
}
