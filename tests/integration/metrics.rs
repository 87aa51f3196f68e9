//! `GET /metrics`: Prometheus text without a token, counts that follow what
//! the service did, latency under route templates, and no identifier or
//! personal value anywhere in it.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, PERSONAL_VALUES, TestApp, batch, deposit};
use crate::subscribe::Subscriber;

both_backends!(
    metrics_count_what_the_service_did_and_name_no_one,
    a_fresh_service_reports_zeros,
);

const STREAM_A: &str = "accounts-metrics-7";
const STREAM_B: &str = "accounts-metrics-8";
const SUBJECT_A: &str = "cust-metrics-1";
const SUBJECT_B: &str = "cust-metrics-2";

/// `GET /metrics` without a token: the body, after checking the status and
/// the content type.
async fn scrape(app: &TestApp) -> String {
    let r = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    r.text().await.unwrap()
}

/// The value of the series `series` (name and labels exactly as printed);
/// fails the test when there is no such series.
#[track_caller]
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().expect("a number"))
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{body}"))
}

async fn metrics_count_what_the_service_did_and_name_no_one(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let auditor = app.env.add_principal("metrics-auditor", &["auditor"]).await;
    let dpo = app.env.add_principal("metrics-dpo", &["dpo"]).await;

    // Two appends: 3 + 2 events, every one with personal fields.
    app.append_ok(
        STREAM_A,
        &batch(
            (0..3)
                .map(|i| deposit(Uuid::new_v4(), SUBJECT_A, &format!("{i}.10")))
                .collect(),
        ),
    )
    .await;
    app.append_ok(
        STREAM_B,
        &batch(
            (0..2)
                .map(|i| deposit(Uuid::new_v4(), SUBJECT_B, &format!("{i}.20")))
                .collect(),
        ),
    )
    .await;
    // A read that decrypts 3 events, a refusal (403), no token (401) and a
    // path that no route matches.
    assert_eq!(app.read(STREAM_A, "").await.status(), StatusCode::OK);
    let (status, _) = app
        .get(&format!("/streams/{STREAM_A}/events"), &auditor)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app
        .request(Method::GET, &format!("/streams/{STREAM_B}/events"))
        .send()
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app
        .get(&format!("/no-such/{SUBJECT_B}"), &app.token())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A subscription delivers the 5 events (decrypted) and is counted open.
    let mut open_now = app.progress().subscriptions_open;
    let mut sub = Subscriber::open(&app, "/events/subscribe?after=0", &app.token(), &[]).await;
    sub.take(5).await;
    let open = scrape(&app).await;
    assert_eq!(value(&open, "eventvault_subscriptions_open"), 1.0);
    assert!(value(&open, "eventvault_subscription_lag_events_count") >= 5.0);
    drop(sub);

    // The forget appends a `$subjects` event.
    let (status, text) = app
        .request(Method::POST, &format!("/subjects/{SUBJECT_A}/forget"))
        .token(&dpo)
        .json(&json!({"reason": "ticket 12"}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // The subscription's end reaches the gauge once the server notices the
    // client left.
    tokio::time::timeout(Duration::from_secs(20), open_now.wait_for(|n| *n == 0))
        .await
        .expect("the subscription is still counted open")
        .expect("the application runs");
    let body = scrape(&app).await;
    assert_eq!(value(&body, "eventvault_subscriptions_open"), 0.0);

    // Exact where the scenario decides the number.
    for (series, expected) in [
        ("eventvault_appends_total{outcome=\"created\"}", 3.0),
        ("eventvault_appends_total{outcome=\"rejected\"}", 0.0),
        ("eventvault_events_appended_total", 6.0),
        ("eventvault_commit_group_events_sum", 6.0),
        ("eventvault_encryptions_total{kind=\"event\"}", 5.0),
        (
            "eventvault_decryptions_total{kind=\"event\",outcome=\"ok\"}",
            8.0,
        ),
        (
            "eventvault_decryptions_total{kind=\"event\",outcome=\"failed\"}",
            0.0,
        ),
        (
            "eventvault_key_cache_requests_total{cache=\"by_subject\",outcome=\"miss\"}",
            2.0,
        ),
        ("eventvault_forgets_total", 1.0),
        ("eventvault_keys_destroyed_total", 1.0),
        ("eventvault_commit_failures_total", 0.0),
        ("eventvault_commit_head_position", 6.0),
        (
            "eventvault_http_request_duration_seconds_count{method=\"POST\",route=\"/streams/{stream}/events\",status=\"201\"}",
            2.0,
        ),
        (
            "eventvault_http_request_duration_seconds_count{method=\"GET\",route=\"/streams/{stream}/events\",status=\"403\"}",
            1.0,
        ),
        (
            "eventvault_http_request_duration_seconds_count{method=\"GET\",route=\"/streams/{stream}/events\",status=\"401\"}",
            1.0,
        ),
        (
            "eventvault_http_request_duration_seconds_count{method=\"GET\",route=\"unmatched\",status=\"404\"}",
            1.0,
        ),
        (
            "eventvault_http_request_duration_seconds_count{method=\"POST\",route=\"/subjects/{subject}/forget\",status=\"200\"}",
            1.0,
        ),
        (
            "eventvault_http_request_duration_seconds_count{method=\"GET\",route=\"/events/subscribe\",status=\"200\"}",
            1.0,
        ),
    ] {
        assert_eq!(value(&body, series), expected, "{series}");
    }
    // At least, where timing decides how requests were grouped or how many
    // records the audited requests (and subscription) wrote.
    for (series, at_least) in [
        ("eventvault_commits_total", 3.0),
        ("eventvault_commit_group_events_count", 3.0),
        ("eventvault_commit_wait_seconds_count", 8.0),
        ("eventvault_commit_duration_seconds_count", 3.0),
        ("eventvault_audit_records_written_total", 8.0),
        (
            "eventvault_key_cache_requests_total{cache=\"by_id\",outcome=\"hit\"}",
            1.0,
        ),
        ("eventvault_subscription_lag_events_count", 5.0),
    ] {
        assert!(value(&body, series) >= at_least, "{series} < {at_least}");
    }

    // Nothing that names a stream, a subject or a caller, and no secret.
    let secrets = [app.token(), auditor, dpo];
    for s in PERSONAL_VALUES
        .iter()
        .copied()
        .chain([
            STREAM_A,
            STREAM_B,
            SUBJECT_A,
            SUBJECT_B,
            "metrics-dpo",
            "metrics-auditor",
        ])
        .chain(secrets.iter().map(String::as_str))
    {
        assert!(!body.contains(s), "/metrics shows {s:?}");
    }
    // The metrics themselves are no data request: never audited.
    assert!(
        app.audit_records("")
            .await
            .iter()
            .all(|r| !r["action"].as_str().unwrap_or("").contains("metric")),
        "a scrape was audited"
    );
}

async fn a_fresh_service_reports_zeros(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let body = scrape(&app).await;
    for series in [
        "eventvault_appends_total{outcome=\"created\"}",
        "eventvault_events_appended_total",
        "eventvault_forgets_total",
        "eventvault_subscriptions_open",
        "eventvault_commit_head_position",
        "eventvault_encryptions_total{kind=\"event\"}",
    ] {
        assert_eq!(value(&body, series), 0.0, "{series}");
    }
    // No token is needed, and none is looked at: a wrong one is no 401.
    let r = app
        .client
        .get(format!("{}/metrics", app.base))
        .bearer_auth("evt_not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The first scrape is counted under its own route.
    assert_eq!(
        value(
            &scrape(&app).await,
            "eventvault_http_request_duration_seconds_count{method=\"GET\",route=\"/metrics\",status=\"200\"}"
        ),
        2.0
    );
}
