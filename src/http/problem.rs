//! The API's one error type and its `application/problem+json` form
//! (RFC 9457). Client errors say what is wrong; server errors are generic to
//! the caller and logged in full (never with payloads or key material).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::service::ServiceError;
use crate::store::StoreError;
use crate::store::writer::AppendRejection;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{detail}")]
    Conflict {
        detail: String,
        current_version: Option<u64>,
    },
    #[error("{0}")]
    Gone(String),
    /// A snapshot older than the stored one.
    #[error("{0}")]
    StaleSnapshot(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The principal's rate limit is reached; retry after so many seconds.
    #[error("too many requests from this principal; retry after {0} s")]
    TooManyRequests(u64),
    /// The client address's allowance of requests without a valid token is
    /// used up; retry after so many seconds.
    #[error("too many requests without a valid token from this address; retry after {0} s")]
    TooManyUnauthenticated(u64),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The path is served, but not with this method; `Allow` (added by the
    /// router) names the methods it is served with.
    #[error("this path is not served with this method; Allow names the methods it is")]
    MethodNotAllowed,
    /// The request line and headers are larger than this many bytes.
    #[error("the request line and headers are larger than {0} bytes")]
    HeadersTooLarge(usize),
    /// The request body did not arrive within so many seconds.
    #[error("the request body did not arrive within {0} s")]
    RequestTimeout(u64),
    /// The connection limit is reached.
    #[error("too many connections; retry in a moment")]
    TooManyConnections,
    #[error("integrity check failed")]
    Integrity,
    /// A data key the event store refers to is missing from the keystore.
    #[error(
        "a data key this data needs is missing from the keystore (its subject was not forgotten); nothing was disclosed"
    )]
    KeyMissing,
    #[error("internal error")]
    Internal,
    #[error("{0}")]
    Unavailable(&'static str),
    /// A request not served within the store timeout (so many seconds).
    #[error(
        "the request was not served within {0} s (a store does not answer); it may still \
         complete: retry it (an append with the same event ids is answered with its result)"
    )]
    StoreTimeout(u64),
    /// The service is starting: the forget ledger is being re-applied.
    #[error(
        "the service is starting (re-applying the forget ledger); retry after {RETRY_AFTER_SECS} s"
    )]
    Starting,
}

/// Every problem kind (`urn:eventvault:problem:<kind>`) and what it means.
/// The OpenAPI document lists them under the `Problem` schema and the
/// README lists the same (a test compares the three): a new kind is added
/// here, in [`ApiError::kind`] and in the README.
pub const PROBLEM_KINDS: &[(&str, &str)] = &[
    (
        "bad-request",
        "400: malformed input (path, query, headers or body), or a missing `X-Purpose`",
    ),
    (
        "unauthorized",
        "401: no token, a malformed `Authorization` header, or an unknown token",
    ),
    (
        "forbidden",
        "403: the caller's roles do not grant the operation on the resource",
    ),
    ("not-found", "404: no such stream, snapshot or endpoint"),
    (
        "method-not-allowed",
        "405: the path is not served with this method; `Allow` names those it is",
    ),
    (
        "request-timeout",
        "408: the body did not arrive in time; the connection closes",
    ),
    (
        "wrong-expected-version",
        "409: `Expected-Version` does not hold; `current_version` says the stream's version",
    ),
    (
        "duplicate-event-ids",
        "409: event ids in use (in another stream, another order, or only some of them)",
    ),
    (
        "stale-snapshot",
        "409: a snapshot of a newer version is stored",
    ),
    ("subject-forgotten", "410: the subject has been forgotten"),
    (
        "payload-too-large",
        "413: the body is over `--max-body-bytes`",
    ),
    (
        "unsupported-media-type",
        "415: the body is not `application/json`",
    ),
    (
        "rate-limited",
        "429: the principal's request rate is exceeded, or, without a valid token, the client address's; retry after `Retry-After` seconds",
    ),
    (
        "headers-too-large",
        "431: the request line and headers are over `--max-header-bytes`; the connection closes",
    ),
    (
        "integrity-failure",
        "500: stored data failed its integrity check; nothing was disclosed",
    ),
    (
        "key-missing",
        "500: a data key the event store refers to is missing from the keystore, and its subject was not forgotten (an integrity failure of the stores); nothing was disclosed",
    ),
    (
        "internal-error",
        "500: an internal error; nothing was disclosed",
    ),
    (
        "unavailable",
        "503: a store does not answer, is full or busy, the request could not be committed or audited, or the service is stopping; retry after `Retry-After` seconds (the detail says whether something may have been written)",
    ),
    (
        "starting",
        "503: the forget ledger is being re-applied at start; retry after `Retry-After` seconds",
    ),
    (
        "too-many-connections",
        "503: the connection limit is reached; retry after `Retry-After` seconds; the connection closes",
    ),
];

/// What a 503 (starting, unavailable, too many connections) asks the
/// caller to wait before retrying, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

impl ApiError {
    /// The answer when a request's audit record could not be written: the
    /// response it would have had is withheld.
    pub fn not_audited() -> Self {
        Self::Unavailable("the request could not be audited; nothing was disclosed")
    }

    /// The answer to work a store could not do because of its condition
    /// (see [`crate::store::Fault`]): 503, never a 500. The cause is logged.
    pub fn from_fault(e: &StoreError) -> Self {
        use crate::store::Fault;
        tracing::warn!(error = %e, "a store could not serve a request");
        match e.fault() {
            Some(Fault::Full) => Self::Unavailable("the store is full; nothing was written"),
            Some(Fault::Busy) => Self::Unavailable("the store is busy; retry"),
            _ => Self::Unavailable("a store does not answer; retry"),
        }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::StaleSnapshot(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests(_) | Self::TooManyUnauthenticated(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            Self::Integrity | Self::KeyMissing | Self::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::Unavailable(_) | Self::StoreTimeout(_) | Self::Starting => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A stable, documented identifier of the problem kind: one of
    /// [`PROBLEM_KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad-request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::Conflict {
                current_version: Some(_),
                ..
            } => "wrong-expected-version",
            Self::Conflict { .. } => "duplicate-event-ids",
            Self::Gone(_) => "subject-forgotten",
            Self::StaleSnapshot(_) => "stale-snapshot",
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::TooManyRequests(_) | Self::TooManyUnauthenticated(_) => "rate-limited",
            Self::UnsupportedMediaType(_) => "unsupported-media-type",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::HeadersTooLarge(_) => "headers-too-large",
            Self::RequestTimeout(_) => "request-timeout",
            Self::TooManyConnections => "too-many-connections",
            Self::Integrity => "integrity-failure",
            Self::KeyMissing => "key-missing",
            Self::Internal => "internal-error",
            Self::Unavailable(_) | Self::StoreTimeout(_) => "unavailable",
            Self::Starting => "starting",
        }
    }

    /// The problem+json document.
    fn body(&self) -> Problem {
        let status = self.status_code();
        Problem {
            problem_type: format!("urn:eventvault:problem:{}", self.kind()),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self.to_string(),
            current_version: match self {
                Self::Conflict {
                    current_version, ..
                } => *current_version,
                _ => None,
            },
        }
    }

    /// The whole HTTP/1.1 response, for a connection answered before (or
    /// instead of) the router: a request whose headers are too large, a
    /// connection beyond the limit. The connection closes after it.
    pub fn to_http1_bytes(&self) -> Vec<u8> {
        let status = self.status_code();
        let body = serde_json::to_string(&self.body()).expect("a problem serialises");
        let retry = if status == StatusCode::SERVICE_UNAVAILABLE {
            format!("retry-after: {RETRY_AFTER_SECS}\r\n")
        } else {
            String::new()
        };
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\ncache-control: no-store\r\n{retry}connection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            body.len(),
        )
        .into_bytes()
    }
}

/// The body of every error response (`application/problem+json`, RFC 9457).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:eventvault:problem:<kind>`, one of the kinds the README lists.
    #[serde(rename = "type")]
    #[schema(pattern = "^urn:eventvault:problem:[a-z-]+$")]
    pub problem_type: String,
    /// The status code's reason phrase.
    #[schema(value_type = String)]
    pub title: &'static str,
    pub status: u16,
    /// What is wrong, for a person to read. Never a payload or a key.
    pub detail: String,
    /// On `wrong-expected-version`: the stream's version now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_string(&self.body()).expect("a problem serialises");
        let mut resp = (status, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::TooManyRequests(secs) | Self::TooManyUnauthenticated(secs) = &self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 is a condition that passes: say when to try again.
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if let Self::RequestTimeout(_) = &self {
            // The rest of the body may still come: the connection cannot
            // carry another request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Rejected(AppendRejection::WrongVersion { current }) => Self::Conflict {
                detail: format!(
                    "Expected-Version does not match: the stream is at version {current}"
                ),
                current_version: Some(current),
            },
            ServiceError::Rejected(AppendRejection::IdsInUse(detail)) => Self::Conflict {
                detail,
                current_version: None,
            },
            ServiceError::Rejected(r @ AppendRejection::Forgotten(_)) => Self::Gone(r.to_string()),
            ServiceError::StreamNotFound => Self::NotFound("stream not found".into()),
            e @ (ServiceError::NoSuchVersion { .. }
            | ServiceError::SnapshotSubject
            | ServiceError::PersonalWithoutSubject { .. }) => Self::BadRequest(e.to_string()),
            e @ ServiceError::OlderSnapshot { .. } => Self::StaleSnapshot(e.to_string()),
            ServiceError::Integrity { position } => {
                tracing::error!(
                    position,
                    "stored ciphertext failed its integrity check; nothing was disclosed"
                );
                Self::Integrity
            }
            ServiceError::SnapshotIntegrity(stream) => {
                tracing::error!(
                    stream,
                    "a stored snapshot failed its integrity check; nothing was disclosed"
                );
                Self::Integrity
            }
            // Logged (position and key id) and counted where it was found.
            ServiceError::KeyMissing { .. } => Self::KeyMissing,
            ServiceError::Unavailable => Self::Unavailable("the service is shutting down"),
            ServiceError::Key(crate::keys::KeyError::Crypto(
                crate::crypto::CryptoError::Unavailable,
            )) => {
                tracing::warn!("the token holding the master key did not answer");
                Self::Unavailable("the master key's token does not answer")
            }
            ServiceError::Key(crate::keys::KeyError::Store(StoreError::Busy(why)))
            | ServiceError::Store(StoreError::Busy(why)) => {
                tracing::warn!(reason = why, "a request found the store busy");
                Self::Unavailable(why)
            }
            ServiceError::Store(StoreError::GroupCommit {
                maybe_committed: false,
                ..
            }) => Self::Unavailable("the request could not be committed; nothing was written"),
            ServiceError::Store(StoreError::GroupCommit {
                maybe_committed: true,
                ..
            }) => Self::Unavailable(
                "the store failed while committing the request, which may or may not have been \
                 written; retry it (an append with the same event ids is answered with its result)",
            ),
            ServiceError::Store(StoreError::RecordedOrNot(e)) => {
                tracing::warn!(error = %e, "the connection was lost while committing");
                Self::Unavailable(
                    "the store failed while committing, so this may or may not have been \
                     recorded; send it again (it is idempotent)",
                )
            }
            ServiceError::Key(crate::keys::KeyError::Store(e)) | ServiceError::Store(e)
                if e.fault().is_some() =>
            {
                Self::from_fault(&e)
            }
            other => {
                tracing::error!(error = %other, "request failed");
                Self::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every variant. The match has no wildcard, so a new
    /// variant does not compile until it is given a sample here, which the
    /// test then holds to [`PROBLEM_KINDS`].
    fn samples() -> Vec<ApiError> {
        let all = vec![
            ApiError::BadRequest(String::new()),
            ApiError::Unauthorized(""),
            ApiError::Forbidden(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::Conflict {
                detail: String::new(),
                current_version: Some(1),
            },
            ApiError::Conflict {
                detail: String::new(),
                current_version: None,
            },
            ApiError::Gone(String::new()),
            ApiError::StaleSnapshot(String::new()),
            ApiError::PayloadTooLarge(1),
            ApiError::TooManyRequests(1),
            ApiError::TooManyUnauthenticated(1),
            ApiError::UnsupportedMediaType(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::HeadersTooLarge(1),
            ApiError::RequestTimeout(1),
            ApiError::TooManyConnections,
            ApiError::Integrity,
            ApiError::KeyMissing,
            ApiError::Internal,
            ApiError::Unavailable(""),
            ApiError::StoreTimeout(1),
            ApiError::Starting,
        ];
        for e in &all {
            match e {
                ApiError::BadRequest(_)
                | ApiError::Unauthorized(_)
                | ApiError::Forbidden(_)
                | ApiError::NotFound(_)
                | ApiError::Conflict { .. }
                | ApiError::Gone(_)
                | ApiError::StaleSnapshot(_)
                | ApiError::PayloadTooLarge(_)
                | ApiError::TooManyRequests(_)
                | ApiError::TooManyUnauthenticated(_)
                | ApiError::UnsupportedMediaType(_)
                | ApiError::MethodNotAllowed
                | ApiError::HeadersTooLarge(_)
                | ApiError::RequestTimeout(_)
                | ApiError::TooManyConnections
                | ApiError::Integrity
                | ApiError::KeyMissing
                | ApiError::Internal
                | ApiError::Unavailable(_)
                | ApiError::StoreTimeout(_)
                | ApiError::Starting => {}
            }
        }
        all
    }

    #[test]
    fn every_kind_is_listed_with_its_status() {
        let mut seen = std::collections::BTreeSet::new();
        for e in samples() {
            let (kind, status) = (e.kind(), e.status_code().as_u16());
            let (_, meaning) = PROBLEM_KINDS
                .iter()
                .find(|(k, _)| *k == kind)
                .unwrap_or_else(|| panic!("{kind} is not in PROBLEM_KINDS"));
            assert!(
                meaning.starts_with(&format!("{status}: ")),
                "{kind}: {meaning} (answered {status})"
            );
            seen.insert(kind);
        }
        let listed: std::collections::BTreeSet<&str> =
            PROBLEM_KINDS.iter().map(|(k, _)| *k).collect();
        assert_eq!(seen, listed, "a listed kind no error has");
    }
}
