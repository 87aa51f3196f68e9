//! A JSON body extractor whose every failure is a problem+json answer: 415
//! for a non-JSON content type, 413 past the size limit, 408 when the whole
//! body has not arrived within the body read deadline (a client trickling
//! it in), 400 naming the place of a syntax or type error (e.g.
//! `events[2].id`).

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use serde::de::DeserializeOwned;

use super::AppState;
use super::problem::ApiError;

/// A JSON request body of type `T`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        Ok(Self(parse(&bytes)?))
    }
}

/// An optional JSON request body: `None` when the body is empty (or only
/// whitespace); otherwise a `T` as [`JsonBody`], with the same limits,
/// deadline and answers (`null` is not a `T`: the API document describes
/// the body as absent or a `T`, which is what generated clients send).
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<T: DeserializeOwned> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        Ok(Self(Some(parse::<T>(&bytes)?)))
    }
}

/// The whole body, within the size limit and the body read deadline, of a
/// request whose content type (if any) is JSON.
async fn read_body(req: Request, state: &AppState) -> Result<axum::body::Bytes, ApiError> {
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the body must be application/json, not {essence:?}"
            )));
        }
    }
    let slot = req.extensions().get::<super::trail::AuditSlot>().cloned();
    let began = tokio::time::Instant::now();
    let limit = state.config.max_body_bytes;
    // One deadline for the whole body, not per chunk: a byte now and
    // then must not hold a connection and a request's memory forever.
    let deadline = state.config.body_read_timeout;
    let read = axum::body::to_bytes(Body::new(req.into_body()), limit);
    let read = tokio::time::timeout(deadline, read).await;
    // Waiting for the client is not waiting for the stores.
    if let Some(slot) = slot {
        slot.deadline.add_client_time(began.elapsed());
    }
    read.map_err(|_| {
        state
            .metrics
            .limit_applied(crate::metrics::Limit::BodyReadTimeout);
        tracing::info!(
            timeout_secs = deadline.as_secs(),
            "a request body did not arrive within the body read timeout; answered 408"
        );
        ApiError::RequestTimeout(deadline.as_secs())
    })?
    .map_err(|e| {
        if is_length_limit(&e) {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })
}

/// `bytes` as a `T`; a 400 names the place of the error.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::BadRequest(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::BadRequest(format!("invalid JSON body at {path}: {inner}"))
        }
    })
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}
