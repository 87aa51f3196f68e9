//! The OpenAPI document (`GET /openapi.json`) and what schemathesis finds
//! when it drives the API from it: no server error, no response outside the
//! document, and no personal value for a caller without `read_personal`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::access::{audit_records, call};
use crate::both_backends;
use crate::common::{Backend, TestApp, batch};

both_backends!(
    the_document_describes_every_operation,
    schemathesis_finds_no_failure
);

/// Every operation of the API (DESIGN.md), as `METHOD path`.
const OPERATIONS: &[&str] = &[
    "GET /audit",
    "GET /audit/verify",
    "GET /events",
    "GET /events/subscribe",
    "GET /healthz",
    "GET /metrics",
    "GET /openapi.json",
    "GET /readyz",
    "GET /streams/{stream}/events",
    "GET /streams/{stream}/snapshot",
    "GET /streams/{stream}/subscribe",
    "GET /subjects/{subject}",
    "GET /subjects/{subject}/export",
    "POST /streams/{stream}/events",
    "POST /subjects/{subject}/forget",
    "PUT /streams/{stream}/snapshot",
];

/// The operations that need no token.
const OPEN: &[&str] = &["/healthz", "/readyz", "/metrics", "/openapi.json"];

async fn document(app: &TestApp) -> Value {
    let r = app
        .client
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.unwrap()
}

async fn the_document_describes_every_operation(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let doc = document(&app).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let name = format!("{} {path}", method.to_uppercase());
            let responses = op["responses"].as_object().unwrap();
            if OPEN.contains(&path.as_str()) {
                assert!(op.get("security").is_none(), "{name} needs no token");
            } else {
                // Every authenticated operation: the bearer token, the audit
                // headers, and the refusals, each a problem document.
                assert_eq!(op["security"], json!([{"bearer": []}]), "{name}");
                for status in ["400", "401", "403", "429", "500", "503"] {
                    let problem = &responses[status]["content"]["application/problem+json"];
                    assert_eq!(
                        problem["schema"]["$ref"], "#/components/schemas/Problem",
                        "{name} {status}"
                    );
                }
                let headers: Vec<&str> = op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["in"] == "header")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                for h in [
                    "X-Correlation-Id",
                    "X-Causation-Id",
                    "X-Purpose",
                    "X-Request-Id",
                ] {
                    assert!(headers.contains(&h), "{name} lacks {h}");
                }
            }
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{name} has no success response"
            );
            // The operation is served: an unauthenticated call is refused
            // (or answered), never "no such endpoint".
            let concrete = path
                .replace("{stream}", "accounts-1")
                .replace("{subject}", "customer-1");
            let (status, _) = call(
                &app,
                Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                &concrete,
                None,
                &[],
                None,
            )
            .await;
            let want = if OPEN.contains(&path.as_str()) {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(status, want, "{name}");
            found.insert(name);
        }
    }
    let expected: BTreeSet<String> = OPERATIONS.iter().map(|s| s.to_string()).collect();
    assert_eq!(found, expected);
    // The schemas the operations name are all there.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "Event",
        "Problem",
        "AppendRequest",
        "NewEvent",
        "PersonalData",
    ] {
        assert!(schemas.contains_key(name), "{name}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer"})
    );
    // Free text that PostgreSQL cannot store (NUL) is a 400 wherever it may
    // be sent, as the document's patterns say (schemathesis found a 500).
    let admin = app.token();
    let (status, text) = call(
        &app,
        Method::GET,
        "/audit?action=a%00b",
        Some(&admin),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let (status, text) = call(
        &app,
        Method::POST,
        "/subjects/customer-1/forget",
        Some(&admin),
        &[],
        Some(&json!({"reason": "ticket\u{0}1"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    // Refused requests are audited; the document itself is not a data route.
    let records = audit_records(&app, "action=stream.read&outcome=denied").await;
    assert!(!records.is_empty());
}

/// The schemathesis command: `EVENTVAULT_SCHEMATHESIS`, or `st` on the
/// `PATH`. `None` when there is none and it is not required.
fn schemathesis() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EVENTVAULT_SCHEMATHESIS") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("st"))
            .find(|p| p.is_file())
    });
    if on_path.is_none() {
        assert!(
            std::env::var("EVENTVAULT_REQUIRE_SCHEMATHESIS").as_deref() != Ok("1"),
            "schemathesis is required (EVENTVAULT_REQUIRE_SCHEMATHESIS=1) but neither \
             EVENTVAULT_SCHEMATHESIS nor `st` on the PATH names it"
        );
        eprintln!(
            "schemathesis not found (pip install schemathesis==4.32.5); skipping the API fuzz test"
        );
    }
    on_path
}

/// The personal values the fuzzing caller must never see.
const SECRETS: &[&str] = &["Zebulon Quackenbush", "DE44500105175407324931"];

/// Runs schemathesis against every operation with `token`: 25 cases each,
/// and 5 of each subscription (schemathesis reads an endless event stream
/// for a while before it moves on). `(success, output)`.
async fn fuzz_all(st: &PathBuf, app: &TestApp, token: &str, secrets: &[&str]) -> (bool, String) {
    let (a, out_a) = fuzz(
        st,
        app,
        token,
        secrets,
        &["--exclude-path-regex", "subscribe$"],
    )
    .await;
    let (b, out_b) = fuzz(
        st,
        app,
        token,
        secrets,
        &["--include-path-regex", "subscribe$", "--max-examples", "5"],
    )
    .await;
    (a && b, format!("{out_a}\n{out_b}"))
}

/// Runs schemathesis against the API with `token`, checking that no
/// response carries any of `secrets`; `(success, output)`.
async fn fuzz(
    st: &PathBuf,
    app: &TestApp,
    token: &str,
    secrets: &[&str],
    extra: &[&str],
) -> (bool, String) {
    let hooks = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let report = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(st)
        .arg("run")
        .arg(format!("{}/openapi.json", app.base))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        // Every check but one: a request valid by the document may still be
        // refused by the state it finds (a version the stream does not have,
        // a forgotten subject), which is what the API says it does.
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args([
            "--workers",
            "1",
            "--seed",
            "20261128",
            "--request-timeout",
            "30",
        ])
        // Its cache and reports go to a directory of this run's own.
        .current_dir(report.path())
        .arg("--report-dir")
        .arg(report.path())
        .args(extra)
        .args(if extra.contains(&"--max-examples") {
            &[][..]
        } else {
            &["--max-examples", "25"][..]
        })
        .env("PYTHONPATH", &hooks)
        .env("SCHEMATHESIS_HOOKS", "eventvault_checks")
        .env("EVENTVAULT_PERSONAL_VALUES", json!(secrets).to_string())
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output()
        .await
        .expect("schemathesis runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn schemathesis_finds_no_failure(backend: Backend) {
    let Some(st) = schemathesis() else { return };
    let app = TestApp::spawn(&backend).await;
    let admin = app.token();
    // Personal data where the document's examples point: the stream
    // `accounts-ACC-1`, its snapshot, the subject `customer-42`.
    let event = json!({
        "type": "MoneyDeposited",
        "subject": "customer-42",
        "data": {"account": "ACC-1", "amount": "10.00", "currency": "EUR",
                 "payer_name": SECRETS[0], "payer_iban": SECRETS[1]},
    });
    app.append_ok("accounts-ACC-1", &batch(vec![event])).await;
    let (status, text) = call(
        &app,
        Method::PUT,
        "/streams/accounts-ACC-1/snapshot",
        Some(&admin),
        &[],
        Some(&json!({"version": 1, "subject": "customer-42",
                     "state": {"holder": SECRETS[0]}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = call(
        &app,
        Method::GET,
        "/streams/accounts-ACC-1/events",
        Some(&admin),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains(SECRETS[0]),
        "the admin reads the value: {text}"
    );

    // The personal-value check fails when a response does carry one: the
    // admin reading that stream.
    let (ok, out) = fuzz(
        &st,
        &app,
        &admin,
        SECRETS,
        &[
            "--include-path",
            "/streams/{stream}/events",
            "--include-method",
            "GET",
            "--phases",
            "examples",
        ],
    )
    .await;
    assert!(!ok && out.contains("personal value(s)"), "{out}");

    // A `service` caller (read, no read_personal) through every operation.
    let service = app.env.add_principal("fuzz-service", &["service"]).await;
    let (ok, out) = fuzz_all(&st, &app, &service, SECRETS).await;
    assert!(ok, "schemathesis as service:\n{out}");
    // It did read the stream that holds the personal data.
    let reads = audit_records(
        &app,
        "principal=fuzz-service&action=stream.read&resource=stream:accounts-ACC-1&outcome=ok",
    )
    .await;
    assert!(!reads.is_empty(), "{out}");

    // The admin, with every permission (personal data included), through
    // every operation.
    let (ok, out) = fuzz_all(&st, &app, &admin, &[]).await;
    assert!(ok, "schemathesis as admin:\n{out}");
    app.stop().await;
}
