//! The audit log: one record per request with the request's metadata,
//! appends audited in their own transaction, tampering found by
//! `GET /audit/verify` and `eventvault audit verify`, a failed audit write
//! withholding the response, and one chain for several processes.

use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

use crate::at_rest::{events_db, exec};
use crate::both_backends;
use crate::common::{
    Backend, PERSONAL_VALUES, ServerProcess, TestApp, TestEnv, batch, command, deposit,
};
use eventvault::store::Db;

both_backends!(
    records_carry_the_request_metadata,
    an_append_and_its_record_commit_together,
    any_changed_byte_is_found_at_its_record,
    a_deleted_or_moved_record_is_found,
    cut_off_newest_records_are_found,
    verify_never_creates_a_database,
    a_failed_audit_write_discloses_nothing,
    several_processes_write_one_chain,
    every_outcome_is_recorded_once,
    the_listing_filters_and_pages,
);

async fn verify(app: &TestApp) -> Value {
    let (status, text) = app.get("/audit/verify", &app.token()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Runs `eventvault audit verify` on the app's database: (success, output).
async fn verify_cli(app: &TestApp) -> (bool, String) {
    verify_cli_env(&app.env).await
}

async fn verify_cli_env(env: &TestEnv) -> (bool, String) {
    let out = command(env, &["audit", "verify"]).output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Lets the test rewrite the audit log, as someone with database access could.
async fn allow_tampering(db: &Db) {
    match db {
        Db::Sqlite(_) => {
            exec(db, "drop trigger audit_log_no_update").await.unwrap();
            exec(db, "drop trigger audit_log_no_delete").await.unwrap();
        }
        Db::Postgres(_) => {
            exec(db, "alter table audit_log disable trigger user")
                .await
                .unwrap();
        }
    }
}

/// Runs the SQLite or the PostgreSQL form of a statement.
async fn exec_either(db: &Db, sqlite: &'static str, postgres: &'static str) {
    let sql = match db {
        Db::Sqlite(_) => sqlite,
        Db::Postgres(_) => postgres,
    };
    let n = exec(db, sql).await.unwrap();
    assert!(n >= 1, "{sql} changed nothing");
}

/// Runs a statement written alike for both backends; it must change a row.
async fn exec_both(db: &Db, sql: &'static str) {
    exec_either(db, sql, sql).await
}

/// Ten requests of several kinds, so that there are records to tamper with.
async fn make_records(app: &TestApp) {
    for i in 0..4 {
        app.append_ok(
            "accounts-1",
            &batch(vec![deposit(Uuid::new_v4(), "c", &i.to_string())]),
        )
        .await;
        assert_eq!(app.read("accounts-1", "").await.status(), StatusCode::OK);
    }
    let (s, _) = app.request(Method::GET, "/events").send().await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(app.log("").await.status(), StatusCode::OK);
}

async fn records_carry_the_request_metadata(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let body = batch(vec![
        deposit(Uuid::new_v4(), "cust-9", "1.00"),
        deposit(Uuid::new_v4(), "cust-9", "2.00"),
    ]);
    let r = app
        .client
        .post(format!("{}/streams/accounts-9/events", app.base))
        .bearer_auth(app.token())
        .header("X-Correlation-Id", "corr-1")
        .header("X-Causation-Id", "cause-1")
        .header("X-Request-Id", "req-append-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .client
        .get(format!("{}/streams/accounts-9/events", app.base))
        .bearer_auth(app.token())
        .header("X-Correlation-Id", "corr-1")
        .header("X-Causation-Id", "cause-2")
        .header("X-Purpose", "dispute 12")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();

    let records = app.audit_records("resource=stream:accounts-9").await;
    assert_eq!(records.len(), 2, "{records:?}");
    let (append, read) = (&records[0], &records[1]);
    assert_eq!(append["seq"], 1);
    assert_eq!(append["principal"], "admin");
    assert_eq!(append["action"], "stream.append");
    assert_eq!(append["resource"], "stream:accounts-9");
    assert_eq!(append["outcome"], "ok");
    assert_eq!(append["event_count"], 2);
    assert_eq!(append["personal_data"], false);
    assert_eq!(append["correlation_id"], "corr-1");
    assert_eq!(append["causation_id"], "cause-1");
    assert_eq!(append["request_id"], "req-append-1");
    assert_eq!(append["purpose"], Value::Null);
    assert_eq!(append["prev_hash"], "0".repeat(64));

    assert_eq!(read["seq"], 2);
    assert_eq!(read["action"], "stream.read");
    assert_eq!(read["event_count"], 2);
    assert_eq!(read["personal_data"], true);
    assert_eq!(read["purpose"], "dispute 12");
    assert_eq!(read["causation_id"], "cause-2");
    assert_eq!(read["request_id"], request_id.as_str());
    assert_eq!(read["prev_hash"], append["hash"]);

    // No payload in the log, and the chain holds.
    let text = serde_json::to_string(&records).unwrap();
    for v in PERSONAL_VALUES {
        assert!(!text.contains(v), "{v} in the audit log");
    }
    let v = verify(&app).await;
    assert_eq!(v["ok"], true, "{v}");
    // The two requests and the listing above.
    assert_eq!(v["records"], 3, "{v}");
    let (ok, out) = verify_cli(&app).await;
    assert!(ok, "{out}");
    assert!(out.contains("intact") && out.contains("records"), "{out}");
}

async fn an_append_and_its_record_commit_together(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let first = batch(vec![deposit(Uuid::new_v4(), "c", "1")]);
    app.append_ok("accounts-1", &first).await;
    // A retry: 200, nothing written; a conflict: 409.
    assert_eq!(
        app.append("accounts-1", None, &first).await.status(),
        StatusCode::OK
    );
    let other = batch(vec![deposit(Uuid::new_v4(), "c", "2")]);
    assert_eq!(
        app.append("accounts-1", Some("0"), &other).await.status(),
        StatusCode::CONFLICT
    );
    // Refused before the writer: malformed.
    assert_eq!(
        app.append("accounts-1", None, &serde_json::json!({"events": []}))
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
    let records = app.audit_records("action=stream.append").await;
    let summary: Vec<(&str, u64)> = records
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap(),
                r["event_count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![("ok", 1), ("ok", 0), ("error", 0), ("error", 0)],
        "exactly one record per request"
    );
    // The append's record and its events share one transaction: they carry
    // the same commit time.
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    let db = events_db(&app.env).await;
    let times: Vec<(i64, i64)> = match &db {
        Db::Sqlite(p) => sqlx::query_as(
            "select e.recorded_at, a.recorded_at from events e, audit_log a where a.seq = 1",
        )
        .fetch_all(p)
        .await
        .unwrap(),
        Db::Postgres(p) => sqlx::query_as(
            "select e.recorded_at, a.recorded_at from events e, audit_log a where a.seq = 1",
        )
        .fetch_all(p)
        .await
        .unwrap(),
    };
    assert_eq!(times.len(), 1);
    assert_eq!(times[0].0, times[0].1);
    assert_eq!(page["current_version"], 1);
}

async fn any_changed_byte_is_found_at_its_record(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    make_records(&app).await;
    make_records(&app).await;
    assert_eq!(verify(&app).await["ok"], true);
    let db = events_db(&app.env).await;
    allow_tampering(&db).await;
    // From the last record down, one field at a time: each time the first
    // bad record is the one just changed.
    let changes: [(u64, &str, &str); 14] = [
        (
            15,
            "update audit_log set action = 'X' || substr(action, 2) where seq = 15",
            "update audit_log set action = overlay(action placing 'X' from 1 for 1) where seq = 15",
        ),
        // An absent value made present, and the other way round.
        (
            14,
            "update audit_log set correlation_id = 'c' where seq = 14",
            "update audit_log set correlation_id = 'c' where seq = 14",
        ),
        (
            13,
            "update audit_log set causation_id = '' where seq = 13",
            "update audit_log set causation_id = '' where seq = 13",
        ),
        (
            12,
            "update audit_log set purpose = 'audit' where seq = 12",
            "update audit_log set purpose = 'audit' where seq = 12",
        ),
        (
            11,
            "update audit_log set principal = null where seq = 11",
            "update audit_log set principal = null where seq = 11",
        ),
        (
            10,
            "update audit_log set hash = zeroblob(32) where seq = 10",
            "update audit_log set hash = decode(repeat('00', 32), 'hex') where seq = 10",
        ),
        (
            9,
            "update audit_log set resource = 'X' || substr(resource, 2) where seq = 9",
            "update audit_log set resource = overlay(resource placing 'X' from 1 for 1) where seq = 9",
        ),
        (
            8,
            "update audit_log set event_count = event_count + 1 where seq = 8",
            "update audit_log set event_count = event_count + 1 where seq = 8",
        ),
        (
            7,
            "update audit_log set personal_data = 1 - personal_data where seq = 7",
            "update audit_log set personal_data = not personal_data where seq = 7",
        ),
        (
            6,
            "update audit_log set principal = 'Xdmin' where seq = 6",
            "update audit_log set principal = 'Xdmin' where seq = 6",
        ),
        (
            5,
            "update audit_log set outcome = 'error' where seq = 5",
            "update audit_log set outcome = 'error' where seq = 5",
        ),
        (
            4,
            "update audit_log set recorded_at = recorded_at + 1 where seq = 4",
            "update audit_log set recorded_at = recorded_at + 1 where seq = 4",
        ),
        (
            3,
            "update audit_log set request_id = 'X' || substr(request_id, 2) where seq = 3",
            "update audit_log set request_id = overlay(request_id placing 'X' from 1 for 1) where seq = 3",
        ),
        (
            2,
            "update audit_log set prev_hash = zeroblob(32) where seq = 2",
            "update audit_log set prev_hash = decode(repeat('00', 32), 'hex') where seq = 2",
        ),
    ];
    for (seq, sqlite, postgres) in changes {
        exec_either(&db, sqlite, postgres).await;
        let v = verify(&app).await;
        assert_eq!(v["ok"], false, "after changing record {seq}: {v}");
        assert_eq!(v["first_bad_seq"], seq, "{v}");
        let (ok, out) = verify_cli(&app).await;
        assert!(!ok, "the command must fail: {out}");
        assert!(out.contains(&format!("record {seq}")), "{out}");
    }
}

async fn a_deleted_or_moved_record_is_found(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    make_records(&app).await;
    let db = events_db(&app.env).await;
    allow_tampering(&db).await;
    // Two records swap places.
    exec_both(&db, "update audit_log set seq = -1 where seq = 6").await;
    exec_both(&db, "update audit_log set seq = 6 where seq = 3").await;
    exec_both(&db, "update audit_log set seq = 3 where seq = -1").await;
    let v = verify(&app).await;
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["first_bad_seq"], 3, "{v}");
    let (ok, out) = verify_cli(&app).await;
    assert!(!ok && out.contains("record 3"), "{out}");

    // A record deleted (an earlier one than the swap).
    exec_both(&db, "delete from audit_log where seq = 2").await;
    let v = verify(&app).await;
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["first_bad_seq"], 2, "{v}");
    let (ok, out) = verify_cli(&app).await;
    assert!(
        !ok && out.contains("record 2") && out.contains("missing"),
        "{out}"
    );
}

async fn cut_off_newest_records_are_found(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    make_records(&app).await;
    // An auditor keeps the head that verify prints.
    let (ok, out) = verify_cli(&app).await;
    assert!(ok, "{out}");
    let expect = out.split("--expect ").nth(1).unwrap().trim().to_owned();
    assert!(expect.starts_with("10:"), "{expect}");

    let db = events_db(&app.env).await;
    allow_tampering(&db).await;
    exec_both(&db, "delete from audit_log where seq > 7").await;
    // The chain that is left is consistent ...
    let (ok, out) = verify_cli(&app).await;
    assert!(ok, "{out}");
    // ... but not against what the auditor kept,
    let out = command(&app.env, &["audit", "verify", "--expect", &expect])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("record 8") && text.contains("record 10"),
        "{text}"
    );
    // ... and the running service, which wrote those records, refuses to
    // write over the cut (and so to serve data).
    let r = app.read("accounts-1", "").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = app.get("/audit/verify", &app.token()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let n: i64 = match &db {
        Db::Sqlite(p) => sqlx::query_scalar("select count(*) from audit_log")
            .fetch_one(p)
            .await
            .unwrap(),
        Db::Postgres(p) => sqlx::query_scalar("select count(*) from audit_log")
            .fetch_one(p)
            .await
            .unwrap(),
    };
    assert_eq!(n, 7, "nothing was chained onto the cut");

    // The same check over HTTP, on a service started afresh.
    let env = app.stop().await;
    let app = TestApp::start(env).await;
    let (_, text) = app
        .get(&format!("/audit/verify?expect={expect}"), &app.token())
        .await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["first_bad_seq"], 8, "{v}");
}

async fn verify_never_creates_a_database(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    // Nothing has started on these databases: no event store exists yet.
    let out = command(&env, &["audit", "verify"]).output().await.unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    if let Backend::Sqlite = backend {
        let file = env.database_url.trim_start_matches("sqlite://");
        assert!(!std::path::Path::new(file).exists(), "no file was created");
    }
}

async fn a_failed_audit_write_discloses_nothing(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "accounts-5",
        &batch(vec![deposit(Uuid::new_v4(), "cust-5", "5.00")]),
    )
    .await;
    let db = events_db(&app.env).await;
    // The audit table turns read-only.
    match &db {
        Db::Sqlite(_) => {
            exec(
                &db,
                "create trigger audit_read_only before insert on audit_log
                 begin select raise(abort, 'read-only'); end",
            )
            .await
            .unwrap();
        }
        Db::Postgres(_) => {
            exec(
                &db,
                "create function audit_read_only() returns trigger language plpgsql as
                 $$ begin raise exception 'read-only'; end; $$",
            )
            .await
            .unwrap();
            exec(
                &db,
                "create trigger audit_read_only before insert on audit_log
                 for each row execute function audit_read_only()",
            )
            .await
            .unwrap();
        }
    }
    let r = app
        .client
        .get(format!("{}/streams/accounts-5/events", app.base))
        .bearer_auth(app.token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = r.text().await.unwrap();
    for v in PERSONAL_VALUES {
        assert!(!text.contains(v), "{v} disclosed without an audit record");
    }
    assert!(!text.contains("5.00"), "nothing of the event: {text}");
    let r = app.log("").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = r.text().await.unwrap();
    assert!(!text.contains("cust-5") && !text.contains("5.00"), "{text}");
    // An append cannot commit without its record either.
    let r = app
        .append(
            "accounts-5",
            None,
            &batch(vec![deposit(Uuid::new_v4(), "cust-5", "6.00")]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    let drop = match &db {
        Db::Sqlite(_) => "drop trigger audit_read_only",
        Db::Postgres(_) => "drop trigger audit_read_only on audit_log",
    };
    exec(&db, drop).await.unwrap();
    let page: Value = app.read("accounts-5", "").await.json().await.unwrap();
    assert_eq!(
        page["current_version"], 1,
        "the failed append wrote nothing"
    );
    let v = verify(&app).await;
    assert_eq!(v["ok"], true, "{v}");
}

async fn several_processes_write_one_chain(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let first = ServerProcess::start(&env)
        .await
        .expect("first process starts");
    let second = ServerProcess::start(&env)
        .await
        .expect("second process starts");
    let one = Arc::new(TestApp::client_for(env.clone(), first.base.clone()));
    let two = Arc::new(TestApp::client_for(env.clone(), second.base.clone()));
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let app = if i % 2 == 0 { one.clone() } else { two.clone() };
            tokio::spawn(async move {
                let body = batch(vec![deposit(Uuid::new_v4(), "c", &i.to_string())]);
                app.append_ok(&format!("accounts-{}", i % 3), &body).await;
                assert_eq!(app.log("").await.status(), StatusCode::OK);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = verify(&one).await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["records"], 80);
    let records = two.audit_records("").await;
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(first.terminate().await.success());
    assert!(second.terminate().await.success());
    let (ok, out) = verify_cli_env(&env).await;
    assert!(ok, "{out}");
}

async fn the_listing_filters_and_pages(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    make_records(&app).await;
    let officer = app.env.add_principal("officer", &["auditor"]).await;
    // An auditor reads the log.
    let (status, text) = app.get("/audit?limit=3", &officer).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["records"].as_array().unwrap().len(), 3);
    assert_eq!(page["next"], 3);
    let page: Value =
        serde_json::from_str(&app.get("/audit?after=3&limit=2", &officer).await.1).unwrap();
    let seqs: Vec<u64> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 5]);

    assert_eq!(app.audit_records("action=stream.append").await.len(), 4);
    assert_eq!(
        app.audit_records("resource=stream:accounts-1").await.len(),
        8
    );
    assert_eq!(app.audit_records("outcome=denied").await.len(), 1);
    let by_admin = app.audit_records("principal=admin").await;
    assert!(by_admin.len() >= 9, "{by_admin:?}");
    assert!(by_admin.iter().all(|r| r["principal"] == "admin"));
    assert_eq!(
        app.audit_records("until=2000-01-01T00:00:00Z").await.len(),
        0
    );
    assert!(app.audit_records("since=2000-01-01T00:00:00Z").await.len() >= 10);
    let (status, text) = app.get("/audit?since=yesterday", &officer).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("since"), "{text}");
    // The auditor sees no event data.
    let (status, _) = app.get("/events", &officer).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The script in SECURITY.md re-verifies the chain without eventvault (it
/// reads a SQLite file; on PostgreSQL the encoding is the same, see the
/// scenarios above for the chain itself on both backends), an aggregate
/// record of requests without a valid token included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_script_verifies_the_chain() {
    crate::common::capture_logs();
    let env = TestEnv::new(&Backend::Sqlite).await;
    env.configure(|c| c.unauthenticated_audit_interval = std::time::Duration::from_secs(3600));
    let app = TestApp::start(env).await;
    make_records(&app).await;
    let db = events_db(&app.env).await;
    let env = app.stop().await;
    // The window still open was written at the stop: the refusal of
    // `make_records` has its own record and is counted in the aggregate.
    let aggregate: (String, i64) = match &db {
        Db::Sqlite(p) => sqlx::query_as(
            "select resource, event_count from audit_log where action = 'unauthenticated.refused'",
        )
        .fetch_one(p)
        .await
        .unwrap(),
        Db::Postgres(_) => unreachable!("a SQLite store"),
    };
    assert_eq!(aggregate, ("client:127.0.0.1".to_owned(), 1));

    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/SECURITY.md")).unwrap();
    let start = doc.find("```python\n").expect("a python block") + "```python\n".len();
    let script = &doc[start..start + doc[start..].find("```").unwrap()];
    let path = env.dir.path().join("verify_audit.py");
    std::fs::write(&path, script).unwrap();
    let file = env.database_url.trim_start_matches("sqlite://").to_owned();
    let run = || {
        std::process::Command::new("python3")
            .arg(&path)
            .arg(&file)
            .output()
            .expect("python3 runs")
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, cli) = verify_cli_env(&env).await;
    assert!(ok, "{cli}");
    let head = cli
        .split("head hash ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap();
    assert_eq!(stdout.trim(), format!("intact: 11 records, head {head}"));

    allow_tampering(&db).await;
    exec(&db, "update audit_log set event_count = 7 where seq = 4")
        .await
        .unwrap();
    let out = run();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broken at record 4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    crate::common::assert_logs_hold_no_secret();
}

async fn every_outcome_is_recorded_once(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "c", "1")]),
    )
    .await;
    // 404 for an unknown stream, 400 for a bad parameter, a HEAD request,
    // 413 for a body over the limit, a malformed header without a token.
    assert_eq!(
        app.read("accounts-2", "").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.read("accounts-1", "direction=sideways").await.status(),
        StatusCode::BAD_REQUEST
    );
    let r = app
        .client
        .head(format!("{}/streams/accounts-1/events", app.base))
        .bearer_auth(app.token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let huge = "x".repeat(5 * 1024 * 1024);
    let r = app
        .client
        .post(format!("{}/streams/accounts-1/events", app.base))
        .bearer_auth(app.token())
        .header("content-type", "application/json")
        .body(format!(
            "{{\"events\":[{{\"type\":\"T\",\"data\":{{\"x\":\"{huge}\"}}}}]}}"
        ))
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let long = "p".repeat(201);
    let (status, _) = app
        .request(Method::GET, "/events")
        .header("X-Purpose", &long)
        .send()
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "authentication comes first"
    );

    let records = app.audit_records("").await;
    let summary: Vec<(&str, &str, &str)> = records
        .iter()
        .filter(|r| r["action"] != "audit.read")
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["resource"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("stream.append", "stream:accounts-1", "ok"),
            ("stream.read", "stream:accounts-2", "error"),
            ("stream.read", "stream:accounts-1", "error"),
            ("stream.read", "stream:accounts-1", "ok"),
            ("stream.append", "stream:accounts-1", "error"),
            ("log.read", "events", "denied"),
        ]
    );
}
