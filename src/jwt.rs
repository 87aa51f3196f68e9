//! Callers from the bank's identity provider: bearer tokens that are JWTs
//! signed by the configured issuer, beside eventvault's own `evt_` tokens.
//!
//! This module owns the identity provider's key set (a JWK set from a URL
//! or a file), the verification of a token against it and the mapping of
//! its claims to a [`Principal`] (`jwt:<sub>`, roles from the roles claim).
//! The signatures are checked by `jsonwebtoken` (on ring); nothing here
//! computes one.
//!
//! What a token must be to be accepted:
//!
//! - **Algorithm.** Only RS256, PS256, ES256 and EdDSA, and only the one the
//!   key names: the key is found by the header's `kid`, and the header's
//!   `alg` must equal the key's (its `alg` member, or for a key without one,
//!   RS256 for an RSA key, ES256 for a P-256 key, EdDSA for an Ed25519 key).
//!   `none` and HMAC (`HS*`) are never accepted, whatever the header says:
//!   no key of the set is ever an HMAC key (symmetric JWKs are skipped), so
//!   a token "signed" with a public key as an HMAC secret finds none.
//! - **Header.** A `kid` is required; a `crit` member (extensions the
//!   recipient must understand) refuses the token: none is understood.
//! - **Claims.** `exp` is required, `nbf` and `iat` are honoured, each with
//!   [`LEEWAY`] for clocks that differ (an `iat` further in the future is
//!   refused); `iss` must be the configured issuer and `aud` name the
//!   configured audience; `sub` must be a string of 1 to [`MAX_SUBJECT`]
//!   characters without control characters.
//! - **Roles.** The roles claim (`roles` unless configured) is an array of
//!   strings, each naming a role of `roles.toml`; a single string is one
//!   role name (never split); a missing claim is no role. Names the
//!   policies do not define grant nothing (as for principals), and are not
//!   a refusal by themselves: such a caller is authenticated and answered
//!   403. Any other shape of the claim refuses the token.
//!
//! Every refusal is the same to the caller (`None`, answered 401 with the
//! one detail of every invalid token); the reason goes to the debug log,
//! never the token.
//!
//! **Keys.** The set is loaded when the service starts, and a start whose
//! set cannot be fetched or read, is not a JWK set, or holds no usable key
//! fails (a misconfigured identity provider is an operator's error, not a
//! silent "no JWT caller"). A token with a `kid` the set does not hold
//! makes the set be loaded again (URL: fetched; file: read), at most once
//! per [`REFETCH_INTERVAL`] and one load at a time: concurrent unknown kids
//! wait for the one load under way, no longer than [`FETCH_TIMEOUT`], and
//! do not cause more. A load that fails (or yields no usable key) keeps the
//! last good set. Requests whose `kid` is known never wait for a load.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::time::Instant;

use crate::principals::Principal;

/// Tolerance for clocks that differ, on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// The shortest time between two loads of the key set for unknown kids.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// The longest one load of the key set may take (connect, answer, body),
/// and so about the longest a request with an unknown kid waits for it:
/// below the default request budget (`--store-timeout-secs`, 5 s), so that
/// such a request is still answered 401 (and audited as one) rather than
/// 503 at its deadline.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// The default of `--jwt-roles-claim`.
pub const DEFAULT_ROLES_CLAIM: &str = "roles";
/// The longest `sub` accepted, in characters.
pub const MAX_SUBJECT: usize = 200;
/// The largest key set read, in bytes.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The prefix of a JWT caller's principal name (no stored principal's
/// name can hold a `:`).
pub const PRINCIPAL_PREFIX: &str = "jwt:";

/// How JWT callers are configured (`--jwt-*`). As given: [`Verifier::start`]
/// checks the combination, so that a flag given alone is a start-up error
/// rather than ignored.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// The `iss` every token must carry.
    pub issuer: Option<String>,
    /// The value `aud` must hold.
    pub audience: Option<String>,
    /// Where the JWK set is fetched (http or https).
    pub jwks_url: Option<String>,
    /// Where the JWK set is read.
    pub jwks_file: Option<PathBuf>,
    /// The claim holding the caller's role names.
    pub roles_claim: String,
}

impl std::fmt::Debug for JwtConfig {
    /// The URL without a password it may hold (as database URLs are shown).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field(
                "jwks_url",
                &self.jwks_url.as_deref().map(crate::store::redact_url),
            )
            .field("jwks_file", &self.jwks_file)
            .field("roles_claim", &self.roles_claim)
            .finish()
    }
}

impl JwtConfig {
    /// The configuration from the flags: `None` when no issuer, audience
    /// or key source is given (empty values count as not given).
    pub fn from_flags(
        issuer: Option<&str>,
        audience: Option<&str>,
        jwks_url: Option<&str>,
        jwks_file: Option<&std::path::Path>,
        roles_claim: &str,
    ) -> Option<Self> {
        let given = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(String::from);
        let config = Self {
            issuer: given(issuer),
            audience: given(audience),
            jwks_url: given(jwks_url),
            jwks_file: jwks_file
                .filter(|p| !p.as_os_str().is_empty())
                .map(PathBuf::from),
            roles_claim: roles_claim.to_owned(),
        };
        (config.issuer.is_some()
            || config.audience.is_some()
            || config.jwks_url.is_some()
            || config.jwks_file.is_some())
        .then_some(config)
    }
}

/// Why JWT callers cannot be served as configured: the service does not
/// start.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error(
        "JWT callers need --jwt-issuer, --jwt-audience and one of --jwt-jwks-url or --jwt-jwks-file together; {0} is missing"
    )]
    Incomplete(&'static str),
    #[error("give one of --jwt-jwks-url and --jwt-jwks-file, not both")]
    TwoKeySources,
    #[error("--jwt-roles-claim must not be empty")]
    NoRolesClaim,
    #[error("--jwt-jwks-url must be an http:// or https:// URL")]
    BadUrl,
    #[error("the HTTP client for the JWK set cannot be built: {0}")]
    Client(String),
    #[error("the JWK set could not be loaded from {source_name}: {why}")]
    Load { source_name: String, why: String },
    #[error(
        "the JWK set from {0} holds no key eventvault can use (RS256, PS256, ES256 or EdDSA, with a kid, for signatures)"
    )]
    NoUsableKey(String),
}

/// One usable key: its algorithm, the only one it verifies.
struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

/// The usable keys of a JWK set, by `kid`.
type KeySet = HashMap<String, Arc<Key>>;

enum Source {
    Url {
        url: reqwest::Url,
        client: reqwest::Client,
    },
    File(PathBuf),
}

impl Source {
    /// How the log and errors name it (a URL without its query or
    /// credentials).
    fn name(&self) -> String {
        match self {
            Source::Url { url, .. } => {
                let mut shown = url.clone();
                shown.set_query(None);
                let _ = shown.set_password(None);
                shown.to_string()
            }
            Source::File(path) => path.display().to_string(),
        }
    }

    /// The usable keys of the set, within [`FETCH_TIMEOUT`].
    async fn load(&self) -> Result<KeySet, JwtError> {
        let failed = |why: String| JwtError::Load {
            source_name: self.name(),
            why,
        };
        let bytes = tokio::time::timeout(FETCH_TIMEOUT, self.read())
            .await
            .map_err(|_| failed(format!("no answer within {FETCH_TIMEOUT:?}")))?
            .map_err(failed)?;
        let keys = parse_key_set(&bytes).map_err(failed)?;
        if keys.is_empty() {
            return Err(JwtError::NoUsableKey(self.name()));
        }
        Ok(keys)
    }

    async fn read(&self) -> Result<Vec<u8>, String> {
        match self {
            Source::Url { url, client } => {
                let mut response = client
                    .get(url.clone())
                    .header(reqwest::header::ACCEPT, "application/json")
                    .send()
                    .await
                    .map_err(|e| e.without_url().to_string())?;
                if !response.status().is_success() {
                    return Err(format!("answered {}", response.status()));
                }
                let mut body = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| e.without_url().to_string())?
                {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
            Source::File(path) => {
                let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                }
                Ok(bytes)
            }
        }
    }
}

/// The usable keys of a JWK set document. Keys this service cannot or must
/// not use (no `kid`, not for signatures, another algorithm or curve,
/// symmetric keys, members it cannot parse) are skipped, so that a set
/// that also holds encryption keys still serves; the set itself must be
/// JSON with a `keys` array.
fn parse_key_set(bytes: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let document: Document = serde_json::from_slice(bytes)
        .map_err(|_| "not a JWK set (JSON with a \"keys\" array)".to_string())?;
    let mut keys = KeySet::new();
    let mut skipped = 0usize;
    for raw in document.keys {
        match serde_json::from_value::<Jwk>(raw)
            .ok()
            .and_then(|jwk| usable(&jwk))
        {
            Some((kid, key)) => match keys.entry(kid) {
                std::collections::hash_map::Entry::Occupied(taken) => {
                    tracing::warn!(kid = %taken.key(), "the JWK set holds two keys with one kid; the first is used");
                }
                std::collections::hash_map::Entry::Vacant(free) => {
                    free.insert(Arc::new(key));
                }
            },
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::info!(
            skipped,
            usable = keys.len(),
            "keys of the JWK set not used (no kid, not for signatures, or not RS256, PS256, ES256 or EdDSA)"
        );
    }
    Ok(keys)
}

/// The algorithm a key verifies: the one its `alg` names, or for a key
/// without `alg` the one its type implies; `None` for any key of another
/// algorithm, curve or use.
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Some(Algorithm::RS256),
        (AlgorithmParameters::RSA(_), Some(KeyAlgorithm::PS256)) => Some(Algorithm::PS256),
        (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
            if p.curve == EllipticCurve::P256 =>
        {
            Some(Algorithm::ES256)
        }
        (AlgorithmParameters::OctetKeyPair(p), None | Some(KeyAlgorithm::EdDSA))
            if p.curve == EllipticCurve::Ed25519 =>
        {
            Some(Algorithm::EdDSA)
        }
        _ => None,
    }
}

fn usable(jwk: &Jwk) -> Option<(String, Key)> {
    let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty())?;
    let alg = key_algorithm(jwk)?;
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, Key { alg, key }))
}

/// Why a token was refused: for the debug log only, never for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal(&'static str);

/// Verifies bearer JWTs against the identity provider's key set. One per
/// application.
pub struct Verifier {
    issuer: String,
    audience: String,
    roles_claim: String,
    source: Source,
    keys: RwLock<Arc<KeySet>>,
    /// When the set was last loaded for an unknown kid; held while a load
    /// is under way, so that there is one at a time.
    reload: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("source", &self.source.name())
            .finish_non_exhaustive()
    }
}

/// Whether a bearer token is to be verified as a JWT (when JWT callers are
/// configured): anything but one of eventvault's own `evt_` tokens that has
/// the three parts of a JWS.
pub fn is_jwt(token: &str) -> bool {
    !token.starts_with("evt_") && token.bytes().filter(|b| *b == b'.').count() == 2
}

impl Verifier {
    /// Checks the configuration and loads the key set: an error stops the
    /// start.
    pub async fn start(config: &JwtConfig) -> Result<Self, JwtError> {
        let issuer = config
            .issuer
            .clone()
            .ok_or(JwtError::Incomplete("--jwt-issuer"))?;
        let audience = config
            .audience
            .clone()
            .ok_or(JwtError::Incomplete("--jwt-audience"))?;
        if config.roles_claim.is_empty() {
            return Err(JwtError::NoRolesClaim);
        }
        let source = match (&config.jwks_url, &config.jwks_file) {
            (Some(_), Some(_)) => return Err(JwtError::TwoKeySources),
            (None, None) => {
                return Err(JwtError::Incomplete(
                    "a key source (--jwt-jwks-url or --jwt-jwks-file)",
                ));
            }
            (Some(url), None) => {
                let url = reqwest::Url::parse(url).map_err(|_| JwtError::BadUrl)?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(JwtError::BadUrl);
                }
                // Only the configured URL: no redirect followed, no proxy
                // from the environment; never longer than FETCH_TIMEOUT.
                let client = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .connect_timeout(FETCH_TIMEOUT)
                    .timeout(FETCH_TIMEOUT)
                    .build()
                    .map_err(|e| JwtError::Client(e.to_string()))?;
                Source::Url { url, client }
            }
            (None, Some(path)) => Source::File(path.clone()),
        };
        let keys = source.load().await?;
        tracing::info!(source = %source.name(), keys = keys.len(), issuer = %issuer, "JWT callers accepted: the identity provider's key set is loaded");
        Ok(Self {
            issuer,
            audience,
            roles_claim: config.roles_claim.clone(),
            source,
            keys: RwLock::new(Arc::new(keys)),
            reload: tokio::sync::Mutex::new(None),
        })
    }

    /// The principal of a valid token; `None` for any token that is not
    /// (why goes to the debug log).
    pub async fn authenticate(&self, token: &str) -> Option<Principal> {
        match self.check(token).await {
            Ok(p) => Some(p),
            Err(Refusal(why)) => {
                tracing::debug!(reason = why, "a bearer JWT was refused");
                None
            }
        }
    }

    fn known(&self, kid: &str) -> Option<Arc<Key>> {
        self.keys.read().expect("keys lock").get(kid).cloned()
    }

    /// The key of `kid`, loading the set again if it is not known (see the
    /// module documentation for how often).
    async fn key(&self, kid: &str) -> Option<Arc<Key>> {
        if let Some(key) = self.known(kid) {
            return Some(key);
        }
        // The holder of the lock loads within FETCH_TIMEOUT; a request
        // never waits longer than that for it.
        let mut last = tokio::time::timeout(FETCH_TIMEOUT, self.reload.lock())
            .await
            .ok()?;
        // A load that ended while this request waited may have brought it.
        if let Some(key) = self.known(kid) {
            return Some(key);
        }
        if last.is_some_and(|at| at.elapsed() < REFETCH_INTERVAL) {
            return None;
        }
        *last = Some(Instant::now());
        match self.source.load().await {
            Ok(keys) => {
                tracing::info!(source = %self.source.name(), keys = keys.len(), "the identity provider's key set was loaded again for an unknown kid");
                *self.keys.write().expect("keys lock") = Arc::new(keys);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the identity provider's key set could not be loaded again; the last good one is kept");
            }
        }
        drop(last);
        self.known(kid)
    }

    async fn check(&self, token: &str) -> Result<Principal, Refusal> {
        // `none`, or any name jsonwebtoken does not know, fails here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Refusal("malformed token or header, or an unknown alg"))?;
        if has_critical_extensions(token) {
            return Err(Refusal("crit names extensions this service does not know"));
        }
        let kid = header.kid.as_deref().ok_or(Refusal("no kid"))?;
        let key = self.key(kid).await.ok_or(Refusal("unknown kid"))?;
        if header.alg != key.alg {
            return Err(Refusal("alg is not the key's"));
        }
        let validation = self.validation(key.alg);
        let data = jsonwebtoken::decode::<Value>(token, &key.key, &validation)
            .map_err(|e| Refusal(reason(e.kind())))?;
        principal(&data.claims, &self.roles_claim, now_secs())
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.leeway = LEEWAY.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v
    }
}

/// Whether the header has `crit`: it names extensions the recipient must
/// understand (RFC 7515, 4.1.11), and this service understands none, so
/// such a token is refused (jsonwebtoken's header does not read `crit`).
fn has_critical_extensions(token: &str) -> bool {
    use base64::Engine as _;
    let Some(encoded) = token.split('.').next() else {
        return true;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded) else {
        return true;
    };
    serde_json::from_slice::<serde_json::Map<String, Value>>(&json)
        .map_or(true, |header| header.contains_key("crit"))
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A refusal's reason from jsonwebtoken's error, without its text (which
/// may quote claim values).
fn reason(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature => "bad signature",
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "nbf in the future",
        K::InvalidIssuer => "wrong iss",
        K::InvalidAudience => "wrong aud",
        K::MissingRequiredClaim(_) => "a required claim (exp, iss, aud, sub) is missing",
        K::InvalidAlgorithm | K::MissingAlgorithm => "alg is not the key's",
        _ => "malformed token",
    }
}

/// What jsonwebtoken does not check of the claims (`iat`, the types of
/// `nbf` and `iat`, `sub`), and the principal they name, at `now`
/// (seconds since the epoch).
fn principal(claims: &Value, roles_claim: &str, now: f64) -> Result<Principal, Refusal> {
    let leeway = LEEWAY.as_secs_f64();
    for time in ["nbf", "iat"] {
        match claims.get(time) {
            None => {}
            Some(Value::Number(n)) => {
                let at = n.as_f64().ok_or(Refusal("a time claim is not a number"))?;
                if time == "iat" && at > now + leeway {
                    return Err(Refusal("iat in the future"));
                }
            }
            Some(_) => return Err(Refusal("a time claim is not a number")),
        }
    }
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| {
            !s.is_empty() && s.chars().count() <= MAX_SUBJECT && !s.chars().any(char::is_control)
        })
        .ok_or(Refusal("sub is not a usable string"))?;
    let roles = match claims.get(roles_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(role)) => vec![role.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|r| r.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(Refusal(
                "the roles claim holds a value that is not a string",
            ))?,
        Some(_) => return Err(Refusal("the roles claim is neither a string nor an array")),
    };
    Ok(Principal {
        name: format!("{PRINCIPAL_PREFIX}{sub}"),
        roles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: f64 = 1_800_000_000.0;

    fn roles_of(claims: Value) -> Result<Vec<String>, Refusal> {
        principal(&claims, "roles", NOW).map(|p| p.roles)
    }

    #[test]
    fn roles_come_from_an_array_or_one_string_and_nothing_else() {
        assert_eq!(
            roles_of(json!({"sub": "u", "roles": ["service", "nope"]})).unwrap(),
            ["service", "nope"]
        );
        assert_eq!(
            roles_of(json!({"sub": "u", "roles": "service"})).unwrap(),
            ["service"]
        );
        // Not split: one role name, which names no role.
        assert_eq!(
            roles_of(json!({"sub": "u", "roles": "service auditor"})).unwrap(),
            ["service auditor"]
        );
        assert!(roles_of(json!({"sub": "u"})).unwrap().is_empty());
        assert!(roles_of(json!({"sub": "u", "roles": ["service", 1]})).is_err());
        assert!(roles_of(json!({"sub": "u", "roles": {"a": 1}})).is_err());
        assert!(roles_of(json!({"sub": "u", "roles": true})).is_err());
        // Another claim name.
        let p = principal(&json!({"sub": "u", "groups": ["dpo"]}), "groups", NOW).unwrap();
        assert_eq!(p.roles, ["dpo"]);
        assert_eq!(p.name, "jwt:u");
    }

    #[test]
    fn sub_must_be_a_short_plain_string() {
        assert!(principal(&json!({"sub": ""}), "roles", NOW).is_err());
        assert!(principal(&json!({"sub": 7}), "roles", NOW).is_err());
        assert!(principal(&json!({}), "roles", NOW).is_err());
        assert!(principal(&json!({"sub": "a\nb"}), "roles", NOW).is_err());
        assert!(principal(&json!({"sub": "x".repeat(MAX_SUBJECT + 1)}), "roles", NOW).is_err());
        assert!(principal(&json!({"sub": "x".repeat(MAX_SUBJECT)}), "roles", NOW).is_ok());
    }

    #[test]
    fn iat_in_the_future_beyond_the_leeway_is_refused() {
        let at = |iat: Value| principal(&json!({"sub": "u", "iat": iat}), "roles", NOW);
        assert!(at(json!(NOW as u64)).is_ok());
        assert!(at(json!(NOW as u64 + 59)).is_ok());
        assert_eq!(
            at(json!(NOW as u64 + 61)),
            Err(Refusal("iat in the future"))
        );
        assert!(at(json!("1800000000")).is_err());
        assert!(principal(&json!({"sub": "u", "nbf": "soon"}), "roles", NOW).is_err());
    }

    fn jwk(value: Value) -> Jwk {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_key_verifies_only_the_algorithm_it_names_or_its_type_implies() {
        // An RSA modulus and exponent (any base64url will do for the
        // algorithm decision).
        let rsa = |extra: Value| {
            let mut k = json!({"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"});
            k.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            jwk(k)
        };
        assert_eq!(key_algorithm(&rsa(json!({}))), Some(Algorithm::RS256));
        assert_eq!(
            key_algorithm(&rsa(json!({"alg": "PS256"}))),
            Some(Algorithm::PS256)
        );
        assert_eq!(key_algorithm(&rsa(json!({"alg": "RS512"}))), None);
        assert_eq!(key_algorithm(&rsa(json!({"alg": "RSA-OAEP"}))), None);
        assert_eq!(key_algorithm(&rsa(json!({"use": "enc"}))), None);
        let ec = |crv: &str, alg: Option<&str>| {
            let mut k = json!({"kty": "EC", "kid": "e", "crv": crv, "x": "AA", "y": "AA"});
            if let Some(a) = alg {
                k["alg"] = json!(a);
            }
            jwk(k)
        };
        assert_eq!(key_algorithm(&ec("P-256", None)), Some(Algorithm::ES256));
        assert_eq!(key_algorithm(&ec("P-384", None)), None);
        assert_eq!(key_algorithm(&ec("P-384", Some("ES256"))), None);
        let okp = jwk(json!({"kty": "OKP", "kid": "o", "crv": "Ed25519", "x": "AA"}));
        assert_eq!(key_algorithm(&okp), Some(Algorithm::EdDSA));
        // A symmetric key is never usable, whatever it claims.
        let oct = jwk(json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0", "alg": "HS256"}));
        assert_eq!(key_algorithm(&oct), None);
    }

    #[test]
    fn a_key_set_skips_what_it_cannot_use_and_refuses_what_is_not_one() {
        let set = json!({"keys": [
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "XYZ", "kid": "q"},
        ]});
        let keys = parse_key_set(set.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["ed"]);
        assert_eq!(keys["ed"].alg, Algorithm::EdDSA);
        assert!(parse_key_set(b"[]").is_err());
        assert!(parse_key_set(b"not json").is_err());
    }

    #[test]
    fn a_header_with_crit_is_refused() {
        use base64::Engine as _;
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token = |h: Value| format!("{}.e30.c2ln", b64(h));
        assert!(!has_critical_extensions(&token(
            json!({"alg": "ES256", "kid": "k"})
        )));
        assert!(has_critical_extensions(&token(
            json!({"alg": "ES256", "kid": "k", "crit": ["exp"], "exp": 1})
        )));
        assert!(has_critical_extensions("%%%.e30.c2ln"));
    }

    #[test]
    fn only_non_evt_tokens_of_three_parts_are_jwts() {
        assert!(is_jwt("a.b.c"));
        assert!(!is_jwt("evt_a.b.c"));
        assert!(!is_jwt("evt_abc"));
        assert!(!is_jwt("a.b"));
        assert!(!is_jwt("a.b.c.d.e"));
    }

    #[test]
    fn flags_without_any_jwt_value_mean_no_jwt_callers() {
        assert_eq!(
            JwtConfig::from_flags(None, Some(" "), None, None, "roles"),
            None
        );
        let c = JwtConfig::from_flags(Some("iss"), None, None, None, "roles").unwrap();
        assert_eq!(c.issuer.as_deref(), Some("iss"));
        let c = JwtConfig::from_flags(
            None,
            None,
            Some("https://idp:hunter2@idp.example/certs"),
            None,
            "roles",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
    }

    #[tokio::test]
    async fn a_bad_combination_of_flags_stops_the_start() {
        let base = JwtConfig {
            issuer: Some("https://idp".into()),
            audience: Some("eventvault".into()),
            jwks_url: None,
            jwks_file: None,
            roles_claim: "roles".into(),
        };
        let err = |c: JwtConfig| async move { Verifier::start(&c).await.unwrap_err() };
        assert!(matches!(
            err(base.clone()).await,
            JwtError::Incomplete(s) if s.contains("key source")
        ));
        assert!(matches!(
            err(JwtConfig {
                issuer: None,
                jwks_file: Some("x".into()),
                ..base.clone()
            })
            .await,
            JwtError::Incomplete("--jwt-issuer")
        ));
        assert!(matches!(
            err(JwtConfig {
                jwks_url: Some("https://idp/jwks".into()),
                jwks_file: Some("x".into()),
                ..base.clone()
            })
            .await,
            JwtError::TwoKeySources
        ));
        for url in ["file:///etc/jwks.json", "ftp://idp/jwks", "not a url"] {
            assert!(matches!(
                err(JwtConfig {
                    jwks_url: Some(url.into()),
                    ..base.clone()
                })
                .await,
                JwtError::BadUrl
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            err(JwtConfig {
                jwks_file: Some(dir.path().join("missing.json")),
                ..base.clone()
            })
            .await,
            JwtError::Load { .. }
        ));
        let empty = dir.path().join("empty.json");
        std::fs::write(&empty, r#"{"keys": []}"#).unwrap();
        assert!(matches!(
            err(JwtConfig {
                jwks_file: Some(empty),
                ..base.clone()
            })
            .await,
            JwtError::NoUsableKey(_)
        ));
    }
}
