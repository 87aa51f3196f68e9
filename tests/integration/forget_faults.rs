//! A forget meets faults: the keystore does not answer (202 `forgetting`,
//! erased for every reader at once, finished in the background when it
//! answers again, without a restart), the event store refuses the ledger
//! entry (503), a step after the keys' deletion fails (the count of
//! destroyed keys survives the retry), and its body is read like every
//! other body (limits, deadline, problem+json, permission first).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::at_rest::{events_db, key_ids_of, keystore_db};
use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv, batch, deposit, log_has_line_with};
use crate::forget::{forget, forget_ok, two_deposits};
use crate::limits::{connect, metric, one_response, problem, trickle};
use eventvault::store::Db;

both_backends!(
    a_forget_while_the_keystore_is_down_is_accepted_and_finished_when_it_answers,
    a_forget_that_cannot_be_recorded_is_answered_503_and_takes_no_effect,
    keys_destroyed_by_an_attempt_whose_later_step_failed_are_still_counted,
    the_forget_body_is_read_like_every_other_body_and_only_after_the_permission,
);

/// How long a test waits for the service to finish a forget by itself once
/// the keystore answers again: far beyond its longest retry wait (5 s).
const PATIENCE: Duration = Duration::from_secs(60);

/// A store made to refuse, for real, and put right by [`Outage::end`].
/// SQLite: another connection holds the file's write lock (`BEGIN
/// IMMEDIATE`), so every write waits out the busy timeout and fails; reads
/// go on (WAL). PostgreSQL: the database refuses connections (`ALLOW_CONNECTIONS
/// false`, and its sessions are ended), or refuses writes
/// (`default_transaction_read_only`, as a standby would).
pub enum Outage {
    Sqlite(sqlx::SqliteConnection),
    Postgres {
        admin: String,
        db: String,
        undo: &'static str,
    },
}

impl Outage {
    /// The keystore stops answering.
    pub async fn keystore(env: &TestEnv) -> Outage {
        Self::take(env, &env.keystore_url, "allow_connections false").await
    }

    /// The event store refuses writes (reads still work).
    pub async fn event_store_writes(env: &TestEnv) -> Outage {
        Self::take(env, &env.database_url, "default_transaction_read_only").await
    }

    async fn take(env: &TestEnv, url: &str, how: &'static str) -> Outage {
        match &env.backend {
            Backend::Sqlite => {
                use std::str::FromStr as _;
                let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .unwrap()
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
                let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
                sqlx::raw_sql("begin immediate")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Outage::Sqlite(conn)
            }
            Backend::Postgres(admin) => {
                let db = url.rsplit('/').next().unwrap().to_owned();
                let (set, undo) = match how {
                    "allow_connections false" => (
                        format!("alter database \"{db}\" allow_connections false"),
                        "allow_connections true",
                    ),
                    _ => (
                        format!("alter database \"{db}\" set default_transaction_read_only = on"),
                        "reset default_transaction_read_only",
                    ),
                };
                let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(set))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                // The service's open connections end too: it must connect
                // again, and is refused (or gets a read-only session).
                sqlx::query(
                    "select pg_terminate_backend(pid) from pg_stat_activity
                     where datname = $1 and pid <> pg_backend_pid()",
                )
                .bind(&db)
                .execute(&mut conn)
                .await
                .unwrap();
                conn.close().await.unwrap();
                Outage::Postgres {
                    admin: admin.clone(),
                    db,
                    undo,
                }
            }
        }
    }

    pub async fn end(self) {
        match self {
            Outage::Sqlite(mut conn) => {
                sqlx::raw_sql("rollback").execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
            Outage::Postgres { admin, db, undo } => {
                let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "alter database \"{db}\" {undo}"
                )))
                .execute(&mut conn)
                .await
                .unwrap();
                if undo.starts_with("reset") {
                    // Sessions opened meanwhile keep the read-only default.
                    sqlx::query(
                        "select pg_terminate_backend(pid) from pg_stat_activity
                         where datname = $1 and pid <> pg_backend_pid()",
                    )
                    .bind(&db)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                }
                conn.close().await.unwrap();
            }
        }
    }
}

/// Waits until no recorded forget waits to be finished in the background.
async fn no_forget_pending(app: &TestApp) {
    let mut pending = app.progress().forgets_pending;
    tokio::time::timeout(PATIENCE, pending.wait_for(|n| *n == 0))
        .await
        .expect("the pending forgets are finished once the keystore answers")
        .unwrap();
}

async fn subject_state(app: &TestApp, token: &str, subject: &str) -> String {
    let (status, text) = app.get(&format!("/subjects/{subject}"), token).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["state"].as_str().unwrap().to_owned()
}

async fn a_forget_while_the_keystore_is_down_is_accepted_and_finished_when_it_answers(
    backend: Backend,
) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.store_timeout = Duration::from_secs(1));
    let app = TestApp::start(env).await;
    // Many subjects, so that many forgets wait at once.
    let subjects: Vec<String> = (0..20).map(|i| format!("cust-{i}")).collect();
    let events = subjects
        .iter()
        .map(|s| deposit(Uuid::new_v4(), s, "10.00"))
        .collect();
    app.append_ok("accounts-1", &batch(events)).await;
    app.append_ok(
        "accounts-2",
        &batch(vec![deposit(Uuid::new_v4(), "cust-kept", "5.00")]),
    )
    .await;
    let dpo = app.env.add_principal("dpo", &["dpo"]).await;

    let outage = Outage::keystore(&app.env).await;
    // All at once: each waits at most the store timeout for the keystore.
    // One principal's requests take turns, and a turn is held while its
    // forget waits for the keystore, so some may find no turn within the
    // store timeout: those are answered 503 (the forget may still be
    // recorded once it gets its turn), and the caller sends them again, as
    // a forget may be sent again any time, until it is answered 202.
    let mut answers =
        futures::future::join_all(subjects.iter().map(|s| forget(&app, &dpo, s))).await;
    let mut requests = answers.len();
    for (subject, answer) in subjects.iter().zip(answers.iter_mut()) {
        for _ in 0..20 {
            if answer.0 != StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            *answer = forget(&app, &dpo, subject).await;
            requests += 1;
        }
    }
    for (status, body) in &answers {
        assert_eq!(status, &StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["state"], "forgetting", "{body}");
        assert!(body["forgotten_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(body["events_affected"], 1, "{body}");
    }
    // Forgotten for every reader at once, although no key is destroyed:
    // the ledger is read with the rows, and no key is looked up.
    let (status, text) = app
        .get("/streams/accounts-1/events?limit=100", &app.token())
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let page: Value = serde_json::from_str(&text).unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 20);
    for e in events {
        assert_eq!(e["personal_data"], "erased", "{e}");
        assert_eq!(e["data"]["currency"], "EUR", "clear fields stay");
    }
    assert!(!text.contains("Payer of"), "{text}");
    assert_eq!(subject_state(&app, &dpo, "cust-0").await, "forgetting");
    assert_eq!(metric(&app, "eventvault_forgets_pending").await, 20);

    // The keystore answers again: no restart, the service finishes alone.
    outage.end().await;
    no_forget_pending(&app).await;
    for s in &subjects {
        assert_eq!(subject_state(&app, &dpo, s).await, "forgotten", "{s}");
    }
    let ks = keystore_db(&app.env).await;
    for s in &subjects {
        assert!(key_ids_of(&ks, s).await.is_empty(), "{s}'s key is gone");
    }
    assert_eq!(
        key_ids_of(&ks, "cust-kept").await.len(),
        1,
        "others keep theirs"
    );
    ks.close().await;
    assert_eq!(metric(&app, "eventvault_forgets_pending").await, 0);
    assert!(metric(&app, "eventvault_forget_retries_total").await >= 1);
    // Each finished forget is audited as the start-up path audits it, and
    // left its `$subjects` event.
    let resumed = app.audit_records("action=subject.forget.resume").await;
    assert_eq!(resumed.len(), 20, "{resumed:?}");
    assert!(
        resumed
            .iter()
            .all(|r| r["outcome"] == "ok" && r["event_count"] == 1)
    );
    // One record per request (retries included), each of a forget that
    // took effect.
    let requested = app.audit_records("action=subject.forget").await;
    assert_eq!(requested.len(), requests);
    assert!(
        requested
            .iter()
            .all(|r| r["outcome"] == "ok" && r["principal"] == "dpo")
    );
    let ledger: Value = app
        .read("$subjects", "limit=100")
        .await
        .json()
        .await
        .unwrap();
    let announced = ledger["events"].as_array().unwrap();
    assert_eq!(announced.len(), 20, "one `$subjects` event each");
    assert!(announced.iter().all(|e| e["data"]["keys_destroyed"] == 1));
    // A forget now is the forget that was made, and counts its key.
    let body = forget_ok(&app, &dpo, "cust-0").await;
    assert_eq!(
        (&body["state"], &body["keys_destroyed"]),
        (&json!("forgotten"), &json!(1))
    );
    let page: Value = app.read("accounts-2", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "decrypted");
}

async fn a_forget_that_cannot_be_recorded_is_answered_503_and_takes_no_effect(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.store_timeout = Duration::from_secs(1));
    let app = TestApp::start(env).await;
    two_deposits(&app).await;
    let dpo = app.env.add_principal("dpo", &["dpo"]).await;
    // Warm the authentication cache: the refusal must be the ledger's.
    assert_eq!(subject_state(&app, &dpo, "cust-1").await, "active");

    let outage = Outage::event_store_writes(&app.env).await;
    let r = app
        .client
        .post(format!("{}/subjects/cust-1/forget", app.base))
        .bearer_auth(&dpo)
        .json(&json!({"reason": "ticket 81"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["type"], "urn:eventvault:problem:unavailable", "{p}");
    outage.end().await;

    // Nothing happened: the subject is as it was.
    assert_eq!(subject_state(&app, &dpo, "cust-1").await, "active");
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "decrypted");
    let ks = keystore_db(&app.env).await;
    assert_eq!(key_ids_of(&ks, "cust-1").await.len(), 1);
    ks.close().await;
    assert_eq!(metric(&app, "eventvault_forgets_pending").await, 0);
    // Asked again once the store answers, it is done.
    let body = forget_ok(&app, &dpo, "cust-1").await;
    assert_eq!(body["keys_destroyed"], 1);
}

/// A hold on the keystore under which a forget's deletion succeeds but the
/// step after it, the scrub, cannot run. SQLite: a reader keeps an old
/// snapshot open, so the truncating WAL checkpoint waits for it. PostgreSQL:
/// another maintenance of `deks` (as autovacuum or `ANALYZE` would) holds
/// the table's SHARE UPDATE EXCLUSIVE lock, which `VACUUM deks` waits for.
async fn hold_scrub(env: &TestEnv) -> crate::common::Held {
    crate::common::Held::begin(
        &env.keystore_url,
        "begin; select count(*) from deks",
        "begin; lock table deks in share update exclusive mode",
    )
    .await
}

async fn keys_destroyed_by_an_attempt_whose_later_step_failed_are_still_counted(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.store_timeout = Duration::from_secs(1));
    let app = TestApp::start(env).await;
    two_deposits(&app).await;
    let dpo = app.env.add_principal("dpo", &["dpo"]).await;

    let hold = hold_scrub(&app.env).await;
    let (status, body) = forget(&app, &dpo, "cust-1").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["state"], "forgetting");
    // The deletion itself went through; the scrub after it did not.
    let ks = keystore_db(&app.env).await;
    assert!(key_ids_of(&ks, "cust-1").await.is_empty(), "deleted");
    ks.close().await;
    assert_eq!(body["keys_destroyed"], 1, "counted before it was deleted");
    assert!(
        log_has_line_with(&[
            "its keys could not be destroyed yet",
            "finished in the background"
        ]),
        "the failure is logged"
    );
    assert_eq!(subject_state(&app, &dpo, "cust-1").await, "forgetting");

    // Retried (by the service, then by the caller): the key deleted by the
    // first attempt is still counted.
    hold.release().await;
    no_forget_pending(&app).await;
    assert_eq!(subject_state(&app, &dpo, "cust-1").await, "forgotten");
    let body = forget_ok(&app, &dpo, "cust-1").await;
    assert_eq!(body["keys_destroyed"], 1, "{body}");
    let ledger: Value = app.read("$subjects", "").await.json().await.unwrap();
    assert_eq!(ledger["current_version"], 1);
    assert_eq!(ledger["events"][0]["data"]["keys_destroyed"], 1);
    // The scrub ran in the end.
    if let Backend::Postgres(_) = backend {
        let ks = keystore_db(&app.env).await;
        let Db::Postgres(p) = &ks else { unreachable!() };
        let vacuumed: Option<String> = sqlx::query_scalar(
            "select last_vacuum::text from pg_stat_user_tables where relname = 'deks'",
        )
        .fetch_one(p)
        .await
        .unwrap();
        assert!(vacuumed.is_some(), "vacuumed once the lock was gone");
        ks.close().await;
    }
}

/// The reason stored in the forget ledger for `subject`.
async fn stored_reason(env: &TestEnv, subject: &str) -> Option<String> {
    let db = events_db(env).await;
    let q = "select reason from forgotten_subjects where subject = $1";
    let reason = match &db {
        Db::Sqlite(p) => sqlx::query_scalar(q).bind(subject).fetch_one(p).await,
        Db::Postgres(p) => sqlx::query_scalar(q).bind(subject).fetch_one(p).await,
    }
    .unwrap();
    db.close().await;
    reason
}

async fn the_forget_body_is_read_like_every_other_body_and_only_after_the_permission(
    backend: Backend,
) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.body_read_timeout = Duration::from_secs(1));
    let app = TestApp::start(env).await;
    for i in 0..8 {
        app.append_ok(
            "accounts-1",
            &batch(vec![deposit(Uuid::new_v4(), &format!("cust-{i}"), "1.00")]),
        )
        .await;
    }
    let service = app.env.add_principal("ledger", &["service"]).await;
    let dpo = app.env.add_principal("dpo", &["dpo"]).await;
    let head = |token: &str, subject: &str, content_type: &str, length: usize| {
        format!(
            "POST /subjects/{subject}/forget HTTP/1.1\r\nHost: eventvault\r\nAuthorization: Bearer {token}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
        )
    };

    // Without `forget`: refused before a byte of the (huge) body is read.
    let mut s = connect(&app).await;
    s.write_all(head(&service, "cust-0", "application/json", 100_000_000).as_bytes())
        .await
        .unwrap();
    s.write_all(b"{\"reason\":\"").await.unwrap();
    let response = one_response(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 403 "), "{response:?}");
    assert_eq!(
        problem(&response)["type"],
        "urn:eventvault:problem:forbidden"
    );
    let denied = app
        .audit_records("action=subject.forget&outcome=denied")
        .await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["principal"], "ledger");

    // Over the body limit (4 MiB in the tests): the same 413 problem as
    // every other body.
    let (status, text) = app
        .request(Method::POST, "/subjects/cust-1/forget")
        .token(&dpo)
        .json(&json!({"reason": "x".repeat(5 * 1024 * 1024)}))
        .send()
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    let p: Value = serde_json::from_str(&text).expect("problem+json");
    assert_eq!(p["type"], "urn:eventvault:problem:payload-too-large");

    // A body trickled in: the body deadline, 408.
    let body = br#"{"reason":"ticket 81"}"#.to_vec();
    let s = connect(&app).await;
    let (mut r, mut w) = s.into_split();
    w.write_all(head(&dpo, "cust-2", "application/json", body.len()).as_bytes())
        .await
        .unwrap();
    let writer = trickle(w, body.clone(), Duration::from_millis(200));
    let mut out = Vec::new();
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut out),
    )
    .await
    .expect("answered and closed")
    .ok();
    let response = String::from_utf8_lossy(&out).into_owned();
    assert!(
        response.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{response:?}"
    );
    assert_eq!(
        problem(&response)["type"],
        "urn:eventvault:problem:request-timeout"
    );
    assert!(writer.await.unwrap() < body.len());

    // Not JSON: 415; malformed: 400 naming the problem.
    let r = app
        .client
        .post(format!("{}/subjects/cust-2/forget", app.base))
        .bearer_auth(&dpo)
        .header("Content-Type", "text/plain")
        .body("reason: none")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = app
        .client
        .post(format!("{}/subjects/cust-2/forget", app.base))
        .bearer_auth(&dpo)
        .header("Content-Type", "application/json")
        .body(r#"{"reason": 7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let p: Value = r.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("reason"), "{p}");
    // None of these forgot anyone.
    for s in ["cust-0", "cust-1", "cust-2"] {
        assert_eq!(subject_state(&app, &dpo, s).await, "active", "{s}");
    }

    // No body, an empty one, whitespace: no reason. A reason is kept.
    let r = app
        .client
        .post(format!("{}/subjects/cust-3/forget", app.base))
        .bearer_auth(&dpo)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for (subject, body) in [("cust-4", ""), ("cust-5", " \n")] {
        let r = app
            .client
            .post(format!("{}/subjects/{subject}/forget", app.base))
            .bearer_auth(&dpo)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{body:?}");
        assert_eq!(stored_reason(&app.env, subject).await, None);
    }
    forget_ok(&app, &dpo, "cust-7").await;
    assert_eq!(
        stored_reason(&app.env, "cust-7").await.as_deref(),
        Some("ticket 81")
    );
}
