//! The OpenAPI document (`GET /openapi.json`): what it says, what Redocly's
//! linter makes of it (`redocly.yaml`), whether a Python client generated
//! from it (openapi-python-client) works, and what schemathesis finds when it
//! drives the API from it: no server error, no response outside the
//! document, and no personal value for a caller without `read_personal`.
//!
//! The tools come from `.ci/run`, pinned, or from the `PATH`; see
//! [`tool`]. A new response, header or problem kind needs nothing here: the
//! document's shared parts (`src/http/openapi.rs`) give every answer its
//! headers, and the linter holds the whole document to `redocly.yaml`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::both_backends;
use crate::common::{Backend, TestApp, batch};

both_backends!(
    the_document_describes_every_operation,
    a_wrong_method_is_a_problem_with_allow,
    the_linter_finds_nothing,
    a_generated_client_works,
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
    // Relative: the server that serves the document.
    assert_eq!(doc["servers"][0]["url"], "/", "{}", doc["servers"]);
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let name = format!("{} {path}", method.to_uppercase());
            let responses = op["responses"].as_object().unwrap();
            // The headers of every answer, and Retry-After where the caller
            // is asked to come back.
            for (status, response) in responses {
                let headers = &response["headers"];
                assert!(headers.get("Cache-Control").is_some(), "{name} {status}");
                if status != "431" {
                    assert!(headers.get("X-Request-Id").is_some(), "{name} {status}");
                }
                if status == "429" || status == "503" {
                    assert_eq!(
                        headers["Retry-After"]["schema"]["type"], "integer",
                        "{name} {status}"
                    );
                }
            }
            // The connection's own refusals can meet any request.
            for status in ["431", "503"] {
                assert!(responses.contains_key(status), "{name} lacks {status}");
            }
            if OPEN.contains(&path.as_str()) {
                // Open to anyone, and said so.
                assert_eq!(op["security"], json!([]), "{name} needs no token");
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
            let (status, _) = app
                .request(
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    &concrete,
                )
                .send()
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
    // What generated clients stumbled on. The forget's body: an optional
    // `ForgetRequest`, not a required `oneOf: [null, ForgetRequest]`.
    let forget = &doc["paths"]["/subjects/{subject}/forget"]["post"]["requestBody"];
    assert_ne!(forget["required"], json!(true), "{forget}");
    assert_eq!(
        forget["content"]["application/json"]["schema"],
        json!({"$ref": "#/components/schemas/ForgetRequest"})
    );
    assert!(schemas.contains_key("ForgetRequest"));
    // A subscription: text for an SSE client, not a JSON model; each
    // event's shape in `x-itemSchema` (OpenAPI 3.2's `itemSchema`).
    for path in ["/events/subscribe", "/streams/{stream}/subscribe"] {
        let ok = &doc["paths"][path]["get"]["responses"]["200"];
        let content = ok["content"].as_object().unwrap();
        assert_eq!(content.len(), 1, "{path}");
        let sse = &content["text/event-stream"];
        assert_eq!(sse["schema"], json!({"type": "string"}), "{path}");
        assert_eq!(
            sse["x-itemSchema"]["required"],
            json!(["id", "data"]),
            "{path}"
        );
        assert!(
            ok["description"].as_str().unwrap().contains("SSE client"),
            "{ok}"
        );
    }
    // `Expected-Version` takes the version as an integer, or a word.
    let params = doc["paths"]["/streams/{stream}/events"]["post"]["parameters"]
        .as_array()
        .unwrap();
    let expected = params
        .iter()
        .find(|p| p["name"] == "Expected-Version")
        .unwrap();
    let forms = expected["schema"]["oneOf"].as_array().unwrap();
    assert!(forms.iter().any(|f| f["type"] == "integer"), "{expected}");
    assert!(
        forms
            .iter()
            .any(|f| f["enum"] == json!(["any", "no-stream", "exists"])),
        "{expected}"
    );
    // The problem kinds are listed, the same as the README lists.
    let listed = doc["components"]["schemas"]["Problem"]["properties"]["type"]["description"]
        .as_str()
        .unwrap();
    let in_doc: BTreeSet<String> = listed
        .lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .map(|l| l.split('`').next().unwrap().to_owned())
        .collect();
    assert_eq!(in_doc, readme_problem_kinds(), "{listed}");
    // Free text that PostgreSQL cannot store (NUL) is a 400 wherever it may
    // be sent, as the document's patterns say (schemathesis found a 500).
    let admin = app.token();
    let (status, text) = app.get("/audit?action=a%00b", &admin).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let (status, text) = app
        .request(Method::POST, "/subjects/customer-1/forget")
        .token(&admin)
        .json(&json!({"reason": "ticket\u{0}1"}))
        .send()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    // The forget's body is absent or a `ForgetRequest`: `null` is neither.
    let (status, text) = app
        .request(Method::POST, "/subjects/customer-1/forget")
        .token(&admin)
        .json(&Value::Null)
        .send()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    // Refused requests are audited; the document itself is not a data route.
    let records = app.audit_records("action=stream.read&outcome=denied").await;
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
    let (status, text) = app
        .request(Method::PUT, "/streams/accounts-ACC-1/snapshot")
        .token(&admin)
        .json(&json!({"version": 1, "subject": "customer-42",
                     "state": {"holder": SECRETS[0]}}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = app.get("/streams/accounts-ACC-1/events", &admin).await;
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
    let reads = app
        .audit_records(
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

/// The problem kinds the README lists (`Problem types (…): `a`, `b`, ….`).
fn readme_problem_kinds() -> BTreeSet<String> {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("Problem types (`urn:eventvault:problem:…`):")
        .expect("the README lists the problem kinds");
    let list = &readme[start..];
    let list = &list[list.find("):").unwrap() + 2..list.find("\n\n").unwrap()];
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

async fn a_wrong_method_is_a_problem_with_allow(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    for (method, path, allow) in [
        (
            Method::DELETE,
            "/streams/accounts-1/events",
            "GET,HEAD,POST",
        ),
        (Method::PATCH, "/subjects/customer-1/forget", "POST"),
        (Method::POST, "/healthz", "GET,HEAD"),
        (Method::PUT, "/openapi.json", "GET,HEAD"),
    ] {
        let r = app
            .client
            .request(method.clone(), format!("{}{path}", app.base))
            .bearer_auth(app.token())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        let headers = r.headers().clone();
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{method} {path}"
        );
        assert_eq!(headers["cache-control"], "no-store");
        assert!(headers.contains_key("x-request-id"));
        let mut methods: Vec<&str> = headers["allow"].to_str().unwrap().split(',').collect();
        methods.sort_unstable();
        assert_eq!(methods.join(","), allow, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["type"], "urn:eventvault:problem:method-not-allowed");
        assert_eq!(body["status"], 405);
        assert!(body["detail"].as_str().unwrap().contains("Allow"), "{body}");
    }
    // An unknown path stays a 404, whatever the method.
    let (status, text) = app.request(Method::DELETE, "/nowhere").send().await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    app.stop().await;
}

/// A tool the tests run: the file that `var` names, or `name` on the
/// `PATH`. `None` when there is none and `EVENTVAULT_REQUIRE_OPENAPI_TOOLS`
/// is not `1` (`.ci/run` installs them, pinned, and sets it).
fn tool(var: &str, name: &str, install: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if on_path.is_none() {
        assert!(
            std::env::var("EVENTVAULT_REQUIRE_OPENAPI_TOOLS").as_deref() != Ok("1"),
            "{name} is required (EVENTVAULT_REQUIRE_OPENAPI_TOOLS=1) but neither {var} nor \
             `{name}` on the PATH names it"
        );
        eprintln!("{name} not found ({install}); skipping");
    }
    on_path
}

/// The served document, written to a file of `dir`.
async fn document_file(app: &TestApp, dir: &std::path::Path) -> PathBuf {
    let path = dir.join("openapi.json");
    std::fs::write(&path, document(app).await.to_string()).unwrap();
    path
}

/// Runs Redocly's linter on `file` with the repository's `redocly.yaml`:
/// the problems it reports, errors and warnings alike.
async fn lint(redocly: &PathBuf, file: &std::path::Path) -> Vec<Value> {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("redocly.yaml");
    let out = tokio::process::Command::new(redocly)
        .arg("lint")
        .arg(file)
        .arg("--config")
        .arg(&config)
        // A mistake in the configuration (an unknown rule) fails too.
        .args(["--lint-config", "error", "--format", "json"])
        .current_dir(file.parent().unwrap())
        .env("REDOCLY_TELEMETRY", "off")
        .env("REDOCLY_SUPPRESS_UPDATE_NOTICE", "true")
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output()
        .await
        .expect("redocly runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "redocly's report is not JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let problems = report["problems"].as_array().unwrap().clone();
    assert_eq!(
        out.status.success(),
        problems.iter().all(|p| p["severity"] != "error"),
        "{report}"
    );
    problems
}

async fn the_linter_finds_nothing(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let Some(redocly) = tool(
        "EVENTVAULT_REDOCLY",
        "redocly",
        "npm install @redocly/cli@2.77.0",
    ) else {
        app.stop().await;
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = document_file(&app, dir.path()).await;
    let problems = lint(&redocly, &file).await;
    assert!(
        problems.is_empty(),
        "redocly lint:\n{}",
        serde_json::to_string_pretty(&problems).unwrap()
    );

    // The linter does hold the document to the conventions: without its
    // servers, a 4xx that is not a problem, and a success without its
    // request id, it says so.
    let mut doc = document(&app).await;
    doc.as_object_mut().unwrap().remove("servers");
    let healthz = &mut doc["paths"]["/healthz"]["get"]["responses"];
    healthz["200"]["headers"]
        .as_object_mut()
        .unwrap()
        .remove("X-Request-Id");
    healthz["431"]["content"] = json!({"text/plain": {"schema": {"type": "string"}}});
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, doc.to_string()).unwrap();
    let rules: BTreeSet<String> = lint(&redocly, &broken)
        .await
        .iter()
        .map(|p| p["ruleId"].as_str().unwrap().to_owned())
        .collect();
    for rule in [
        "no-empty-servers",
        "operation-4xx-problem-details-rfc7807",
        "response-contains-header",
    ] {
        assert!(rules.contains(rule), "{rule} not reported: {rules:?}");
    }
    app.stop().await;
}

async fn a_generated_client_works(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let Some(generator) = tool(
        "EVENTVAULT_OPENAPI_PYTHON_CLIENT",
        "openapi-python-client",
        "pip install openapi-python-client==0.29.1",
    ) else {
        app.stop().await;
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = document_file(&app, dir.path()).await;
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openapi_client");
    let out = tokio::process::Command::new(&generator)
        .args(["generate", "--meta", "none", "--fail-on-warning"])
        .arg("--path")
        .arg(&file)
        .arg("--config")
        .arg(here.join("config.yaml"))
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output()
        .await
        .expect("openapi-python-client runs");
    assert!(
        out.status.success() && dir.path().join("eventvault_client").is_dir(),
        "openapi-python-client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The Python beside the generator has what the client needs (httpx,
    // attrs): the generator's own dependencies.
    let python = generator
        .parent()
        .map(|d| d.join("python3"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"));
    let out = tokio::process::Command::new(python)
        .arg(here.join("drive.py"))
        .env("PYTHONPATH", dir.path())
        .env("EVENTVAULT_URL", &app.base)
        .env("EVENTVAULT_TOKEN", app.token())
        .kill_on_drop(true)
        .output()
        .await
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("the generated client works"),
        "the generated client:\n{text}"
    );
    // It did what it said, as the audit log shows.
    let forgets = app.audit_records("action=subject.forget&outcome=ok").await;
    assert_eq!(forgets.len(), 2, "{text}");
    app.stop().await;
}
