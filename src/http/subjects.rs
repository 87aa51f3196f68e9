//! `/subjects/{subject}`: a subject's state, and the right to erasure
//! (`POST …/forget`, crypto-shredding).

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi as _, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::body::OptionalJsonBody;
use super::disclosure::{Audited, Clear};
use super::openapi::SubjectPath;
use super::problem::ApiError;
use super::snapshots::{Snapshot, SnapshotView};
use super::views::{Event, EventView, json_response, rfc3339};
use super::{AppState, path_id, plain_text};
use crate::audit::Outcome;
use crate::domain::Subject;
use crate::policy::Permission;
use crate::service::{ForgetReport, SubjectState};

/// Longest accepted reason of a forget.
const MAX_REASON_CHARS: usize = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ForgetSchemas::openapi())
        .routes(routes!(state))
        .routes(routes!(forget))
        .routes(routes!(export))
}

/// What a subject's state is.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum StateName {
    /// Has data keys; events decrypt.
    Active,
    /// Forgotten: keys destroyed, personal data erased.
    Forgotten,
    /// Being forgotten: personal data erased for every reader, the keys not
    /// all destroyed yet (the keystore did not answer); the service
    /// finishes by itself.
    Forgetting,
    /// Never seen.
    Unknown,
}

/// Everything stored about a subject, decrypted (streamed).
#[derive(ToSchema)]
#[schema(as = SubjectExport)]
#[allow(dead_code)]
struct ExportView {
    subject: String,
    state: StateName,
    events: Vec<Event>,
    /// The snapshots sealed for the subject (their streams' events up to
    /// their versions are about them), in stream id order. A snapshot folds
    /// every subject of its stream: it is shown whole.
    snapshots: Vec<Snapshot>,
}

/// Events per page of an export: what one export holds in memory at once.
const EXPORT_PAGE: u32 = 1000;

/// Snapshots per page of an export.
const EXPORT_SNAPSHOT_PAGE: u32 = 100;

/// Where a streamed export is.
enum Part {
    /// The opening, not yet sent.
    Head(String),
    /// Events after position `after`; `written` so far.
    Events {
        after: u64,
        written: u64,
    },
    /// Snapshots of streams after `after`; `written` so far.
    Snapshots {
        after: String,
        written: u64,
    },
    Done,
}

fn state_name(s: SubjectState) -> StateName {
    match s {
        SubjectState::Active => StateName::Active,
        SubjectState::Forgotten => StateName::Forgotten,
        SubjectState::Forgetting => StateName::Forgetting,
        SubjectState::Unknown => StateName::Unknown,
    }
}

/// Everything stored about a subject (GDPR Art. 15 and 20): its events in
/// position order across all streams, then the snapshots sealed for it:
/// `{"subject","state","events":[…],"snapshots":[…]}`. Streamed a
/// page at a time, so a subject with 100,000 events is never held in memory
/// whole. The disclosure is audited before the first byte leaves; a failure
/// mid-way cuts the connection (the JSON is then visibly incomplete).
#[utoipa::path(
    get,
    path = "/subjects/{subject}/export",
    tag = "subjects",
    params(SubjectPath),
    security(("bearer" = [])),
    responses((status = 200, description = "Every event about the subject, and every snapshot \
        sealed for it, decrypted (GDPR Art. 15 and 20); erased if forgotten", body = ExportView)),
)]
async fn export(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Audited, ApiError> {
    caller.require(Permission::Export, None)?;
    let subject = path_id(path, Subject::parse)?;
    // The export is of the store as it is now: events appended meanwhile
    // wait for the next one, so the audited count is exact and the export ends.
    let until = state.events.head_position().await?;
    let (s, count) = state.events.subject_state(&subject, until).await?;
    let snapshots = state.events.subject_snapshot_count(&subject).await?;
    // A forgotten subject's events and snapshots are erased on every read
    // path (the ledger is checked per page), so only one that is not
    // forgotten discloses (`forgetting` is forgotten for every reader too).
    let personal = !matches!(s, SubjectState::Forgotten | SubjectState::Forgetting)
        && (count > 0 || snapshots > 0);
    if state
        .events
        .audit(caller.audit.entry_disclosing(Outcome::Ok, count, personal))
        .await
        .is_err()
    {
        return Err(ApiError::not_audited());
    }
    let recorded = caller.audit.recorded();

    let head = format!(
        "{{\"subject\":{},\"state\":{},\"events\":[",
        serde_json::to_string(subject.as_str()).expect("strings serialise"),
        serde_json::to_string(&state_name(s)).expect("states serialise"),
    );
    let events = state.events.clone();
    let grants = caller.grants.clone();
    let cut = |e: crate::service::ServiceError| {
        tracing::error!(error = %e, "export failed mid-way; the response is cut");
        std::io::Error::other("export failed")
    };
    let body = futures::stream::unfold(Part::Head(head), move |part| {
        let (events, grants, subject) = (events.clone(), grants.clone(), subject.clone());
        async move {
            match part {
                Part::Head(h) => Some((
                    Ok(Bytes::from(h)),
                    Part::Events {
                        after: 0,
                        written: 0,
                    },
                )),
                Part::Events { after, written } => {
                    let (page, read, last) = match events
                        .export_page(&subject, after, until, EXPORT_PAGE, &grants)
                        .await
                    {
                        Ok(p) => p,
                        Err(e) => return Some((Err(cut(e)), Part::Done)),
                    };
                    let mut chunk = Vec::new();
                    let mut n = written;
                    for e in &page {
                        if n > 0 {
                            chunk.push(b',');
                        }
                        serde_json::to_writer(&mut chunk, &EventView::from(e))
                            .expect("events serialise");
                        n += 1;
                    }
                    let next = if read < EXPORT_PAGE as usize {
                        chunk.extend_from_slice(b"],\"snapshots\":[");
                        Part::Snapshots {
                            after: String::new(),
                            written: 0,
                        }
                    } else {
                        Part::Events {
                            after: last,
                            written: n,
                        }
                    };
                    Some((Ok(Bytes::from(chunk)), next))
                }
                Part::Snapshots { after, written } => {
                    let (page, more) = match events
                        .export_snapshots(&subject, &after, EXPORT_SNAPSHOT_PAGE, &grants)
                        .await
                    {
                        Ok(p) => p,
                        Err(e) => return Some((Err(cut(e)), Part::Done)),
                    };
                    let mut chunk = Vec::new();
                    let mut n = written;
                    for (stream, snap) in &page {
                        if n > 0 {
                            chunk.push(b',');
                        }
                        serde_json::to_writer(&mut chunk, &SnapshotView::new(stream, snap))
                            .expect("snapshots serialise");
                        n += 1;
                    }
                    let next = match more {
                        Some(after) => Part::Snapshots { after, written: n },
                        None => {
                            chunk.extend_from_slice(b"]}");
                            Part::Done
                        }
                    };
                    Some((Ok(Bytes::from(chunk)), next))
                }
                Part::Done => None,
            }
        }
    });
    Ok(Audited::recorded(
        Response::builder()
            .status(StatusCode::OK)
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from_stream(body))
            .expect("a valid response"),
        recorded,
    ))
}

/// A subject's state and how many events name it.
#[derive(Serialize, ToSchema)]
#[schema(as = SubjectState)]
struct StateView<'a> {
    #[schema(value_type = String)]
    subject: &'a str,
    state: StateName,
    events: u64,
}

impl Clear for StateView<'_> {}

/// A subject's state. Needs `export` or `forget`.
#[utoipa::path(
    get,
    path = "/subjects/{subject}",
    tag = "subjects",
    params(SubjectPath),
    security(("bearer" = [])),
    responses((status = 200, description = "The subject's state", body = StateView)),
)]
async fn state(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Audited, ApiError> {
    if !caller.grants.allows(Permission::Export, None) {
        caller.require(Permission::Forget, None)?;
    }
    let subject = path_id(path, Subject::parse)?;
    let (s, events) = state.events.subject_state(&subject, u64::MAX).await?;
    Ok(Audited::clear(
        StatusCode::OK,
        &StateView {
            subject: subject.as_str(),
            state: state_name(s),
            events,
        },
    ))
}

/// The optional body of a forget.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ForgetRequest)]
struct ForgetBody {
    /// Why (e.g. a ticket number). Kept in the forget ledger; must not carry
    /// personal data.
    #[schema(max_length = 1000, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    reason: Option<String>,
}

/// The forget's body is described by reference (see [`forget`]), which
/// does not register its schema: this does.
#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(ForgetBody)))]
struct ForgetSchemas;

/// The result of a forget.
#[derive(Serialize, ToSchema)]
#[schema(as = Forgotten)]
struct ForgetView<'a> {
    #[schema(value_type = String)]
    subject: &'a str,
    /// `forgotten` (200): every step has run. `forgetting` (202): recorded,
    /// so erased for every reader, but the keys are not all destroyed yet
    /// (the keystore did not answer); the service finishes by itself, and
    /// `GET /subjects/{subject}` says `forgotten` once it has.
    #[schema(value_type = String, pattern = "^(forgotten|forgetting)$")]
    state: StateName,
    #[schema(format = DateTime)]
    forgotten_at: String,
    /// Data keys of the subject destroyed by its forget, over all attempts
    /// (while `forgetting`: those whose destruction is recorded so far).
    keys_destroyed: u64,
    events_affected: u64,
}

impl Clear for ForgetView<'_> {}

/// Forgets a subject: destroys its keys (crypto-shredding), so its personal
/// data is erased everywhere. Idempotent. Needs `forget`. Once the forget is
/// recorded the subject reads `erased` for everyone: if its keys cannot be
/// destroyed at once (the keystore does not answer) the answer is 202
/// `forgetting`, and the service finishes by itself; 503 only when the
/// forget could not be recorded.
#[utoipa::path(
    post,
    path = "/subjects/{subject}/forget",
    tag = "subjects",
    params(SubjectPath),
    // An optional `ForgetRequest`, not `Option<ForgetBody>`: that is a
    // required body of `oneOf: [null, ForgetRequest]`, which generated
    // clients cannot send without a body.
    request_body(content = ref("#/components/schemas/ForgetRequest"),
        content_type = "application/json",
        description = "Optional: no body is no reason"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Forgotten (now or before)", body = ForgetView),
        (status = 202, description = "Recorded: erased for every reader; the keys are destroyed \
            as soon as the keystore answers (`state`: `forgetting`)", body = ForgetView),
    )
)]
async fn forget(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Audited, ApiError> {
    // Before a byte of the body is read: a caller without the permission
    // gets its 403 whatever it sends.
    caller.require(Permission::Forget, None)?;
    let subject = path_id(path, Subject::parse)?;
    // No body, an empty one or `null`: no reason.
    let OptionalJsonBody(body) =
        OptionalJsonBody::<ForgetBody>::from_request(request, &state).await?;
    let reason = plain_text("reason", body.and_then(|b| b.reason))?;
    if reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
    {
        return Err(ApiError::BadRequest(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    // Once the ledger entry is durable, the answer is at least 202
    // `forgetting`: should the later steps outlast the request's deadline
    // (a keystore that does not answer), that is what the caller gets, not
    // a 503 that would deny a forget that took effect.
    let slot = caller.audit.clone();
    let (report, recorded) = state
        .events
        .forget(
            &subject,
            reason.as_deref(),
            caller.audit.entry(Outcome::Ok),
            |early| {
                let (status, view) = forget_answer(&subject, early);
                let body = serde_json::to_value(&view).expect("a forget's answer serialises");
                slot.set_fallback(status, body);
            },
        )
        .await?;
    let (status, view) = forget_answer(&subject, &report);
    Ok(if recorded {
        Audited::recorded(json_response(status, &view), caller.audit.recorded())
    } else {
        Audited::affecting(status, &view, report.events_affected)
    })
}

/// The answer to a forget: 200 once it has run to its end, 202 while its
/// keys are still to be destroyed.
fn forget_answer<'a>(subject: &'a Subject, report: &ForgetReport) -> (StatusCode, ForgetView<'a>) {
    let status = match report.state {
        SubjectState::Forgetting => StatusCode::ACCEPTED,
        _ => StatusCode::OK,
    };
    let view = ForgetView {
        subject: subject.as_str(),
        state: state_name(report.state),
        forgotten_at: rfc3339(report.forgotten_at_us),
        keys_destroyed: report.keys_destroyed,
        events_affected: report.events_affected,
    };
    (status, view)
}
