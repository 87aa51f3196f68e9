//! JSON shapes of what the API returns.

use serde::Serialize;
use serde::ser::SerializeStruct;

use crate::audit::AuditRecord;
use crate::domain::{AppendResult, ReadEvent};

// The time format is shared with the outbox relay's messages.
pub use crate::domain::{parse_rfc3339, rfc3339};

/// An event as read: `{"id","stream_id","version","position","type","subject",
/// "data","metadata","recorded_at","personal_data"}`.
pub struct EventView<'a>(pub &'a ReadEvent);

impl Serialize for EventView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut st = s.serialize_struct("Event", 10)?;
        st.serialize_field("id", &e.id)?;
        st.serialize_field("stream_id", e.stream_id.as_str())?;
        st.serialize_field("version", &e.version)?;
        st.serialize_field("position", &e.position)?;
        st.serialize_field("type", &e.event_type)?;
        st.serialize_field("subject", &e.subject)?;
        st.serialize_field("data", &e.data)?;
        st.serialize_field("metadata", &e.metadata)?;
        st.serialize_field("recorded_at", &rfc3339(e.recorded_at_us))?;
        st.serialize_field("personal_data", e.personal_data.as_str())?;
        st.end()
    }
}

/// A list of events, serialised without copying them.
pub struct EventList<'a>(pub &'a [ReadEvent]);

impl Serialize for EventList<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(EventView))
    }
}

/// The answer to an append.
#[derive(Serialize)]
pub struct AppendView<'a> {
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
            first_version: r.first_version,
            last_version: r.last_version,
            first_position: r.first_position,
            last_position: r.last_position,
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
#[derive(Serialize)]
pub struct AuditRecordView {
    pub seq: u64,
    pub recorded_at: String,
    pub principal: Option<String>,
    pub action: String,
    pub resource: String,
    pub outcome: &'static str,
    pub event_count: u64,
    pub personal_data: bool,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub purpose: Option<String>,
    pub request_id: Option<String>,
    pub prev_hash: String,
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
