//! Authentication: the `Caller` extractor turns a bearer token into a
//! principal, or refuses the request with 401. No route that touches data is
//! reachable without it.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::problem::ApiError;
use crate::principals::Principal;

/// The authenticated principal of a request.
#[derive(Debug, Clone)]
pub struct Caller(
    #[expect(
        dead_code,
        reason = "read by the per-role access decision, which comes with the roles and audit work"
    )]
    pub Arc<Principal>,
);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or(ApiError::Unauthorized(
                "an Authorization: Bearer token is required",
            ))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized(
                "the Authorization header must be 'Bearer <token>'",
            ))?;
        match state.principals.authenticate(token).await {
            Ok(Some(p)) => {
                tracing::Span::current().record("principal", p.name.as_str());
                Ok(Caller(p))
            }
            Ok(None) => Err(ApiError::Unauthorized("the token is not valid")),
            Err(e) => {
                tracing::error!(error = %e, "authentication failed");
                Err(ApiError::Internal)
            }
        }
    }
}
