//! What is on disk: no personal value in clear, ciphertexts bound to their
//! rows, an append-only events table, the master key's file and its check.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::common::{Backend, ServerProcess, TestApp, TestEnv, batch, command};
use eventvault::store::{Db, Purpose};

both_backends!(
    ciphertext_moved_to_another_row_is_refused,
    no_personal_value_is_stored_in_clear,
    the_events_table_is_append_only,
    master_key_file_is_created_owner_only,
    a_wrong_master_key_stops_the_start,
);

pub async fn events_db(env: &TestEnv) -> Db {
    Db::connect(&env.database_url, Purpose::Events, 2)
        .await
        .unwrap()
}

pub async fn keystore_db(env: &TestEnv) -> Db {
    Db::connect(&env.keystore_url, Purpose::Keystore, 2)
        .await
        .unwrap()
}

/// `(clear data, has a sealed blob)` of every event, in position order.
pub async fn stored_data(db: &Db) -> Vec<(String, bool)> {
    let rows: Vec<(String, Option<Vec<u8>>)> = match db {
        Db::Sqlite(p) => {
            sqlx::query_as("select data, sealed from events order by position")
                .fetch_all(p)
                .await
        }
        Db::Postgres(p) => {
            sqlx::query_as("select data, sealed from events order by position")
                .fetch_all(p)
                .await
        }
    }
    .unwrap();
    rows.into_iter().map(|(d, s)| (d, s.is_some())).collect()
}

pub async fn key_ids_of(keystore: &Db, subject: &str) -> Vec<String> {
    let q = "select key_id from deks where subject = $1";
    match keystore {
        Db::Sqlite(p) => sqlx::query_scalar(q).bind(subject).fetch_all(p).await,
        Db::Postgres(p) => sqlx::query_scalar(q).bind(subject).fetch_all(p).await,
    }
    .unwrap()
}

pub async fn distinct_key_ids(db: &Db) -> Vec<String> {
    let q = "select distinct key_id from events where key_id is not null";
    match db {
        Db::Sqlite(p) => sqlx::query_scalar(q).fetch_all(p).await,
        Db::Postgres(p) => sqlx::query_scalar(q).fetch_all(p).await,
    }
    .unwrap()
}

/// Executes `sql` directly, bypassing the service (as an attacker or a
/// careless operator with database access would).
pub async fn exec(db: &Db, sql: &'static str) -> Result<u64, sqlx::Error> {
    match db {
        Db::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|r| r.rows_affected()),
        Db::Postgres(p) => sqlx::query(sql).execute(p).await.map(|r| r.rows_affected()),
    }
}

/// Makes the keystore refuse to delete a data key (a trigger named
/// `no_delete` on `deks`, dropped to put things right), as a failing disk
/// would.
pub async fn refuse_key_deletions(ks: &Db) {
    let statements: &[&'static str] = match ks {
        Db::Sqlite(_) => &[
            "create trigger no_delete before delete on deks begin select raise(abort, 'disk on fire'); end",
        ],
        Db::Postgres(_) => &[
            "create function no_delete() returns trigger language plpgsql as $$ begin raise exception 'disk on fire'; end; $$",
            "create trigger no_delete before delete on deks for each row execute function no_delete()",
        ],
    };
    for sql in statements {
        exec(ks, sql).await.unwrap();
    }
}

async fn ciphertext_moved_to_another_row_is_refused(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let body = batch(vec![
        json!({"type": "MoneyDeposited", "subject": "alice", "data": {"account": "A", "amount": "1", "payer_name": "Alice Secret"}}),
        json!({"type": "MoneyDeposited", "subject": "alice", "data": {"account": "A", "amount": "2", "payer_name": "Other Name"}}),
    ]);
    app.append_ok("s", &body).await;
    let db = events_db(&app.env).await;
    // Same subject, same key, same stream and type: only the event id differs,
    // and that alone must make the moved blob fail.
    match &db {
        Db::Sqlite(_) => {
            exec(&db, "drop trigger events_no_update").await.unwrap();
        }
        Db::Postgres(_) => {
            exec(&db, "alter table events disable trigger events_append_only")
                .await
                .unwrap();
        }
    }
    let moved = exec(&db, "update events set sealed = (select sealed from events where position = 1) where position = 2").await.unwrap();
    assert_eq!(moved, 1);

    let r = app.read("s", "").await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let text = r.text().await.unwrap();
    assert!(text.contains("integrity"), "{text}");
    assert!(
        !text.contains("Alice Secret") && !text.contains("Other Name"),
        "{text}"
    );
    let r = app.log("after=0").await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // The untouched event still reads.
    let first: Value = app.read("s", "limit=1").await.json().await.unwrap();
    assert_eq!(first["events"][0]["data"]["payer_name"], "Alice Secret");
}

const SECRETS: [&str; 3] = [
    "Zebulon Quackenbush",
    "DE44500105175407324931",
    "zebulon@example.org",
];

async fn no_personal_value_is_stored_in_clear(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let events: Vec<Value> = (0..50)
        .map(|i| {
            json!({"type": if i % 2 == 0 { "MoneyDeposited" } else { "ContactChanged" }, "subject": format!("cust-{i}"),
                   "data": {"account": "ACC-9", "amount": "10.00", "payer_name": SECRETS[0], "payer_iban": SECRETS[1],
                            "email": SECRETS[2]}})
        })
        .collect();
    app.append_ok("accounts-9", &batch(events)).await;
    // The service still shows them to a reader.
    let log = serde_json::to_string(&app.whole_log().await).unwrap();
    assert!(SECRETS.iter().all(|s| log.contains(s)));
    let env = app.stop().await;

    let dumps: Vec<(String, Vec<u8>)> = match &env.backend {
        Backend::Sqlite => {
            let mut files = Vec::new();
            for sub in ["data", "keys"] {
                for f in std::fs::read_dir(env.dir.path().join(sub)).unwrap() {
                    let path = f.unwrap().path();
                    files.push((path.display().to_string(), std::fs::read(&path).unwrap()));
                }
            }
            assert!(files.iter().any(|(p, _)| p.ends_with("eventvault.db")));
            files
        }
        Backend::Postgres(_) => {
            let mut dumps = Vec::new();
            for url in [&env.database_url, &env.keystore_url] {
                let out = std::process::Command::new("pg_dump")
                    .arg("--data-only")
                    .arg(url)
                    .output()
                    .expect("pg_dump runs");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    String::from_utf8_lossy(&out.stdout).contains("ACC-9")
                        || url == &env.keystore_url
                );
                dumps.push((url.clone(), out.stdout));
            }
            dumps
        }
    };
    for (name, bytes) in dumps {
        for secret in SECRETS {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{secret:?} is stored in clear in {name}");
        }
    }
}

async fn the_events_table_is_append_only(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("s", &batch(vec![json!({"type": "T", "data": {"x": 1}})]))
        .await;
    let db = events_db(&app.env).await;
    // The audit log's triggers are exercised with its records (access-control work).
    for sql in ["update events set data = '{}'", "delete from events"] {
        let e = exec(&db, sql).await.expect_err(sql).to_string();
        assert!(e.contains("append-only"), "{sql}: {e}");
    }
    assert_eq!(app.whole_log().await.len(), 1);
}

async fn master_key_file_is_created_owner_only(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::spawn(&backend).await;
    let key = app.env.master_key_file();
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(key.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    if matches!(backend, Backend::Sqlite) {
        let db = app.env.dir.path().join("keys/keystore.db");
        assert_eq!(
            std::fs::metadata(db).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // A key file others can read is refused at the next start.
    let env = app.stop().await;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ServerProcess::start(&env)
        .await
        .err()
        .expect("start refused");
    assert!(err.contains("readable by others"), "{err}");
}

async fn a_wrong_master_key_stops_the_start(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok(
        "s",
        &batch(vec![
            json!({"type": "T", "subject": "c", "data": {"secret": "x"}}),
        ]),
    )
    .await;
    let env = app.stop().await;
    let original = std::fs::read_to_string(env.master_key_file()).unwrap();

    // Another key in the file.
    std::fs::write(
        env.master_key_file(),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    )
    .unwrap();
    let err = ServerProcess::start(&env)
        .await
        .err()
        .expect("start refused");
    assert!(err.contains("does not open this keystore"), "{err}");
    assert!(!err.contains("AAAAAAAA"), "the key is never printed: {err}");

    // Another key in the environment, with the right file present.
    std::fs::write(env.master_key_file(), &original).unwrap();
    let out = command(&env, &["serve", "--listen", "127.0.0.1:0"])
        .env(
            "EVENTVAULT_MASTER_KEY",
            "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=",
        )
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not open this keystore"), "{stderr}");

    // Not a key at all.
    std::fs::write(env.master_key_file(), "too short").unwrap();
    let err = ServerProcess::start(&env)
        .await
        .err()
        .expect("start refused");
    assert!(err.contains("does not hold 32 bytes"), "{err}");

    // The right key starts again and reads the data.
    std::fs::write(env.master_key_file(), &original).unwrap();
    let server = ServerProcess::start(&env)
        .await
        .expect("starts with the right key");
    let app = TestApp::client_for(env.clone(), server.base.clone());
    assert_eq!(app.whole_log().await[0]["data"]["secret"], "x");
}
