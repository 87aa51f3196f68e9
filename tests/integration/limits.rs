//! Limits a hostile or runaway client meets: a per-principal request rate
//! (429 with Retry-After, audited, others unaffected).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::access::{audit_records, call};
use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv};
use eventvault::app::RateLimit;

both_backends!(a_principal_over_its_rate_is_told_when_to_retry);

async fn a_principal_over_its_rate_is_told_when_to_retry(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    // Three at once, then one a minute: the fourth request is refused
    // however slowly the first three run.
    *env.rate_limit.lock().unwrap() = Some(RateLimit {
        period: Duration::from_secs(60),
        burst: 3,
    });
    let app = TestApp::start(env).await;
    let service = app.env.add_principal("ledger", &["service"]).await;
    for _ in 0..3 {
        let (status, text) = call(&app, Method::GET, "/events", Some(&service), &[], None).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let r = app
        .client
        .get(format!("{}/events", app.base))
        .bearer_auth(&service)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "urn:eventvault:problem:rate-limited");
    // Another principal is not affected.
    let (status, _) = call(&app, Method::GET, "/events", Some(&app.token()), &[], None).await;
    assert_eq!(status, StatusCode::OK);
    // The refusal is audited, with the principal.
    let records = audit_records(&app, "principal=ledger&outcome=error").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["action"], "log.read");
}
