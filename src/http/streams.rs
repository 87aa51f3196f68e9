//! `/streams/{stream}/events`: append and read one stream.

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::auth::Caller;
use super::body::JsonBody;
use super::problem::ApiError;
use super::views::{AppendView, EventList, json_response, parse_rfc3339};
use super::{AppState, path_id};
use crate::audit::Outcome;
use crate::domain::{
    EventBatch, EventType, ExpectedVersion, PersonalData, ProposedEvent, ReadEvent, StreamId,
    Subject,
};
use crate::policy::Permission;
use crate::service::{AsOf, ServiceError};
use crate::store::Direction;
use crate::store::writer::Appended;

/// Default and largest page size of reads.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

pub fn router() -> Router<AppState> {
    Router::new().route("/streams/{stream}/events", post(append).get(read))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendBody {
    events: Vec<EventBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    /// Client-chosen id; makes retries idempotent. Generated when absent.
    id: Option<Uuid>,
    #[serde(rename = "type")]
    event_type: String,
    subject: Option<String>,
    data: Map<String, Value>,
    #[serde(default)]
    metadata: Map<String, Value>,
}

fn expected_version(headers: &HeaderMap) -> Result<ExpectedVersion, ApiError> {
    match headers.get("expected-version") {
        None => Ok(ExpectedVersion::Any),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ApiError::BadRequest("Expected-Version is not text".into()))?;
            ExpectedVersion::parse(s).map_err(|e| ApiError::BadRequest(e.to_string()))
        }
    }
}

fn proposed(body: AppendBody) -> Result<EventBatch, ApiError> {
    let events = body
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let bad = |m: String| ApiError::BadRequest(format!("events[{i}]: {m}"));
            Ok(ProposedEvent {
                id: e.id.unwrap_or_else(Uuid::now_v7),
                event_type: EventType::parse(&e.event_type).map_err(|x| bad(x.to_string()))?,
                subject: e
                    .subject
                    .as_deref()
                    .map(Subject::parse)
                    .transpose()
                    .map_err(|x| bad(x.to_string()))?,
                data: e.data,
                metadata: e.metadata,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    EventBatch::new(events).map_err(|e| ApiError::BadRequest(e.to_string()))
}

async fn append(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<JsonBody<AppendBody>, ApiError>,
) -> Result<Response, ApiError> {
    let stream = path_id(path, StreamId::parse)?;
    caller.require(Permission::Append, Some(stream.as_str()))?;
    let JsonBody(body) = body?;
    let expected = expected_version(&headers)?;
    let batch = proposed(body)?;
    // The writer commits the audit record with the events (or, for a
    // rejected append, alone); it sets the outcome and the event count.
    let appended = state
        .events
        .append(
            stream.clone(),
            expected,
            batch,
            caller.audit.entry(Outcome::Ok),
        )
        .await;
    if matches!(appended, Ok(_) | Err(ServiceError::Rejected(_))) {
        caller.audit.mark_recorded();
    }
    let (status, result) = match appended? {
        Appended::Created(r) => (StatusCode::CREATED, r),
        Appended::AlreadyAppended(r) => (StatusCode::OK, r),
    };
    Ok(json_response(
        status,
        &AppendView::new(stream.as_str(), result),
    ))
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum DirectionParam {
    Forward,
    Backward,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    from: Option<u64>,
    limit: Option<u32>,
    direction: Option<DirectionParam>,
    as_of: Option<String>,
    to_version: Option<u64>,
}

pub fn limit(raw: Option<u32>) -> Result<u32, ApiError> {
    match raw.unwrap_or(DEFAULT_LIMIT) {
        l @ 1..=MAX_LIMIT => Ok(l),
        _ => Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_LIMIT}"
        ))),
    }
}

/// An optional RFC 3339 query parameter, in microseconds since the epoch.
pub fn time_param(name: &str, raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    raw.map(|s| {
        parse_rfc3339(s)
            .ok_or_else(|| ApiError::BadRequest(format!("{name} {s:?} is not an RFC 3339 time")))
    })
    .transpose()
}

pub fn as_of(raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    time_param("as_of", raw)
}

#[derive(serde::Serialize)]
struct StreamPageView<'a> {
    stream_id: &'a str,
    current_version: u64,
    events: EventList<'a>,
    next: Option<u64>,
}

/// Tells the audit record how many events a response carries and whether
/// any of them in clear personal data.
pub fn note_disclosure(caller: &Caller, events: &[ReadEvent]) {
    let personal = events
        .iter()
        .any(|e| e.personal_data == PersonalData::Decrypted);
    caller.audit.disclosed(events.len() as u64, personal);
}

async fn read(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    // System streams (`$subjects`) may be read, never appended to.
    let stream = path_id(path, StreamId::parse_to_read)?;
    caller.require(Permission::Read, Some(stream.as_str()))?;
    caller.require_purpose(Some(stream.as_str()))?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let direction = match p.direction.unwrap_or(DirectionParam::Forward) {
        DirectionParam::Forward => Direction::Forward,
        DirectionParam::Backward => Direction::Backward,
    };
    let page = state
        .events
        .read_stream(
            &stream,
            p.from,
            limit(p.limit)?,
            direction,
            AsOf {
                as_of_us: as_of(p.as_of.as_deref())?,
                to_version: p.to_version,
            },
            &caller.grants,
        )
        .await?;
    note_disclosure(&caller, &page.events);
    Ok(json_response(
        StatusCode::OK,
        &StreamPageView {
            stream_id: stream.as_str(),
            current_version: page.current_version,
            events: EventList(&page.events),
            next: page.next,
        },
    ))
}
