//! Snapshots (save, load, refusals, a subject's snapshot sealed and erased
//! by a forget) and reads of a stream as it was at a version.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::access::{audit_records, call, get};
use crate::at_rest::events_db;
use crate::both_backends;
use crate::common::{Backend, TestApp, batch, deposit};
use eventvault::store::Db;

both_backends!(
    a_snapshot_is_saved_and_loaded,
    snapshots_for_versions_the_stream_lacks_are_refused,
    a_subjects_snapshot_is_sealed_redacted_and_erased_by_a_forget,
    a_stream_reads_as_it_was_at_a_version,
);

async fn put(app: &TestApp, stream: &str, token: &str, body: &Value) -> (StatusCode, Value) {
    let (status, text) = call(
        app,
        Method::PUT,
        &format!("/streams/{stream}/snapshot"),
        Some(token),
        &[],
        Some(body),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn load(app: &TestApp, stream: &str, token: &str) -> (StatusCode, Value) {
    let (status, text) = get(app, &format!("/streams/{stream}/snapshot"), token).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn seed(app: &TestApp, stream: &str, subject: &str, n: usize) {
    app.append_ok(
        stream,
        &batch(
            (0..n)
                .map(|i| deposit(Uuid::new_v4(), subject, &format!("{i}.10")))
                .collect(),
        ),
    )
    .await;
}

/// `n` events without a subject (nothing personal).
async fn seed_clear(app: &TestApp, stream: &str, n: usize) {
    app.append_ok(
        stream,
        &batch(
            (0..n)
                .map(|i| json!({"type": "RateChanged", "data": {"rate": format!("0.0{i}")}}))
                .collect(),
        ),
    )
    .await;
}

async fn a_snapshot_is_saved_and_loaded(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let token = app.token();
    seed_clear(&app, "accounts-1", 3).await;
    let (status, _) = load(&app, "accounts-1", &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Numbers keep every digit: send the text as it is.
    let body: Value = serde_json::from_str(
        r#"{"version": 3, "state": {"balance": 12345678901234567890.000000000000000001, "n": 3}}"#,
    )
    .unwrap();
    let (status, saved) = put(&app, "accounts-1", &token, &body).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    assert_eq!(saved["version"], 3);
    let (status, text) = get(&app, "/streams/accounts-1/snapshot", &token).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        text.contains("12345678901234567890.000000000000000001"),
        "{text}"
    );
    let snap: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(snap["version"], 3);
    assert_eq!(snap["personal_data"], "none");
    assert_eq!(snap["subject"], Value::Null);
    assert_eq!(snap["stream_id"], "accounts-1");
    // A newer one replaces it; an older one is refused and changes nothing.
    let (status, _) = put(
        &app,
        "accounts-1",
        &token,
        &json!({"version": 2, "state": {"n": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (_, snap) = load(&app, "accounts-1", &token).await;
    assert_eq!(snap["state"]["n"], 3);
    seed_clear(&app, "accounts-1", 1).await;
    let (status, _) = put(
        &app,
        "accounts-1",
        &token,
        &json!({"version": 4, "state": {"n": 4}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, snap) = load(&app, "accounts-1", &token).await;
    assert_eq!(
        (snap["version"].as_u64(), &snap["state"]["n"]),
        (Some(4), &json!(4))
    );
    // Both calls were audited.
    let saves = audit_records(&app, "action=snapshot.save").await;
    assert_eq!(saves.len(), 3);
    assert_eq!(saves[1]["outcome"], "error");
    let reads = audit_records(&app, "action=snapshot.read").await;
    assert_eq!(reads.len(), 4);
    assert!(reads.iter().all(|r| r["resource"] == "stream:accounts-1"));
}

async fn snapshots_for_versions_the_stream_lacks_are_refused(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let token = app.token();
    seed(&app, "accounts-1", "cust-1", 2).await;
    for (stream, body) in [
        ("accounts-1", json!({"version": 3, "state": {}})),
        ("accounts-1", json!({"version": 0, "state": {}})),
        ("accounts-none", json!({"version": 1, "state": {}})),
        ("accounts-1", json!({"version": 1})),
        ("accounts-1", json!({"version": 1, "state": {}, "extra": 1})),
        ("accounts-1", json!({"version": -1, "state": {}})),
        (
            "accounts-1",
            json!({"version": 1, "subject": "bad subject", "state": {}}),
        ),
    ] {
        let (status, problem) = put(&app, stream, &token, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
        assert_eq!(problem["type"], "urn:eventvault:problem:bad-request");
    }
    let (status, problem) = put(
        &app,
        "accounts-1",
        &token,
        &json!({"version": 3, "state": {}}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        problem["detail"].as_str().unwrap().contains("version is 2"),
        "{problem}"
    );
    let (status, _) = load(&app, "accounts-1", &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was saved");
    // The stream's events are about cust-1: its snapshot must be sealed
    // under cust-1's key, or a forget of cust-1 would not reach it.
    for body in [
        json!({"version": 2, "state": {"holder": "Jane Roe"}}),
        json!({"version": 2, "subject": "cust-2", "state": {"holder": "Jane Roe"}}),
    ] {
        let (status, problem) = put(&app, "accounts-1", &token, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("must name one of them"),
            "{problem}"
        );
    }
    let (status, _) = put(
        &app,
        "accounts-1",
        &token,
        &json!({"version": 2, "subject": "cust-1", "state": {"holder": "Jane Roe"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // `$…` streams are written by eventvault alone.
    let (status, _) = put(
        &app,
        "$subjects",
        &token,
        &json!({"version": 1, "state": {}}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn a_subjects_snapshot_is_sealed_redacted_and_erased_by_a_forget(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let token = app.token();
    seed(&app, "accounts-5", "cust-5", 2).await;
    let body = json!({"version": 2, "subject": "cust-5",
                      "state": {"holder": "Zebulon Quackenbush", "balance": "20.20"}});
    let (status, saved) = put(&app, "accounts-5", &token, &body).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    // At rest: sealed, no plaintext.
    let db = events_db(&app.env).await;
    let (state, sealed): (Option<String>, Option<Vec<u8>>) = match &db {
        Db::Sqlite(p) => sqlx::query_as("select state, sealed from snapshots")
            .fetch_one(p)
            .await
            .unwrap(),
        Db::Postgres(p) => sqlx::query_as("select state, sealed from snapshots")
            .fetch_one(p)
            .await
            .unwrap(),
    };
    assert_eq!(state, None);
    let sealed = sealed.expect("sealed");
    assert!(
        !String::from_utf8_lossy(&sealed).contains("Zebulon"),
        "the state is encrypted"
    );
    // Decrypted for a reader of personal data, redacted for the service.
    let (_, snap) = load(&app, "accounts-5", &token).await;
    assert_eq!(snap["personal_data"], "decrypted");
    assert_eq!(snap["state"]["holder"], "Zebulon Quackenbush");
    assert_eq!(snap["subject"], "cust-5");
    let service = app.env.add_principal("ledger", &["service"]).await;
    let (status, text) = get(&app, "/streams/accounts-5/snapshot", &service).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!text.contains("Zebulon"), "{text}");
    let snap: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (snap["personal_data"].as_str(), &snap["state"]),
        (Some("redacted"), &Value::Null)
    );
    let records = audit_records(&app, "action=snapshot.read").await;
    let flags: Vec<bool> = records
        .iter()
        .map(|r| r["personal_data"].as_bool().unwrap())
        .collect();
    assert_eq!(flags, [true, false]);
    // A forget erases it for everyone, and refuses new ones.
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-5").await;
    let (status, text) = get(&app, "/streams/accounts-5/snapshot", &token).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!text.contains("Zebulon"), "{text}");
    let snap: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (snap["personal_data"].as_str(), &snap["state"]),
        (Some("erased"), &Value::Null)
    );
    let (status, problem) = put(&app, "accounts-5", &token, &body).await;
    assert_eq!(status, StatusCode::GONE, "{problem}");
    assert_eq!(problem["type"], "urn:eventvault:problem:subject-forgotten");
    // A snapshot moved to another stream does not open there.
    seed(&app, "accounts-6", "cust-6", 2).await;
    let (status, _) = put(
        &app,
        "accounts-6",
        &token,
        &json!({"version": 2, "subject": "cust-6", "state": {"holder": "Alice Secret"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    seed(&app, "accounts-7", "cust-6", 2).await;
    crate::at_rest::exec(
        &db,
        "insert into snapshots (stream_id, version, subject, key_id, state, sealed, recorded_at)
         select 'accounts-7', version, subject, key_id, state, sealed, recorded_at
         from snapshots where stream_id = 'accounts-6'",
    )
    .await
    .unwrap();
    let (status, text) = get(&app, "/streams/accounts-7/snapshot", &token).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
    assert!(text.contains("integrity-failure"), "{text}");
    assert!(!text.contains("Alice"), "{text}");
}

async fn a_stream_reads_as_it_was_at_a_version(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app, "accounts-1", "cust-1", 5).await;
    let token = app.token();
    let page = |q: &'static str| {
        let app = &app;
        let token = &token;
        async move {
            let (status, text) = get(app, &format!("/streams/accounts-1/events?{q}"), token).await;
            (status, serde_json::from_str::<Value>(&text).unwrap())
        }
    };
    let (status, p) = page("to_version=3").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(p["current_version"], 3);
    let versions: Vec<u64> = p["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    let (_, p) = page("to_version=3&direction=backward&limit=2").await;
    let versions: Vec<u64> = p["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [3, 2]);
    assert_eq!(p["next"], 1);
    let (_, p) = page("to_version=3&from=2&limit=1").await;
    assert_eq!(p["next"], 3);
    let (_, p) = page("to_version=3&from=3&limit=1").await;
    assert_eq!(p["next"], Value::Null, "version 3 is the end");
    let (_, p) = page("to_version=5").await;
    assert_eq!(p["events"].as_array().unwrap().len(), 5);
    for q in ["to_version=0", "to_version=6", "to_version=x"] {
        let (status, _) = page(q).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}");
    }
    // With `as_of` before the stream existed there is nothing to show.
    let (status, _) = page("to_version=1&as_of=2000-01-01T00:00:00Z").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
