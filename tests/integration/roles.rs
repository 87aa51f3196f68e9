//! Least privilege on PostgreSQL: `eventvault migrate` runs the migrations
//! as the owner and grants a serving role what eventvault serves with, and
//! nothing more: that role is refused every UPDATE, DELETE and TRUNCATE of
//! history (events, the audit log, the forget ledger), cannot remove the
//! triggers that guard it, and still runs the whole service. As that role,
//! `serve` checks the migrations instead of running them, and says what to
//! do when they are missing. (SQLite has no roles: its files are the
//! boundary, 0600 in 0700 directories; `migrate` works on both.)

use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection as _;
use uuid::Uuid;

use crate::at_rest::{events_db, exec, key_ids_of, keystore_db};
use crate::common::{
    Backend, TestApp, TestEnv, batch, deposit, log_has_line_with, pg_admin_url, run, run_ok,
    with_database, with_user,
};
use crate::relay::{Broker, wait_for_checkpoint};
use crate::subscribe::Subscriber;
use crate::{both_backends, postgres_only};

both_backends!(migrate_prepares_both_databases_and_the_first_principal);

// Roles are PostgreSQL's.
postgres_only!(
    the_serving_role_may_not_rewrite_history_yet_serves_everything,
    as_the_serving_role_serve_checks_the_migrations_instead_of_running_them,
);

/// A login role of this test's own (roles are cluster-wide: the name is
/// unique, and the role is dropped afterwards, with its privileges in the
/// test's databases).
struct TestRole {
    name: String,
    databases: Vec<String>,
}

impl TestRole {
    async fn create(env: &TestEnv) -> TestRole {
        let prefix = std::env::var("EVENTVAULT_TEST_DB_PREFIX").unwrap_or_else(|_| "evtest".into());
        let id = Uuid::new_v4().simple().to_string();
        let name = format!("{prefix}_{}_app", &id[..12]);
        let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("create role \"{name}\" login")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let db_name = |url: &str| url.rsplit('/').next().unwrap().to_owned();
        TestRole {
            name,
            databases: vec![db_name(&env.database_url), db_name(&env.keystore_url)],
        }
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let (name, dbs) = (self.name.clone(), self.databases.clone());
        // Drop runs outside async context: a small runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = pg_admin_url();
                for db in dbs {
                    if let Ok(mut c) =
                        sqlx::PgConnection::connect(&with_database(&admin, &db)).await
                    {
                        let sql = format!("drop owned by \"{name}\"");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
                        let _ = c.close().await;
                    }
                }
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let sql = format!("drop role if exists \"{name}\"");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
                }
            })
        })
        .join();
    }
}

/// The SQLSTATE with which `sql`, run on `url`, is refused.
async fn refusal(url: &str, sql: &str) -> String {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let err = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .expect_err(sql);
    let _ = conn.close().await;
    err.as_database_error()
        .and_then(|d| d.code().map(|c| c.into_owned()))
        .unwrap_or_else(|| panic!("{sql}: {err}"))
}

/// `eventvault migrate --grant-to ROLE` on `env`: the admin token it
/// printed on the first run becomes the test's token.
async fn migrate(env: &TestEnv, role: &str) {
    let out = run_ok(env, &["migrate", "--grant-to", role]).await;
    assert!(out.contains(&format!("granted {role:?}")), "{out}");
    let token = out.lines().last().unwrap();
    assert!(token.starts_with("evt_"), "{out}");
    env.set_token(token);
}

async fn the_serving_role_may_not_rewrite_history_yet_serves_everything(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let role = TestRole::create(&env).await;
    migrate(&env, &role.name).await;
    // Something in every table, as the owner would have it.
    let app = TestApp::start(env.clone()).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-0", "1.00")]),
    )
    .await;
    crate::forget::forget_ok(&app, &app.token(), "cust-0").await;
    app.stop().await;

    let events = with_user(&env.database_url, &role.name);
    for (table, column) in [
        ("events", "data"),
        ("audit_log", "action"),
        ("forgotten_subjects", "reason"),
    ] {
        for sql in [
            format!("update {table} set {column} = {column}"),
            format!("delete from {table}"),
            format!("truncate {table}"),
        ] {
            assert_eq!(refusal(&events, &sql).await, "42501", "{sql}");
        }
    }
    // Nor can it take away what guards them, or touch what it only reads.
    for sql in [
        "alter table events disable trigger events_append_only",
        "drop trigger audit_log_append_only on audit_log",
        "drop trigger forgotten_subjects_append_only on forgotten_subjects",
        "drop table events",
        "delete from snapshots",
        "truncate snapshots",
        "delete from destroyed_keys",
        "insert into principals (name, roles, token_hash, created_at) values ('x', '[\"admin\"]', 'x', 0)",
        "delete from principals",
        "create table stash (x int)",
    ] {
        assert_eq!(refusal(&events, sql).await, "42501", "{sql}");
    }
    let keystore = with_user(&env.keystore_url, &role.name);
    for sql in [
        "truncate deks",
        "drop table deks",
        "delete from keks",
        "alter table deks add column x int",
    ] {
        assert_eq!(refusal(&keystore, sql).await, "42501", "{sql}");
    }

    // The whole service, as that role: appends, reads, snapshots, forgets,
    // subscriptions, the relay and its checkpoint.
    let broker = Broker::new().await;
    env.set_nats(Some(broker.target.clone()));
    env.serve_as(Some(&role.name));
    let app = TestApp::start(env.clone()).await;
    assert!(
        log_has_line_with(&["may not VACUUM deks"]),
        "the role's missing VACUUM is said at start"
    );
    // It is that role the service connects as, to both databases.
    let mut admin = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
    let users: Vec<String> = sqlx::query_scalar(
        "select distinct usename::text from pg_stat_activity
         where application_name = 'eventvault' and datname = any($1)",
    )
    .bind(&role.databases)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    assert_eq!(users, std::slice::from_ref(&role.name));
    let mut sub = Subscriber::open(&app, "/events/subscribe?after=0", &app.token(), &[]).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![
            deposit(Uuid::new_v4(), "cust-1", "10.00"),
            deposit(Uuid::new_v4(), "cust-2", "20.00"),
        ]),
    )
    .await;
    let delivered = sub.take(4).await;
    assert_eq!(delivered[3].1["subject"], "cust-2", "{delivered:?}");
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][1]["personal_data"], "decrypted");
    // A snapshot of a stream about cust-1 alone (one of accounts-1 would be
    // sealed for cust-0 too, who is forgotten: refused).
    app.append_ok(
        "accounts-2",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "10.00")]),
    )
    .await;
    let (status, text) = app
        .request(Method::PUT, "/streams/accounts-2/snapshot")
        .token(&app.token())
        .json(&json!({"version": 1, "subject": "cust-1", "state": {"balance": "10.00"}}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = app.get("/streams/accounts-2/snapshot", &app.token()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("\"decrypted\""), "{text}");
    let body = crate::forget::forget_ok(&app, &app.token(), "cust-1").await;
    assert_eq!(body["keys_destroyed"], 1);
    let ks = keystore_db(&env).await;
    assert!(key_ids_of(&ks, "cust-1").await.is_empty());
    ks.close().await;
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][1]["personal_data"], "erased");
    // Published to the broker, and the checkpoint moved past it: the
    // first forget, the two deposits, the one of accounts-2 and the second
    // forget.
    broker.wait_until_stored(6).await;
    let db = events_db(&env).await;
    wait_for_checkpoint(&db, &broker.target.stream, 6).await;
    db.close().await;
    let records = app.audit_records("action=subject.forget").await;
    assert_eq!(records.len(), 2);
    let (status, text) = app.get("/audit/verify", &app.token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["ok"], true);
    drop(sub);
    app.stop().await;
    let _ = (role, env);
}

async fn as_the_serving_role_serve_checks_the_migrations_instead_of_running_them(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let role = TestRole::create(&env).await;
    let owner: Arc<TestEnv> = env.clone();
    // Never migrated: the role may not create the schema, and says so.
    env.serve_as(Some(&role.name));
    let err = eventvault::app::Application::build(&env.config())
        .await
        .err()
        .expect("no start on an empty database");
    let text = err.to_string();
    assert!(
        text.contains("may not migrate the event store schema")
            && text.contains("eventvault migrate"),
        "{text}"
    );

    // Migrated by the owner: serve as the role needs no migration to run.
    env.serve_as(None);
    migrate(&owner, &role.name).await;
    // One migration is missing (the schema is from an older eventvault):
    // the role does not run it; it names it and what to do.
    let db = events_db(&owner).await;
    exec(&db, "delete from _sqlx_migrations where version = 6")
        .await
        .unwrap();
    db.close().await;
    env.serve_as(Some(&role.name));
    let err = eventvault::app::Application::build(&env.config())
        .await
        .err()
        .expect("no start on a schema without every migration");
    let text = err.to_string();
    assert!(
        text.contains("migration(s) 6 (key registry and forget progress) not applied")
            && text.contains(&format!("database role {:?} does not own it", role.name))
            && text.contains("run `eventvault migrate` as the owner"),
        "{text}"
    );
    // The binary says the same and exits non-zero.
    let out = tokio::process::Command::new(crate::common::binary())
        .arg("--database-url")
        .arg(with_user(&env.database_url, &role.name))
        .arg("--keystore-url")
        .arg(with_user(&env.keystore_url, &role.name))
        .arg("--master-key-file")
        .arg(env.master_key_file())
        .arg("--policies-dir")
        .arg(crate::common::policies_dir())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("EVENTVAULT_MASTER_KEY")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not applied"), "{stderr}");
    let _ = role;
}

async fn migrate_prepares_both_databases_and_the_first_principal(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let out = run_ok(&env, &["migrate"]).await;
    assert!(
        out.contains("migrated the event store and the keystore"),
        "{out}"
    );
    let token = out.lines().last().unwrap();
    assert!(token.starts_with("evt_"), "the admin token, last: {out}");
    env.set_token(token);
    // Again: nothing to do, no second admin.
    let again = run_ok(&env, &["migrate"]).await;
    assert!(!again.contains("evt_"), "{again}");
    // `serve` finds the schema and the principal made.
    let app = TestApp::start(env.clone()).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "1.00")]),
    )
    .await;
    app.stop().await;
    // Roles: PostgreSQL's alone, and only existing ones.
    let (ok, _, err) = run(&env, &["migrate", "--grant-to", "no_such_role_at_all"]).await;
    assert!(!ok);
    match backend {
        Backend::Sqlite => assert!(err.contains("SQLite has no database roles"), "{err}"),
        Backend::Postgres(_) => assert!(err.contains("does not exist"), "{err}"),
    }
}
