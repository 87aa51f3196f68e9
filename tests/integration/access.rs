//! Access control: 401 and 403 on every data endpoint (and their audit
//! records), redaction by role, the purpose rule, the global log filtered to
//! the streams a caller may read, and decisions made by today's policy.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::both_backends;
use crate::common::{
    Backend, TestApp, TestEnv, assert_no_personal_value, batch, deposit, policies_dir,
};

both_backends!(
    every_endpoint_refuses_and_audits_unauthenticated_and_unauthorised_callers,
    a_service_reader_sees_personal_data_redacted,
    a_support_reader_needs_a_purpose_and_then_sees_personal_data,
    the_global_log_hides_streams_outside_the_grant,
    a_refusal_says_nothing_about_whether_the_stream_exists,
    what_a_reader_sees_follows_todays_policy,
    a_principal_with_an_undefined_role_stops_the_start,
    malformed_audit_headers_are_refused_and_recorded,
);

async fn every_endpoint_refuses_and_audits_unauthenticated_and_unauthorised_callers(
    backend: Backend,
) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "c1", "1")]),
    )
    .await;
    let service = app.env.add_principal("ledger", &["service"]).await;
    let auditor = app.env.add_principal("inspector", &["auditor"]).await;
    let body = batch(vec![deposit(Uuid::new_v4(), "c1", "2")]);
    // (method, path, action, resource, a token whose roles lack the permission)
    let endpoints = [
        (
            Method::POST,
            "/streams/accounts-1/events",
            "stream.append",
            "stream:accounts-1",
            &auditor,
        ),
        (
            Method::GET,
            "/streams/accounts-1/events",
            "stream.read",
            "stream:accounts-1",
            &auditor,
        ),
        (Method::GET, "/events", "log.read", "events", &auditor),
        (
            Method::PUT,
            "/streams/accounts-1/snapshot",
            "snapshot.save",
            "stream:accounts-1",
            &auditor,
        ),
        (
            Method::GET,
            "/streams/accounts-1/snapshot",
            "snapshot.read",
            "stream:accounts-1",
            &auditor,
        ),
        (
            Method::GET,
            "/events/subscribe",
            "log.subscribe",
            "events:subscribe",
            &auditor,
        ),
        (
            Method::GET,
            "/streams/accounts-1/subscribe",
            "stream.subscribe",
            "stream:accounts-1",
            &auditor,
        ),
        (Method::GET, "/audit", "audit.read", "audit", &service),
        (
            Method::GET,
            "/audit/verify",
            "audit.verify",
            "audit:verify",
            &service,
        ),
    ];
    let snapshot = json!({"version": 1, "subject": "c1", "state": {"balance": "1"}});
    for (method, path, action, resource, wrong_role) in &endpoints {
        let body = match *method {
            Method::POST => Some(&body),
            Method::PUT => Some(&snapshot),
            _ => None,
        };
        for token in [None, Some("evt_not-a-token"), Some("")] {
            let (status, text) = app
                .request(method.clone(), path)
                .token_opt(token)
                .json_opt(body)
                .send()
                .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {text}");
            assert!(
                text.contains("urn:eventvault:problem:unauthorized"),
                "{text}"
            );
        }
        let (status, text) = app
            .request(method.clone(), path)
            .token(wrong_role)
            .header("X-Correlation-Id", "corr-403")
            .json_opt(body)
            .send()
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {text}");
        assert!(text.contains("urn:eventvault:problem:forbidden"), "{text}");

        let records = app
            .audit_records(&format!("action={action}&outcome=denied"))
            .await;
        let denied: Vec<&Value> = records
            .iter()
            .filter(|r| r["outcome"] == "denied")
            .collect();
        assert_eq!(
            denied.len(),
            4,
            "{method} {path}: three 401s and one 403 recorded: {records:?}"
        );
        for r in &denied[..3] {
            assert_eq!(r["principal"], Value::Null);
            assert_eq!(r["resource"], *resource);
            assert_eq!(r["personal_data"], false);
        }
        let forbidden = denied[3];
        assert_ne!(forbidden["principal"], Value::Null);
        assert_eq!(forbidden["resource"], *resource);
        assert_eq!(forbidden["correlation_id"], "corr-403");
    }
    // The refused append wrote nothing, nor the refused snapshot.
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    assert_eq!(page["current_version"], 1);
    let (status, _) = app.get("/streams/accounts-1/snapshot", &app.token()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn a_service_reader_sees_personal_data_redacted(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "accounts-7",
        &batch(
            (0..3)
                .map(|i| deposit(Uuid::new_v4(), "cust-7", &format!("{i}.50")))
                .collect(),
        ),
    )
    .await;
    let service = app.env.add_principal("ledger", &["service"]).await;
    for path in [
        "/streams/accounts-7/events",
        "/streams/accounts-7/events?direction=backward",
        "/streams/accounts-7/events?as_of=2100-01-01T00:00:00Z",
        "/events",
        "/events?as_of=2100-01-01T00:00:00Z",
    ] {
        let (status, text) = app.get(path, &service).await;
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
        assert_no_personal_value(&text);
        let page: Value = serde_json::from_str(&text).unwrap();
        let events = page["events"].as_array().unwrap();
        assert_eq!(events.len(), 3, "{path}");
        for e in events {
            assert_eq!(e["personal_data"], "redacted");
            assert_eq!(e["data"]["account"], "ACC-1", "clear fields stay");
            assert!(e["data"].get("payer_name").is_none());
            assert!(e["data"].get("payer_iban").is_none());
        }
    }
    // Appending with the service role works on its streams.
    let (status, text) = app
        .request(Method::POST, "/streams/accounts-7/events")
        .token(&service)
        .json(&batch(vec![deposit(Uuid::new_v4(), "cust-7", "9")]))
        .send()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let records = app
        .audit_records("principal=ledger&action=stream.read")
        .await;
    assert_eq!(records.len(), 3);
    assert!(
        records
            .iter()
            .all(|r| r["personal_data"] == false && r["event_count"] == 3 && r["outcome"] == "ok")
    );
}

async fn a_support_reader_needs_a_purpose_and_then_sees_personal_data(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "loans-3",
        &batch(vec![deposit(Uuid::new_v4(), "cust-3", "12.00")]),
    )
    .await;
    let support = app.env.add_principal("officer", &["support"]).await;
    for path in ["/streams/loans-3/events", "/events"] {
        let (status, text) = app.get(path, &support).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {text}");
        assert!(text.contains("X-Purpose"), "{text}");
        assert_no_personal_value(&text);

        let (status, text) = app
            .request(Method::GET, path)
            .token(&support)
            .header("X-Purpose", "complaint 4711")
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
        let page: Value = serde_json::from_str(&text).unwrap();
        let e = &page["events"][0];
        assert_eq!(e["personal_data"], "decrypted");
        assert_eq!(e["data"]["payer_name"], "Payer of cust-3");
        assert_eq!(e["data"]["payer_iban"], "DE89370400440532013000");
    }
    // Support may read but not append.
    let (status, _) = app
        .request(Method::POST, "/streams/loans-3/events")
        .token(&support)
        .json(&batch(vec![deposit(Uuid::new_v4(), "cust-3", "1")]))
        .send()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let records = app.audit_records("principal=officer").await;
    let outcomes: Vec<(&str, &str, bool, &Value)> = records
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
                r["personal_data"].as_bool().unwrap(),
                &r["purpose"],
            )
        })
        .collect();
    let purpose = json!("complaint 4711");
    assert_eq!(
        outcomes,
        vec![
            ("stream.read", "error", false, &Value::Null),
            ("stream.read", "ok", true, &purpose),
            ("log.read", "error", false, &Value::Null),
            ("log.read", "ok", true, &purpose),
            ("stream.append", "denied", false, &Value::Null),
        ]
    );
}

async fn the_global_log_hides_streams_outside_the_grant(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    // 25 events the service may not see between the ones it may.
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "a", "1")]),
    )
    .await;
    app.append_ok(
        "loans-1",
        &batch(
            (0..25)
                .map(|i| deposit(Uuid::new_v4(), "l", &i.to_string()))
                .collect(),
        ),
    )
    .await;
    app.append_ok(
        "payments-1",
        &batch(vec![deposit(Uuid::new_v4(), "p", "2")]),
    )
    .await;
    app.append_ok("loans-2", &batch(vec![deposit(Uuid::new_v4(), "l", "3")]))
        .await;
    let service = app.env.add_principal("ledger", &["service"]).await;

    let mut seen = Vec::new();
    let mut after = 0;
    let mut pages = 0;
    loop {
        let (status, text) = app
            .get(&format!("/events?after={after}&limit=4"), &service)
            .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(!text.contains("loans-"), "a hidden stream leaked: {text}");
        let page: Value = serde_json::from_str(&text).unwrap();
        let next = page["next"].as_u64().unwrap();
        for e in page["events"].as_array().unwrap() {
            seen.push((
                e["stream_id"].as_str().unwrap().to_owned(),
                e["position"].as_u64().unwrap(),
            ));
        }
        pages += 1;
        if next == after {
            break;
        }
        assert!(next > after, "next never goes back");
        after = next;
        assert!(pages < 50, "the log must come to an end");
    }
    assert_eq!(
        seen,
        vec![("accounts-1".to_owned(), 1), ("payments-1".to_owned(), 27)]
    );
    assert_eq!(after, 28, "the reader walked past the hidden tail");
    // The admin sees everything.
    assert_eq!(app.whole_log().await.len(), 28);
}

async fn a_refusal_says_nothing_about_whether_the_stream_exists(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("loans-1", &batch(vec![deposit(Uuid::new_v4(), "l", "1")]))
        .await;
    let service = app.env.add_principal("ledger", &["service"]).await;
    let (s1, existing) = app.get("/streams/loans-1/events", &service).await;
    let (s2, missing) = app.get("/streams/loans-404/events", &service).await;
    assert_eq!((s1, s2), (StatusCode::FORBIDDEN, StatusCode::FORBIDDEN));
    assert_eq!(existing, missing, "the same answer either way");
    // Also when the request is malformed: permission comes first.
    let (status, _) = app
        .request(Method::POST, "/streams/loans-1/events")
        .token(&service)
        .json(&json!({"not": "events"}))
        .send()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app
        .get("/streams/loans-1/events?limit=oops", &service)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

async fn what_a_reader_sees_follows_todays_policy(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let policies = env.dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::copy(
        policies_dir().join("classification.toml"),
        policies.join("classification.toml"),
    )
    .unwrap();
    let roles = |personal: bool| {
        let perms = if personal {
            r#"["read", "read_personal"]"#
        } else {
            r#"["read"]"#
        };
        std::fs::write(
            policies.join("roles.toml"),
            format!(
                "[roles.admin]\n[[roles.admin.grant]]\nstreams = [\"*\"]\npermissions = [\"append\", \"read\", \"audit\"]\n\
                 [roles.reader]\n[[roles.reader.grant]]\nstreams = [\"*\"]\npermissions = {perms}\n"
            ),
        )
        .unwrap();
    };
    roles(true);
    env.configure(|c| c.policies_dir = policies.clone());

    let app = TestApp::start(env.clone()).await;
    let reader = env.add_principal("reader", &["reader"]).await;
    // Written by the admin, who may not read personal data under this policy.
    app.append_ok("s-1", &batch(vec![deposit(Uuid::new_v4(), "c", "1")]))
        .await;
    let admin_view: Value = app.read("s-1", "").await.json().await.unwrap();
    assert_eq!(admin_view["events"][0]["personal_data"], "redacted");
    let read = |app: TestApp| {
        let reader = reader.clone();
        async move {
            let (status, text) = app.get("/streams/s-1/events", &reader).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            (app, text)
        }
    };
    let (app, text) = read(app).await;
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["events"][0]["personal_data"], "decrypted");
    app.stop().await;

    // Today the reader may no longer see personal data: the same event reads
    // redacted.
    roles(false);
    let (_app, text) = read(TestApp::start(env.clone()).await).await;
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["events"][0]["personal_data"], "redacted");
    assert_no_personal_value(&text);
}

async fn a_principal_with_an_undefined_role_stops_the_start(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.env.add_principal("officer", &["support"]).await;
    let env = app.stop().await;
    let policies = env.dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::copy(
        policies_dir().join("classification.toml"),
        policies.join("classification.toml"),
    )
    .unwrap();
    std::fs::write(
        policies.join("roles.toml"),
        "[roles.admin]\n[[roles.admin.grant]]\nstreams = [\"*\"]\npermissions = [\"read\"]\n",
    )
    .unwrap();
    env.configure(|c| c.policies_dir = policies);
    let err = match eventvault::app::Application::build(&env.config()).await {
        Ok(_) => panic!("the start must fail"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("officer") && err.contains("support") && err.contains("roles.toml"),
        "{err}"
    );
}

async fn malformed_audit_headers_are_refused_and_recorded(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let long = "x".repeat(201);
    let (status, text) = app
        .request(Method::GET, "/events")
        .token(&app.token())
        .header("X-Correlation-Id", &long)
        .send()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("X-Correlation-Id"), "{text}");
    let records = app.audit_records("action=log.read").await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["outcome"], "error");
    assert_eq!(records[0]["correlation_id"], Value::Null);
}
