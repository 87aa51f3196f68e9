//! JSON shapes of what the API returns.

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::audit::AuditRecord;
use crate::domain::{AppendResult, PersonalData, ReadEvent, Subject};

// The time format is shared with the outbox relay's messages.
pub use crate::domain::{parse_rfc3339, rfc3339};

/// An event as read. `personal_data` says what became of its personal
/// fields for this caller.
#[derive(Serialize, ToSchema)]
#[schema(as = Event)]
pub struct EventView<'a> {
    pub id: Uuid,
    #[schema(value_type = String)]
    pub stream_id: &'a str,
    /// 1-based version within the stream.
    #[schema(minimum = 1)]
    pub version: u64,
    /// Position in the global log (gapless, commit order).
    #[schema(minimum = 1)]
    pub position: u64,
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub event_type: &'a str,
    /// The data subject whose personal data the event carries.
    #[schema(value_type = Option<String>)]
    pub subject: Option<&'a str>,
    /// The event's fields; personal ones only when `personal_data` is
    /// `decrypted`.
    #[schema(value_type = Object)]
    pub data: &'a Map<String, Value>,
    #[schema(value_type = Object)]
    pub metadata: &'a Map<String, Value>,
    #[schema(format = DateTime)]
    pub recorded_at: String,
    pub personal_data: PersonalData,
}

impl<'a> From<&'a ReadEvent> for EventView<'a> {
    fn from(e: &'a ReadEvent) -> Self {
        Self {
            id: e.id.into(),
            stream_id: e.stream_id.as_str(),
            version: e.version.get(),
            position: e.position.get(),
            event_type: &e.event_type,
            subject: e.subject.as_ref().map(Subject::as_str),
            data: &e.data,
            metadata: &e.metadata,
            recorded_at: rfc3339(e.recorded_at_us),
            personal_data: e.personal_data,
        }
    }
}

/// The name the API document gives [`EventView`].
pub type Event = EventView<'static>;

/// A list of events, serialised without copying them.
pub struct EventList<'a>(pub &'a [ReadEvent]);

impl Serialize for EventList<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(EventView::from))
    }
}

/// The answer to an append.
#[derive(Serialize, ToSchema)]
#[schema(as = Appended)]
pub struct AppendView<'a> {
    #[schema(value_type = String)]
    pub stream_id: &'a str,
    pub first_version: u64,
    pub last_version: u64,
    pub first_position: u64,
    pub last_position: u64,
}

impl<'a> AppendView<'a> {
    pub fn new(stream_id: &'a str, r: AppendResult) -> Self {
        Self {
            stream_id,
            first_version: r.first_version.get(),
            last_version: r.last_version.get(),
            first_position: r.first_position.get(),
            last_position: r.last_position.get(),
        }
    }
}

/// `serde_json::to_vec` into an `application/json` response.
pub fn json_response(
    status: axum::http::StatusCode,
    value: &impl Serialize,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "response serialisation failed");
            super::ApiError::Internal.into_response()
        }
    }
}

/// An audit record as the API shows it; hashes in hex.
#[derive(Serialize, ToSchema)]
#[schema(as = AuditRecord)]
pub struct AuditRecordView {
    #[schema(minimum = 1)]
    pub seq: u64,
    #[schema(format = DateTime)]
    pub recorded_at: String,
    pub principal: Option<String>,
    pub action: String,
    pub resource: String,
    /// `ok`, `denied` or `error`.
    #[schema(value_type = String, pattern = "^(ok|denied|error)$")]
    pub outcome: &'static str,
    pub event_count: u64,
    pub personal_data: bool,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub purpose: Option<String>,
    pub request_id: Option<String>,
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub prev_hash: String,
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub hash: String,
}

impl From<AuditRecord> for AuditRecordView {
    fn from(r: AuditRecord) -> Self {
        let e = r.entry;
        Self {
            seq: r.seq,
            recorded_at: rfc3339(r.recorded_at_us),
            principal: e.principal,
            action: e.action,
            resource: e.resource,
            outcome: e.outcome.as_str(),
            event_count: e.event_count,
            personal_data: e.personal_data,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            purpose: e.purpose,
            request_id: e.request_id,
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
        }
    }
}
