//! Appends: optimistic concurrency, idempotent retries, classification and
//! every kind of bad input.

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, TestApp, batch, deposit};

both_backends!(
    append_then_read_decrypts_and_keeps_every_digit,
    expected_version_is_enforced,
    same_ids_same_order_is_an_idempotent_retry,
    idempotency_survives_a_restart,
    bad_input_is_refused_and_writes_nothing,
    events_without_subject_and_unlisted_types,
    a_classified_type_without_a_subject_carries_only_clear_values,
    nested_values_are_clear_only_by_listed_paths,
    requests_without_a_valid_token_are_refused,
);

async fn problem(r: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    r.json().await.unwrap()
}

async fn append_then_read_decrypts_and_keeps_every_digit(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let id = Uuid::new_v4();
    // Written by hand: a `json!` literal would round the amount through f64.
    let text = format!(
        r#"{{"events":[{{"id":"{id}","type":"MoneyDeposited","subject":"cust-42",
            "data":{{"account":"ACC-1","amount":12345678901234567890.000000000000000001,"currency":"EUR",
                     "payer_name":"Jane Roe","payer_iban":"DE89370400440532013000"}},
            "metadata":{{"channel":"mobile"}}}}]}}"#
    );
    let r = app
        .client
        .post(format!("{}/streams/accounts-ACC-1/events", app.base))
        .bearer_auth(app.token())
        .header("content-type", "application/json")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    assert_eq!(
        created,
        json!({"stream_id": "accounts-ACC-1", "first_version": 1, "last_version": 1, "first_position": 1, "last_position": 1})
    );

    let r = app.read("accounts-ACC-1", "").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let text = r.text().await.unwrap();
    assert!(
        text.contains("\"amount\":12345678901234567890.000000000000000001"),
        "{text}"
    );
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["stream_id"], "accounts-ACC-1");
    assert_eq!(page["current_version"], 1);
    assert_eq!(page["next"], Value::Null);
    let e = &page["events"][0];
    assert_eq!(e["id"], id.to_string());
    assert_eq!(e["stream_id"], "accounts-ACC-1");
    assert_eq!(
        (e["version"].as_u64(), e["position"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(e["type"], "MoneyDeposited");
    assert_eq!(e["subject"], "cust-42");
    assert_eq!(e["data"]["payer_name"], "Jane Roe");
    assert_eq!(e["data"]["payer_iban"], "DE89370400440532013000");
    assert_eq!(e["data"]["currency"], "EUR");
    assert_eq!(e["metadata"], json!({"channel": "mobile"}));
    assert_eq!(e["personal_data"], "decrypted");
    assert!(e["recorded_at"].as_str().unwrap().ends_with('Z'));
}

async fn expected_version_is_enforced(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let one = || batch(vec![deposit(Uuid::new_v4(), "c1", "1.00")]);

    let r = app.append("s", Some("exists"), &one()).await;
    assert_eq!(problem(r, StatusCode::CONFLICT).await["current_version"], 0);

    assert_eq!(
        app.append("s", Some("no-stream"), &one()).await.status(),
        StatusCode::CREATED
    );
    let r = app.append("s", Some("no-stream"), &one()).await;
    assert_eq!(problem(r, StatusCode::CONFLICT).await["current_version"], 1);
    let r = app.append("s", Some("0"), &one()).await;
    assert_eq!(problem(r, StatusCode::CONFLICT).await["current_version"], 1);

    assert_eq!(
        app.append("s", Some("1"), &one()).await.status(),
        StatusCode::CREATED
    );
    let r = app.append("s", Some("1"), &one()).await;
    let p = problem(r, StatusCode::CONFLICT).await;
    assert_eq!(p["current_version"], 2);
    assert!(p["detail"].as_str().unwrap().contains("version 2"));
    assert_eq!(
        app.append("s", Some("exists"), &one()).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        app.append("s", Some("any"), &one()).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        app.append("s", None, &one()).await.status(),
        StatusCode::CREATED
    );

    let page: Value = app.read("s", "").await.json().await.unwrap();
    assert_eq!(page["current_version"], 5);
    assert_eq!(
        app.whole_log().await.len(),
        5,
        "refused appends wrote nothing"
    );
}

async fn same_ids_same_order_is_an_idempotent_retry(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let original = batch(ids.iter().map(|i| deposit(*i, "c1", "5")).collect());
    app.append_ok("other", &batch(vec![deposit(Uuid::new_v4(), "c1", "1")]))
        .await;
    let first = app.append_ok("s", &original).await;

    // The same append again, even with an Expected-Version that no longer
    // holds: 200 with the original result, nothing written.
    let r = app.append("s", Some("no-stream"), &original).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    assert_eq!(app.whole_log().await.len(), 4);

    let reordered = batch(vec![
        deposit(ids[1], "c1", "5"),
        deposit(ids[0], "c1", "5"),
        deposit(ids[2], "c1", "5"),
    ]);
    problem(
        app.append("s", None, &reordered).await,
        StatusCode::CONFLICT,
    )
    .await;
    let partial = batch(vec![deposit(ids[0], "c1", "5"), deposit(ids[1], "c1", "5")]);
    problem(app.append("s", None, &partial).await, StatusCode::CONFLICT).await;
    let extended = batch(vec![
        deposit(ids[0], "c1", "5"),
        deposit(ids[1], "c1", "5"),
        deposit(ids[2], "c1", "5"),
        deposit(Uuid::new_v4(), "c1", "5"),
    ]);
    problem(app.append("s", None, &extended).await, StatusCode::CONFLICT).await;
    let elsewhere = batch(ids.iter().map(|i| deposit(*i, "c1", "5")).collect());
    let p = problem(
        app.append("t", None, &elsewhere).await,
        StatusCode::CONFLICT,
    )
    .await;
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("another stream"), "{p}");
    assert!(
        !detail.contains("\"s\""),
        "the other stream is not named (the caller may not know it): {p}"
    );
    assert_eq!(p.get("current_version"), None);
    assert_eq!(
        app.whole_log().await.len(),
        4,
        "no refused append wrote anything"
    );
}

async fn idempotency_survives_a_restart(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let body = batch(vec![
        deposit(Uuid::new_v4(), "c1", "1"),
        deposit(Uuid::new_v4(), "c2", "2"),
    ]);
    let first = app.append_ok("s", &body).await;
    let env = app.stop().await;
    let app = TestApp::start(env).await;
    let r = app.append("s", None, &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    assert_eq!(app.whole_log().await.len(), 2);
}

async fn bad_input_is_refused_and_writes_nothing(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let good = |t: &str| json!({"type": t, "data": {}});
    let raw = |stream: &str, body: String, ct: &str| {
        app.client
            .post(format!("{}/streams/{stream}/events", app.base))
            .bearer_auth(app.token())
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let long_name = "x".repeat(201);
    let cases: Vec<(&str, String, &str, StatusCode, &str)> = vec![
        (
            "s",
            "{not json".into(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "s",
            "[]".into(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "s",
            json!({}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "events",
        ),
        (
            "s",
            json!({"events": []}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "at least one event",
        ),
        (
            "s",
            json!({"events": [{"data": {}}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "type",
        ),
        (
            "s",
            json!({"events": [{"type": "T"}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "data",
        ),
        (
            "s",
            json!({"events": [{"type": 5, "data": {}}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "events[0].type",
        ),
        (
            "s",
            json!({"events": [{"type": "T", "data": [1]}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "events[0].data",
        ),
        (
            "s",
            json!({"events": [good("T"), {"id": "not-a-uuid", "type": "T", "data": {}}]})
                .to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "events[1].id",
        ),
        (
            "s",
            json!({"events": [{"type": "T", "data": {}, "colour": "red"}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            "s",
            json!({"events": [{"type": "has space", "data": {}}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "event type",
        ),
        (
            "s",
            json!({"events": [{"type": "T", "subject": "", "data": {}}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "subject",
        ),
        (
            "s",
            json!({"events": [{"type": "T", "subject": "jane roe@x", "data": {}}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "subject",
        ),
        (
            "s",
            json!({"events": [{"type": "T", "data": {}, "metadata": "x"}]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "metadata",
        ),
        (
            "$system",
            json!({"events": [good("T")]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "reserved",
        ),
        (
            "bad%20name",
            json!({"events": [good("T")]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "stream id",
        ),
        (
            &long_name,
            json!({"events": [good("T")]}).to_string(),
            "application/json",
            StatusCode::BAD_REQUEST,
            "stream id",
        ),
        (
            "s",
            json!({"events": [good("T")]}).to_string(),
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
    ];
    for (stream, body, ct, status, needle) in cases {
        let r = raw(stream, body.clone(), ct).await.unwrap();
        let p = problem(r, status).await;
        let detail = p["detail"].as_str().unwrap();
        assert!(
            detail.contains(needle),
            "{body}: {detail:?} should mention {needle:?}"
        );
        assert_eq!(p["status"], status.as_u16());
    }

    let dup = Uuid::new_v4();
    let twice = json!({"events": [{"id": dup, "type": "T", "data": {}}, {"id": dup, "type": "T", "data": {}}]});
    let p = problem(app.append("s", None, &twice).await, StatusCode::BAD_REQUEST).await;
    assert!(p["detail"].as_str().unwrap().contains("more than once"));

    let too_many = batch((0..1001).map(|_| good("T")).collect());
    let p = problem(
        app.append("s", None, &too_many).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("at most 1000"));

    for word in ["sometimes", "-1", "1.5", ""] {
        let p = problem(
            app.append("s", Some(word), &batch(vec![good("T")])).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(
            p["detail"].as_str().unwrap().contains("Expected-Version"),
            "{word}: {p}"
        );
    }

    // Over the 4 MiB body limit: 413, also when the client does not announce
    // the length up front.
    let huge = json!({"events": [{"type": "T", "data": {"blob": "x".repeat(5 * 1024 * 1024)}}]})
        .to_string();
    problem(
        raw("s", huge.clone(), "application/json").await.unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    let chunks = futures::stream::iter(
        huge.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let sent = app
        .client
        .post(format!("{}/streams/s/events", app.base))
        .bearer_auth(app.token())
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    match sent {
        Ok(r) => {
            problem(r, StatusCode::PAYLOAD_TOO_LARGE).await;
        }
        // The server answers 413 and closes as soon as the limit is passed;
        // a client still sending may see the connection reset before it
        // reads that answer. Either way the body was refused.
        Err(e) => assert!(e.is_request() || e.is_body(), "unexpected failure: {e}"),
    }

    assert!(
        app.whole_log().await.is_empty(),
        "no bad request wrote anything"
    );
    assert_eq!(app.read("s", "").await.status(), StatusCode::NOT_FOUND);
}

async fn events_without_subject_and_unlisted_types(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "s",
        &json!({"events": [
            {"type": "RateChanged", "data": {"rate": "0.01", "note": "no subject, no personal data"}},
            {"type": "ProfileUpdated", "subject": "c9", "data": {"email_hash": "h", "city": "Bonn"}},
            {"type": "MoneyDeposited", "subject": "c9", "data": {"account": "A", "amount": "2"}},
        ]}),
    )
    .await;
    let page: Value = app.read("s", "").await.json().await.unwrap();
    let e = page["events"].as_array().unwrap();
    assert_eq!(e[0]["personal_data"], "none");
    assert_eq!(e[0]["data"]["note"], "no subject, no personal data");
    assert_eq!(e[0]["subject"], Value::Null);
    assert_eq!(e[1]["personal_data"], "decrypted");
    assert_eq!(e[1]["data"], json!({"email_hash": "h", "city": "Bonn"}));
    assert_eq!(
        e[2]["personal_data"], "none",
        "only clear fields: nothing to seal"
    );

    // At rest, the unlisted type kept nothing in clear.
    let db = crate::at_rest::events_db(&app.env).await;
    let stored: Vec<(String, bool)> = crate::at_rest::stored_data(&db).await;
    assert_eq!(stored[1], ("{}".to_owned(), true));
    assert!(!stored[2].1, "only clear fields: nothing sealed");
}

/// An event of a type `classification.toml` lists, without a subject, has no
/// key to seal under: any value that is not one of its type's clear ones is
/// a 400 naming its path (never its value), and the batch writes nothing.
async fn a_classified_type_without_a_subject_carries_only_clear_values(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let fine = json!({"type": "MoneyDeposited", "data": {"account": "A", "amount": "1"}});
    let refused = [
        (
            json!({"type": "MoneyDeposited", "data": {"account": "A", "amount": "1", "payer_name": "Jane Roe"}}),
            "data.payer_name",
        ),
        (
            json!({"type": "MoneyDeposited", "data": {"account": {"holder": "Jane Roe"}, "amount": "1"}}),
            "data.account",
        ),
        (
            json!({"type": "MoneyDeposited", "data": {"account": "A", "amount": ["Jane Roe"]}}),
            "data.amount",
        ),
        (
            json!({"type": "TransferCompleted", "data": {"amount": "1",
                   "counterparty": {"bic": "DEUTDEFF", "name": "Jane Roe"}}}),
            "data.counterparty.name",
        ),
        (
            json!({"type": "TransferCompleted", "data": {"amount": "1", "counterparty": "Jane Roe"}}),
            "data.counterparty",
        ),
    ];
    for (event, path) in &refused {
        let body = batch(vec![fine.clone(), event.clone()]);
        let p = problem(
            app.append("accounts-1", None, &body).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(p["type"], "urn:eventvault:problem:bad-request");
        let detail = p["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(&format!("events[1]: {path} is personal for the type ")),
            "{detail}"
        );
        assert!(!detail.contains("Jane"), "never the value: {detail}");
    }
    assert!(
        app.whole_log().await.is_empty(),
        "no refused batch wrote anything"
    );
    let records = app.audit_records("action=stream.append").await;
    assert_eq!(records.len(), refused.len());
    assert!(
        records.iter().all(|r| r["outcome"] == "error"),
        "{records:?}"
    );

    // Clear values only (a listed path into an object included): stored.
    app.append_ok(
        "accounts-1",
        &batch(vec![
            fine,
            json!({"type": "TransferCompleted", "data": {"amount": "1", "counterparty": {"bic": "DEUTDEFF"}}}),
        ]),
    )
    .await;
    let log = app.whole_log().await;
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|e| e["personal_data"] == "none"));
    assert_eq!(log[1]["data"]["counterparty"], json!({"bic": "DEUTDEFF"}));
}

/// A listed field is clear only as a scalar: an object or array in its
/// place is personal (sealed, redacted, erased), except for the paths into
/// it the classification lists. Readers allowed to see everything get the
/// event back exactly, numbers digit for digit.
async fn nested_values_are_clear_only_by_listed_paths(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    // Written by hand: a `json!` literal would round the numbers through f64.
    let data = r#"{"from_account": "ACC-1",
        "to_account": {"holder": "Jane Roe", "iban": "DE89370400440532013000"},
        "amount": 12345678901234567890.000000000000000001, "currency": "EUR",
        "counterparty": {"bic": "DEUTDEFF", "name": "Zebulon Quackenbush",
                         "limit": 0.1000000000000000000001, "notes": ["Payer of cust-7"], "extra": {}},
        "booked_on": {"date": "2026-11-27"}}"#;
    let data: Value = serde_json::from_str(data).unwrap();
    let event = json!({"type": "TransferCompleted", "subject": "cust-7", "data": data});
    app.append_ok("payments-7", &batch(vec![event])).await;
    let clear = json!({"from_account": "ACC-1",
        "amount": serde_json::from_str::<Value>("12345678901234567890.000000000000000001").unwrap(),
        "currency": "EUR", "counterparty": {"bic": "DEUTDEFF"}});

    // At rest: only the clear pieces outside the sealed blob.
    let db = crate::at_rest::events_db(&app.env).await;
    let stored = crate::at_rest::stored_data(&db).await;
    assert_eq!(stored.len(), 1);
    let (stored_clear, sealed) = &stored[0];
    assert!(*sealed);
    assert_eq!(serde_json::from_str::<Value>(stored_clear).unwrap(), clear);
    for secret in [
        "Jane Roe",
        "Zebulon",
        "Payer of",
        "DE89370400440532013000",
        "2026-11-27",
    ] {
        assert!(
            !stored_clear.contains(secret),
            "{secret} in clear: {stored_clear}"
        );
    }

    // Put back together exactly for a reader of personal data.
    let r = app.read("payments-7", "").await;
    let text = r.text().await.unwrap();
    assert!(
        text.contains("12345678901234567890.000000000000000001"),
        "{text}"
    );
    assert!(text.contains("0.1000000000000000000001"), "{text}");
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["events"][0]["personal_data"], "decrypted");
    assert_eq!(page["events"][0]["data"], data);

    // Redacted: the clear pieces alone.
    let service = app.env.add_principal("ledger", &["service"]).await;
    let (_, text) = app.get("/streams/payments-7/events", &service).await;
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["events"][0]["personal_data"], "redacted");
    assert_eq!(page["events"][0]["data"], clear, "{text}");

    // Erased for everyone after a forget; the clear pieces stay.
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-7").await;
    let page: Value = app.read("payments-7", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "erased");
    assert_eq!(page["events"][0]["data"], clear);
    db.close().await;
}

async fn requests_without_a_valid_token_are_refused(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let url = format!("{}/streams/s/events", app.base);
    let body = batch(vec![json!({"type": "T", "data": {}})]);
    let valid = format!("bearer {}", app.token());
    let cases = [
        (None, StatusCode::UNAUTHORIZED),
        (Some("Bearer"), StatusCode::UNAUTHORIZED),
        (Some("Bearer evt_unknown"), StatusCode::UNAUTHORIZED),
        (Some("Basic dXNlcjpwYXNz"), StatusCode::UNAUTHORIZED),
        (Some(valid.as_str()), StatusCode::CREATED), // the scheme is case-insensitive
    ];
    for (auth, status) in cases {
        let mut req = app.client.post(&url).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            problem(r, status).await;
        } else {
            assert_eq!(r.status(), status);
        }
    }
    for path in ["/streams/s/events", "/events"] {
        let r = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        problem(r, StatusCode::UNAUTHORIZED).await;
    }
    assert_eq!(app.whole_log().await.len(), 1);
}
