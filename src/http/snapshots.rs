//! `/streams/{stream}/snapshot`: save and load a stream's snapshot.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::body::JsonBody;
use super::disclosure::{Audited, Clear, Discloses};
use super::openapi::{ReadStreamPath, StreamPath};
use super::problem::{ApiError, Problem};
use super::views::rfc3339;
use super::{AppState, cursor_param, path_id};
use crate::domain::{PersonalData, StreamId, Subject};
use crate::policy::Permission;
use crate::service::SnapshotRead;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(save, load))
}

/// A snapshot to save.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewSnapshot)]
struct SnapshotBody {
    /// The stream version the state folds (1-based; the stream must have it).
    #[schema(minimum = 1, maximum = 9223372036854775807_i64)]
    version: u64,
    /// Optional: a subject to keep with the snapshot. When the stream's
    /// events up to `version` name subjects it must be one of them; the
    /// state is sealed for all of them whether or not one is named (for
    /// this one alone when the events name none).
    #[schema(pattern = "^[A-Za-z0-9._:@-]{1,200}$")]
    subject: Option<String>,
    /// Any JSON value.
    state: Value,
}

/// A saved snapshot.
#[derive(Serialize, ToSchema)]
#[schema(as = SavedSnapshot)]
struct SavedView<'a> {
    #[schema(value_type = String)]
    stream_id: &'a str,
    version: u64,
    #[schema(value_type = Option<String>)]
    subject: Option<&'a str>,
}

impl Clear for SavedView<'_> {}

/// Saves a stream's snapshot (replacing an older one). Needs `append`. The
/// state is sealed for every subject whose events the stream holds up to
/// `version`, so that the forget of any of them erases it.
#[utoipa::path(
    put,
    path = "/streams/{stream}/snapshot",
    tag = "snapshots",
    params(StreamPath),
    request_body = SnapshotBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Saved", body = SavedView),
        (status = 409, description = "`stale-snapshot`: a newer snapshot is stored",
            body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "A subject of the stream's events up to the version \
            (or the one named) has been forgotten: the snapshot would be erased",
            body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn save(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    body: Result<JsonBody<SnapshotBody>, ApiError>,
) -> Result<Audited, ApiError> {
    let stream = path_id(path, StreamId::parse)?;
    caller.require(Permission::Append, Some(stream.as_str()))?;
    let JsonBody(body) = body?;
    let subject = body
        .subject
        .as_deref()
        .map(Subject::parse)
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("subject: {e}")))?;
    cursor_param("version", Some(body.version))?;
    if body.version == 0 {
        return Err(ApiError::BadRequest(
            "version must be at least 1 (versions are 1-based)".into(),
        ));
    }
    state
        .events
        .save_snapshot(&stream, body.version, subject.as_ref(), &body.state)
        .await?;
    Ok(Audited::clear(
        StatusCode::OK,
        &SavedView {
            stream_id: stream.as_str(),
            version: body.version,
            subject: subject.as_ref().map(Subject::as_str),
        },
    ))
}

/// A stored snapshot, as this caller may see it.
#[derive(Serialize, ToSchema)]
#[schema(as = Snapshot)]
pub(super) struct SnapshotView<'a> {
    #[schema(value_type = String)]
    stream_id: &'a str,
    version: u64,
    /// The subject the snapshot was saved with, if it named one.
    #[schema(value_type = Option<String>)]
    subject: Option<&'a str>,
    /// `null` when redacted or erased.
    #[schema(value_type = Value)]
    state: Option<&'a Value>,
    /// `erased` once any subject whose events the stream holds up to the
    /// snapshot's version is forgotten.
    personal_data: PersonalData,
    #[schema(format = DateTime)]
    recorded_at: String,
}

impl Discloses for SnapshotView<'_> {
    fn disclosure(&self) -> (u64, bool) {
        (1, self.personal_data == PersonalData::Decrypted)
    }
}

/// The name the API document gives [`SnapshotView`].
pub(super) type Snapshot = SnapshotView<'static>;

impl<'a> SnapshotView<'a> {
    pub(super) fn new(stream_id: &'a str, snap: &'a SnapshotRead) -> Self {
        Self {
            stream_id,
            version: snap.version,
            subject: snap.subject.as_deref(),
            state: snap.state.as_ref(),
            personal_data: snap.personal_data,
            recorded_at: rfc3339(snap.recorded_at_us),
        }
    }
}

/// Loads a stream's snapshot. Needs `read`.
#[utoipa::path(
    get,
    path = "/streams/{stream}/snapshot",
    tag = "snapshots",
    params(ReadStreamPath),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The snapshot", body = SnapshotView),
        (status = 404, description = "The stream has no snapshot",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn load(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Audited, ApiError> {
    let stream = path_id(path, StreamId::parse_to_read)?;
    caller.require(Permission::Read, Some(stream.as_str()))?;
    caller.require_purpose(Some(stream.as_str()))?;
    let snap = state
        .events
        .load_snapshot(&stream, &caller.grants)
        .await?
        .ok_or_else(|| ApiError::NotFound("the stream has no snapshot".into()))?;
    Ok(Audited::disclosing(
        StatusCode::OK,
        &SnapshotView::new(stream.as_str(), &snap),
    ))
}
