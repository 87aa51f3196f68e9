//! Starting and stopping as an operator would: the binary, its first-start
//! token, the principal commands, bad policies, graceful shutdown, and no
//! data served (nor readiness claimed) while the forget ledger is re-applied.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::at_rest::{key_ids_of, keystore_db, refuse_key_deletions};
use crate::common::{
    Backend, ServerProcess, TestApp, TestEnv, batch, command, command_with_policies, deposit,
};
use crate::forget::{forget_ok, keystore_copy};
use crate::{both_backends, postgres_only};
use eventvault::service::LedgerState;
use eventvault::store::Db;

both_backends!(
    first_start_prints_one_admin_token_and_sigterm_stops_cleanly,
    principal_commands_add_list_and_remove,
    a_bad_policy_stops_the_start_naming_file_and_line,
    shutdown_finishes_in_flight_appends,
    no_data_is_served_while_the_forget_ledger_is_reapplied,
    a_failed_reapply_stops_the_service_before_it_serves,
);

async fn first_start_prints_one_admin_token_and_sigterm_stops_cleanly(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let server = ServerProcess::start(&env).await.expect("starts");
    let token = server.stdout_lines.last().expect("printed a token").clone();
    // The token is the last line before the listening address.
    assert!(token.starts_with("evt_"), "{:?}", server.stdout_lines);
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            client
                .get(format!("{}{path}", server.base))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    let r = client
        .post(format!("{}/streams/s/events", server.base))
        .bearer_auth(&token)
        .json(&batch(vec![deposit(Uuid::new_v4(), "c", "1")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(server.terminate().await.success());

    let again = ServerProcess::start(&env).await.expect("restarts");
    assert!(
        again.stdout_lines.iter().all(|l| !l.contains("evt_")),
        "the token is printed only once"
    );
    assert!(again.terminate().await.success());
}

async fn principal_commands_add_list_and_remove(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let server = ServerProcess::start(&env).await.expect("starts");
    let out = command(
        &env,
        &[
            "principal",
            "add",
            "teller",
            "--role",
            "service",
            "--role",
            "support",
        ],
    )
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.lines().last().unwrap().to_owned();
    assert!(token.starts_with("evt_"), "{stdout}");

    let app = TestApp::client_for(env.clone(), server.base.clone());
    let r = app
        .client
        .get(format!("{}/events", server.base))
        .bearer_auth(&token)
        .header("X-Purpose", "account review")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let list = command(&env, &["principal", "list"])
        .output()
        .await
        .unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    assert!(
        list.contains("teller\tservice,support") && list.contains("admin\tadmin"),
        "{list}"
    );
    assert!(!list.contains("evt_"), "list never prints tokens");

    let dup = command(&env, &["principal", "add", "teller", "--role", "service"])
        .output()
        .await
        .unwrap();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists already"));
    let bad_role = command(&env, &["principal", "add", "x", "--role", "wizard"])
        .output()
        .await
        .unwrap();
    assert!(!bad_role.status.success());
    let msg = String::from_utf8_lossy(&bad_role.stderr);
    assert!(msg.contains("wizard") && msg.contains("service"), "{msg}");

    let rm = command(&env, &["principal", "remove", "teller"])
        .output()
        .await
        .unwrap();
    assert!(rm.status.success());
    let list = String::from_utf8(
        command(&env, &["principal", "list"])
            .output()
            .await
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!list.contains("teller"));
    let rm = command(&env, &["principal", "remove", "teller"])
        .output()
        .await
        .unwrap();
    assert!(!rm.status.success());
    assert!(server.terminate().await.success());
}

async fn a_bad_policy_stops_the_start_naming_file_and_line(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        crate::common::policies_dir().join("roles.toml"),
        dir.path().join("roles.toml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("classification.toml"),
        "[types.MoneyDeposited]\nclear = [\"amount\"\n",
    )
    .unwrap();
    let out = command_with_policies(&env, dir.path(), &["serve", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("classification.toml") && err.contains("line 2"),
        "{err}"
    );
}

async fn shutdown_finishes_in_flight_appends(backend: Backend) {
    let app = Arc::new(TestApp::spawn(&backend).await);
    let first_done = Arc::new(Notify::new());
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (app, first_done) = (app.clone(), first_done.clone());
            tokio::spawn(async move {
                let id = Uuid::new_v4();
                let r = app
                    .client
                    .post(format!("{}/streams/s{}/events", app.base, i % 10))
                    .bearer_auth(app.token())
                    .json(&batch(vec![deposit(id, "c", "1")]))
                    .send()
                    .await;
                first_done.notify_one();
                (id, r.map(|r| r.status()))
            })
        })
        .collect();
    // Shut down while the other appends are in flight.
    first_done.notified().await;
    let env = app.stop().await;
    let mut acknowledged = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (id, Ok(status)) => {
                assert_eq!(
                    status,
                    StatusCode::CREATED,
                    "an append the server took must finish, not fail"
                );
                acknowledged.push(id.to_string());
            }
            // Not accepted: the listener had closed. The client knows it failed.
            (_, Err(_)) => {}
        }
    }
    assert!(!acknowledged.is_empty());
    let app = TestApp::start(env).await;
    let stored: Vec<String> = app
        .whole_log()
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged append {id} was lost");
    }
}

/// A forgotten subject whose key a restored keystore brought back: cust-1,
/// with one deposit in `accounts-1` (and cust-2's, not forgotten, beside it).
async fn forgotten_but_restored(backend: &Backend) -> std::sync::Arc<TestEnv> {
    let app = TestApp::spawn(backend).await;
    crate::forget::two_deposits(&app).await;
    let env = app.stop().await;
    keystore_copy(&env, false).await; // last night's backup
    let app = TestApp::start(env).await;
    forget_ok(&app, &app.token(), "cust-1").await;
    let env = app.stop().await;
    keystore_copy(&env, true).await; // restored
    let ks = keystore_db(&env).await;
    assert_eq!(key_ids_of(&ks, "cust-1").await.len(), 1, "the key is back");
    ks.close().await;
    env
}

/// A lock on the keystore that the re-apply of the forget ledger must wait
/// for, while `/readyz`'s ping still gets through. SQLite: a write
/// transaction (in WAL mode readers go on, so the re-apply reads which keys
/// exist and then waits to delete them). PostgreSQL: the key table locked
/// against everything, reads too (the ping touches no table).
async fn lock_keystore(env: &TestEnv) -> crate::common::Held {
    crate::common::Held::begin(
        &env.keystore_url,
        "begin immediate",
        "begin; lock table deks in access exclusive mode",
    )
    .await
}

async fn readyz(app: &TestApp) -> (StatusCode, Value) {
    let r = app
        .client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

async fn no_data_is_served_while_the_forget_ledger_is_reapplied(backend: Backend) {
    let env = forgotten_but_restored(&backend).await;
    // The re-apply cannot finish while the lock is held, and waits for it
    // (up to the store timeout: longer than this test holds it).
    env.configure(|c| c.store_timeout = std::time::Duration::from_secs(60));
    let lock = lock_keystore(&env).await;
    let app = TestApp::start_unready(env).await;

    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "alive while starting");
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not ready", "{body}");
    assert_eq!(body["forget_ledger"], "reapplying", "{body}");
    assert_eq!(
        (&body["event_store"], &body["keystore"]),
        (&Value::from("ok"), &Value::from("ok")),
        "both stores answer: {body}"
    );

    // The restored key is still there: no data route may serve yet, not
    // even to a caller allowed everything.
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        app.read("accounts-1", ""),
    )
    .await
    .expect("refused at once, not left waiting for the keystore");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(r.headers()["retry-after"], "1");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["type"], "urn:eventvault:problem:starting",
        "{problem}"
    );
    assert!(!problem.to_string().contains("Payer of"), "{problem}");
    let r = app
        .append(
            "accounts-2",
            None,
            &batch(vec![deposit(Uuid::new_v4(), "cust-3", "1")]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    lock.release().await;
    app.ready().await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["status"], &body["forget_ledger"]),
        (&Value::from("ready"), &Value::from("applied")),
        "{body}"
    );
    let ks = keystore_db(&app.env).await;
    assert!(key_ids_of(&ks, "cust-1").await.is_empty(), "shredded again");
    ks.close().await;
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events[0]["subject"], "cust-1");
    assert_eq!(events[0]["personal_data"], "erased");
    assert_eq!(events[1]["personal_data"], "decrypted");
    assert_eq!(
        app.whole_log().await.len(),
        3,
        "the refused append wrote nothing"
    );

    // The refusals were audited like any other.
    let refused = app.audit_records("action=stream.read&outcome=error").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["resource"], "stream:accounts-1");
    assert_eq!(refused[0]["personal_data"], false);
    let refused = app
        .audit_records("action=stream.append&outcome=error")
        .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["resource"], "stream:accounts-2");
}

async fn a_failed_reapply_stops_the_service_before_it_serves(backend: Backend) {
    let env = forgotten_but_restored(&backend).await;
    // Shredding the restored key fails.
    let ks = keystore_db(&env).await;
    refuse_key_deletions(&ks).await;
    ks.close().await;
    // The binary exits with a clear error and never says it is ready.
    let printed = match ServerProcess::start(&env).await {
        Ok(server) => panic!("became ready: {:?}", server.stdout_lines),
        Err(printed) => printed,
    };
    assert!(
        printed.contains("re-applying the forget ledger failed"),
        "{printed}"
    );
    assert!(!printed.contains("eventvault ready"), "{printed}");
    // In process: the ledger says so, and the application stops by itself
    // with the error.
    let app = TestApp::start_unready(env.clone()).await;
    let mut ledger = app.progress().ledger;
    let state = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        ledger.wait_for(|s| *s != LedgerState::Reapplying),
    )
    .await
    .expect("the re-apply ends")
    .map(|s| *s);
    assert_eq!(state.ok(), Some(LedgerState::Failed));
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), app.stopped())
        .await
        .expect("the application stops by itself")
        .expect_err("a failed start is an error");
    assert!(
        err.to_string()
            .contains("re-applying the forget ledger failed"),
        "{err}"
    );
}

// Plan caching is PostgreSQL's.
postgres_only!(statements_are_planned_with_their_parameters,);

/// Every connection of the service plans a statement with its parameters
/// each time: a generic plan made while the tables were empty (a
/// sequential scan of `events` for the writer's look-up of event ids) would
/// otherwise be kept for the connection's life, and appends would slow
/// down as the store grows.
async fn statements_are_planned_with_their_parameters(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    for (url, purpose) in [
        (&env.database_url, eventvault::store::Purpose::Events),
        (&env.keystore_url, eventvault::store::Purpose::Keystore),
    ] {
        // Nothing here is logged by the service: a line of the test's own,
        // so that the log check after it has something to read.
        tracing::debug!(?purpose, "checking the plan cache mode");
        let db = Db::connect(url, purpose, 1).await.unwrap();
        let Db::Postgres(pool) = &db else {
            panic!("a PostgreSQL URL gives a PostgreSQL pool")
        };
        let mode: String = sqlx::query_scalar("show plan_cache_mode")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(mode, "force_custom_plan");
        db.close().await;
    }
}
