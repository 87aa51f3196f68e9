//! Backups: `eventvault backup events|keystore` write consistent copies,
//! taken while the service runs, and `backup all` both, the event store
//! first; a service started on the restored copies (with the same master
//! key) reads what was there, forgets included.

use serde_json::Value;
use uuid::Uuid;

use crate::both_backends;
use crate::common::{
    Backend, TestApp, TestEnv, batch, deposit, pg_admin_url, run, run_ok, with_database,
};

both_backends!(
    a_restored_backup_reads_what_was_backed_up,
    backup_all_copies_the_event_store_then_the_keystore,
);

async fn a_restored_backup_reads_what_was_backed_up(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    for s in ["cust-1", "cust-2", "cust-3"] {
        app.append_ok(
            "accounts-1",
            &batch(vec![deposit(Uuid::new_v4(), s, "7.50")]),
        )
        .await;
    }
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-2").await;
    // Taken while the service runs.
    let dir = app.env.dir.path().join("backups");
    for (what, file) in [("events", "events.bak"), ("keystore", "keystore.bak")] {
        let to = dir.join(file);
        let out = run_ok(&app.env, &["backup", what, "--to", to.to_str().unwrap()]).await;
        assert!(out.contains("a consistent copy"), "{out}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{what} backup is private");
        // A backup never overwrites.
        let (again, _, _) = run(&app.env, &["backup", what, "--to", to.to_str().unwrap()]).await;
        assert!(!again, "a backup never overwrites");
    }
    // Written after the backup: not in it.
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-4", "1.00")]),
    )
    .await;
    let env = app.stop().await;

    // Restore into new databases, with the same master key and principals.
    let restored = restore(&env, &dir.join("events.bak"), &dir.join("keystore.bak")).await;
    let app = TestApp::start(restored).await;
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    let states: Vec<(&str, &str)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["subject"].as_str().unwrap(),
                e["personal_data"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("cust-1", "decrypted"),
            ("cust-2", "erased"),
            ("cust-3", "decrypted")
        ]
    );
    let (status, text) = crate::access::get(&app, "/audit/verify", &app.token()).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["ok"], true);
}

/// New databases holding the copies `events` and `keystore` of `env`'s,
/// with its master key and admin token.
async fn restore(
    env: &TestEnv,
    events: &std::path::Path,
    keystore: &std::path::Path,
) -> std::sync::Arc<TestEnv> {
    let backend = env.backend.clone();
    let restored = TestEnv::new(&backend).await;
    std::fs::create_dir_all(restored.master_key_file().parent().unwrap()).unwrap();
    std::fs::copy(env.master_key_file(), restored.master_key_file()).unwrap();
    for (file, url) in [
        (events, &restored.database_url),
        (keystore, &restored.keystore_url),
    ] {
        match &backend {
            Backend::Sqlite => {
                let target = url.strip_prefix("sqlite://").unwrap();
                std::fs::create_dir_all(std::path::Path::new(target).parent().unwrap()).unwrap();
                std::fs::copy(file, target).unwrap();
            }
            Backend::Postgres(_) => {
                let db = url.rsplit('/').next().unwrap();
                let out = tokio::process::Command::new("pg_restore")
                    .arg("--no-owner")
                    .arg("--dbname")
                    .arg(with_database(&pg_admin_url(), db))
                    .arg(file)
                    .output()
                    .await
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    restored.set_token(&env.token());
    restored
}

async fn backup_all_copies_the_event_store_then_the_keystore(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    for s in ["cust-1", "cust-2"] {
        app.append_ok(
            "accounts-1",
            &batch(vec![deposit(Uuid::new_v4(), s, "7.50")]),
        )
        .await;
    }
    let dir = app.env.dir.path().join("backups");
    let (events, keystore) = (dir.join("events.bak"), dir.join("keystore.bak"));
    let args = [
        "backup",
        "all",
        "--events-to",
        events.to_str().unwrap(),
        "--keystore-to",
        keystore.to_str().unwrap(),
    ];
    // A file in the way: nothing is written.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&keystore, b"in the way").unwrap();
    let (ok, _, err) = run(&app.env, &args).await;
    assert!(!ok, "a backup never overwrites");
    assert!(err.contains("exists"), "{err}");
    assert!(!events.exists(), "the event store was not copied either");
    std::fs::remove_file(&keystore).unwrap();
    // Taken while the service runs, the event store first.
    let out = run_ok(&app.env, &args).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].ends_with("a consistent copy of the event store"),
        "{out}"
    );
    assert!(
        lines[1].ends_with("a consistent copy of the keystore"),
        "{out}"
    );
    for f in [&events, &keystore] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is private", f.display());
    }
    let env = app.stop().await;
    // Restored, the pair has every key the events refer to: ready at once.
    let app = TestApp::start(restore(&env, &events, &keystore).await).await;
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    assert!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["personal_data"] == "decrypted"),
        "{page}"
    );
}
