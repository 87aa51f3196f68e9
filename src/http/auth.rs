//! Authentication and authorisation: the `Caller` extractor turns a bearer
//! token into a principal and its grants under today's policies, or refuses
//! the request with 401. No route that touches data is reachable without it,
//! and every handler asks [`Caller::require`] before it touches data.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::problem::ApiError;
use super::trail::AuditSlot;
use zeroize::Zeroizing;

use crate::policy::{Grants, Permission, Policies};
use crate::principals::Principals;

/// The authenticated principal of a request, what it may do, and the audit
/// record of the request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub grants: Grants,
    pub audit: AuditSlot,
    /// The bearer token, for long-lived requests that authenticate again.
    token: Token,
}

/// A bearer token held in memory: zeroized on drop, never shown by `Debug`.
#[derive(Clone)]
struct Token(Zeroizing<String>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Caller {
    /// 403 unless the caller's roles grant `permission` on `stream` (`None`:
    /// a permission not about one stream). Says nothing about whether the
    /// stream exists: the check comes before any data is read.
    pub fn require(&self, permission: Permission, stream: Option<&str>) -> Result<(), ApiError> {
        if self.grants.allows(permission, stream) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "the caller's roles do not grant '{}'{}",
                permission.as_str(),
                if stream.is_some() {
                    " on this stream"
                } else {
                    ""
                }
            )))
        }
    }

    /// The caller's grants as they are now, for a request that outlives the
    /// authentication cache (a subscription): `None` once the token no
    /// longer authenticates (the principal was removed).
    pub async fn grants_now(&self, principals: &Principals, policies: &Policies) -> Option<Grants> {
        match principals.authenticate(&self.token.0).await {
            Ok(Some(p)) => Some(Grants::of(policies, &p.roles)),
            Ok(None) => None,
            Err(e) => {
                // Keep serving on a passing database failure; the next check
                // decides.
                tracing::warn!(error = %e, "could not authenticate a subscriber again");
                Some(self.grants.clone())
            }
        }
    }

    /// 400 if a read that may disclose personal data of `stream` (`None`: of
    /// any stream) lacks the purpose one of the caller's roles requires.
    pub fn require_purpose(&self, stream: Option<&str>) -> Result<(), ApiError> {
        if self.audit.context().purpose.is_none() && self.grants.purpose_required(stream) {
            return Err(ApiError::BadRequest(
                "the caller's role requires a purpose for reads of personal data: send an X-Purpose header".into(),
            ));
        }
        Ok(())
    }
}

/// How many requests of one principal are served at once; the others wait
/// their turn, in arrival order, before anything else is done for them
/// (including a rate-limit refusal and its audit record). A principal that
/// floods then shares the writer's groups and the processors with the
/// others instead of crowding them out; one alone still has as many turns
/// as it can use.
#[derive(Debug)]
pub struct Turns {
    per_principal: usize,
    principals: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Turns {
    /// `None` for 0: no limit.
    pub fn new(per_principal: usize) -> Option<Self> {
        (per_principal > 0).then(|| Self {
            per_principal,
            principals: Default::default(),
        })
    }

    /// Waits for one of `principal`'s turns. (One entry per principal that
    /// ever made a request: bounded by the principals there are.)
    pub async fn take(&self, principal: &str) -> tokio::sync::OwnedSemaphorePermit {
        let turns = self
            .principals
            .lock()
            .expect("turns lock")
            .entry(principal.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_principal)))
            .clone();
        turns
            .acquire_owned()
            .await
            .expect("a principal's turns are never closed")
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let audit = parts
            .extensions
            .get::<AuditSlot>()
            .cloned()
            .ok_or_else(|| {
                tracing::error!("a data route is not wrapped by the audit middleware");
                ApiError::Internal
            })?;
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
            Ok(Some(principal)) => {
                tracing::Span::current().record("principal", principal.name.as_str());
                audit.set_principal(&principal.name);
                if let Some(turns) = &state.turns {
                    audit.hold_turn(turns.take(&principal.name).await);
                }
                if let Some(problem) = audit.bad_header() {
                    return Err(ApiError::BadRequest(problem.to_owned()));
                }
                if let Some(limiter) = &state.rate_limit
                    && let Err(until) = limiter.check_key(&principal.name)
                {
                    use governor::clock::Clock;
                    let wait = until.wait_time_from(governor::clock::DefaultClock::default().now());
                    return Err(ApiError::TooManyRequests(
                        wait.as_secs_f64().ceil().max(1.0) as u64,
                    ));
                }
                let grants = Grants::of(&state.policies, &principal.roles);
                Ok(Caller {
                    grants,
                    audit,
                    token: Token(Zeroizing::new(token.to_owned())),
                })
            }
            Ok(None) => Err(ApiError::Unauthorized("the token is not valid")),
            Err(e) => {
                tracing::error!(error = %e, "authentication failed");
                Err(ApiError::Internal)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn a_principal_waits_for_its_own_turns_only() {
        let turns = Turns::new(2).unwrap();
        let first = turns.take("a").await;
        let _second = turns.take("a").await;
        // A third request of `a` waits; `b` is served at once.
        let mut third = Box::pin(turns.take("a"));
        assert!((&mut third).now_or_never().is_none());
        assert!(turns.take("b").now_or_never().is_some());
        // One of `a`'s requests ends: the waiting one goes on.
        drop(first);
        assert!(third.now_or_never().is_some());
        assert!(Turns::new(0).is_none());
    }
}
