//! The key caches under faults and forgets: a keystore that refuses
//! connections or is locked by someone else (served from the cache where
//! the key is held, 503 where it is not); a forget that a fetch in flight
//! must not undo, here or in another process; a forget made elsewhere while
//! a process could not hear of it.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::common::{Backend, TestApp, TestEnv, batch, deposit, pg_admin_url};
use crate::forget::forget_ok;
use crate::{both_backends, postgres_only};
use eventvault::keys::{FetchHold, FollowerEvents};

both_backends!(
    a_keystore_outage_is_served_from_the_key_cache,
    a_key_fetched_before_a_forget_is_not_cached_after_it,
);

// Other processes hear of a forget through the PostgreSQL keystore's
// LISTEN/NOTIFY; a SQLite keystore belongs to one process, which evicts
// its own keys as it forgets (several processes on one SQLite file are
// not a supported deployment, see SECURITY.md).
postgres_only!(
    a_forget_in_another_process_keeps_a_fetch_in_flight_from_caching_the_key,
    a_forget_missed_while_not_listening_is_made_up_from_the_ledger,
);

/// How long requests wait for a store that does not answer, in these tests.
const STORE_TIMEOUT: Duration = Duration::from_secs(1);

/// A keystore that the service cannot use, until it is put right.
pub enum Outage {
    /// The keystore's PostgreSQL database refuses new connections and its
    /// sessions were ended: nothing can be read or written.
    Postgres { admin: String, database: String },
    /// Another connection holds the SQLite keystore's write lock (as a
    /// long-running `sqlite3` session or a tool would): nothing can be
    /// written. Readers of a WAL database are never stopped by a lock (nor
    /// can another connection take the file away from the pool's open ones:
    /// an exclusive lock is refused while they hold the WAL index).
    Sqlite(sqlx::SqliteConnection),
}

impl Outage {
    /// Takes the keystore of `env` away from the service.
    pub async fn begin(env: &TestEnv) -> Outage {
        use sqlx::Connection as _;
        match &env.backend {
            Backend::Postgres(admin) => {
                let database = env.keystore_url.rsplit('/').next().unwrap().to_owned();
                let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "alter database \"{database}\" allow_connections false"
                )))
                .execute(&mut conn)
                .await
                .unwrap();
                let ended: Vec<bool> = sqlx::query_scalar(
                    "select pg_terminate_backend(pid) from pg_stat_activity
                     where datname = $1 and pid <> pg_backend_pid()",
                )
                .bind(&database)
                .fetch_all(&mut conn)
                .await
                .unwrap();
                assert!(!ended.is_empty(), "the service had keystore sessions");
                let _ = conn.close().await;
                Outage::Postgres {
                    admin: admin.clone(),
                    database,
                }
            }
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&env.keystore_url)
                    .await
                    .unwrap();
                sqlx::query("begin immediate")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Outage::Sqlite(conn)
            }
        }
    }

    /// Whether reads of the keystore fail too (not only writes).
    pub fn refuses_reads(&self) -> bool {
        matches!(self, Outage::Postgres { .. })
    }

    /// Gives the keystore back.
    pub async fn end(self) {
        use sqlx::Connection as _;
        match self {
            Outage::Postgres { admin, database } => {
                let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "alter database \"{database}\" allow_connections true"
                )))
                .execute(&mut conn)
                .await
                .unwrap();
                let _ = conn.close().await;
            }
            Outage::Sqlite(mut conn) => {
                sqlx::query("rollback").execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
        }
    }
}

/// What a request got: status, `Retry-After`, body, and how long it took.
struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    text: String,
    took: Duration,
}

async fn answer(request: impl Future<Output = reqwest::Response>) -> Answer {
    let started = Instant::now();
    let r = request.await;
    Answer {
        status: r.status(),
        retry_after: r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned()),
        took: started.elapsed(),
        text: r.text().await.unwrap(),
    }
}

/// Insists on a prompt 503 `unavailable` with `Retry-After`: within the
/// store timeout and a margin for the rest of the request.
#[track_caller]
fn assert_unavailable(what: &str, a: &Answer) {
    assert_eq!(
        a.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {}",
        a.text
    );
    assert!(
        a.text.contains("urn:eventvault:problem:unavailable"),
        "{what}: {}",
        a.text
    );
    assert_eq!(a.retry_after.as_deref(), Some("1"), "{what}: Retry-After");
    assert!(
        a.took < STORE_TIMEOUT + Duration::from_secs(2),
        "{what} took {:?} with a store timeout of {STORE_TIMEOUT:?}",
        a.took
    );
}

fn one_deposit(subject: &str, amount: &str) -> Value {
    batch(vec![deposit(Uuid::new_v4(), subject, amount)])
}

async fn a_keystore_outage_is_served_from_the_key_cache(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.store_timeout = STORE_TIMEOUT);
    let app = TestApp::start(env).await;
    app.append_ok("accounts-2", &one_deposit("cust-2", "2.00"))
        .await;
    // A new start: nothing cached. cust-1's key is made (and cached, with
    // encryptions reserved) now; cust-2's stays in the keystore alone.
    let app = TestApp::start(app.stop().await).await;
    app.append_ok("accounts-1", &one_deposit("cust-1", "1.00"))
        .await;

    let mut follower = app.progress().key_cache.events();
    let outage = Outage::begin(&app.env).await;
    if outage.refuses_reads() {
        // PostgreSQL: the eviction follower has lost its LISTEN with the
        // rest; the caches must outlive it.
        follower_reaches(&mut follower, |e| !e.listening).await;
    }
    // The cached subject is read and appended to as usual.
    let a = answer(app.read("accounts-1", "")).await;
    assert_eq!(a.status, StatusCode::OK, "cached read: {}", a.text);
    let page: Value = serde_json::from_str(&a.text).unwrap();
    assert_eq!(
        page["events"][0]["personal_data"], "decrypted",
        "{}",
        a.text
    );
    let a = answer(app.append("accounts-1", None, &one_deposit("cust-1", "1.50"))).await;
    assert_eq!(a.status, StatusCode::CREATED, "cached append: {}", a.text);
    // What needs the keystore is a prompt 503, never a 500: a subject whose
    // key is not cached (its key must be read and encryptions reserved), a
    // new subject (its key must be stored).
    let a = answer(app.read("accounts-2", "")).await;
    if outage.refuses_reads() {
        assert_unavailable("uncached read", &a);
    } else {
        // SQLite: a locked keystore can still be read.
        assert_eq!(a.status, StatusCode::OK, "uncached read: {}", a.text);
        assert!(a.text.contains("\"decrypted\""), "{}", a.text);
    }
    for subject in ["cust-2", "cust-3"] {
        let a = answer(app.append("accounts-3", None, &one_deposit(subject, "3.00"))).await;
        assert_unavailable(subject, &a);
    }
    // The refusals were audited, as errors (a refusal at the request's
    // deadline is recorded once its work has given up: waited for).
    let mut head = app.progress().audit_head;
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            head.borrow_and_update();
            let r = app
                .audit_records("action=stream.append&outcome=error")
                .await;
            if r.len() >= 2 {
                return r;
            }
            head.changed().await.unwrap();
        }
    })
    .await
    .expect("both refusals are recorded");
    assert_eq!(refused.len(), 2, "{refused:?}");

    // Back: normal service, without a restart.
    let resyncs = follower.borrow_and_update().resyncs;
    let reads_refused = outage.refuses_reads();
    outage.end().await;
    if reads_refused {
        follower_reaches(&mut follower, |e| e.listening && e.resyncs > resyncs).await;
    }
    let page: Value = app.read("accounts-2", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "decrypted", "{page}");
    for subject in ["cust-2", "cust-3"] {
        app.append_ok("accounts-3", &one_deposit(subject, "3.00"))
            .await;
    }
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    assert_eq!(page["current_version"], 2);
    let page: Value = app.read("accounts-3", "").await.json().await.unwrap();
    assert_eq!(page["current_version"], 2, "nothing of the refused appends");
}

/// How long a test waits for what must happen at once.
const PATIENCE: Duration = Duration::from_secs(20);

/// Sends a read of `stream` and returns it, not yet answered, once the
/// service's fetch of the key it needs has read the keystore and is held
/// by `hold` (the subject must be `subject`).
async fn read_held_at_fetch<'a>(
    app: &'a TestApp,
    stream: &'a str,
    hold: &mut FetchHold,
    subject: &str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let request = app
        .client
        .get(format!("{}/streams/{stream}/events", app.base))
        .bearer_auth(app.token());
    let read = tokio::spawn(async move { request.send().await.expect("request") });
    let fetched = tokio::time::timeout(PATIENCE, hold.fetched())
        .await
        .expect("the read fetched a key")
        .expect("the service runs");
    assert_eq!(fetched, subject);
    read
}

/// Waits until the eviction follower's events satisfy `what`.
#[track_caller]
fn follower_reaches<'a>(
    events: &'a mut tokio::sync::watch::Receiver<FollowerEvents>,
    what: impl FnMut(&FollowerEvents) -> bool + 'a,
) -> impl Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        tokio::time::timeout(PATIENCE, events.wait_for(what))
            .await
            .unwrap_or_else(|_| panic!("at {caller}: the eviction follower did not get there"))
            .expect("the application runs");
    }
}

async fn a_key_fetched_before_a_forget_is_not_cached_after_it(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    app.append_ok("accounts-1", &one_deposit("cust-1", "1.00"))
        .await;
    // A new start: the read below must fetch cust-1's key.
    let app = TestApp::start(app.stop().await).await;
    let probe = app.progress().key_cache;
    let mut hold = probe.hold_fetches();
    // The read has read the wrapped key; the forget deletes it and evicts;
    // only then may the read go on to cache what it read.
    let read = read_held_at_fetch(&app, "accounts-1", &mut hold, "cust-1").await;
    forget_ok(&app, &app.token(), "cust-1").await;
    hold.release();
    let r = read.await.unwrap();
    // It began before the forget: whatever it shows is what was true then.
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        !probe.holds_key_of("cust-1"),
        "a key fetched before its forget is in the cache after it"
    );
    let page: Value = app.read("accounts-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "erased");
}

async fn a_forget_in_another_process_keeps_a_fetch_in_flight_from_caching_the_key(
    backend: Backend,
) {
    let here = TestApp::spawn(&backend).await;
    here.append_ok("accounts-1", &one_deposit("cust-1", "1.00"))
        .await;
    let there = TestApp::start(here.env.clone()).await;
    let probe = there.progress().key_cache;
    let mut events = probe.events();
    follower_reaches(&mut events, |e| e.listening).await;
    let mut hold = probe.hold_fetches();
    let read = read_held_at_fetch(&there, "accounts-1", &mut hold, "cust-1").await;
    // Forgotten here; the other process hears the notice while its fetch is
    // held, and only then goes on.
    let heard = events.borrow_and_update().notices;
    forget_ok(&here, &here.token(), "cust-1").await;
    follower_reaches(&mut events, |e| e.notices > heard).await;
    hold.release();
    assert_eq!(read.await.unwrap().status(), StatusCode::OK);
    assert!(
        !probe.holds_key_of("cust-1"),
        "a key fetched before a forget elsewhere is cached after its eviction notice"
    );
}

/// `url` with its user replaced by `user` (and no password).
fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}@{host}")
}

/// A PostgreSQL role for one test, dropped afterwards whatever happened
/// (its sessions ended first).
struct TempRole(String);

impl TempRole {
    async fn create() -> TempRole {
        let prefix = std::env::var("EVENTVAULT_TEST_DB_PREFIX").unwrap_or_else(|_| "evtest".into());
        let role = format!(
            "{prefix}_{}_there",
            &Uuid::new_v4().simple().to_string()[..12]
        );
        admin(format!("create role \"{role}\" login superuser")).await;
        TempRole(role)
    }
}

impl Drop for TempRole {
    fn drop(&mut self) {
        let sql = format!("drop role if exists \"{}\"", self.0);
        // Drop runs outside async context: a small runtime of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    use sqlx::Connection as _;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&pg_admin_url()).await {
                        // Its sessions first (a test that failed half-way
                        // may have left the application running).
                        let _ = sqlx::query(
                            "select pg_terminate_backend(pid) from pg_stat_activity where usename = $1",
                        )
                        .bind(sql.split('"').nth(1).unwrap_or_default())
                        .execute(&mut conn)
                        .await;
                        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await;
                    }
                })
        })
        .join();
    }
}

/// Runs `sql` on the PostgreSQL server as the administrator.
async fn admin(sql: String) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
}

async fn a_forget_missed_while_not_listening_is_made_up_from_the_ledger(backend: Backend) {
    let here = TestApp::spawn(&backend).await;
    here.append_ok("accounts-1", &one_deposit("cust-1", "1.00"))
        .await;
    here.append_ok("accounts-2", &one_deposit("cust-2", "2.00"))
        .await;
    // The other process reaches the keystore as a role of its own, so that
    // it alone can be cut off from it.
    let temp_role = TempRole::create().await;
    let role = temp_role.0.clone();
    let mut cfg = here.env.config();
    cfg.keystore_url = with_user(&here.env.keystore_url, &role);
    let there = TestApp::start_with(here.env.clone(), &cfg).await;
    let probe = there.progress().key_cache;
    let mut events = probe.events();
    follower_reaches(&mut events, |e| e.listening).await;
    let page: Value = there.read("accounts-1", "").await.json().await.unwrap();
    assert_eq!(page["events"][0]["personal_data"], "decrypted");
    assert!(probe.holds_key_of("cust-1"));
    // A fetch of cust-2's key has read it and is held.
    let mut hold = probe.hold_fetches();
    let read = read_held_at_fetch(&there, "accounts-2", &mut hold, "cust-2").await;

    // Cut the other process off the keystore: its LISTEN session and the
    // rest are ended, and it may not log in again for now.
    let database = here.env.keystore_url.rsplit('/').next().unwrap().to_owned();
    admin(format!("alter role \"{role}\" nologin")).await;
    {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
        let ended: Vec<(String, bool)> = sqlx::query_as(
            "select query, pg_terminate_backend(pid) from pg_stat_activity
             where usename = $1 and datname = $2",
        )
        .bind(&role)
        .bind(&database)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert!(
            ended
                .iter()
                .any(|(q, done)| q.starts_with("LISTEN") && *done),
            "the listening session was ended: {ended:?}"
        );
        let _ = conn.close().await;
    }
    follower_reaches(&mut events, |e| !e.listening).await;
    // Both subjects are forgotten here meanwhile: the notices are lost.
    forget_ok(&here, &here.token(), "cust-1").await;
    forget_ok(&here, &here.token(), "cust-2").await;
    assert!(!events.borrow().listening, "nothing could be heard");

    // Back: the LISTEN is made again, and the caches are reconciled with
    // the forget ledger.
    let resyncs = events.borrow_and_update().resyncs;
    admin(format!("alter role \"{role}\" login")).await;
    follower_reaches(&mut events, |e| e.listening && e.resyncs > resyncs).await;
    assert!(
        !probe.holds_key_of("cust-1"),
        "a key cached before a forget missed while not listening stays cached"
    );
    // The fetch that read cust-2's key before its forget goes on now: it
    // began before the LISTEN was back, so it caches nothing.
    hold.release();
    assert_eq!(read.await.unwrap().status(), StatusCode::OK);
    assert!(
        !probe.holds_key_of("cust-2"),
        "a key fetched while not listening is cached after the reconnect"
    );
    for stream in ["accounts-1", "accounts-2"] {
        let page: Value = there.read(stream, "").await.json().await.unwrap();
        assert_eq!(page["events"][0]["personal_data"], "erased", "{page}");
    }
    there.stop().await;
}
