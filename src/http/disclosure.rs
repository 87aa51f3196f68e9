//! What a data route's answer tells its audit record, carried by the
//! answer itself.
//!
//! Every handler behind the audit middleware ([`super::trail`]) answers
//! `Result<Audited, ApiError>`, and an [`Audited`] can only be made by
//! saying what the answer discloses:
//!
//! - [`Audited::disclosing`] takes a body that holds events or a snapshot
//!   ([`Discloses`]): the count and whether any personal data is in clear
//!   are read off the body itself;
//! - [`Audited::clear`] takes a body that holds neither ([`Clear`]: the
//!   views of events and snapshots do not implement it, so they cannot go
//!   out this way);
//! - [`Audited::affecting`] is a clear body about events a request changed
//!   (a forget);
//! - [`Audited::recorded`] is an answer whose record the handler had
//!   committed itself (with an append, a forget's ledger entry, before an
//!   export's body), which takes the [`Recorded`] the slot hands out.
//!
//! The middleware reads it from the response. A success without one (a
//! handler that did not say) is a bug: it is logged and answered 500, and
//! nothing leaves.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::views::{EventList, json_response};
use crate::domain::PersonalData;

/// What an answer tells the audit record (a response extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Told {
    /// It carries (or changed) `events` events; some with personal data in
    /// clear when `personal_data`.
    Counted { events: u64, personal_data: bool },
    /// Its record is already committed.
    Recorded,
}

/// A body that holds events or snapshots: what it discloses.
pub(super) trait Discloses {
    /// The events (or snapshots) it holds, and whether any shows personal
    /// data in clear.
    fn disclosure(&self) -> (u64, bool);
}

/// A body that holds no event, no snapshot and no personal data.
pub(super) trait Clear {}

/// Proof that the request's record was committed by the handler's own
/// write: from [`super::trail::AuditSlot::recorded`].
pub struct Recorded(pub(super) ());

/// The answer of a data route, with what its audit record must say.
pub struct Audited {
    response: Response,
    told: Told,
}

impl Audited {
    /// A body of events or snapshots, as its record counts them.
    pub(super) fn disclosing(status: StatusCode, body: &(impl Serialize + Discloses)) -> Self {
        let (events, personal_data) = body.disclosure();
        Self {
            response: json_response(status, body),
            told: Told::Counted {
                events,
                personal_data,
            },
        }
    }

    /// A body that discloses nothing.
    pub(super) fn clear(status: StatusCode, body: &(impl Serialize + Clear)) -> Self {
        Self::affecting(status, body, 0)
    }

    /// A body that discloses nothing, about `events` events the request
    /// changed.
    pub(super) fn affecting(
        status: StatusCode,
        body: &(impl Serialize + Clear),
        events: u64,
    ) -> Self {
        Self {
            response: json_response(status, body),
            told: Told::Counted {
                events,
                personal_data: false,
            },
        }
    }

    /// Any answer (a streamed body, a refusal) whose record the handler
    /// committed.
    pub(super) fn recorded(response: impl IntoResponse, _: Recorded) -> Self {
        Self {
            response: response.into_response(),
            told: Told::Recorded,
        }
    }

    /// A subscription: its opening record discloses nothing, and each batch
    /// it sends with personal data in clear is recorded before it leaves,
    /// with a closing record of all it sent.
    pub(super) fn subscription(response: Response) -> Self {
        Self {
            response,
            told: Told::Counted {
                events: 0,
                personal_data: false,
            },
        }
    }
}

impl IntoResponse for Audited {
    fn into_response(self) -> Response {
        let mut response = self.response;
        response.extensions_mut().insert(self.told);
        response
    }
}

impl Discloses for EventList<'_> {
    fn disclosure(&self) -> (u64, bool) {
        let personal = self
            .0
            .iter()
            .any(|e| e.personal_data == PersonalData::Decrypted);
        (self.0.len() as u64, personal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventId, Position, ReadEvent, StreamId, Subject, Version};

    fn event(personal_data: PersonalData) -> ReadEvent {
        ReadEvent {
            id: EventId::new(uuid::Uuid::new_v4()),
            stream_id: StreamId::parse("accounts-1").unwrap(),
            version: Version::new(1),
            position: Position::new(1),
            event_type: "MoneyDeposited".into(),
            subject: Some(Subject::parse("cust-1").unwrap()),
            data: serde_json::Map::new(),
            metadata: serde_json::Map::new(),
            recorded_at_us: 0,
            personal_data,
        }
    }

    fn told(a: Audited) -> Option<Told> {
        a.into_response().extensions().get::<Told>().copied()
    }

    #[derive(Serialize)]
    struct Page<'a> {
        events: EventList<'a>,
    }

    impl Discloses for Page<'_> {
        fn disclosure(&self) -> (u64, bool) {
            self.events.disclosure()
        }
    }

    #[derive(Serialize)]
    struct Nothing {}

    impl Clear for Nothing {}

    #[test]
    fn a_body_of_events_tells_their_count_and_whether_any_is_in_clear() {
        let events = [
            event(PersonalData::Redacted),
            event(PersonalData::Decrypted),
        ];
        let page = Page {
            events: EventList(&events),
        };
        assert_eq!(
            told(Audited::disclosing(StatusCode::OK, &page)),
            Some(Told::Counted {
                events: 2,
                personal_data: true
            })
        );
        for withheld in [
            PersonalData::Redacted,
            PersonalData::Erased,
            PersonalData::Lost,
            PersonalData::None,
        ] {
            let events = [event(withheld)];
            let page = Page {
                events: EventList(&events),
            };
            assert_eq!(
                told(Audited::disclosing(StatusCode::OK, &page)),
                Some(Told::Counted {
                    events: 1,
                    personal_data: false
                }),
                "{withheld:?}"
            );
        }
    }

    #[test]
    fn clear_affecting_and_recorded_answers_say_so() {
        assert_eq!(
            told(Audited::clear(StatusCode::OK, &Nothing {})),
            Some(Told::Counted {
                events: 0,
                personal_data: false
            })
        );
        assert_eq!(
            told(Audited::affecting(StatusCode::ACCEPTED, &Nothing {}, 7)),
            Some(Told::Counted {
                events: 7,
                personal_data: false
            })
        );
        assert_eq!(
            told(Audited::recorded(StatusCode::CONFLICT, Recorded(()))),
            Some(Told::Recorded)
        );
    }
}
