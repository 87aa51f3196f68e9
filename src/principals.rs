//! Named callers and their bearer tokens.
//!
//! A token is 256 random bits shown once when the principal is created; only
//! its SHA-256 is stored. Authentication hashes the presented token, looks
//! the hash up and compares it with the stored one in constant time (a
//! lookup's timing could only ever tell something about the hash, never about
//! the token). Recent answers (also "unknown") are cached briefly so that a
//! busy caller does not cost a database round trip per request, and a removed
//! principal loses access within [`CACHE_TTL`].
//!
//! A principal may instead be bound to a client certificate: the SHA-256
//! of its DER is stored (`principal add --client-cert`), and a request over
//! a TLS connection whose verified client certificate has that fingerprint
//! is that principal ([`Principals::authenticate_certificate`], cached the
//! same way). Such a principal has no token.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use zeroize::Zeroizing;

use crate::crypto;
use crate::policy::Policies;
use crate::store::principals::NewCredential;
use crate::store::{EventStore, StoreError};

/// How long an authentication answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
const CACHE_ENTRIES: usize = 10_000;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub roles: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrincipalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a principal named {0:?} exists already")]
    Exists(String),
    #[error("no principal is named {0:?}")]
    NotFound(String),
    #[error("unknown role {role:?}; the policies define: {known}")]
    UnknownRole { role: String, known: String },
    #[error("a principal needs at least one role")]
    NoRole,
    #[error("principal name must be 1 to 100 characters of letters, digits, '.', '_', '-' or '@'")]
    BadName,
    #[error("random generator unavailable")]
    Random,
    #[error("stored principal {0:?} is unreadable")]
    Corrupt(String),
    #[error("this certificate is bound to principal {0:?} already")]
    CertificateTaken(String),
}

/// A listed principal (never with a token).
#[derive(Debug, Clone)]
pub struct PrincipalInfo {
    pub name: String,
    pub roles: Vec<String>,
    pub created_at_us: i64,
    /// The fingerprint of the client certificate it is bound to, if any.
    pub client_cert_sha256: Option<String>,
}

/// A cached authentication answer (`None`: unknown token) and when it was made.
type CachedAnswer = (Option<Arc<Principal>>, Instant);

pub struct Principals {
    /// Where principals are stored.
    store: EventStore,
    /// Token hash → recent answer.
    cache: Mutex<LruCache<String, CachedAnswer>>,
}

impl std::fmt::Debug for Principals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principals").finish_non_exhaustive()
    }
}

fn parse_roles(name: &str, json: &str) -> Result<Vec<String>, PrincipalError> {
    serde_json::from_str(json).map_err(|_| PrincipalError::Corrupt(name.to_owned()))
}

/// A new principal's name and roles: a name of the allowed characters, at
/// least one role, each defined in the policies.
fn check_new(policies: &Policies, name: &str, roles: &[String]) -> Result<(), PrincipalError> {
    if name.is_empty()
        || name.len() > 100
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    {
        return Err(PrincipalError::BadName);
    }
    if roles.is_empty() {
        return Err(PrincipalError::NoRole);
    }
    for role in roles {
        if policies.role(role).is_none() {
            let mut known: Vec<&str> = policies.roles.keys().map(String::as_str).collect();
            known.sort();
            return Err(PrincipalError::UnknownRole {
                role: role.clone(),
                known: known.join(", "),
            });
        }
    }
    Ok(())
}

impl Principals {
    pub fn new(store: EventStore) -> Self {
        let cap = NonZeroUsize::new(CACHE_ENTRIES).expect("non-zero");
        Self {
            store,
            cache: Mutex::new(LruCache::new(cap)),
        }
    }

    /// The principal holding `token`, or `None` for an unknown token.
    pub async fn authenticate(
        &self,
        token: &str,
    ) -> Result<Option<Arc<Principal>>, PrincipalError> {
        let hash = crypto::token_hash(token);
        if let Some((p, at)) = self.cache.lock().expect("cache lock").get(&hash)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(p.clone());
        }
        let found = match self.store.principal_by_token_hash(&hash).await? {
            Some(row)
                if bool::from(subtle::ConstantTimeEq::ct_eq(
                    row.token_hash.as_deref().unwrap_or_default().as_bytes(),
                    hash.as_bytes(),
                )) =>
            {
                Some(Arc::new(Principal {
                    roles: parse_roles(&row.name, &row.roles)?,
                    name: row.name,
                }))
            }
            _ => None,
        };
        self.cache
            .lock()
            .expect("cache lock")
            .put(hash, (found.clone(), Instant::now()));
        Ok(found)
    }

    /// The principal bound to the client certificate of `fingerprint`
    /// (`crate::tls::fingerprint`), or `None`. The fingerprint is of a
    /// certificate the TLS verifier accepted, and no secret: a plain
    /// look-up.
    pub async fn authenticate_certificate(
        &self,
        fingerprint: &str,
    ) -> Result<Option<Arc<Principal>>, PrincipalError> {
        // Apart from the token hashes, whose keys are bare hex.
        let key = format!("cert:{fingerprint}");
        if let Some((p, at)) = self.cache.lock().expect("cache lock").get(&key)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(p.clone());
        }
        let found = match self.store.principal_by_certificate(fingerprint).await? {
            Some(row) => Some(Arc::new(Principal {
                roles: parse_roles(&row.name, &row.roles)?,
                name: row.name,
            })),
            None => None,
        };
        self.cache
            .lock()
            .expect("cache lock")
            .put(key, (found.clone(), Instant::now()));
        Ok(found)
    }

    /// Creates a principal with `roles` (each must exist in the policies) and
    /// returns its new token, which is not stored anywhere.
    pub async fn add(
        &self,
        policies: &Policies,
        name: &str,
        roles: &[String],
    ) -> Result<Zeroizing<String>, PrincipalError> {
        check_new(policies, name, roles)?;
        let token = crypto::new_token().map_err(|_| PrincipalError::Random)?;
        let roles_json = serde_json::to_string(roles).expect("strings serialise");
        if !self
            .store
            .insert_principal(
                name,
                &roles_json,
                NewCredential::TokenHash(&crypto::token_hash(&token)),
            )
            .await?
        {
            return Err(PrincipalError::Exists(name.to_owned()));
        }
        Ok(token)
    }

    /// Creates a principal with `roles` bound to the client certificate of
    /// `fingerprint`, without a token.
    pub async fn add_with_certificate(
        &self,
        policies: &Policies,
        name: &str,
        roles: &[String],
        fingerprint: &str,
    ) -> Result<(), PrincipalError> {
        check_new(policies, name, roles)?;
        if let Some(other) = self.store.principal_by_certificate(fingerprint).await? {
            return Err(PrincipalError::CertificateTaken(other.name));
        }
        let roles_json = serde_json::to_string(roles).expect("strings serialise");
        if !self
            .store
            .insert_principal(name, &roles_json, NewCredential::Certificate(fingerprint))
            .await?
        {
            return Err(PrincipalError::Exists(name.to_owned()));
        }
        Ok(())
    }
    pub async fn list(&self) -> Result<Vec<PrincipalInfo>, PrincipalError> {
        self.store
            .list_principals()
            .await?
            .into_iter()
            .map(|r| {
                Ok(PrincipalInfo {
                    roles: parse_roles(&r.name, &r.roles)?,
                    name: r.name,
                    created_at_us: r.created_at,
                    client_cert_sha256: r.client_cert_sha256,
                })
            })
            .collect()
    }

    pub async fn remove(&self, name: &str) -> Result<(), PrincipalError> {
        if !self.store.remove_principal(name).await? {
            return Err(PrincipalError::NotFound(name.to_owned()));
        }
        // Drop every cached answer so this process forgets the token now.
        self.cache.lock().expect("cache lock").clear();
        Ok(())
    }

    /// On a first start (no principal at all) creates `admin` with the
    /// `admin` role and returns its token, to be shown once.
    pub async fn bootstrap_admin(
        &self,
        policies: &Policies,
    ) -> Result<Option<Zeroizing<String>>, PrincipalError> {
        if self.store.count_principals().await? > 0 {
            return Ok(None);
        }
        match self.add(policies, "admin", &["admin".to_owned()]).await {
            Ok(token) => Ok(Some(token)),
            // Another process sharing the database bootstrapped it first.
            Err(PrincipalError::Exists(_)) => Ok(None),
            // A least-privilege serving role only reads principals: the
            // owner creates them (`eventvault migrate` makes the first).
            Err(PrincipalError::Store(StoreError::Database(sqlx::Error::Database(d))))
                if d.code().as_deref() == Some("42501") =>
            {
                tracing::warn!(
                    "no principal exists, and this database role may not create one: run `eventvault migrate` or `eventvault principal add NAME --role admin` as the owner"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
