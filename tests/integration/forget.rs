//! Forget (crypto-shredding): personal data erased for every reader on every
//! path while clear fields stay, 410 for later appends, idempotence, the key
//! bytes gone from the keystore's files, restored keystores and interrupted
//! forgets put right at start, and other processes' caches evicted.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::at_rest::{exec, key_ids_of, keystore_db, refuse_key_deletions};
use crate::common::{Backend, PERSONAL_VALUES, ServerProcess, TestApp, TestEnv, batch, deposit};
use crate::{both_backends, postgres_only};
use eventvault::store::Db;

both_backends!(
    a_forget_erases_personal_data_for_everyone_and_keeps_the_clear_fields,
    a_forget_is_idempotent_and_refuses_later_appends,
    only_the_dpo_may_forget_and_refusals_are_audited,
    the_wrapped_key_leaves_the_keystore,
    a_restored_keystore_is_shredded_again_at_start,
    an_interrupted_forget_is_completed_at_start,
    an_export_holds_everything_about_the_subject,
);

// Cache eviction across processes goes through PostgreSQL's
// LISTEN/NOTIFY; several processes on one SQLite file are not a
// supported deployment (see SECURITY.md).
postgres_only!(a_forget_reaches_every_process_within_a_second,);

/// A forget of `subject` with a reason: its status and body.
pub async fn forget(app: &TestApp, token: &str, subject: &str) -> (StatusCode, Value) {
    let (status, text) = app
        .request(Method::POST, &format!("/subjects/{subject}/forget"))
        .token(token)
        .json(&json!({"reason": "ticket 81"}))
        .send()
        .await;
    (status, serde_json::from_str(&text).unwrap())
}

/// A forget of `subject` that must succeed.
pub async fn forget_ok(app: &TestApp, token: &str, subject: &str) -> Value {
    let (status, body) = forget(app, token, subject).await;
    assert_eq!(status, StatusCode::OK, "forget {subject}: {body}");
    body
}

/// One deposit about cust-1 (10.50) and one about cust-2 (20.00), in
/// `accounts-1`.
pub async fn two_deposits(app: &TestApp) {
    app.append_ok(
        "accounts-1",
        &batch(vec![
            deposit(Uuid::new_v4(), "cust-1", "10.50"),
            deposit(Uuid::new_v4(), "cust-2", "20.00"),
        ]),
    )
    .await;
}

/// Deposits about cust-1 in two streams and one about cust-2.
pub async fn seed(app: &TestApp) {
    two_deposits(app).await;
    app.append_ok(
        "payments-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "0.25")]),
    )
    .await;
}

fn events_of<'a>(events: &'a [Value], subject: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["subject"] == subject).collect()
}

async fn a_forget_erases_personal_data_for_everyone_and_keeps_the_clear_fields(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app).await;
    let before = app.whole_log().await;
    let before_time = before[2]["recorded_at"].as_str().unwrap().to_owned();
    let dpo = app.env.add_principal("dpo", &["dpo"]).await;
    let service = app.env.add_principal("ledger", &["service"]).await;

    let (status, body) = forget(&app, &dpo, "cust-1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["subject"], "cust-1");
    assert_eq!(body["keys_destroyed"], 1);
    assert_eq!(body["events_affected"], 2);
    assert!(body["forgotten_at"].as_str().unwrap().ends_with('Z'));

    let after = app.whole_log().await;
    for e in events_of(&after, "cust-1") {
        assert_eq!(e["personal_data"], "erased", "{e}");
        assert!(e["data"].get("payer_name").is_none());
        assert_eq!(e["data"]["currency"], "EUR", "clear fields stay");
    }
    let amounts = |log: &[Value]| -> Vec<String> {
        events_of(log, "cust-1")
            .iter()
            .map(|e| e["data"]["amount"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(amounts(&after), amounts(&before), "totals do not change");
    let other = events_of(&after, "cust-2");
    assert_eq!(other[0]["personal_data"], "decrypted", "others keep theirs");

    // Every path, every caller: stream, backward, as_of, service role.
    for (token, query) in [
        (app.token(), String::new()),
        (app.token(), "direction=backward".to_owned()),
        (app.token(), format!("as_of={before_time}")),
        (service.clone(), String::new()),
    ] {
        let (status, text) = app
            .get(&format!("/streams/payments-1/events?{query}"), &token)
            .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let page: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(page["events"][0]["personal_data"], "erased", "{query}");
        assert!(!text.contains("Payer of cust-1"), "{text}");
    }
    // The ledger stream says what happened, without personal data.
    let (status, text) = app.get("/streams/$subjects/events", &app.token()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let page: Value = serde_json::from_str(&text).unwrap();
    let e = &page["events"][0];
    assert_eq!(e["type"], "SubjectForgotten");
    assert_eq!(e["data"]["subject"], "cust-1");
    assert_eq!(e["personal_data"], "none");
    assert!(
        !text.contains("ticket 81"),
        "the reason stays in the ledger"
    );
    // Who was forgotten is itself personal: `*` does not reach `$subjects`.
    let support = app.env.add_principal("officer", &["support"]).await;
    let (status, _) = app
        .request(Method::GET, "/streams/$subjects/events")
        .token(&support)
        .header("X-Purpose", "curiosity")
        .send()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app.get("/streams/$subjects/events", &dpo).await;
    assert_eq!(status, StatusCode::OK);
    // The subject's state.
    for (subject, state, events) in [
        ("cust-1", "forgotten", 2),
        ("cust-2", "active", 1),
        ("cust-9", "unknown", 0),
    ] {
        let (status, text) = app.get(&format!("/subjects/{subject}"), &dpo).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"subject": subject, "state": state, "events": events})
        );
    }
}

async fn a_forget_is_idempotent_and_refuses_later_appends(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app).await;
    let dpo = app.env.add_principal("dpo", &["dpo"]).await;
    let (_, first) = forget(&app, &dpo, "cust-1").await;
    let (status, second) = forget(&app, &dpo, "cust-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first, second, "the same answer, nothing more destroyed");
    let page: Value = app.read("$subjects", "").await.json().await.unwrap();
    assert_eq!(page["current_version"], 1, "one ledger event");

    let r = app
        .append(
            "accounts-1",
            None,
            &batch(vec![deposit(Uuid::new_v4(), "cust-1", "1.00")]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::GONE);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("urn:eventvault:problem:subject-forgotten"),
        "{text}"
    );
    // The refused append made no key for the forgotten subject, so a
    // forget again destroys nothing more and counts nothing more.
    let ks = keystore_db(&app.env).await;
    assert!(key_ids_of(&ks, "cust-1").await.is_empty());
    ks.close().await;
    let (_, third) = forget(&app, &dpo, "cust-1").await;
    assert_eq!(first, third, "still the first answer");

    // An unknown subject is recorded as forgotten too.
    let (status, body) = forget(&app, &dpo, "cust-never").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            body["keys_destroyed"].clone(),
            body["events_affected"].clone()
        ),
        (json!(0), json!(0))
    );
    let r = app
        .append(
            "accounts-2",
            None,
            &batch(vec![deposit(Uuid::new_v4(), "cust-never", "1.00")]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::GONE);
    // No key was made for it by the refused append.
    let ks = keystore_db(&app.env).await;
    assert!(key_ids_of(&ks, "cust-never").await.is_empty());

    let records = app.audit_records("action=subject.forget").await;
    assert_eq!(records.len(), 4, "{records:?}");
    assert!(
        records
            .iter()
            .all(|r| r["outcome"] == "ok" && r["principal"] == "dpo")
    );
    assert_eq!(records[0]["resource"], "subject:cust-1");
    assert_eq!(records[0]["event_count"], 2);
}

async fn only_the_dpo_may_forget_and_refusals_are_audited(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app).await;
    let service = app.env.add_principal("ledger", &["service"]).await;
    let auditor = app.env.add_principal("inspector", &["auditor"]).await;
    for (method, path) in [
        (Method::POST, "/subjects/cust-1/forget"),
        (Method::GET, "/subjects/cust-1"),
    ] {
        let (status, _) = app.request(method.clone(), path).send().await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        for token in [&service, &auditor] {
            let (status, text) = app.request(method.clone(), path).token(token).send().await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {text}");
        }
    }
    let denied = app
        .audit_records("outcome=denied&resource=subject:cust-1")
        .await;
    assert_eq!(denied.len(), 6, "{denied:?}");
    // Nothing was forgotten.
    let page: Value = app.read("payments-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "decrypted");
    // Bad input: an invalid subject id, an unknown body field.
    let (status, _) = app
        .request(Method::POST, "/subjects/no%20spaces/forget")
        .token(&app.token())
        .send()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, text) = app
        .request(Method::POST, "/subjects/cust-1/forget")
        .token(&app.token())
        .json(&json!({"why": "x"}))
        .send()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let page: Value = app.read("payments-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "decrypted");
}

/// The wrapped key of `subject`, as stored.
async fn wrapped_key(ks: &Db, subject: &str) -> Vec<u8> {
    let q = "select wrapped from deks where subject = $1";
    match ks {
        Db::Sqlite(p) => sqlx::query_scalar(q).bind(subject).fetch_one(p).await,
        Db::Postgres(p) => sqlx::query_scalar(q).bind(subject).fetch_one(p).await,
    }
    .unwrap()
}

async fn the_wrapped_key_leaves_the_keystore(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app).await;
    let ks = keystore_db(&app.env).await;
    let wrapped = wrapped_key(&ks, "cust-1").await;
    ks.close().await;
    let (status, _) = forget(&app, &app.token(), "cust-1").await;
    assert_eq!(status, StatusCode::OK);
    let ks = keystore_db(&app.env).await;
    assert!(key_ids_of(&ks, "cust-1").await.is_empty());
    assert_eq!(key_ids_of(&ks, "cust-2").await.len(), 1);
    match &ks {
        Db::Sqlite(_) => {
            // The hard way: the bytes must be in none of the keystore's files.
            let dir = app.env.dir.path().join("keys");
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes
                        .windows(wrapped.len())
                        .any(|w| w == wrapped.as_slice()),
                    "the wrapped key is still in {}",
                    path.display()
                );
            }
        }
        Db::Postgres(p) => {
            let vacuumed: Option<String> = sqlx::query_scalar(
                "select last_vacuum::text from pg_stat_user_tables where relname = 'deks'",
            )
            .fetch_one(p)
            .await
            .unwrap();
            assert!(
                vacuumed.is_some(),
                "the key table was vacuumed after the delete"
            );
        }
    }
}

/// Copies the keystore aside (`back = false`) or puts the copy back.
pub async fn keystore_copy(env: &TestEnv, back: bool) {
    match &env.backend {
        Backend::Sqlite => {
            let keys = env.dir.path().join("keys");
            let copy = env.dir.path().join("keys-backup");
            let (from, to) = if back { (&copy, &keys) } else { (&keys, &copy) };
            std::fs::create_dir_all(to).unwrap();
            for f in ["keystore.db", "keystore.db-wal", "keystore.db-shm"] {
                let _ = std::fs::remove_file(to.join(f));
                if from.join(f).exists() {
                    std::fs::copy(from.join(f), to.join(f)).unwrap();
                }
            }
        }
        Backend::Postgres(admin) => {
            use sqlx::Connection as _;
            let name = env.keystore_url.rsplit('/').next().unwrap().to_owned();
            let copy = format!("{name}_bak");
            let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
            let sql = if back {
                vec![
                    format!("drop database \"{name}\" with (force)"),
                    format!("create database \"{name}\" template \"{copy}\""),
                    format!("drop database \"{copy}\""),
                ]
            } else {
                vec![format!("create database \"{copy}\" template \"{name}\"")]
            };
            for s in sql {
                sqlx::query(sqlx::AssertSqlSafe(s))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }
}

async fn a_restored_keystore_is_shredded_again_at_start(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app).await;
    let env = app.stop().await;
    keystore_copy(&env, false).await; // last night's backup
    let app = TestApp::start(env).await;
    let (status, _) = forget(&app, &app.token(), "cust-1").await;
    assert_eq!(status, StatusCode::OK);
    let env = app.stop().await;
    keystore_copy(&env, true).await; // restored
    let ks = keystore_db(&env).await;
    assert_eq!(
        key_ids_of(&ks, "cust-1").await.len(),
        1,
        "the backup has the key"
    );
    ks.close().await;

    let app = TestApp::start(env).await;
    let ks = keystore_db(&app.env).await;
    assert!(
        key_ids_of(&ks, "cust-1").await.is_empty(),
        "shredded again at start"
    );
    // The operator is told how many.
    assert!(
        crate::common::log_has_line_with(&[
            "forgotten subjects had data keys again (a restored keystore?); shredded them again",
            "subjects=1",
        ]),
        "the start-up warning says how many subjects were shredded again"
    );
    let page: Value = app.read("payments-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "erased");
    let log = app.whole_log().await;
    assert_eq!(events_of(&log, "cust-2")[0]["personal_data"], "decrypted");
}

async fn an_interrupted_forget_is_completed_at_start(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app).await;
    let ks = keystore_db(&app.env).await;
    // The key deletion fails once.
    refuse_key_deletions(&ks).await;
    let (status, body) = forget(&app, &app.token(), "cust-1").await;
    // The intent is recorded, so the answer says so: being forgotten.
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["state"], "forgetting", "{body}");
    assert!(
        !body.to_string().contains("disk on fire"),
        "no internals: {body}"
    );
    // The subject is being forgotten, appends are refused.
    let (_, text) = app.get("/subjects/cust-1", &app.token()).await;
    assert!(text.contains("\"forgetting\""), "{text}");
    // ... and reads show it erased although its key could not be deleted yet.
    let r = app
        .append(
            "payments-1",
            None,
            &batch(vec![deposit(Uuid::new_v4(), "cust-1", "3.00")]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::GONE);
    let text = app.read("payments-1", "").await.text().await.unwrap();
    assert!(
        text.contains("\"erased\"") && !text.contains("Payer of cust-1"),
        "{text}"
    );
    let (_, text) = export(&app, &app.token(), "cust-1").await;
    assert!(!text.contains("Payer of cust-1"), "{text}");
    let env = app.stop().await;
    match &ks {
        Db::Sqlite(_) => exec(&ks, "drop trigger no_delete").await.unwrap(),
        Db::Postgres(_) => exec(&ks, "drop trigger no_delete on deks").await.unwrap(),
    };
    ks.close().await;

    let app = TestApp::start(env).await;
    let ks = keystore_db(&app.env).await;
    assert!(key_ids_of(&ks, "cust-1").await.is_empty());
    let page: Value = app.read("payments-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "erased");
    let ledger: Value = app.read("$subjects", "").await.json().await.unwrap();
    assert_eq!(ledger["events"][0]["data"]["subject"], "cust-1");
    let resumed = app.audit_records("action=subject.forget.resume").await;
    assert_eq!(resumed.len(), 1);
    // A forget now answers with the first call's time and destroys nothing.
    let (status, body) = forget(&app, &app.token(), "cust-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["keys_destroyed"], 1);
}

async fn a_forget_reaches_every_process_within_a_second(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let one = ServerProcess::start(&env).await.expect("first process");
    let two = ServerProcess::start(&env).await.expect("second process");
    let a = TestApp::client_for(env.clone(), one.base.clone());
    let b = TestApp::client_for(env.clone(), two.base.clone());
    seed(&a).await;
    // Both processes have the key in their caches.
    for app in [&a, &b] {
        let page: Value = app.read("payments-1", "").await.json().await.unwrap();
        assert_eq!(page["events"][0]["personal_data"], "decrypted");
    }
    let (status, _) = forget(&a, &a.token(), "cust-1").await;
    assert_eq!(status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let text = b.read("payments-1", "").await.text().await.unwrap();
        if text.contains("\"erased\"") {
            for v in PERSONAL_VALUES {
                assert!(!text.contains(v), "{v} in {text}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other process still decrypts a second after the forget: {text}"
        );
    }
    assert!(one.terminate().await.success());
    assert!(two.terminate().await.success());
}

async fn export(app: &TestApp, token: &str, subject: &str) -> (StatusCode, String) {
    app.get(&format!("/subjects/{subject}/export"), token).await
}

async fn an_export_holds_everything_about_the_subject(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    seed(&app).await;
    // More than two pages of the export, in two streams, interleaved.
    for (stream, n) in [
        ("accounts-7", 1000),
        ("payments-7", 1),
        ("accounts-7", 1000),
        ("accounts-7", 100),
    ] {
        let events = (0..n)
            .map(|i| deposit(Uuid::new_v4(), "cust-7", &format!("{i}.00")))
            .collect();
        app.append_ok(stream, &batch(events)).await;
    }
    let dpo = app.env.add_principal("dpo", &["dpo"]).await;
    let (status, text) = export(&app, &dpo, "cust-7").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).expect("one complete JSON document");
    assert_eq!(v["subject"], "cust-7");
    assert_eq!(v["state"], "active");
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 2101);
    let positions: Vec<u64> = events
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "position order");
    assert!(events.iter().all(|e| e["subject"] == "cust-7"
        && e["personal_data"] == "decrypted"
        && e["data"]["payer_name"] == "Payer of cust-7"));
    assert_eq!(events[1000]["stream_id"], "payments-7");
    let records = app.audit_records("action=subject.export").await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["personal_data"], true);
    assert_eq!(records[0]["event_count"], 2101);
    assert_eq!(records[0]["resource"], "subject:cust-7");

    // Without `export`: refused. An unknown subject: nothing.
    let service = app.env.add_principal("ledger", &["service"]).await;
    let (status, _) = export(&app, &service, "cust-7").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, text) = export(&app, &dpo, "cust-none").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v,
        json!({"subject": "cust-none", "state": "unknown", "events": [], "snapshots": []})
    );

    // After a forget the events are still listed, erased.
    let (status, _) = forget(&app, &dpo, "cust-7").await;
    assert_eq!(status, StatusCode::OK);
    let (_, text) = export(&app, &dpo, "cust-7").await;
    assert!(!text.contains("Payer of cust-7"));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["state"], "forgotten");
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 2101);
    assert!(
        events
            .iter()
            .all(|e| e["personal_data"] == "erased" && e["data"]["currency"] == "EUR")
    );
    let records = app.audit_records("action=subject.export&outcome=ok").await;
    assert_eq!(records.last().unwrap()["personal_data"], false);
}
