//! `/events`: the global log in position order.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;

use super::AppState;
use super::auth::Caller;
use super::problem::ApiError;
use super::streams::{as_of, limit, note_disclosure};
use super::views::{EventList, json_response};
use crate::policy::Permission;

pub fn router() -> Router<AppState> {
    Router::new().route("/events", get(read_all))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    after: Option<u64>,
    limit: Option<u32>,
    as_of: Option<String>,
}

#[derive(serde::Serialize)]
struct LogPageView<'a> {
    events: EventList<'a>,
    /// Pass as `after` to continue; equal to `after` when nothing is new.
    next: u64,
}

async fn read_all(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<LogParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    // `read` on at least one stream; the events of the others are left out.
    caller.require(Permission::Read, None)?;
    caller.require_purpose(None)?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let after = p.after.unwrap_or(0);
    let page = state
        .events
        .read_all(
            after,
            limit(p.limit)?,
            as_of(p.as_of.as_deref())?,
            &caller.grants,
        )
        .await?;
    caller.audit.set_resource(if page.next > after {
        format!("positions:{}-{}", after + 1, page.next)
    } else {
        format!("positions:>{after}")
    });
    note_disclosure(&caller, &page.events);
    Ok(json_response(
        StatusCode::OK,
        &LogPageView {
            events: EventList(&page.events),
            next: page.next,
        },
    ))
}
