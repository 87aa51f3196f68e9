//! Master key rotation: every data key re-wrapped under a new master key,
//! events untouched, resumable after an interruption, the old key retired.

use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::at_rest::{exec, keystore_db};
use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv, batch, deposit, run};
use eventvault::store::Db;

both_backends!(
    rotation_rewraps_every_key_and_resumes_after_an_interruption,
    a_key_is_retired_before_its_encryption_limit,
);

async fn rotation_rewraps_every_key_and_resumes_after_an_interruption(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    for s in ["cust-a", "cust-b", "cust-c"] {
        app.append_ok(
            "accounts-1",
            &batch(vec![deposit(Uuid::new_v4(), s, "1.00")]),
        )
        .await;
    }
    let env = app.stop().await;
    let key_file = env.master_key_file();
    let old_key = std::fs::read_to_string(&key_file).unwrap();
    let (ok, status, _) = run(&env, &["keys", "status"]).await;
    assert!(ok);
    let old_id = status.split('\t').next().unwrap().to_owned();
    assert!(status.contains("3 data keys (configured)"), "{status}");

    // The second re-wrap fails: the rotation stops half-way.
    let ks = keystore_db(&env).await;
    match &ks {
        Db::Sqlite(_) => exec(
            &ks,
            "create trigger interrupt before update on deks
             when (select count(*) from deks where kek_id = new.kek_id) >= 1
             begin select raise(abort, 'interrupted'); end",
        )
        .await
        .unwrap(),
        Db::Postgres(_) => {
            exec(
                &ks,
                "create function interrupt() returns trigger language plpgsql as $$
                 begin
                   if (select count(*) from deks where kek_id = new.kek_id) >= 1 then
                     raise exception 'interrupted';
                   end if;
                   return new;
                 end; $$",
            )
            .await
            .unwrap();
            exec(
                &ks,
                "create trigger interrupt before update on deks for each row execute function interrupt()",
            )
            .await
            .unwrap()
        }
    };
    let (ok, _, err) = run(&env, &["keys", "rotate-kek", "--batch-size", "1"]).await;
    assert!(!ok, "{err}");
    assert!(
        err.contains("re-wrapping data keys: 1/3"),
        "progress is shown: {err}"
    );
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), old_key);
    let next = eventvault::keys::next_master_key_path(&key_file);
    assert!(next.exists());
    // The service refuses to start on a half-rotated keystore.
    let e = match eventvault::app::Application::build(&env.config()).await {
        Ok(_) => panic!("must not start mid-rotation"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("rotation is unfinished"), "{e}");

    match &ks {
        Db::Sqlite(_) => exec(&ks, "drop trigger interrupt").await.unwrap(),
        Db::Postgres(_) => exec(&ks, "drop trigger interrupt on deks").await.unwrap(),
    };
    ks.close().await;
    let (ok, out, err) = run(&env, &["keys", "rotate-kek", "--batch-size", "1"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("2 data keys re-wrapped"), "the rest: {out}");
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), old_key);
    assert!(!next.exists());
    let retired = format!("{}.retired-{old_id}", key_file.display());
    assert_eq!(std::fs::read_to_string(&retired).unwrap(), old_key);
    let (_, status, _) = run(&env, &["keys", "status"]).await;
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(
        !status.contains(&old_id) && status.contains("3 data keys (configured)"),
        "{status}"
    );

    // Events untouched, still readable; new subjects get keys under the new key.
    let app = TestApp::start(env).await;
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e["personal_data"] == "decrypted"));
    let r = app
        .append(
            "accounts-1",
            None,
            &batch(vec![deposit(Uuid::new_v4(), "cust-d", "2.00")]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let env = app.stop().await;
    let (_, status, _) = run(&env, &["keys", "status"]).await;
    assert!(status.contains("4 data keys (configured)"), "{status}");
}

async fn a_key_is_retired_before_its_encryption_limit(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.dek_max_encryptions = 3);
    let app = TestApp::start(env).await;
    for i in 0..8 {
        app.append_ok(
            "accounts-1",
            &batch(vec![deposit(Uuid::new_v4(), "cust-r", &format!("{i}.00"))]),
        )
        .await;
    }
    app.append_ok(
        "accounts-1",
        &batch(vec![
            deposit(Uuid::new_v4(), "cust-r", "8.00"),
            deposit(Uuid::new_v4(), "cust-r", "9.00"),
        ]),
    )
    .await;
    let ks = keystore_db(&app.env).await;
    let q = "select encryptions, retired_at is null from deks where subject = $1";
    let keys: Vec<(i64, bool)> = match &ks {
        Db::Sqlite(p) => sqlx::query_as(q).bind("cust-r").fetch_all(p).await,
        Db::Postgres(p) => sqlx::query_as(q).bind("cust-r").fetch_all(p).await,
    }
    .unwrap();
    assert!(keys.len() >= 4, "10 events, at most 3 per key: {keys:?}");
    assert!(keys.iter().all(|(n, _)| *n <= 3), "{keys:?}");
    assert_eq!(
        keys.iter().filter(|(_, active)| *active).count(),
        1,
        "{keys:?}"
    );
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 10);
    assert!(events.iter().all(|e| e["personal_data"] == "decrypted"));
    // A forget destroys every key of the subject, retired ones too.
    let r = app
        .client
        .post(format!("{}/subjects/cust-r/forget", app.base))
        .bearer_auth(app.token())
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["keys_destroyed"], keys.len());
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    assert!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["personal_data"] == "erased")
    );
}
