//! Authentication and authorisation: the `Caller` extractor turns a bearer
//! token into a principal and its grants under today's policies, or refuses
//! the request with 401. No route that touches data is reachable without it,
//! and every handler asks [`Caller::require`] before it touches data.
//!
//! Over TLS with a verified client certificate (`crate::tls::PeerCertificate`,
//! set per connection by `http::conn`), a request without a token is the
//! principal bound to that certificate; a certificate bound to nobody is a
//! 401 like a missing token. A request with both must name one principal:
//! a token of another principal than the certificate's is refused (401), so
//! that a stolen token cannot be used from a machine whose certificate is
//! someone else's, nor a certificate lend its standing to a token. A
//! certificate bound to nobody does not stand in the way of a valid token.

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
    /// What authenticated it, for long-lived requests that authenticate
    /// again.
    credential: Credential,
    /// The verifier of a JWT caller (`None`: one of eventvault's own
    /// tokens, or a certificate), which such a request asks again.
    jwt: Option<Arc<crate::jwt::Verifier>>,
}

/// What a caller authenticated with.
#[derive(Debug, Clone)]
enum Credential {
    /// A bearer token (with or without an agreeing certificate).
    Token(Token),
    /// The fingerprint of the connection's verified client certificate.
    Certificate(String),
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
    /// authentication cache (a subscription): `Ok(None)` once the token (or
    /// the client certificate) no longer authenticates (the principal was
    /// removed; a JWT expired, or its key is no longer in the identity
    /// provider's set), and an error when that cannot be told now (the
    /// principals cannot be read). The caller fails closed on an error:
    /// grants that cannot be confirmed are not kept, since the principal
    /// may have been removed meanwhile.
    pub async fn grants_now(
        &self,
        principals: &Principals,
        policies: &Policies,
    ) -> Result<Option<Grants>, crate::principals::PrincipalError> {
        let principal = match (&self.credential, &self.jwt) {
            (Credential::Token(token), Some(jwt)) => jwt.authenticate(&token.0).await.map(Arc::new),
            (Credential::Token(token), None) => principals.authenticate(&token.0).await?,
            (Credential::Certificate(fingerprint), _) => {
                principals.authenticate_certificate(fingerprint).await?
            }
        };
        Ok(principal.map(|p| Grants::of(policies, &p.roles)))
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
/// (including a rate-limit refusal and its audit record). While other
/// principals are active (a request in the last [`ACTIVE_WINDOW`]) each has
/// `shared` turns: one that floods then holds only so many requests in the
/// writer's groups and on the processors, and the others' requests go into
/// the next small commit. A principal alone has `alone` turns, so that one
/// service with many connections still fills the groups.
#[derive(Debug)]
pub struct Turns {
    shared: usize,
    alone: usize,
    principals: std::sync::Mutex<std::collections::HashMap<String, Principal>>,
}

/// How long after its last request a principal still counts as active.
pub const ACTIVE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug)]
struct Principal {
    in_flight: usize,
    last_seen: tokio::time::Instant,
    /// Woken (one waiter) when one of its turns is given back.
    released: Arc<tokio::sync::Notify>,
}

/// One turn; given back when dropped.
#[derive(Debug)]
pub struct Turn {
    turns: Arc<Turns>,
    principal: String,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut all = self.turns.principals.lock().expect("turns lock");
        if let Some(p) = all.get_mut(&self.principal) {
            p.in_flight -= 1;
            p.released.notify_one();
        }
    }
}

impl Turns {
    /// `None` when `shared` is 0: no limit. `alone` is at least `shared`.
    pub fn new(shared: usize, alone: usize) -> Option<Self> {
        (shared > 0).then(|| Self {
            shared,
            alone: alone.max(shared),
            principals: Default::default(),
        })
    }

    /// Waits for one of `principal`'s turns. (One entry per principal that
    /// ever made a request: bounded by the principals there are.)
    pub async fn take(self: &Arc<Self>, principal: &str) -> Turn {
        loop {
            let released = {
                let mut all = self.principals.lock().expect("turns lock");
                let now = tokio::time::Instant::now();
                let others_active = all.iter().any(|(name, p)| {
                    name != principal
                        && (p.in_flight > 0 || now.duration_since(p.last_seen) < ACTIVE_WINDOW)
                });
                let cap = if others_active {
                    self.shared
                } else {
                    self.alone
                };
                let p = all
                    .entry(principal.to_owned())
                    .or_insert_with(|| Principal {
                        in_flight: 0,
                        last_seen: now,
                        released: Arc::new(tokio::sync::Notify::new()),
                    });
                p.last_seen = now;
                if p.in_flight < cap {
                    p.in_flight += 1;
                    return Turn {
                        turns: self.clone(),
                        principal: principal.to_owned(),
                    };
                }
                p.released.clone()
            };
            // All its turns are taken, so one will be given back; a notice
            // given meanwhile is kept by `Notify` for the next waiter.
            released.notified().await;
        }
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
        // A refusal for want of a valid token counts against the client
        // address's allowance (429 beyond it) and is recorded, or counted
        // into the address's aggregate record (`unauthenticated`).
        let refuse = |why: &'static str| {
            let verdict = state
                .unauthenticated
                .refused(audit.client(), audit.context().request_id.as_deref());
            audit.refused_unauthenticated(verdict);
            match verdict.retry_after {
                Some(secs) => ApiError::TooManyUnauthenticated(secs),
                None => ApiError::Unauthorized(why),
            }
        };
        let certificate = parts
            .extensions
            .get::<crate::tls::PeerCertificate>()
            .map(|c| c.fingerprint.clone());
        let Some(header) = parts.headers.get(AUTHORIZATION) else {
            let Some(fingerprint) = certificate else {
                return Err(refuse("an Authorization: Bearer token is required"));
            };
            return match state
                .principals
                .authenticate_certificate(&fingerprint)
                .await
            {
                Ok(Some(principal)) => {
                    admit(
                        state,
                        audit,
                        &principal,
                        Credential::Certificate(fingerprint),
                        None,
                    )
                    .await
                }
                Ok(None) => Err(refuse(
                    "the client certificate is bound to no principal; send an Authorization: Bearer token",
                )),
                Err(e) => Err(not_authenticated(e)),
            };
        };
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refuse("the Authorization header must be 'Bearer <token>'"))?;
        // With JWT callers configured, a token that is not one of ours and
        // has a JWT's shape is verified as one; every refusal of it is the
        // same 401 as an unknown token of ours.
        let jwt = state.jwt.clone().filter(|_| crate::jwt::is_jwt(token));
        let found = match &jwt {
            Some(verifier) => Ok(verifier.authenticate(token).await.map(Arc::new)),
            None => state.principals.authenticate(token).await,
        };
        match found {
            Ok(Some(principal)) => {
                if let Some(fingerprint) = certificate {
                    match state
                        .principals
                        .authenticate_certificate(&fingerprint)
                        .await
                    {
                        Ok(Some(bound)) if bound.name != principal.name => {
                            return Err(refuse(
                                "the bearer token and the client certificate belong to different principals",
                            ));
                        }
                        Ok(_) => {}
                        Err(e) => return Err(not_authenticated(e)),
                    }
                }
                let credential = Credential::Token(Token(Zeroizing::new(token.to_owned())));
                admit(state, audit, &principal, credential, jwt).await
            }
            Ok(None) => Err(refuse("the token is not valid")),
            Err(e) => Err(not_authenticated(e)),
        }
    }
}

/// The caller `principal`, once its turn, its headers and its rate allow.
async fn admit(
    state: &AppState,
    audit: AuditSlot,
    principal: &crate::principals::Principal,
    credential: Credential,
    jwt: Option<Arc<crate::jwt::Verifier>>,
) -> Result<Caller, ApiError> {
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
        credential,
        jwt,
    })
}

/// The answer when the principals could not be read: 503 for a store that
/// may come back, 500 otherwise.
fn not_authenticated(e: crate::principals::PrincipalError) -> ApiError {
    match e {
        crate::principals::PrincipalError::Store(e) if e.fault().is_some() => {
            ApiError::from_fault(&e)
        }
        e => {
            tracing::error!(error = %e, "authentication failed");
            ApiError::Internal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test(start_paused = true)]
    async fn a_principal_has_few_turns_while_others_are_active() {
        let turns = Arc::new(Turns::new(2, 3).unwrap());
        // Alone, `a` has three turns; a fourth request waits.
        let first = turns.take("a").await;
        let second = turns.take("a").await;
        let _third = turns.take("a").await;
        let mut fourth = Box::pin(turns.take("a"));
        assert!((&mut fourth).now_or_never().is_none());
        // `b` is served at once; from now on `a` has two turns, so one
        // given back is not enough.
        let b = turns.take("b").now_or_never().expect("b is served at once");
        drop(first);
        assert!((&mut fourth).now_or_never().is_none());
        // `b` is done and a second of quiet later it no longer counts: the
        // next turn `a` gives back lets the waiting request go on.
        drop(b);
        tokio::time::advance(ACTIVE_WINDOW).await;
        drop(second);
        assert!(fourth.now_or_never().is_some());
        assert!(Turns::new(0, 64).is_none());
    }
}
