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
    let (status, text) = app.get("/audit/verify", &app.token()).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["ok"], true);
}

/// PostgreSQL only (a SQLite backup has no connection): `eventvault backup`
/// hands pg_dump the whole URL, so that TLS settings, `options` and the
/// other parameters apply to the backup's connection too, and the password
/// reaches pg_dump through its environment, never its command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_backup_connects_with_every_parameter_of_the_url() {
    crate::common::capture_logs();
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "7.50")]),
    )
    .await;
    let env = app.stop().await;
    let dir = env.dir.path().join("backups");
    let with = |params: &str| {
        let sep = if env.database_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{sep}{params}", env.database_url)
    };
    // A pg_dump in front of the real one that notes its arguments and the
    // password it was given, then runs the real one.
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("pg_dump"))
        .find(|p| p.is_file())
        .expect("pg_dump is installed");
    let shim = env.dir.path().join("bin");
    std::fs::create_dir_all(&shim).unwrap();
    let seen = env.dir.path().join("seen");
    std::fs::write(
        shim.join("pg_dump"),
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{seen}.argv'\nprintf '%s' \"$PGPASSWORD\" > '{seen}.password'\nexec '{real}' \"$@\"\n",
            seen = seen.display(),
            real = real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(shim.join("pg_dump"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::join_paths(
        std::iter::once(shim.clone())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let backup = |url: String, to: &str| {
        let to = dir.join(to);
        let path = path.clone();
        async move {
            let out = tokio::process::Command::new(crate::common::binary())
                .args(["backup", "events", "--to", to.to_str().unwrap()])
                .env("EVENTVAULT_DATABASE_URL", url)
                .env("PATH", path)
                .env_remove("PGPASSWORD")
                .output()
                .await
                .unwrap();
            (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                to,
            )
        }
    };

    // TLS that cannot be verified (a root certificate that is not there)
    // fails the way libpq fails, and leaves no file. Before, sslmode and
    // sslrootcert were dropped and the backup went through in whatever TLS
    // mode libpq chose by default.
    let missing_ca = env.dir.path().join("no-such-ca.pem");
    let (ok, out, to) = backup(
        with(&format!(
            "sslmode=verify-full&sslrootcert={}",
            missing_ca.display()
        )),
        "tls.bak",
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("pg_dump failed") && out.contains(&missing_ca.display().to_string()),
        "{out}"
    );
    assert!(!to.exists(), "a failed backup leaves no file");

    // `options` reaches the server: the session pg_dump opened has the
    // client encoding the URL asked for, and its dump says so.
    let password = format!("pw-{}", Uuid::new_v4().simple());
    crate::common::remember_secret(&password);
    let url = with("options=-c%20client_encoding%3DLATIN1&application_name=ev-backup").replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{password}@"),
        1,
    );
    assert!(
        url.contains(&password),
        "the test URL has a password: {url}"
    );
    let (ok, out, to) = backup(url, "options.bak").await;
    assert!(ok, "{out}");
    let restored = tokio::process::Command::new("pg_restore")
        .arg("--file=-")
        .arg(&to)
        .output()
        .await
        .unwrap();
    assert!(restored.status.success());
    assert!(
        String::from_utf8_lossy(&restored.stdout).contains("SET client_encoding = 'LATIN1';"),
        "the URL's options did not reach the server"
    );
    // The password went through the environment only.
    let argv = std::fs::read_to_string(format!("{}.argv", seen.display())).unwrap();
    assert!(!argv.contains(&password), "{argv}");
    assert!(argv.contains("application_name=ev-backup"), "{argv}");
    assert_eq!(
        std::fs::read_to_string(format!("{}.password", seen.display())).unwrap(),
        password
    );
    assert!(!out.contains(&password), "{out}");
    crate::common::assert_logs_hold_no_secret();
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
