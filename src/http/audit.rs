//! `/audit`: the access log and the check of its hash chain (permission
//! `audit`). Audit records hold no event data, so an auditor never sees any.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Caller;
use super::problem::ApiError;
use super::streams::{limit, time_param};
use super::views::{AuditRecordView, json_response};
use crate::audit::Outcome;
use crate::policy::Permission;
use crate::service::ServiceError;
use crate::store::audit::{AuditFilter, ChainReport, parse_expectation};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/audit", get(list))
        .route("/audit/verify", get(verify))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    after: Option<u64>,
    limit: Option<u32>,
    principal: Option<String>,
    action: Option<String>,
    resource: Option<String>,
    /// `ok`, `denied` or `error`.
    outcome: Option<String>,
    /// RFC 3339: records at or after this time.
    since: Option<String>,
    /// RFC 3339: records before this time.
    until: Option<String>,
}

#[derive(Serialize)]
struct AuditPage {
    records: Vec<AuditRecordView>,
    /// Pass as `after` to continue.
    next: u64,
}

async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    caller.require(Permission::Audit, None)?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let filter = AuditFilter {
        since_us: time_param("since", p.since.as_deref())?,
        until_us: time_param("until", p.until.as_deref())?,
        principal: p.principal,
        action: p.action,
        resource: p.resource,
        outcome: p
            .outcome
            .map(|o| {
                Outcome::parse(&o).ok_or_else(|| {
                    ApiError::BadRequest(format!("outcome {o:?} is none of ok, denied, error"))
                })
            })
            .transpose()?,
    };
    let after = p.after.unwrap_or(0);
    let records = state
        .store
        .audit_records(after, limit(p.limit)?, &filter)
        .await
        .map_err(ServiceError::from)?;
    let next = records.last().map_or(after, |r| r.seq);
    Ok(json_response(
        StatusCode::OK,
        &AuditPage {
            records: records.into_iter().map(AuditRecordView::from).collect(),
            next,
        },
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    /// `SEQ:HASH` from an earlier verification: that record must still be
    /// there with that hash.
    expect: Option<String>,
}

async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<VerifyParams>, QueryRejection>,
) -> Result<Response, ApiError> {
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
        ChainReport::Intact { records, head_hash } => serde_json::json!({
            "ok": true,
            "records": records,
            "head_hash": hex::encode(head_hash),
        }),
        ChainReport::Broken {
            first_bad_seq,
            reason,
        } => {
            tracing::error!(first_bad_seq, %reason, "the audit chain is broken");
            serde_json::json!({
                "ok": false,
                "first_bad_seq": first_bad_seq,
                "reason": reason,
            })
        }
    };
    Ok(json_response(StatusCode::OK, &body))
}
