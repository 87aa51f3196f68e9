//! Browsers (CORS): the origins given with `--cors-origin` get their
//! preflights answered and their answers (refusals included) marked
//! readable; every other origin gets no CORS header at all.

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};

use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv, capture_logs};

both_backends!(
    an_allowed_origins_preflight_is_answered,
    an_allowed_origin_can_read_answers_and_refusals,
    another_origin_gets_no_cors_header,
);

const ALLOWED: &str = "https://app.example.com";

async fn start(backend: &Backend) -> TestApp {
    let env = TestEnv::new(backend).await;
    env.configure(|c| {
        c.cors_origins = vec![ALLOWED.into(), "http://localhost:3000".into()];
    });
    let app = TestApp::start(env).await;
    // So that reads of the stream are 200.
    app.append_ok(
        "accounts-1",
        &crate::common::batch(vec![crate::common::deposit(
            uuid::Uuid::new_v4(),
            "cust-1",
            "1.00",
        )]),
    )
    .await;
    app
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
        .to_str()
        .unwrap()
}

/// The comma-separated list in `name`, lower-cased.
fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
    header(headers, name)
        .split(',')
        .map(|v| v.trim().to_ascii_lowercase())
        .collect()
}

fn assert_no_cors_header(headers: &HeaderMap) {
    let cors: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .collect();
    assert!(cors.is_empty(), "{cors:?}");
}

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(
            Method::OPTIONS,
            format!("{}/streams/accounts-1/events", app.base),
        )
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type, expected-version",
        )
        .send()
        .await
        .unwrap()
}

async fn an_allowed_origins_preflight_is_answered(backend: Backend) {
    let app = start(&backend).await;
    let r = preflight(&app, ALLOWED).await;
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(header(h, "access-control-allow-origin"), ALLOWED);
    assert_eq!(header(h, "cache-control"), "no-store");
    let methods = list(h, "access-control-allow-methods");
    for m in ["get", "post", "put"] {
        assert!(methods.iter().any(|x| x == m), "{methods:?}");
    }
    let allowed = list(h, "access-control-allow-headers");
    for name in [
        "authorization",
        "content-type",
        "expected-version",
        "x-correlation-id",
        "x-causation-id",
        "x-purpose",
        "x-request-id",
        "last-event-id",
    ] {
        assert!(allowed.iter().any(|x| x == name), "{name}: {allowed:?}");
    }
    app.stop().await;
}

async fn an_allowed_origin_can_read_answers_and_refusals(backend: Backend) {
    let app = start(&backend).await;
    let get = |token: Option<String>| {
        let mut req = app
            .client
            .get(format!("{}/streams/accounts-1/events", app.base))
            .header("Origin", ALLOWED);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap() }
    };
    for (token, status) in [
        (Some(app.token()), StatusCode::OK),
        // A refusal a browser's script can read (why, and its request id).
        (None, StatusCode::UNAUTHORIZED),
    ] {
        let r = get(token).await;
        assert_eq!(r.status(), status);
        let h = r.headers();
        assert_eq!(header(h, "access-control-allow-origin"), ALLOWED);
        let exposed = list(h, "access-control-expose-headers");
        for name in ["x-request-id", "retry-after"] {
            assert!(exposed.iter().any(|x| x == name), "{name}: {exposed:?}");
        }
        assert!(h.contains_key("x-request-id"));
    }
    // The refusal is recorded like every 401.
    let refused: Vec<_> = app
        .audit_records("action=stream.read&outcome=denied")
        .await
        .into_iter()
        .filter(|r| r["principal"].is_null())
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    app.stop().await;
}

async fn another_origin_gets_no_cors_header(backend: Backend) {
    let app = start(&backend).await;
    for origin in [
        "https://evil.example.com",
        // Only exact origins: not another scheme, port or a subdomain.
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://sub.app.example.com",
    ] {
        let r = preflight(&app, origin).await;
        // As without CORS: the path is not served with OPTIONS.
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{origin}");
        assert_no_cors_header(r.headers());
        let r = app
            .client
            .get(format!("{}/streams/accounts-1/events", app.base))
            .header("Origin", origin)
            .bearer_auth(app.token())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_no_cors_header(r.headers());
    }
    app.stop().await;
}

/// A `--cors-origin` that is not `scheme://host[:port]` stops the start,
/// naming it.
#[tokio::test]
async fn a_bad_origin_stops_the_start() {
    capture_logs();
    let env = TestEnv::new(&Backend::Sqlite).await;
    for bad in [
        "*",
        "https://app.example.com/",
        "app.example.com",
        "https://*.example.com",
    ] {
        let mut cfg = env.config();
        cfg.cors_origins = vec![ALLOWED.into(), bad.into()];
        match eventvault::app::Application::build(&cfg).await {
            Ok(_) => panic!("{bad:?} is accepted"),
            Err(e) => assert!(e.to_string().contains(&format!("{bad:?}")), "{e}"),
        }
    }
}
