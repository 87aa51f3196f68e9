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

/// Property tests of an append's body, decoded as the JSON extractor does
/// and turned into a batch as the handler does (no server needed).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// What the handler makes of a body's bytes.
    fn decode(bytes: &[u8]) -> Result<EventBatch, ApiError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let body: AppendBody = serde_path_to_error::deserialize(de)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        proposed(body)
    }

    const NAME_CHARS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@-";

    fn name_ok(s: &str, at_sign: bool) -> bool {
        (1..=200).contains(&s.chars().count())
            && s.chars()
                .all(|c| NAME_CHARS.contains(c) && (at_sign || c != '@'))
    }

    /// One event of a body: id (from a small range, so that some repeat),
    /// type, subject, data and metadata.
    #[derive(Debug, Clone)]
    struct Ev {
        id: Option<u128>,
        event_type: String,
        subject: Option<String>,
        data: Map<String, Value>,
        metadata: Option<Map<String, Value>>,
    }

    fn objects() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(
            ".{0,6}",
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                ".{0,8}".prop_map(Value::from),
                Just(json!({"nested": [1, "two", null]})),
            ],
            0..3,
        )
        .prop_map(|m| m.into_iter().collect())
    }

    fn evs() -> impl Strategy<Value = Ev> {
        let name =
            || prop_oneof![6 => "[A-Za-z0-9._:-]{1,12}", 1 => "[A-Za-z@ /$]{0,3}", 1 => ".{0,4}"];
        (
            prop::option::of(0..40u128),
            name(),
            prop::option::of(name()),
            objects(),
            prop::option::of(objects()),
        )
            .prop_map(|(id, event_type, subject, data, metadata)| Ev {
                id,
                event_type,
                subject,
                data,
                metadata,
            })
    }

    fn to_json(e: &Ev) -> Value {
        let mut o = Map::new();
        if let Some(id) = e.id {
            o.insert("id".into(), json!(Uuid::from_u128(id)));
        }
        o.insert("type".into(), json!(e.event_type));
        if let Some(s) = &e.subject {
            o.insert("subject".into(), json!(s));
        }
        o.insert("data".into(), Value::Object(e.data.clone()));
        if let Some(m) = &e.metadata {
            o.insert("metadata".into(), Value::Object(m.clone()));
        }
        Value::Object(o)
    }

    fn bodies() -> impl Strategy<Value = Vec<Ev>> {
        prop_oneof![
            8 => prop::collection::vec(evs(), 0..6),
            1 => (evs(), 999..=1001usize).prop_map(|(e, n)| {
                // Many events, distinct ids: only the count decides.
                (0..n as u128)
                    .map(|i| Ev { id: Some(1000 + i), ..e.clone() })
                    .collect()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn bodies_are_accepted_exactly_when_valid(events in bodies()) {
            let body = serde_json::to_vec(&json!({
                "events": events.iter().map(to_json).collect::<Vec<_>>()
            }))
            .unwrap();
            let first_bad = events.iter().position(|e| {
                !name_ok(&e.event_type, false)
                    || e.subject.as_deref().is_some_and(|s| !name_ok(s, true))
            });
            let mut given: Vec<u128> = events.iter().filter_map(|e| e.id).collect();
            let n_given = given.len();
            given.sort_unstable();
            given.dedup();
            let valid = first_bad.is_none()
                && (1..=crate::domain::MAX_EVENTS_PER_APPEND).contains(&events.len())
                && given.len() == n_given;
            match decode(&body) {
                Ok(batch) => {
                    prop_assert!(valid, "accepted {events:?}");
                    let got = batch.into_inner();
                    prop_assert_eq!(got.len(), events.len());
                    for (g, e) in got.iter().zip(&events) {
                        if let Some(id) = e.id {
                            prop_assert_eq!(g.id, Uuid::from_u128(id));
                        }
                        prop_assert_eq!(g.event_type.as_str(), e.event_type.as_str());
                        prop_assert_eq!(g.subject.as_ref().map(Subject::as_str), e.subject.as_deref());
                        prop_assert_eq!(&g.data, &e.data);
                        prop_assert_eq!(&g.metadata, &e.metadata.clone().unwrap_or_default());
                    }
                }
                Err(ApiError::BadRequest(m)) => {
                    prop_assert!(!valid, "refused: {m}");
                    if let Some(i) = first_bad {
                        let place = format!("events[{i}]: ");
                        prop_assert!(m.starts_with(&place), "{m}");
                    }
                }
                Err(other) => prop_assert!(false, "not a 400: {other:?}"),
            }
        }

        #[test]
        fn any_bytes_are_a_batch_or_a_bad_request(bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            // JSON-like text near the expected shape.
            prop::collection::vec(prop::sample::select(&[
                "{", "}", "[", "]", ",", ":", "\"events\"", "\"type\"", "\"T\"", "\"data\"",
                "\"id\"", "\"subject\"", "\"metadata\"", "\"00000000-0000-0000-0000-000000000001\"",
                "null", "1", "-0.5e999", "\"\\ud800\"", " ",
            ][..]), 0..30).prop_map(|p| p.concat().into_bytes()),
        ]) {
            match decode(&bytes) {
                Ok(batch) => prop_assert!(!batch.into_inner().is_empty()),
                Err(ApiError::BadRequest(m)) => prop_assert!(!m.is_empty()),
                Err(other) => prop_assert!(false, "not a 400: {other:?}"),
            }
        }
    }
}
