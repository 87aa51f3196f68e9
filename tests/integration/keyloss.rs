//! A data key the keystore lost is an integrity failure, never a forget: a
//! keystore restored from a backup older than the event store keeps the
//! service from becoming ready (the log and `/readyz` say how many keys are
//! missing, never whose) until the operator accepts the loss, after which
//! those events read `lost`; a key deleted behind the service's back is a
//! `key-missing` problem, logged and counted, not `erased`.

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::at_rest::{exec, key_ids_of, keystore_db};
use crate::both_backends;
use crate::common::{Backend, TestApp, batch, deposit, log_has_line_with};
use crate::forget::{forget_ok, keystore_copy};
use crate::limits::metric;
use eventvault::service::KeyCheck;

both_backends!(
    a_keystore_older_than_the_event_store_keeps_the_service_unready_until_the_loss_is_accepted,
    a_key_deleted_behind_the_services_back_is_an_integrity_failure_not_erased,
);

async fn readyz(app: &TestApp) -> (StatusCode, Value) {
    let r = app
        .client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// `(subject, personal_data)` of each event of `stream`.
async fn states(app: &TestApp, stream: &str) -> Vec<(String, String)> {
    let (status, text) = app
        .get(&format!("/streams/{stream}/events"), &app.token())
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let page: Value = serde_json::from_str(&text).unwrap();
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["subject"].as_str().unwrap().to_owned(),
                e["personal_data"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn a_keystore_older_than_the_event_store_keeps_the_service_unready_until_the_loss_is_accepted(
    backend: Backend,
) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "10.00")]),
    )
    .await;
    let env = app.stop().await;
    keystore_copy(&env, false).await; // the keystore's backup
    let app = TestApp::start(env).await;
    // After the backup: a new subject, so a new key.
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-new", "20.00")]),
    )
    .await;
    let env = app.stop().await;
    keystore_copy(&env, true).await; // restored: older than the event store

    let app = TestApp::start_unready(env).await;
    let mut check = app.progress().data_keys;
    let verdict = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        check.wait_for(|c| *c != KeyCheck::Checking),
    )
    .await
    .expect("the check ends")
    .map(|c| *c)
    .unwrap();
    assert_eq!(verdict, KeyCheck::Missing(1));
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        (
            &body["status"],
            &body["data_keys"],
            &body["missing_data_keys"]
        ),
        (&json!("not ready"), &json!("missing"), &json!(1)),
        "{body}"
    );
    assert_eq!(body["forget_ledger"], "applied");
    // Nothing is served, not even what the keystore still has.
    let r = app.read("accounts-1", "").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["type"], "urn:eventvault:problem:unavailable", "{p}");
    // The log says how many, never whose.
    assert!(
        log_has_line_with(&[
            "data keys the event store refers to are missing from the keystore",
            "keys=1",
            "--accept-missing-keys",
        ]),
        "the refusal is logged with the count"
    );
    assert!(
        !log_has_line_with(&["missing from the keystore", "cust-new"]),
        "the subject is not named"
    );
    assert_eq!(metric(&app, "eventvault_data_keys_missing").await, 1);
    let env = app.stop().await;

    // The operator accepts the loss: ready, and the events say `lost`.
    env.configure(|c| c.accept_missing_keys = true);
    let app = TestApp::start(env).await;
    assert_eq!(
        states(&app, "accounts-1").await,
        [
            ("cust-1".to_owned(), "decrypted".to_owned()),
            ("cust-new".to_owned(), "lost".to_owned())
        ]
    );
    let (_, text) = app.get("/streams/accounts-1/events", &app.token()).await;
    assert!(!text.contains("Payer of cust-new"), "{text}");
    assert!(text.contains("20.00"), "clear fields stay: {text}");
    let accepted = app.audit_records("action=keys.accept_missing").await;
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0]["event_count"], 1);
    assert!(log_has_line_with(&["their loss is accepted", "keys=1"]));
    assert_eq!(metric(&app, "eventvault_data_keys_missing").await, 0);
    let (status, _) = readyz(&app).await;
    assert_eq!(status, StatusCode::OK);
    let env = app.stop().await;

    // The acceptance is recorded: the next start needs no flag for it.
    env.configure(|c| c.accept_missing_keys = false);
    let app = TestApp::start(env).await;
    assert_eq!(states(&app, "accounts-1").await[1].1, "lost");
    // A lost key is not a forget, but the subject can still be forgotten.
    forget_ok(&app, &app.token(), "cust-new").await;
    assert_eq!(states(&app, "accounts-1").await[1].1, "erased");
}

async fn a_key_deleted_behind_the_services_back_is_an_integrity_failure_not_erased(
    backend: Backend,
) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![
            deposit(Uuid::new_v4(), "cust-1", "10.00"),
            deposit(Uuid::new_v4(), "cust-2", "20.00"),
        ]),
    )
    .await;
    let (status, text) = app
        .request(reqwest::Method::PUT, "/streams/accounts-1/snapshot")
        .token(&app.token())
        .json(&json!({"version": 2, "subject": "cust-1", "state": {"holder": "Jane Roe"}}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // A new start: nothing cached; the check finds every key.
    let env = app.stop().await;
    let app = TestApp::start(env).await;
    let ks = keystore_db(&app.env).await;
    assert_eq!(key_ids_of(&ks, "cust-1").await.len(), 1);
    let deleted = exec(&ks, "delete from deks where subject = 'cust-1'")
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    ks.close().await;

    // Not `erased`: the subject was never forgotten.
    let r = app.read("accounts-1", "").await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let text = r.text().await.unwrap();
    let p: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(p["type"], "urn:eventvault:problem:key-missing", "{p}");
    assert!(
        !text.contains("erased") && !text.contains("Payer of"),
        "{text}"
    );
    let (status, text) = app.get("/streams/accounts-1/snapshot", &app.token()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
    assert!(
        text.contains("urn:eventvault:problem:key-missing"),
        "{text}"
    );
    assert!(!text.contains("Jane Roe"));
    assert!(log_has_line_with(&[
        "a data key the event store refers to is missing from the keystore",
        "position=1",
    ]));
    assert_eq!(metric(&app, "eventvault_data_key_missing_total").await, 2);
    // The subject is still active, and a reader without personal data
    // (who needs no key) is served.
    let (_, text) = app.get("/subjects/cust-1", &app.token()).await;
    assert!(text.contains("\"active\""), "{text}");
    let service = app.env.add_principal("ledger", &["service"]).await;
    let (status, text) = app.get("/streams/accounts-1/events", &service).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("\"redacted\""));
    // A forget makes it what a forget makes it.
    forget_ok(&app, &app.token(), "cust-1").await;
    assert_eq!(
        states(&app, "accounts-1").await,
        [
            ("cust-1".to_owned(), "erased".to_owned()),
            ("cust-2".to_owned(), "decrypted".to_owned())
        ]
    );
}
