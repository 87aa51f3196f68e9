//! Secrets on the host: `--help` never shows a secret taken from the
//! environment, and every file eventvault writes is owner-only from its
//! first byte, in directories of its own that are owner-only too.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv, batch, binary, deposit, run_ok};

both_backends!(every_file_and_directory_is_owner_only);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_never_shows_a_secret_from_the_environment() {
    let secrets = [
        (
            "EVENTVAULT_DATABASE_URL",
            "postgres://ev:db-hunter2@db.example/events",
            "db-hunter2",
        ),
        (
            "EVENTVAULT_KEYSTORE_URL",
            "postgres://ev:ks-hunter2@db.example/keys",
            "ks-hunter2",
        ),
        (
            "EVENTVAULT_NATS_URL",
            "nats://relay:nats-hunter2@nats.example:4222",
            "nats-hunter2",
        ),
        (
            "EVENTVAULT_JWT_JWKS_URL",
            "https://idp:jwks-hunter2@idp.example/certs",
            "jwks-hunter2",
        ),
    ];
    // The example read model's database URL too.
    let mut cmd = tokio::process::Command::new(crate::common::tool_binary("eventvault-balances"));
    let out = cmd
        .arg("--help")
        .env(
            "BALANCES_DATABASE_URL",
            "postgres://rm:rm-hunter2@db.example/balances",
        )
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[env: BALANCES_DATABASE_URL]"), "{help}");
    assert!(!help.contains("rm-hunter2"), "{help}");
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["backup", "events", "--help"],
        &["principal", "add", "--help"],
        &["audit", "verify", "--help"],
        &["keys", "status", "--help"],
    ] {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(args);
        for (name, value, _) in secrets {
            cmd.env(name, value);
        }
        let out = cmd.output().await.unwrap();
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("[env: EVENTVAULT_DATABASE_URL]"),
            "{args:?}: the variable is still named: {help}"
        );
        for (name, _, password) in secrets {
            assert!(
                !help.contains(password),
                "{args:?} shows the value of {name}: {help}"
            );
        }
    }
}

/// Every directory under `root` (itself excluded) whose mode is not 0700,
/// and every file whose mode is not 0600, with its mode in octal.
fn not_owner_only(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                if mode != 0o700 {
                    out.push((path.clone(), format!("{mode:o}")));
                }
                dirs.push(path);
            } else if mode != 0o600 {
                out.push((path, format!("{mode:o}")));
            }
        }
    }
    out
}

async fn every_file_and_directory_is_owner_only(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let root = env.dir.path().to_owned();
    // `keys/` (and `data/` on SQLite) exist already, made by hand under a
    // usual umask: readable and searchable by everyone.
    let own_dirs: &[&str] = match backend {
        Backend::Sqlite => &["keys", "data"],
        Backend::Postgres(_) => &["keys"],
    };
    for d in own_dirs {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let app = TestApp::start(env).await;
    assert_eq!(not_owner_only(&root), vec![], "after the start");
    if let Backend::Sqlite = backend {
        // The write-ahead logs exist by now: they are owner-only because
        // the database file was, before SQLite created them.
        for f in ["data/eventvault.db-wal", "keys/keystore.db-wal"] {
            assert!(root.join(f).is_file(), "{f}");
        }
    }

    // Writes to both stores: events, new data keys, a forget (which
    // deletes keys and checkpoints the keystore), then backups of both.
    for s in ["cust-1", "cust-2"] {
        app.append_ok(
            "accounts-1",
            &batch(vec![deposit(Uuid::new_v4(), s, "1.00")]),
        )
        .await;
    }
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-1").await;
    for (what, file) in [("events", "events.bak"), ("keystore", "keystore.bak")] {
        let to = root.join("backups").join(file);
        run_ok(&app.env, &["backup", what, "--to", to.to_str().unwrap()]).await;
        assert!(to.is_file());
    }
    assert_eq!(not_owner_only(&root), vec![], "after writes");

    let env = app.stop().await;
    assert_eq!(not_owner_only(&root), vec![], "after the stop");
    // A database file left open to others (an older version made it so) is
    // made owner-only, with its write-ahead log, before it is opened again.
    if let Backend::Sqlite = backend {
        for f in ["data/eventvault.db", "keys/keystore.db"] {
            std::fs::set_permissions(root.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let app = TestApp::start(env).await;
        app.append_ok(
            "accounts-1",
            &batch(vec![deposit(Uuid::new_v4(), "cust-3", "1.00")]),
        )
        .await;
        assert_eq!(not_owner_only(&root), vec![], "after a restart");
        app.stop().await;
    }
}
