//! `/streams/{stream}/snapshot`: save and load a stream's snapshot.

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::put;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::Caller;
use super::body::JsonBody;
use super::problem::ApiError;
use super::views::{json_response, rfc3339};
use super::{AppState, path_id};
use crate::domain::{PersonalData, StreamId, Subject};
use crate::policy::Permission;

pub fn router() -> Router<AppState> {
    Router::new().route("/streams/{stream}/snapshot", put(save).get(load))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    /// The stream version the state folds (1-based; the stream must have it).
    version: u64,
    subject: Option<String>,
    state: Value,
}

#[derive(Serialize)]
struct SavedView<'a> {
    stream_id: &'a str,
    version: u64,
    subject: Option<&'a str>,
}

async fn save(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    body: Result<JsonBody<SnapshotBody>, ApiError>,
) -> Result<Response, ApiError> {
    let stream = path_id(path, StreamId::parse)?;
    caller.require(Permission::Append, Some(stream.as_str()))?;
    let JsonBody(body) = body?;
    let subject = body
        .subject
        .as_deref()
        .map(Subject::parse)
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("subject: {e}")))?;
    if body.version == 0 {
        return Err(ApiError::BadRequest(
            "version must be at least 1 (versions are 1-based)".into(),
        ));
    }
    state
        .events
        .save_snapshot(&stream, body.version, subject.as_ref(), &body.state)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &SavedView {
            stream_id: stream.as_str(),
            version: body.version,
            subject: subject.as_ref().map(Subject::as_str),
        },
    ))
}

#[derive(Serialize)]
struct SnapshotView<'a> {
    stream_id: &'a str,
    version: u64,
    subject: Option<&'a str>,
    /// `null` when redacted or erased.
    state: Option<&'a Value>,
    personal_data: &'static str,
    recorded_at: String,
}

async fn load(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let stream = path_id(path, StreamId::parse_to_read)?;
    caller.require(Permission::Read, Some(stream.as_str()))?;
    caller.require_purpose(Some(stream.as_str()))?;
    let snap = state
        .events
        .load_snapshot(&stream, &caller.grants)
        .await?
        .ok_or_else(|| ApiError::NotFound("the stream has no snapshot".into()))?;
    caller
        .audit
        .disclosed(1, snap.personal_data == PersonalData::Decrypted);
    Ok(json_response(
        StatusCode::OK,
        &SnapshotView {
            stream_id: stream.as_str(),
            version: snap.version,
            subject: snap.subject.as_deref(),
            state: snap.state.as_ref(),
            personal_data: snap.personal_data.as_str(),
            recorded_at: rfc3339(snap.recorded_at_us),
        },
    ))
}
