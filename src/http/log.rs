//! `/events`: the global log in position order.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::disclosure::{Audited, Discloses};
use super::problem::ApiError;
use super::streams::{as_of, limit};
use super::views::{Event, EventList};
use super::{AppState, cursor_param};
use crate::policy::Permission;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(read_all))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LogParams {
    /// Read the events after this position (default 0: from the start).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<u64>,
    /// Events per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// RFC 3339: the log as it was at that time.
    #[param(format = DateTime)]
    as_of: Option<String>,
}

/// A page of the global log.
#[derive(serde::Serialize, ToSchema)]
#[schema(as = LogPage)]
struct LogPageView<'a> {
    #[schema(value_type = Vec<Event>)]
    events: EventList<'a>,
    /// Pass as `after` to continue; equal to `after` when nothing is new.
    next: u64,
}

impl Discloses for LogPageView<'_> {
    fn disclosure(&self) -> (u64, bool) {
        self.events.disclosure()
    }
}

/// The global log in position order, filtered to the streams the caller may
/// read.
#[utoipa::path(
    get,
    path = "/events",
    tag = "log",
    params(LogParams),
    security(("bearer" = [])),
    responses((status = 200, description = "A page of the log", body = LogPageView)),
)]
async fn read_all(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<LogParams>, QueryRejection>,
) -> Result<Audited, ApiError> {
    // `read` on at least one stream; the events of the others are left out.
    caller.require(Permission::Read, None)?;
    caller.require_purpose(None)?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let after = cursor_param("after", p.after)?.unwrap_or(0);
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
    Ok(Audited::disclosing(
        StatusCode::OK,
        &LogPageView {
            events: EventList(&page.events),
            next: page.next,
        },
    ))
}
