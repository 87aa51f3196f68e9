//! `/streams/{stream}/events`: append and read one stream.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::Caller;
use super::body::JsonBody;
use super::disclosure::{Audited, Discloses};
use super::openapi::{ReadStreamPath, StreamPath};
use super::problem::{ApiError, Problem};
use super::views::{AppendView, Event, EventList, json_response, parse_rfc3339};
use super::{AppState, cursor_param, path_id};
use crate::audit::Outcome;
use crate::domain::{EventBatch, EventType, ExpectedVersion, ProposedEvent, StreamId, Subject};
use crate::policy::Permission;
use crate::service::{AsOf, ServiceError};
use crate::store::Direction;
use crate::store::writer::Appended;

/// Default and largest page size of reads.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(append, read))
}

/// The body of an append: 1 to 1000 events, appended atomically.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AppendRequest)]
struct AppendBody {
    #[schema(min_items = 1, max_items = 1000)]
    events: Vec<EventBody>,
}

/// An event to append. The policies name which fields of its type are
/// personal; those are encrypted under the subject's key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewEvent)]
struct EventBody {
    /// Client-chosen id; makes retries idempotent. Generated when absent.
    id: Option<Uuid>,
    /// 1–200 of `[A-Za-z0-9._:-]`.
    #[serde(rename = "type")]
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,200}$")]
    event_type: String,
    /// The data subject whose personal data the event carries. Without one,
    /// an event of a type `classification.toml` lists may carry only that
    /// type's clear values (400 otherwise).
    #[schema(pattern = "^[A-Za-z0-9._:@-]{1,200}$")]
    subject: Option<String>,
    #[schema(value_type = Object)]
    data: Map<String, Value>,
    /// Stored in clear, never personal.
    #[serde(default)]
    #[schema(value_type = Object)]
    metadata: Map<String, Value>,
}

/// The optimistic-concurrency header of an append.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct AppendHeaders {
    /// `any` (default), `no-stream` (= `0`), `exists`, or the stream's
    /// current version (an integer). With `schema_with` the description is
    /// the schema's: see [`expected_version_schema`].
    #[param(rename = "Expected-Version", required = false, schema_with = expected_version_schema)]
    expected_version: Option<String>,
}

/// `Expected-Version`: an integer or one of the words, so that a generated
/// client takes the version as the number it is.
fn expected_version_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
    Schema::OneOf(
        OneOfBuilder::new()
            .description(Some(
                "`any` (default), `no-stream` (= `0`), `exists`, or the stream's current \
                 version, an integer",
            ))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .description(Some("The stream's current version (`0`: no stream)")),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["any", "no-stream", "exists"])),
            )
            .build(),
    )
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

/// Appends events to a stream, atomically.
#[utoipa::path(
    post,
    path = "/streams/{stream}/events",
    tag = "streams",
    params(StreamPath, AppendHeaders),
    request_body = AppendBody,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Appended", body = AppendView),
        (status = 200, description = "The same event ids were appended before, in this order: \
            the original result, nothing written", body = AppendView),
        (status = 409, description = "`wrong-expected-version` (with `current_version`) or \
            `duplicate-event-ids`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "An event's subject has been forgotten",
            body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn append(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<JsonBody<AppendBody>, ApiError>,
) -> Result<Audited, ApiError> {
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
    let (status, result) = match appended {
        Ok(Appended::Created(r)) => (StatusCode::CREATED, r),
        Ok(Appended::AlreadyAppended(r)) => (StatusCode::OK, r),
        // Refused by the writer, which committed its record (outcome
        // `error`).
        Err(e @ ServiceError::Rejected(_)) => {
            return Ok(Audited::recorded(
                ApiError::from(e),
                caller.audit.recorded(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Audited::recorded(
        json_response(status, &AppendView::new(stream.as_str(), result)),
        caller.audit.recorded(),
    ))
}

#[derive(Deserialize, Clone, Copy, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = Direction)]
enum DirectionParam {
    Forward,
    Backward,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ReadParams {
    /// The first version to read (forward: default 1; backward: default the
    /// last).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    from: Option<u64>,
    /// Events per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    #[param(inline)]
    direction: Option<DirectionParam>,
    /// RFC 3339: the stream as it was at that time.
    #[param(format = DateTime)]
    as_of: Option<String>,
    /// The stream as it was at that version.
    #[param(minimum = 1, maximum = 9223372036854775807_i64)]
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

/// A page of a stream.
#[derive(serde::Serialize, ToSchema)]
#[schema(as = StreamPage)]
struct StreamPageView<'a> {
    #[schema(value_type = String)]
    stream_id: &'a str,
    current_version: u64,
    #[schema(value_type = Vec<Event>)]
    events: EventList<'a>,
    /// The `from` of the next page; `null` at the end.
    next: Option<u64>,
}

impl Discloses for StreamPageView<'_> {
    fn disclosure(&self) -> (u64, bool) {
        self.events.disclosure()
    }
}

/// Reads a stream, a page at a time.
#[utoipa::path(
    get,
    path = "/streams/{stream}/events",
    tag = "streams",
    params(ReadStreamPath, ReadParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the stream", body = StreamPageView),
        (status = 404, description = "No such stream",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn read(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Audited, ApiError> {
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
            cursor_param("from", p.from)?,
            limit(p.limit)?,
            direction,
            AsOf {
                as_of_us: as_of(p.as_of.as_deref())?,
                to_version: cursor_param("to_version", p.to_version)?,
            },
            &caller.grants,
        )
        .await?;
    Ok(Audited::disclosing(
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
