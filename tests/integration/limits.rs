//! Limits a hostile or runaway client meets: a per-principal request rate
//! (429 with Retry-After, audited, others unaffected), the size of a
//! request's headers (431), slow headers, trickled bodies (408), idle
//! connections and the number of connections (503). Each answer is a
//! problem+json document, and the service goes on serving everyone else.
//!
//! The connection-level tests speak HTTP/1.1 over a raw socket: what a
//! well-behaved client library would never send is the point.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv, batch, deposit};
use crate::subscribe::Subscriber;
use eventvault::app::RateLimit;

both_backends!(
    a_principal_over_its_rate_is_told_when_to_retry,
    oversized_headers_are_answered_431_and_others_are_served,
    a_client_sending_its_headers_slowly_is_disconnected,
    a_trickled_body_is_answered_408,
    an_idle_kept_alive_connection_is_closed,
    beyond_the_connection_limit_a_client_gets_503_until_a_slot_frees,
    a_subscription_outlives_the_header_and_idle_timeouts,
);

/// How long a test waits for the server to close a connection before it
/// fails: far beyond every timeout the tests set.
const PATIENCE: Duration = Duration::from_secs(30);

pub async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Everything the server sends until it closes the connection (a reset
/// ends it too: what arrived before it is kept). Fails the test if the
/// connection is still open after [`PATIENCE`].
async fn until_closed(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(PATIENCE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        read.is_ok(),
        "the server kept the connection open for {PATIENCE:?}; it sent {text:?}"
    );
    text
}

/// One response (head and `Content-Length` body) from a kept-alive
/// connection.
pub async fn one_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .expect("a Content-Length");
                if out.len() >= end + 4 + length {
                    return text;
                }
            }
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "the connection closed mid-response: {text:?}");
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response in time")
}

/// The problem document at the end of a raw response.
pub fn problem(response: &str) -> Value {
    let (_, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response:?}"))
}

/// The value of a counter or gauge line of `GET /metrics`.
pub async fn metric(app: &TestApp, line: &str) -> u64 {
    let text = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in /metrics"))
}

async fn a_principal_over_its_rate_is_told_when_to_retry(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    // Three at once, then one a minute: the fourth request is refused
    // however slowly the first three run.
    env.configure(|c| {
        c.rate_limit = Some(RateLimit {
            period: Duration::from_secs(60),
            burst: 3,
        })
    });
    let app = TestApp::start(env).await;
    let service = app.env.add_principal("ledger", &["service"]).await;
    for _ in 0..3 {
        let (status, text) = app.get("/events", &service).await;
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
    let (status, _) = app.get("/events", &app.token()).await;
    assert_eq!(status, StatusCode::OK);
    // The refusal is audited, with the principal.
    let records = app.audit_records("principal=ledger&outcome=error").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["action"], "log.read");
}

async fn oversized_headers_are_answered_431_and_others_are_served(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.max_header_bytes = 4096);
    let app = TestApp::start(env).await;
    // Headers just under the limit are served (with the token in them, so
    // that the log check below also covers a request that was refused).
    let (status, text) = app
        .request(Method::GET, "/events")
        .token(&app.token())
        .header("X-Padding", &"p".repeat(3000))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // 64 KiB of headers: a clear answer, then the connection closes.
    let mut s = connect(&app).await;
    let head = format!(
        "GET /events HTTP/1.1\r\nHost: eventvault\r\nAuthorization: Bearer {}\r\nX-Padding: {}\r\n\r\n",
        app.token(),
        "p".repeat(64 * 1024)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let response = until_closed(&mut s).await;
    assert!(
        response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{response:?}"
    );
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("content-type: application/problem+json\r\n"));
    assert!(lower.contains("connection: close\r\n"));
    let p = problem(&response);
    assert_eq!(p["type"], "urn:eventvault:problem:headers-too-large");
    assert_eq!(p["status"], 431);
    // Everyone else is served as before.
    let (status, text) = app.get("/events", &app.token()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        metric(
            &app,
            "eventvault_connection_limits_total{limit=\"max_header_bytes\"}"
        )
        .await,
        1
    );
}

/// Writes `bytes` one at a time, `every` apart, until the server closes the
/// connection (a slow client; the pace is the behaviour under test).
pub fn trickle(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    bytes: Vec<u8>,
    every: Duration,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        // Never faster than `every`, even after a late tick.
        let mut pace = tokio::time::interval(every);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace.tick().await; // the first tick is immediate
        let mut sent = 0;
        for b in bytes {
            pace.tick().await;
            if w.write_all(&[b]).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    })
}

async fn a_client_sending_its_headers_slowly_is_disconnected(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.header_read_timeout = Duration::from_secs(1));
    let app = TestApp::start(env).await;
    let s = connect(&app).await;
    let (mut r, w) = s.into_split();
    // A header line every 100 ms, for far longer than the deadline: a
    // deadline that restarted with every byte would never fire.
    let headers: Vec<u8> = "GET /healthz HTTP/1.1\r\n"
        .bytes()
        .chain((0..1000).flat_map(|i| format!("X-{i}: {i}\r\n").into_bytes()))
        .collect();
    let writer = trickle(w, headers, Duration::from_millis(10));
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, r.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the slow client was not disconnected");
    assert!(
        out.is_empty(),
        "nothing is answered: {:?}",
        String::from_utf8_lossy(&out)
    );
    let sent = writer.await.unwrap();
    assert!(
        sent < 9000,
        "the client sent all its headers ({sent} bytes)"
    );
    assert_eq!(
        metric(
            &app,
            "eventvault_connection_limits_total{limit=\"header_read_timeout\"}"
        )
        .await,
        1
    );
    // A client that says nothing at all is disconnected too.
    let mut silent = connect(&app).await;
    assert_eq!(until_closed(&mut silent).await, "");
    // And the service serves the others.
    let (status, _) = app.get("/events", &app.token()).await;
    assert_eq!(status, StatusCode::OK);
}

async fn a_trickled_body_is_answered_408(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.body_read_timeout = Duration::from_secs(1));
    let app = TestApp::start(env).await;
    let body = serde_json::to_vec(&batch(vec![deposit(
        uuid::Uuid::new_v4(),
        "cust-408",
        "1.00",
    )]))
    .unwrap();
    let s = connect(&app).await;
    let (mut r, mut w) = s.into_split();
    let head = format!(
        "POST /streams/accounts-408/events HTTP/1.1\r\nHost: eventvault\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        app.token(),
        body.len()
    );
    w.write_all(head.as_bytes()).await.unwrap();
    // A byte every 50 ms: the body would take far longer than the deadline,
    // yet no single gap comes near it.
    let writer = trickle(w, body.clone(), Duration::from_millis(50));
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(PATIENCE, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let response = String::from_utf8_lossy(&out).into_owned();
    assert!(read.is_ok(), "the connection stayed open: {response:?}");
    assert!(
        response.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{response:?}"
    );
    assert!(
        response
            .to_ascii_lowercase()
            .contains("connection: close\r\n")
    );
    let p = problem(&response);
    assert_eq!(p["type"], "urn:eventvault:problem:request-timeout");
    let sent = writer.await.unwrap();
    assert!(sent < body.len(), "the whole body arrived ({sent} bytes)");
    // Nothing was appended.
    let r = app.read("accounts-408", "").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        metric(
            &app,
            "eventvault_connection_limits_total{limit=\"body_read_timeout\"}"
        )
        .await,
        1
    );
}

async fn an_idle_kept_alive_connection_is_closed(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.idle_timeout = Duration::from_secs(1));
    // Longer than the patience: only the idle timeout can close it.
    env.configure(|c| c.header_read_timeout = Duration::from_secs(600));
    let app = TestApp::start(env).await;
    let mut s = connect(&app).await;
    // Two requests on the connection: it is kept alive between them.
    for _ in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: eventvault\r\n\r\n")
            .await
            .unwrap();
        let response = one_response(&mut s).await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    }
    // Then nothing: the server closes it, without a word.
    assert_eq!(until_closed(&mut s).await, "");
    assert_eq!(
        metric(
            &app,
            "eventvault_connection_limits_total{limit=\"idle_timeout\"}"
        )
        .await,
        1
    );
}

async fn beyond_the_connection_limit_a_client_gets_503_until_a_slot_frees(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.max_connections = 2);
    let app = TestApp::start(env).await;
    // Two connections, each answered once: both hold a slot.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&app).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: eventvault\r\n\r\n")
            .await
            .unwrap();
        assert!(
            one_response(&mut s)
                .await
                .starts_with("HTTP/1.1 200 OK\r\n")
        );
        held.push(s);
    }
    // A third is answered 503 and closed, whatever it sends.
    let mut third = connect(&app).await;
    let response = until_closed(&mut third).await;
    assert!(
        response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{response:?}"
    );
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1\r\n"), "{response:?}");
    assert!(lower.contains("connection: close\r\n"), "{response:?}");
    assert_eq!(
        problem(&response)["type"],
        "urn:eventvault:problem:too-many-connections"
    );
    // The server closes one of the two; once the client sees it closed,
    // its slot is free.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: eventvault\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(
        until_closed(&mut first)
            .await
            .starts_with("HTTP/1.1 200 OK\r\n")
    );
    let mut next = connect(&app).await;
    next.write_all(b"GET /metrics HTTP/1.1\r\nHost: eventvault\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let response = until_closed(&mut next).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    for line in [
        "eventvault_connection_limits_total{limit=\"max_connections\"} 1",
        "eventvault_connections_open 2",
    ] {
        assert!(response.lines().any(|l| l == line), "no {line:?}");
    }
}

async fn a_subscription_outlives_the_header_and_idle_timeouts(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.header_read_timeout = Duration::from_secs(1));
    env.configure(|c| c.idle_timeout = Duration::from_secs(1));
    let app = TestApp::start(env).await;
    let token = app.token();
    let mut sub = Subscriber::open(&app, "/events/subscribe?after=0", &token, &[]).await;
    // Opened after the subscription: a connection that says nothing meets
    // the header timeout, and one kept alive after a request meets the
    // idle timeout. Both are then behind the subscription.
    let mut silent = connect(&app).await;
    assert_eq!(until_closed(&mut silent).await, "");
    let mut idle = connect(&app).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: eventvault\r\n\r\n")
        .await
        .unwrap();
    one_response(&mut idle).await;
    assert_eq!(until_closed(&mut idle).await, "");
    // The subscription still delivers.
    let id = uuid::Uuid::new_v4();
    app.append_ok(
        "accounts-sub",
        &json!({"events": [deposit(id, "cust-1", "5.00")]}),
    )
    .await;
    let (_, event) = sub.next().await;
    assert_eq!(event["id"], id.to_string());
}
