//! Requests without a valid token: limited per client address (429 with
//! `Retry-After`), and their audit records aggregated per address and
//! window, so that whoever reaches the port can neither grow the audit log
//! by request nor fill the writer's queue, and every refused request is
//! still accounted for in the chain.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv, batch, deposit};
use eventvault::app::RateLimit;

both_backends!(
    requests_without_a_valid_token_are_limited_per_address,
    refusals_are_recorded_once_per_address_and_window,
);

/// A client whose connections come from `addr` (any of 127.0.0.0/8 reaches
/// the server on 127.0.0.1).
fn client_from(addr: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(addr.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// `GET /streams/accounts-1/events` with `authorization` (or none):
/// status, `Retry-After`, `X-Request-Id`, body.
async fn read(
    client: &reqwest::Client,
    app: &TestApp,
    authorization: Option<&str>,
) -> (StatusCode, Option<u64>, String, String) {
    let mut req = client.get(format!("{}/streams/accounts-1/events", app.base));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let r = req.send().await.unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    (r.status(), retry, id, r.text().await.unwrap())
}

/// The records without a principal, as `(action, resource, event_count)`.
fn anonymous(records: &[Value]) -> Vec<(String, String, u64)> {
    records
        .iter()
        .filter(|r| r["principal"].is_null())
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["resource"].as_str().unwrap().to_owned(),
                r["event_count"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn requests_without_a_valid_token_are_limited_per_address(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    // Three refusals per address, then none for an hour; one window for
    // the whole test (its records are written at the stop).
    env.configure(|c| {
        c.unauthenticated_rate_limit = Some(RateLimit {
            period: Duration::from_secs(3600),
            burst: 3,
        })
    });
    env.configure(|c| c.unauthenticated_audit_interval = Duration::from_secs(3600));
    let app = TestApp::start(env).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "1.00")]),
    )
    .await;
    let here = client_from("127.0.0.1");
    // No token, a malformed header, an unknown token: 401, each taking one
    // of the address's three.
    let mut first_id = None;
    for auth in [None, Some("Basic dXNlcjpwYXNz"), Some("Bearer evt_unknown")] {
        let (status, retry, id, text) = read(&here, &app, auth).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {text}");
        assert_eq!(retry, None);
        first_id.get_or_insert(id);
    }
    // Beyond them, whatever the kind of bad token: 429 `rate-limited`
    // with the wait until the next one.
    for auth in [None, Some("Bearer"), Some("Bearer evt_unknown-2")] {
        let (status, retry, _, text) = read(&here, &app, auth).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{auth:?}: {text}");
        assert!(
            text.contains("urn:eventvault:problem:rate-limited"),
            "{text}"
        );
        let retry = retry.expect("Retry-After");
        assert!((3500..=3600).contains(&retry), "{retry}");
    }
    // A valid token from the same address is served: the limit counts
    // refusals, not the address's requests.
    let (status, _, _, text) = read(&here, &app, Some(&format!("Bearer {}", app.token()))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // Another address has an allowance of its own.
    let there = client_from("127.0.0.2");
    let (status, _, there_id, _) = read(&there, &app, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The first refusal of each address has a record of its own; the
    // others are counted, not written.
    let records = app.audit_records("").await;
    assert_eq!(
        anonymous(&records),
        vec![
            ("stream.read".into(), "stream:accounts-1".into(), 0),
            ("stream.read".into(), "stream:accounts-1".into(), 0),
        ],
        "{records:?}"
    );
    let (status, metrics) = app.request(reqwest::Method::GET, "/metrics").send().await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics
            .contains("eventvault_connection_limits_total{limit=\"unauthenticated_rate_limit\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("eventvault_unauthenticated_requests_total{audit=\"aggregated\"} 5"),
        "{metrics}"
    );

    // At the stop, the window still open is written: one record per
    // address, counting all of its requests without a valid token, tied
    // to the one recorded on its own.
    let env = app.stop().await;
    let app = TestApp::start(env).await;
    let aggregates: HashMap<String, (u64, String, String)> = app
        .audit_records("action=unauthenticated.refused")
        .await
        .iter()
        .map(|r| {
            (
                r["resource"].as_str().unwrap().to_owned(),
                (
                    r["event_count"].as_u64().unwrap(),
                    r["outcome"].as_str().unwrap().to_owned(),
                    r["correlation_id"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    assert_eq!(
        aggregates,
        HashMap::from([
            (
                "client:127.0.0.1".to_owned(),
                (6, "denied".to_owned(), first_id.unwrap())
            ),
            (
                "client:127.0.0.2".to_owned(),
                (1, "denied".to_owned(), there_id)
            ),
        ])
    );
    let (status, text) = app.get("/audit/verify", &app.token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["ok"], true);
}

async fn refusals_are_recorded_once_per_address_and_window(backend: Backend) {
    const REQUESTS: u64 = 300;
    let interval = Duration::from_secs(1);
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.unauthenticated_audit_interval = interval);
    let app = TestApp::start(env).await;
    let mut aggregated = app.progress().unauthenticated_aggregated;
    let records_before = app.audit_records("").await.len();
    // A flood without tokens from one address, four connections at once.
    let client = client_from("127.0.0.3");
    let started = Instant::now();
    let floods = (0..4).map(|i| {
        let (client, app) = (&client, &app);
        async move {
            let mut ids = Vec::new();
            for _ in (i..REQUESTS).step_by(4) {
                let (status, _, id, _) = read(client, app, Some("Bearer evt_guess")).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED);
                ids.push(id);
            }
            ids
        }
    });
    let ids: Vec<String> = futures::future::join_all(floods)
        .await
        .into_iter()
        .flatten()
        .collect();
    let took = started.elapsed();
    assert_eq!(ids.len() as u64, REQUESTS);
    // Every one of them is accounted for once its window has ended.
    tokio::time::timeout(
        Duration::from_secs(30),
        aggregated.wait_for(|n| *n >= REQUESTS),
    )
    .await
    .expect("the windows' records were written")
    .unwrap();
    let records = app.audit_records("").await;
    let new = &records[records_before..];
    let own: Vec<&Value> = new
        .iter()
        .filter(|r| r["principal"].is_null() && r["action"] == "stream.read")
        .collect();
    let aggregates: Vec<&Value> = new
        .iter()
        .filter(|r| r["action"] == "unauthenticated.refused")
        .collect();
    // Per window one record of its own (the first request) and one
    // aggregate record; the windows the flood touched, no more.
    let windows = (took.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 1;
    assert!(
        !aggregates.is_empty() && aggregates.len() <= windows,
        "{} aggregate records in {took:?}",
        aggregates.len()
    );
    assert_eq!(own.len(), aggregates.len(), "{new:?}");
    assert_eq!(
        aggregates
            .iter()
            .map(|r| r["event_count"].as_u64().unwrap())
            .sum::<u64>(),
        REQUESTS
    );
    for a in &aggregates {
        assert_eq!(a["resource"], "client:127.0.0.3");
        assert_eq!(a["outcome"], "denied");
        // Tied to the record of its window's first request.
        let first = a["correlation_id"].as_str().unwrap();
        assert!(ids.iter().any(|id| id == first));
        assert!(own.iter().any(|r| r["request_id"] == first), "{a}");
    }
    let (status, text) = app.get("/audit/verify", &app.token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["ok"], true);
}
