//! `/audit`: the access log and the check of its hash chain (permission
//! `audit`). Audit records hold no event data, so an auditor never sees any.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::disclosure::{Audited, Clear};
use super::problem::ApiError;
use super::streams::{limit, time_param};
use super::views::AuditRecordView;
use super::{AppState, cursor_param, plain_text};
use crate::audit::Outcome;
use crate::policy::Permission;
use crate::service::ServiceError;
use crate::store::audit::{AuditFilter, ChainReport, parse_expectation};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(verify))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    /// Records after this sequence number (default 0).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<u64>,
    /// Records per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only this principal's records.
    #[param(pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    principal: Option<String>,
    /// Only this action (e.g. `stream.read`).
    #[param(pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    action: Option<String>,
    /// Only this resource (e.g. `stream:accounts-1`).
    #[param(pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    resource: Option<String>,
    /// `ok`, `denied` or `error`.
    #[param(pattern = "^(ok|denied|error)$")]
    outcome: Option<String>,
    /// RFC 3339: records at or after this time.
    #[param(format = DateTime)]
    since: Option<String>,
    /// RFC 3339: records before this time.
    #[param(format = DateTime)]
    until: Option<String>,
}

/// A page of audit records.
#[derive(Serialize, ToSchema)]
struct AuditPage {
    records: Vec<AuditRecordView>,
    /// Pass as `after` to continue.
    next: u64,
}

/// Audit records name principals, resources and ids, never personal data.
impl Clear for AuditPage {}

/// Audit records in order, filtered. Needs `audit`.
#[utoipa::path(
    get,
    path = "/audit",
    tag = "audit",
    params(AuditParams),
    security(("bearer" = [])),
    responses((status = 200, description = "A page of audit records", body = AuditPage)),
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Audited, ApiError> {
    caller.require(Permission::Audit, None)?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let filter = AuditFilter {
        since_us: time_param("since", p.since.as_deref())?,
        until_us: time_param("until", p.until.as_deref())?,
        principal: plain_text("principal", p.principal)?,
        action: plain_text("action", p.action)?,
        resource: plain_text("resource", p.resource)?,
        outcome: p
            .outcome
            .map(|o| {
                Outcome::parse(&o).ok_or_else(|| {
                    ApiError::BadRequest(format!("outcome {o:?} is none of ok, denied, error"))
                })
            })
            .transpose()?,
    };
    let after = cursor_param("after", p.after)?.unwrap_or(0);
    let records = state
        .store
        .audit_records(after, limit(p.limit)?, &filter)
        .await
        .map_err(ServiceError::from)?;
    let next = records.last().map_or(after, |r| r.seq);
    Ok(Audited::clear(
        StatusCode::OK,
        &AuditPage {
            records: records.into_iter().map(AuditRecordView::from).collect(),
            next,
        },
    ))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct VerifyParams {
    /// `SEQ:HASH` from an earlier verification: that record must still be
    /// there with that hash.
    #[param(pattern = "^[1-9][0-9]{0,18}:[0-9a-fA-F]{64}$")]
    expect: Option<String>,
}

/// The result of a check of the audit chain.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum Verification {
    /// Every record's hash is right and links to the one before.
    Intact {
        ok: bool,
        records: u64,
        /// The last record's hash (hex): pass as `expect` next time.
        #[schema(pattern = "^[0-9a-f]{64}$")]
        head_hash: String,
    },
    /// The first record that fails, and why.
    Broken {
        ok: bool,
        first_bad_seq: u64,
        reason: String,
    },
}

impl Clear for Verification {}

/// Checks the audit log's hash chain. Needs `audit`.
#[utoipa::path(
    get,
    path = "/audit/verify",
    tag = "audit",
    params(VerifyParams),
    security(("bearer" = [])),
    responses((status = 200, description = "Intact, or where it breaks", body = Verification)),
)]
async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<VerifyParams>, QueryRejection>,
) -> Result<Audited, ApiError> {
    caller.require(Permission::Audit, None)?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let expect = p
        .expect
        .map(|e| {
            parse_expectation(&e).ok_or_else(|| {
                ApiError::BadRequest(
                    "expect must be SEQ:HASH, a record number and its 64 hex digit hash".into(),
                )
            })
        })
        .transpose()?;
    let report = state
        .store
        .verify_audit_chain(expect)
        .await
        .map_err(ServiceError::from)?;
    let body = match report {
        ChainReport::Intact { records, head_hash } => Verification::Intact {
            ok: true,
            records,
            head_hash: hex::encode(head_hash),
        },
        ChainReport::Broken {
            first_bad_seq,
            reason,
        } => {
            tracing::error!(first_bad_seq, %reason, "the audit chain is broken");
            Verification::Broken {
                ok: false,
                first_bad_seq,
                reason,
            }
        }
    };
    Ok(Audited::clear(StatusCode::OK, &body))
}
