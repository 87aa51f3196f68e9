//! Snapshots (save, load, refusals, a subject's snapshot sealed and erased
//! by a forget) and reads of a stream as it was at a version.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::at_rest::events_db;
use crate::both_backends;
use crate::common::{Backend, TestApp, batch, deposit};
use eventvault::store::Db;

both_backends!(
    a_snapshot_is_saved_and_loaded,
    snapshots_for_versions_the_stream_lacks_are_refused,
    a_subjects_snapshot_is_sealed_redacted_and_erased_by_a_forget,
    a_snapshot_of_several_subjects_is_erased_by_the_forget_of_any,
    a_subjects_export_holds_the_snapshots_sealed_for_them,
    snapshots_saved_before_layers_are_kept_or_removed,
    a_stream_reads_as_it_was_at_a_version,
);

async fn put(app: &TestApp, stream: &str, token: &str, body: &Value) -> (StatusCode, Value) {
    let (status, text) = app
        .request(Method::PUT, &format!("/streams/{stream}/snapshot"))
        .token(token)
        .json(body)
        .send()
        .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn load(app: &TestApp, stream: &str, token: &str) -> (StatusCode, Value) {
    let (status, text) = app.get(&format!("/streams/{stream}/snapshot"), token).await;
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
    let (status, text) = app.get("/streams/accounts-1/snapshot", &token).await;
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
    let saves = app.audit_records("action=snapshot.save").await;
    assert_eq!(saves.len(), 3);
    assert_eq!(saves[1]["outcome"], "error");
    let reads = app.audit_records("action=snapshot.read").await;
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
    // The stream's events are about cust-1: a snapshot that names a subject
    // must name that one (either way it is sealed for cust-1).
    let body = json!({"version": 2, "subject": "cust-2", "state": {"holder": "Jane Roe"}});
    let (status, problem) = put(&app, "accounts-1", &token, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("names a subject the stream's events up to its version are not about"),
        "{problem}"
    );
    let (status, _) = load(&app, "accounts-1", &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was saved");
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
    let (status, text) = app.get("/streams/accounts-5/snapshot", &service).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!text.contains("Zebulon"), "{text}");
    let snap: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (snap["personal_data"].as_str(), &snap["state"]),
        (Some("redacted"), &Value::Null)
    );
    let records = app.audit_records("action=snapshot.read").await;
    let flags: Vec<bool> = records
        .iter()
        .map(|r| r["personal_data"].as_bool().unwrap())
        .collect();
    assert_eq!(flags, [true, false]);
    // A forget erases it for everyone, and refuses new ones.
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-5").await;
    let (status, text) = app.get("/streams/accounts-5/snapshot", &token).await;
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
        "insert into snapshots (stream_id, version, subject, key_id, state, sealed, wrapped_key, recorded_at)
         select 'accounts-7', version, subject, key_id, state, sealed, wrapped_key, recorded_at
         from snapshots where stream_id = 'accounts-6'",
    )
    .await
    .unwrap();
    crate::at_rest::exec(
        &db,
        "insert into snapshot_keys (stream_id, layer, subject, key_id)
         select 'accounts-7', layer, subject, key_id from snapshot_keys where stream_id = 'accounts-6'",
    )
    .await
    .unwrap();
    let (status, text) = app.get("/streams/accounts-7/snapshot", &token).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
    assert!(text.contains("integrity-failure"), "{text}");
    assert!(!text.contains("Alice"), "{text}");
}

/// The layers a stored snapshot is sealed under: `(subject, key_id)` in
/// layer order.
async fn layers(db: &Db, stream: &str) -> Vec<(String, String)> {
    let q = "select subject, key_id from snapshot_keys where stream_id = $1 order by layer";
    match db {
        Db::Sqlite(p) => sqlx::query_as(q).bind(stream).fetch_all(p).await,
        Db::Postgres(p) => sqlx::query_as(q).bind(stream).fetch_all(p).await,
    }
    .unwrap()
}

/// A joint account: the stream's events are about two subjects. Its
/// snapshot is sealed for both, whichever (or whether one) it names: the
/// forget of either erases it, and with that subject's key destroyed the
/// other's key alone does not open it, even where the ledger is not looked
/// at (an event store restored from before the forget). A snapshot at a
/// version before the second subject's first event is sealed for the first
/// alone.
async fn a_snapshot_of_several_subjects_is_erased_by_the_forget_of_any(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let token = app.token();
    seed(&app, "accounts-J", "cust-A", 2).await;
    seed(&app, "accounts-J", "cust-B", 1).await;
    seed(&app, "accounts-E", "cust-A", 1).await;
    seed(&app, "accounts-E", "cust-B", 1).await;
    let joint = json!({"holders": ["Zebulon Quackenbush", "Alice Secret"], "balance": "0.30"});
    for (stream, version) in [("accounts-J", 3), ("accounts-E", 1)] {
        let body = json!({"version": version, "subject": "cust-A", "state": joint});
        let (status, saved) = put(&app, stream, &token, &body).await;
        assert_eq!(status, StatusCode::OK, "{saved}");
        assert_eq!(saved["subject"], "cust-A");
    }
    for stream in ["accounts-J", "accounts-E"] {
        let (_, snap) = load(&app, stream, &token).await;
        assert_eq!(snap["personal_data"], "decrypted", "{snap}");
        assert_eq!(snap["state"], joint);
        assert_eq!(snap["subject"], "cust-A");
    }
    let service = app.env.add_principal("ledger", &["service"]).await;
    let (_, text) = app.get("/streams/accounts-J/snapshot", &service).await;
    assert!(!text.contains("Zebulon"), "{text}");
    let snap: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(snap["personal_data"], "redacted");

    // The forget of cust-B, whom the snapshot does not name.
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-B").await;
    let (status, text) = app.get("/streams/accounts-J/snapshot", &token).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !text.contains("Zebulon") && !text.contains("Alice"),
        "{text}"
    );
    let snap: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (snap["personal_data"].as_str(), &snap["state"]),
        (Some("erased"), &Value::Null)
    );
    let (_, snap) = load(&app, "accounts-E", &token).await;
    assert_eq!(snap["personal_data"], "decrypted", "not sealed for cust-B");
    // Nor can a new one be saved: it would be erased at once.
    let (status, problem) = put(
        &app,
        "accounts-J",
        &token,
        &json!({"version": 3, "state": {}}),
    )
    .await;
    assert_eq!(status, StatusCode::GONE, "{problem}");
    assert_eq!(problem["type"], "urn:eventvault:problem:subject-forgotten");

    // Sealed for both, one layer each, in subject order; no plaintext at rest.
    let db = events_db(&app.env).await;
    let keystore = crate::at_rest::keystore_db(&app.env).await;
    let key_a = crate::at_rest::key_ids_of(&keystore, "cust-A").await;
    assert_eq!(key_a.len(), 1);
    let layers_j = layers(&db, "accounts-J").await;
    let subjects: Vec<&str> = layers_j.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(subjects, ["cust-A", "cust-B"]);
    assert_eq!(layers_j[0].1, key_a[0]);
    assert!(
        !crate::relay::key_exists(&keystore, &layers_j[1].1).await,
        "cust-B's key is destroyed"
    );
    assert_eq!(
        layers(&db, "accounts-E").await,
        [("cust-A".to_owned(), key_a[0].clone())],
        "up to version 1 the stream is about cust-A alone"
    );
    let rows: Vec<(Option<String>, Vec<u8>, Vec<u8>)> = match &db {
        Db::Sqlite(p) => sqlx::query_as("select state, sealed, wrapped_key from snapshots")
            .fetch_all(p)
            .await
            .unwrap(),
        Db::Postgres(p) => sqlx::query_as("select state, sealed, wrapped_key from snapshots")
            .fetch_all(p)
            .await
            .unwrap(),
    };
    assert_eq!(rows.len(), 2);
    for (state, sealed, wrapped) in &rows {
        assert_eq!(state, &None);
        for secret in ["Zebulon", "Alice Secret"] {
            assert!(!String::from_utf8_lossy(sealed).contains(secret));
            assert!(!String::from_utf8_lossy(wrapped).contains(secret));
        }
    }

    // Crypto-shredding, not only the ledger: with the ledger entry gone (an
    // event store restored from before the forget), cust-A's key, which
    // exists, does not open what cust-B's key sealed too.
    // (The ledger refuses deletes: the restore is played by the owner
    // taking that protection away first.)
    let unprotect = match backend {
        Backend::Sqlite => "drop trigger forgotten_subjects_no_delete",
        Backend::Postgres(_) => "drop trigger forgotten_subjects_append_only on forgotten_subjects",
    };
    crate::at_rest::exec(&db, unprotect).await.unwrap();
    crate::at_rest::exec(
        &db,
        "delete from forgotten_subjects where subject = 'cust-B'",
    )
    .await
    .unwrap();
    let (status, text) = app.get("/streams/accounts-J/snapshot", &token).await;
    assert!(
        !text.contains("Zebulon") && !text.contains("Alice"),
        "{text}"
    );
    let snap: Value = serde_json::from_str(&text).unwrap();
    assert_ne!(snap["personal_data"], "decrypted", "{status} {text}");

    // A joint stream's snapshot that names nobody is sealed for all its
    // subjects all the same.
    seed(&app, "accounts-K", "cust-A", 1).await;
    seed(&app, "accounts-K", "cust-C", 1).await;
    let (status, saved) = put(
        &app,
        "accounts-K",
        &token,
        &json!({"version": 2, "state": joint}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    assert_eq!(saved["subject"], Value::Null);
    let subjects: Vec<String> = layers(&db, "accounts-K")
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(subjects, ["cust-A", "cust-C"]);
    let (_, snap) = load(&app, "accounts-K", &token).await;
    assert_eq!(
        (snap["personal_data"].as_str(), &snap["subject"]),
        (Some("decrypted"), &Value::Null)
    );
    crate::forget::forget_ok(&app, &dpo, "cust-C").await;
    let (_, snap) = load(&app, "accounts-K", &token).await;
    assert_eq!(snap["personal_data"], "erased");
    db.close().await;
    keystore.close().await;
}

async fn export(app: &TestApp, token: &str, subject: &str) -> Value {
    let (status, text) = app.get(&format!("/subjects/{subject}/export"), token).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// A subject's export (GDPR Art. 15 and 20) holds, after its events, the
/// snapshots sealed for it: decrypted, or erased once any of their subjects
/// is forgotten. The disclosure is audited as one.
async fn a_subjects_export_holds_the_snapshots_sealed_for_them(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let token = app.token();
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    seed(&app, "accounts-J", "cust-A", 1).await;
    seed(&app, "accounts-J", "cust-B", 1).await;
    seed(&app, "accounts-K", "cust-A", 1).await;
    seed_clear(&app, "accounts-L", 1).await;
    let state = json!({"holders": ["Zebulon Quackenbush"]});
    for (stream, version) in [("accounts-J", 2), ("accounts-K", 1), ("accounts-L", 1)] {
        let body = json!({"version": version, "state": state});
        let (status, saved) = put(&app, stream, &token, &body).await;
        assert_eq!(status, StatusCode::OK, "{saved}");
    }
    let a = export(&app, &dpo, "cust-A").await;
    assert_eq!(a["events"].as_array().unwrap().len(), 2);
    let snaps = a["snapshots"].as_array().unwrap();
    let streams: Vec<&str> = snaps
        .iter()
        .map(|s| s["stream_id"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["accounts-J", "accounts-K"], "{a}");
    assert!(
        snaps
            .iter()
            .all(|s| s["personal_data"] == "decrypted" && s["state"] == state)
    );
    let b = export(&app, &dpo, "cust-B").await;
    let streams: Vec<&str> = b["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream_id"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["accounts-J"]);
    let none = export(&app, &dpo, "cust-Z").await;
    assert_eq!(none["snapshots"], json!([]));
    assert_eq!(none["events"], json!([]));
    let records = app.audit_records("action=subject.export").await;
    let flags: Vec<bool> = records
        .iter()
        .map(|r| r["personal_data"].as_bool().unwrap())
        .collect();
    assert_eq!(flags, [true, true, false]);

    crate::forget::forget_ok(&app, &dpo, "cust-B").await;
    let a = export(&app, &dpo, "cust-A").await;
    let snaps = a["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(
        (snaps[0]["personal_data"].as_str(), &snaps[0]["state"]),
        (Some("erased"), &Value::Null),
        "sealed for cust-B too"
    );
    assert_eq!(snaps[1]["personal_data"], "decrypted");
    let b = export(&app, &dpo, "cust-B").await;
    assert_eq!(b["state"], "forgotten");
    assert_eq!(b["snapshots"][0]["personal_data"], "erased");
    assert!(!serde_json::to_string(&b).unwrap().contains("Zebulon"));
    // The export is for `export` alone.
    let service = app.env.add_principal("ledger", &["service"]).await;
    let (status, _) = app.get("/subjects/cust-A/export", &service).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// An event store made by the previous release (migrations 1 to 4), with
/// snapshots sealed under the one subject they named: the migration keeps
/// those whose stream is about that subject alone up to their version
/// (they read, and a forget erases them), removes those whose stream holds
/// events of another subject by then (their forget would not reach them),
/// and keeps those in clear.
async fn snapshots_saved_before_layers_are_kept_or_removed(backend: Backend) {
    use eventvault::crypto::SnapshotAad;
    use eventvault::store::Purpose;

    let env = crate::common::TestEnv::new(&backend).await;
    // The previous release's schema: the migrations before this one.
    let dir = tempfile::tempdir().unwrap();
    let sub = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres(_) => "postgres",
    };
    let source =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("migrations/{sub}/events"));
    for f in std::fs::read_dir(&source).unwrap() {
        let f = f.unwrap();
        let name = f.file_name().into_string().unwrap();
        if name.as_str() < "0005" {
            std::fs::copy(f.path(), dir.path().join(&name)).unwrap();
        }
    }
    let old = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    let url = &env.database_url;
    let db = match backend {
        Backend::Sqlite => {
            std::fs::create_dir_all(env.dir.path().join("data")).unwrap();
            let opts = url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .create_if_missing(true);
            Db::Sqlite(sqlx::SqlitePool::connect_with(opts).await.unwrap())
        }
        Backend::Postgres(_) => Db::Postgres(sqlx::PgPool::connect(url).await.unwrap()),
    };
    match &db {
        Db::Sqlite(p) => old.run(p).await.unwrap(),
        Db::Postgres(p) => old.run(p).await.unwrap(),
    }
    // Data keys as the previous release made them.
    let (kek, _) = eventvault::keys::load_master_key(None, &env.master_key_file()).unwrap();
    let keystore = eventvault::keys::KeyManager::open(
        eventvault::store::keystore::Keystore::new(
            Db::connect(&env.keystore_url, Purpose::Keystore, 2)
                .await
                .unwrap(),
        ),
        eventvault::keys::MasterKey::new(
            kek,
            eventvault::keys::uri::MasterKeyUri::File(env.master_key_file()),
        ),
        16,
        eventvault::keys::DEFAULT_MAX_ENCRYPTIONS,
        eventvault::metrics::Metrics::new(),
    )
    .await
    .unwrap();
    let key = keystore.key_for_subject("cust-1", 3).await.unwrap();
    // Streams, events (clear fields only) and snapshots, as stored then.
    let events: [(&str, i64, &str); 8] = [
        ("accounts-4", 1, "cust-1"),
        ("accounts-1", 1, "cust-1"),
        ("accounts-1", 2, "cust-1"),
        ("accounts-2", 1, "cust-1"),
        ("accounts-2", 2, "cust-2"),
        ("accounts-3", 1, "cust-1"),
        ("accounts-3", 2, "cust-2"),
        ("ledger", 1, ""),
    ];
    for (i, (stream, version, subject)) in events.iter().enumerate() {
        let subject = (!subject.is_empty()).then_some(*subject);
        let (streams, insert) = (
            "insert into streams (stream_id, version, created_at, updated_at) values ($1, $2, 1, 1)
             on conflict (stream_id) do update set version = excluded.version",
            match backend {
                Backend::Sqlite => "insert into events (position, stream_id, version, event_id, event_type, subject, data, metadata, recorded_at, append_index, append_size)
                     values ($1, $2, $3, $4, 'MoneyDeposited', $5, '{\"amount\":\"1\"}', '{}', $1, 0, 1)",
                Backend::Postgres(_) => "insert into events (position, stream_id, version, event_id, event_type, subject, data, metadata, recorded_at, append_index, append_size)
                     values ($1, $2, $3, $4::uuid, 'MoneyDeposited', $5, '{\"amount\":\"1\"}', '{}', $1, 0, 1)",
            },
        );
        let id = Uuid::new_v4().to_string();
        let position = i as i64 + 1;
        match &db {
            Db::Sqlite(p) => {
                sqlx::query(streams)
                    .bind(stream)
                    .bind(version)
                    .execute(p)
                    .await
                    .unwrap();
                sqlx::query(insert)
                    .bind(position)
                    .bind(stream)
                    .bind(version)
                    .bind(&id)
                    .bind(subject)
                    .execute(p)
                    .await
                    .unwrap();
            }
            Db::Postgres(p) => {
                sqlx::query(streams)
                    .bind(stream)
                    .bind(version)
                    .execute(p)
                    .await
                    .unwrap();
                sqlx::query(insert)
                    .bind(position)
                    .bind(stream)
                    .bind(version)
                    .bind(&id)
                    .bind(subject)
                    .execute(p)
                    .await
                    .unwrap();
            }
        }
    }
    let legacy = [
        ("accounts-1", 2, "Zebulon Quackenbush"),
        ("accounts-2", 2, "Alice Secret"),
        ("accounts-3", 1, "Other Name"),
    ];
    for (stream, version, holder) in legacy {
        let state = serde_json::to_vec(&json!({"holder": holder})).unwrap();
        let at = SnapshotAad {
            stream_id: stream,
            version: version as u64,
            key_id: &key.key_id,
        };
        let sealed = key.dek.seal_snapshot(&state, &at).unwrap();
        let q = "insert into snapshots (stream_id, version, subject, key_id, state, sealed, recorded_at)
                 values ($1, $2, 'cust-1', $3, null, $4, 1)";
        match &db {
            Db::Sqlite(p) => sqlx::query(q)
                .bind(stream)
                .bind(version as i64)
                .bind(&*key.key_id)
                .bind(&sealed)
                .execute(p)
                .await
                .map(|r| r.rows_affected()),
            Db::Postgres(p) => sqlx::query(q)
                .bind(stream)
                .bind(version as i64)
                .bind(&*key.key_id)
                .bind(&sealed)
                .execute(p)
                .await
                .map(|r| r.rows_affected()),
        }
        .unwrap();
    }
    crate::at_rest::exec(
        &db,
        "insert into snapshots (stream_id, version, state, recorded_at) values ('ledger', 1, '{\"rate\":\"0.01\"}', 1)",
    )
    .await
    .unwrap();
    // Saved in clear although its stream is about cust-1 (the previous
    // release allowed a snapshot without a subject anywhere).
    crate::at_rest::exec(
        &db,
        "insert into snapshots (stream_id, version, state, recorded_at) values ('accounts-4', 1, '{\"holder\":\"Jane Roe\"}', 1)",
    )
    .await
    .unwrap();
    db.close().await;
    drop(keystore);

    // This release migrates it at start.
    let app = TestApp::start(env.clone()).await;
    let token = app.token();
    let (_, snap) = load(&app, "accounts-1", &token).await;
    assert_eq!(
        (snap["personal_data"].as_str(), &snap["state"]["holder"]),
        (Some("decrypted"), &json!("Zebulon Quackenbush"))
    );
    let (status, _) = load(&app, "accounts-2", &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "about cust-2 too: removed");
    let (status, _) = load(&app, "accounts-4", &token).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "in clear, of a stream about cust-1: removed"
    );
    let (_, snap) = load(&app, "accounts-3", &token).await;
    assert_eq!(
        snap["state"]["holder"], "Other Name",
        "cust-2 came after it"
    );
    let (_, snap) = load(&app, "ledger", &token).await;
    assert_eq!(
        (snap["personal_data"].as_str(), &snap["state"]["rate"]),
        (Some("none"), &json!("0.01"))
    );
    // A newer snapshot of accounts-3 is sealed for both subjects.
    let (status, _) = put(
        &app,
        "accounts-3",
        &token,
        &json!({"version": 2, "state": {"holder": "Other Name"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let db = events_db(&app.env).await;
    let subjects: Vec<String> = layers(&db, "accounts-3")
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(subjects, ["cust-1", "cust-2"]);
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    let exported = export(&app, &dpo, "cust-1").await;
    let streams: Vec<&str> = exported["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream_id"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["accounts-1", "accounts-3"]);
    crate::forget::forget_ok(&app, &dpo, "cust-2").await;
    let (_, snap) = load(&app, "accounts-3", &token).await;
    assert_eq!(snap["personal_data"], "erased");
    let (_, snap) = load(&app, "accounts-1", &token).await;
    assert_eq!(snap["personal_data"], "decrypted");
    crate::forget::forget_ok(&app, &dpo, "cust-1").await;
    let (_, snap) = load(&app, "accounts-1", &token).await;
    assert_eq!(
        (snap["personal_data"].as_str(), &snap["state"]),
        (Some("erased"), &Value::Null)
    );
    db.close().await;
}

async fn a_stream_reads_as_it_was_at_a_version(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app, "accounts-1", "cust-1", 5).await;
    let token = app.token();
    let page = |q: &'static str| {
        let app = &app;
        let token = &token;
        async move {
            let (status, text) = app
                .get(&format!("/streams/accounts-1/events?{q}"), token)
                .await;
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
