//! Browsers (CORS): the origins allowed to call the API (`--cors-origin`),
//! checked at start, and the middleware that answers their preflights and
//! marks their answers readable (tower-http's `cors`).
//!
//! Only a request whose `Origin` is one of the allowed ones, exactly, goes
//! through tower-http's layer; any other request is served as if CORS did
//! not exist: no CORS header at all (tower-http alone would answer every
//! `OPTIONS` and add `Access-Control-Allow-Methods` whatever the origin).
//! The layer is the router's outermost, so that a refusal (401, 429, 503)
//! carries the headers too and a browser's script can read why.

use std::collections::HashSet;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The request headers the API reads (besides the CORS-safelisted ones).
pub const REQUEST_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "expected-version",
    "x-correlation-id",
    "x-causation-id",
    "x-purpose",
    "x-request-id",
    "last-event-id",
];

/// The response headers a client's script needs to read.
pub const EXPOSED_HEADERS: &[&str] = &["x-request-id", "retry-after", "www-authenticate", "allow"];

/// The methods the API is served with.
pub const METHODS: &[Method] = &[Method::GET, Method::POST, Method::PUT];

#[derive(Debug, thiserror::Error)]
#[error(
    "--cors-origin {origin:?} is not an origin: give scheme://host[:port] (http or https, no path, no '*')"
)]
pub struct BadOrigin {
    origin: String,
}

/// The allowed origins and the layer that serves them.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: HashSet<HeaderValue>,
    layer: CorsLayer,
}

impl Cors {
    /// `None` for no origin (no CORS at all); an error naming the first
    /// origin that is not `scheme://host[:port]`.
    pub fn new(origins: &[String]) -> Result<Option<Cors>, BadOrigin> {
        let mut allowed = HashSet::new();
        for origin in origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
            let bad = || BadOrigin {
                origin: origin.to_owned(),
            };
            allowed.insert(parse_origin(origin).ok_or_else(bad)?);
        }
        if allowed.is_empty() {
            return Ok(None);
        }
        let names = |list: &[&'static str]| {
            list.iter()
                .map(|h| HeaderName::from_static(h))
                .collect::<Vec<_>>()
        };
        let layer = CorsLayer::new()
            .allow_origin(AllowOrigin::list(allowed.iter().cloned()))
            .allow_methods(METHODS.to_vec())
            .allow_headers(names(REQUEST_HEADERS))
            .expose_headers(names(EXPOSED_HEADERS))
            .max_age(std::time::Duration::from_secs(600));
        Ok(Some(Cors {
            origins: allowed,
            layer,
        }))
    }

    fn allows(&self, req: &Request) -> bool {
        req.headers()
            .get(header::ORIGIN)
            .is_some_and(|o| self.origins.contains(o))
    }
}

/// An origin as a browser sends it: `http` or `https`, a host, an optional
/// port, nothing else. Returned in its canonical form (lower case, no
/// trailing slash), which is what the `Origin` header holds.
fn parse_origin(origin: &str) -> Option<HeaderValue> {
    let (scheme, rest) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal's colons are inside brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && (host.starts_with('[') && host.ends_with(']') && host.len() > 2
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    if !host_ok || !port_ok {
        return None;
    }
    let canonical = match port {
        Some(p) => format!("{scheme}://{}:{p}", host.to_ascii_lowercase()),
        None => format!("{scheme}://{}", host.to_ascii_lowercase()),
    };
    HeaderValue::from_str(&canonical).ok()
}

/// The middleware: an allowed origin's request through the CORS layer,
/// every other one straight on.
pub async fn cross_origin(State(cors): State<Cors>, req: Request, next: Next) -> Response {
    if !cors.allows(&req) {
        return next.run(req).await;
    }
    let mut response = match cors.layer.layer(next).oneshot(req).await {
        Ok(response) => response.into_response(),
        Err(never) => match never {},
    };
    // A preflight is answered here, outside the layer that marks every
    // other answer: it too must not be kept by a cache.
    response
        .headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        for good in [
            "https://app.example.com",
            "http://localhost:3000",
            "https://[::1]:8443",
            "HTTPS://App.Example.com",
        ] {
            assert!(parse_origin(good).is_some(), "{good}");
        }
        assert_eq!(
            parse_origin("HTTPS://App.Example.com").unwrap(),
            "https://app.example.com"
        );
        for bad in [
            "*",
            "https://*.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "app.example.com",
            "ftp://example.com",
            "https://",
            "https://example.com:",
            "https://example.com:99999",
            "https://user@example.com",
            "null",
        ] {
            assert!(parse_origin(bad).is_none(), "{bad}");
        }
        assert!(Cors::new(&["https://ok.example".into(), "*".into()]).is_err());
        assert!(Cors::new(&[]).unwrap().is_none());
    }
}
