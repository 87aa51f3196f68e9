//! Test harness: every test gets its own databases (a temporary directory for
//! SQLite, fresh databases named by a UUID on PostgreSQL) and drives the real
//! router over real HTTP, in process, or the real binary where a test needs
//! separate processes.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use eventvault::app::{Application, Config, Progress};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{oneshot, watch};

/// Runs a scenario once on SQLite and once on PostgreSQL.
///
/// PostgreSQL comes from `EVENTVAULT_TEST_DATABASE_URL` (default: the local
/// server as `postgres`). When it is unreachable the PostgreSQL half says so
/// and is skipped, unless `EVENTVAULT_REQUIRE_POSTGRES=1` (as in CI), where
/// that is a failure.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::capture_logs();
                    super::$name($crate::common::Backend::Sqlite).await;
                    $crate::common::assert_logs_hold_no_secret();
                }
            )*
        }
        $crate::postgres_tests!(postgres; $($name),*);
    };
}

/// Runs a scenario on PostgreSQL only (one that needs several processes on
/// one database, or PostgreSQL's roles or planner), as the PostgreSQL half of
/// [`both_backends!`] does: skipped when PostgreSQL is unreachable, a
/// failure then under `EVENTVAULT_REQUIRE_POSTGRES=1`, and the logs checked
/// for secrets afterwards. The tests are named `postgres_only::<name>`.
#[macro_export]
macro_rules! postgres_only {
    ($($name:ident),* $(,)?) => {
        $crate::postgres_tests!(postgres_only; $($name),*);
    };
}

/// The PostgreSQL tests of [`both_backends!`] and [`postgres_only!`], in a
/// module of their own.
#[macro_export]
#[doc(hidden)]
macro_rules! postgres_tests {
    ($module:ident; $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::capture_logs();
                    if let Some(backend) = $crate::common::Backend::postgres().await {
                        super::$name(backend).await;
                        $crate::common::assert_logs_hold_no_secret();
                    }
                }
            )*
        }
    };
}

/// Personal values the tests put into events. None of them, and no token or
/// master key, may ever appear in what the service logs.
pub const PERSONAL_VALUES: &[&str] = &[
    "Jane Roe",
    "John Doe",
    "Payer of ",
    "DE89370400440532013000",
    "Alice Secret",
    "Other Name",
    "Zebulon Quackenbush",
    "DE44500105175407324931",
    "zebulon@example.org",
];

/// Everything logged in this test process (the in-process services, at
/// debug level) and by the child processes (their stderr).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// How many bytes [`LOG`] holds; moves with every write, so that a test can
/// wait for a line instead of looking again and again.
static LOG_LEN: LazyLock<watch::Sender<usize>> = LazyLock::new(|| watch::Sender::new(0));
/// Tokens and master keys handed out during the suite.
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let len = {
            let mut log = LOG.lock().unwrap();
            log.extend_from_slice(buf);
            log.len()
        };
        LOG_LEN.send_replace(len);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends this process's logs to the capture buffer (once per process).
pub fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug,sqlx=info"))
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .init();
    });
}

pub fn append_to_log(text: &str) {
    let len = {
        let mut log = LOG.lock().unwrap();
        log.extend_from_slice(text.as_bytes());
        log.push(b'\n');
        log.len()
    };
    LOG_LEN.send_replace(len);
}

/// Waits until `count` lines logged in this process (from its start)
/// contain every one of `parts`, waking whenever something is logged.
/// Fails the test after `patience`, naming the caller.
#[track_caller]
pub fn wait_for_log_lines<'a>(
    parts: &'a [&'a str],
    count: usize,
    patience: Duration,
) -> impl Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    wait_for_log_lines_where(
        move |l| parts.iter().all(|p| l.contains(p)),
        count,
        patience,
        caller,
    )
}

/// Waits until `count` lines logged in this process (from its start) match
/// `matches`, waking whenever something is logged; fails the test after
/// `patience`, naming `caller`.
pub async fn wait_for_log_lines_where(
    matches: impl Fn(&str) -> bool,
    count: usize,
    patience: Duration,
    caller: &std::panic::Location<'_>,
) {
    let mut written = LOG_LEN.subscribe();
    // Lines up to `scanned` have been looked at: only new text is scanned
    // on each wake-up (the log of a whole suite is large).
    let (mut scanned, mut found) = (0, 0);
    let waited = tokio::time::timeout(patience, async {
        loop {
            // Marked seen before looking: a line written after the look
            // wakes the wait below.
            written.borrow_and_update();
            {
                let log = LOG.lock().unwrap();
                let end = log[scanned..]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(scanned, |i| scanned + i + 1);
                found += String::from_utf8_lossy(&log[scanned..end])
                    .lines()
                    .filter(|l| matches(l))
                    .count();
                scanned = end;
            }
            if found >= count {
                return;
            }
            written
                .changed()
                .await
                .expect("the log capture lives as long as the process");
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "at {caller}: after {patience:?} the log holds {found} of {count} awaited lines"
    );
}

/// Whether a line logged so far in this process contains every one of `parts`.
pub fn log_has_line_with(parts: &[&str]) -> bool {
    String::from_utf8_lossy(&LOG.lock().unwrap())
        .lines()
        .any(|l| parts.iter().all(|p| l.contains(p)))
}

/// Remembers a secret that must never be logged.
pub fn remember_secret(secret: &str) {
    SECRETS.lock().unwrap().push(secret.to_owned());
}

/// Fails if `text` (a response, an event, what a broker received) holds
/// one of the [`PERSONAL_VALUES`].
#[track_caller]
pub fn assert_no_personal_value(text: impl AsRef<str>) {
    let text = text.as_ref();
    for v in PERSONAL_VALUES {
        assert!(!text.contains(v), "{v:?} disclosed in {text}");
    }
}

/// Fails if anything logged so far in the suite holds a personal value, a
/// token or a master key.
pub fn assert_logs_hold_no_secret() {
    let log = String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned();
    assert!(!log.is_empty(), "the log capture caught nothing");
    let secrets = SECRETS.lock().unwrap().clone();
    for s in PERSONAL_VALUES
        .iter()
        .copied()
        .chain(secrets.iter().map(String::as_str))
    {
        if let Some(at) = log.find(s) {
            let line = log[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = log[at..].find('\n').map_or(log.len(), |i| at + i);
            panic!("a secret appears in the service's log: {}", &log[line..end]);
        }
    }
}

#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    /// The server URL to create per-test databases through.
    Postgres(String),
}

pub fn pg_admin_url() -> String {
    std::env::var("EVENTVAULT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl Backend {
    pub async fn postgres() -> Option<Backend> {
        let url = pg_admin_url();
        match sqlx::PgConnection::connect(&url).await {
            Ok(c) => {
                let _ = c.close().await;
                Some(Backend::Postgres(url))
            }
            Err(e) if std::env::var("EVENTVAULT_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
                panic!(
                    "PostgreSQL is required (EVENTVAULT_REQUIRE_POSTGRES=1) but {url} is unreachable: {e}"
                )
            }
            Err(e) => {
                eprintln!(
                    "SKIPPED: PostgreSQL test: {url} is unreachable ({e}); set EVENTVAULT_TEST_DATABASE_URL"
                );
                None
            }
        }
    }
}

/// Replaces the database name of a PostgreSQL URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let root = match base.rfind('/') {
        Some(i) if i > base.find("://").map_or(0, |s| s + 2) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    }
}

/// Replaces the user of a PostgreSQL URL (`postgres://user@host/db`).
pub fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let host = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}@{host}")
}

/// The storage of one test: databases, master key, policies. Survives
/// restarts of the application; cleaned up when dropped.
pub struct TestEnv {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pub database_url: String,
    pub keystore_url: String,
    /// Names of the PostgreSQL databases to drop afterwards.
    pg_databases: Vec<String>,
    /// The admin token printed on first start.
    pub token: Mutex<Option<String>>,
    /// The configuration the application starts with; tests change it with
    /// [`TestEnv::configure`] between starts.
    config: Mutex<Config>,
}

/// A NATS server, JetStream stream and subject prefix for the relay.
#[derive(Debug, Clone)]
pub struct NatsTarget {
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
}

impl TestEnv {
    pub async fn new(backend: &Backend) -> Arc<TestEnv> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (database_url, keystore_url, pg_databases) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}/data/eventvault.db", dir.path().display()),
                format!("sqlite://{}/keys/keystore.db", dir.path().display()),
                vec![],
            ),
            Backend::Postgres(admin) => {
                let prefix =
                    std::env::var("EVENTVAULT_TEST_DB_PREFIX").unwrap_or_else(|_| "evtest".into());
                let id = uuid::Uuid::new_v4().simple().to_string();
                let events = format!("{prefix}_{}_ev", &id[..12]);
                let keys = format!("{prefix}_{}_ks", &id[..12]);
                let mut conn = sqlx::PgConnection::connect(admin)
                    .await
                    .expect("connect to PostgreSQL");
                for db in [&events, &keys] {
                    sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{db}\"")))
                        .execute(&mut conn)
                        .await
                        .expect("create test database");
                }
                let _ = conn.close().await;
                (
                    with_database(admin, &events),
                    with_database(admin, &keys),
                    vec![events, keys],
                )
            }
        };
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            database_url: database_url.clone(),
            keystore_url: keystore_url.clone(),
            master_key_file: dir.path().join("keys/master.key"),
            policies_dir: policies_dir(),
            key_cache_capacity: 1000,
            max_db_connections: 8,
            // No limit per principal unless a test sets one.
            rate_limit: None,
            // Requests without a valid token: no limit per client address
            // and no aggregation of their audit records (every refusal has
            // a record of its own) unless a test sets them: the tests of
            // refusals look at each one's record; `unauthenticated.rs` tests
            // the limit and the aggregation.
            unauthenticated_rate_limit: None,
            unauthenticated_audit_interval: std::time::Duration::ZERO,
            ..Config::default()
        };
        Arc::new(TestEnv {
            backend: backend.clone(),
            dir,
            database_url,
            keystore_url,
            pg_databases,
            token: Mutex::new(None),
            config: Mutex::new(config),
        })
    }

    pub fn master_key_file(&self) -> PathBuf {
        self.dir.path().join("keys/master.key")
    }

    /// The configuration the next start uses.
    pub fn config(&self) -> Config {
        self.config.lock().unwrap().clone()
    }

    /// Changes the configuration of the next start.
    pub fn configure(&self, change: impl FnOnce(&mut Config)) {
        change(&mut self.config.lock().unwrap());
    }

    /// PostgreSQL: connects the next start to both databases as `role`
    /// (`None`: as the owner the databases were made with).
    pub fn serve_as(&self, role: Option<&str>) {
        let as_role = |url: &str| match role {
            Some(r) => with_user(url, r),
            None => url.to_owned(),
        };
        let (database_url, keystore_url) =
            (as_role(&self.database_url), as_role(&self.keystore_url));
        self.configure(|c| {
            c.database_url = database_url;
            c.keystore_url = keystore_url;
        });
    }

    /// Points the relay of the next start at `target` (`None`: no relay).
    pub fn set_nats(&self, target: Option<NatsTarget>) {
        self.configure(|c| {
            c.nats_url = target.as_ref().map(|n| n.url.clone());
            if let Some(n) = target {
                c.nats_stream = n.stream;
                c.nats_subject_prefix = n.subject_prefix;
            } else {
                c.nats_stream = eventvault::relay::DEFAULT_STREAM.into();
                c.nats_subject_prefix = eventvault::relay::DEFAULT_SUBJECT_PREFIX.into();
            }
        });
    }

    pub fn token(&self) -> String {
        self.token
            .lock()
            .unwrap()
            .clone()
            .expect("the first start printed an admin token")
    }

    pub fn set_token(&self, token: &str) {
        remember_secret(token);
        *self.token.lock().unwrap() = Some(token.to_owned());
    }

    /// Creates a principal with `roles` (as `eventvault principal add`
    /// does) and returns its token.
    pub async fn add_principal(&self, name: &str, roles: &[&str]) -> String {
        let (store, policies) = eventvault::app::open_event_store(&self.config())
            .await
            .expect("open the event store");
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        let token = eventvault::principals::Principals::new(store.clone())
            .add(&policies, name, &roles)
            .await
            .expect("add principal");
        store.db.close().await;
        remember_secret(&token);
        token.to_string()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let (Backend::Postgres(admin), false) = (&self.backend, self.pg_databases.is_empty())
        else {
            return;
        };
        let (admin, dbs) = (admin.clone(), std::mem::take(&mut self.pg_databases));
        // Drop runs outside async context: a small runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    for db in dbs {
                        let sql = format!("drop database if exists \"{db}\" with (force)");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                            .execute(&mut conn)
                            .await;
                    }
                }
            })
        })
        .join();
    }
}

pub fn policies_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"))
}

/// A running application (in this process) and an HTTP client for it.
pub struct TestApp {
    pub env: Arc<TestEnv>,
    pub base: String,
    pub client: reqwest::Client,
    /// Watches on the in-process application (`None` for a server running
    /// elsewhere).
    progress: Option<Progress>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<std::io::Result<()>>>>,
}

impl TestApp {
    /// A fresh application on fresh databases.
    pub async fn spawn(backend: &Backend) -> TestApp {
        TestApp::start(TestEnv::new(backend).await).await
    }

    /// Starts the application on `env`'s existing databases and waits until
    /// it is ready (the forget ledger re-applied).
    pub async fn start(env: Arc<TestEnv>) -> TestApp {
        let app = TestApp::start_unready(env).await;
        app.ready().await;
        app
    }

    /// Waits until the application has re-applied the forget ledger and
    /// checked the data keys (and so serves data); fails the test if either
    /// failed or took longer than a minute.
    pub async fn ready(&self) {
        let mut progress = self.progress();
        let state = tokio::time::timeout(Duration::from_secs(60), progress.ready())
            .await
            .expect("the application is ready or refuses within a minute");
        match state {
            Ok(()) => {}
            Err(why) => {
                eprintln!("not ready: {why}");
                // The service stops; its error says why.
                let task = self.task.lock().await.take();
                let outcome = match task {
                    Some(t) => format!("{:?}", t.await),
                    None => "not running".into(),
                };
                panic!("the application did not become ready: {outcome}");
            }
        }
    }

    /// Watches on the in-process application.
    pub fn progress(&self) -> Progress {
        self.progress
            .clone()
            .expect("an application started by this harness")
    }

    /// Starts the application on `env`'s existing databases and returns as
    /// soon as it listens, while it may still be re-applying the forget
    /// ledger.
    pub async fn start_unready(env: Arc<TestEnv>) -> TestApp {
        let cfg = env.config();
        TestApp::start_unready_with(env, &cfg).await
    }

    /// [`TestApp::start`] with `cfg` in place of `env.config()` (e.g. a
    /// second process that reaches a database as another role).
    pub async fn start_with(env: Arc<TestEnv>, cfg: &Config) -> TestApp {
        let app = TestApp::start_unready_with(env, cfg).await;
        app.ready().await;
        app
    }

    async fn start_unready_with(env: Arc<TestEnv>, cfg: &Config) -> TestApp {
        let mut app = Application::build(cfg).await.expect("application starts");
        if let Some(t) = app.take_admin_token() {
            env.set_token(&t);
        }
        if let Ok(key) = std::fs::read_to_string(env.master_key_file()) {
            remember_secret(key.trim());
        }
        let base = format!("http://{}", app.local_addr());
        let progress = app.progress();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        TestApp {
            env,
            base,
            client: reqwest::Client::new(),
            progress: Some(progress),
            stop: Mutex::new(Some(stop)),
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    /// A client for a server running elsewhere (e.g. a child process).
    pub fn client_for(env: Arc<TestEnv>, base: String) -> TestApp {
        TestApp {
            env,
            base,
            client: reqwest::Client::new(),
            progress: None,
            stop: Mutex::new(None),
            task: tokio::sync::Mutex::new(None),
        }
    }

    /// Waits until the application stops by itself (without [`stop`]):
    /// what `run_until` returned.
    ///
    /// [`stop`]: TestApp::stop
    pub async fn stopped(&self) -> std::io::Result<()> {
        let task = self.task.lock().await.take().expect("not stopped yet");
        task.await.expect("the application did not panic")
    }

    /// Graceful shutdown; waits until in-flight requests are answered and
    /// the databases are closed.
    pub async fn stop(&self) -> Arc<TestEnv> {
        let stop = self
            .stop
            .lock()
            .unwrap()
            .take()
            .expect("an application started by this harness");
        stop.send(()).unwrap();
        let task = self.task.lock().await.take().expect("not stopped yet");
        task.await.unwrap().unwrap();
        self.env.clone()
    }

    pub fn token(&self) -> String {
        self.env.token()
    }

    /// A request to `path` (with its query), without a token until
    /// [`Call::token`] adds one.
    pub fn request(&self, method: Method, path: &str) -> Call {
        Call(self.client.request(method, format!("{}{path}", self.base)))
    }

    /// A GET with a bearer token and no other header.
    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, String) {
        self.request(Method::GET, path).token(token).send().await
    }

    /// Every audit record, read with the admin token (which holds `audit`).
    /// A short page ends the listing: each listing is itself audited, so the
    /// log grows while it is read.
    pub async fn audit_records(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let (status, text) = self
                .get(
                    &format!("/audit?after={after}&limit=1000&{query}"),
                    &self.token(),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{text}");
            let page: Value = serde_json::from_str(&text).unwrap();
            let records = page["records"].as_array().unwrap();
            out.extend(records.iter().cloned());
            if records.len() < 1000 {
                return out;
            }
            after = page["next"].as_u64().unwrap();
        }
    }

    pub async fn append(&self, stream: &str, expected: Option<&str>, body: &Value) -> Response {
        let mut req = self
            .client
            .post(format!("{}/streams/{stream}/events", self.base))
            .bearer_auth(self.token())
            .json(body);
        if let Some(e) = expected {
            req = req.header("Expected-Version", e);
        }
        req.send().await.expect("request")
    }

    /// Appends and insists on success; returns the response body.
    #[track_caller]
    pub fn append_ok<'a>(
        &'a self,
        stream: &'a str,
        body: &'a Value,
    ) -> impl Future<Output = Value> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let r = self.append(stream, None, body).await;
            let status = r.status();
            let text = r.text().await.unwrap();
            assert_eq!(status, StatusCode::CREATED, "append at {caller}: {text}");
            serde_json::from_str(&text).unwrap()
        }
    }

    pub async fn read(&self, stream: &str, query: &str) -> Response {
        self.client
            .get(format!("{}/streams/{stream}/events?{query}", self.base))
            .bearer_auth(self.token())
            .send()
            .await
            .expect("request")
    }

    pub async fn log(&self, query: &str) -> Response {
        self.client
            .get(format!("{}/events?{query}", self.base))
            .bearer_auth(self.token())
            .send()
            .await
            .expect("request")
    }

    /// Every event of the global log, following `next`.
    pub async fn whole_log(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let page: Value = self
                .log(&format!("after={after}&limit=1000"))
                .await
                .json()
                .await
                .unwrap();
            let events = page["events"].as_array().unwrap();
            if events.is_empty() {
                return out;
            }
            out.extend(events.iter().cloned());
            after = page["next"].as_u64().unwrap();
        }
    }
}

/// A request being built by [`TestApp::request`]; [`Call::send`] sends it
/// and answers its status and body.
pub struct Call(reqwest::RequestBuilder);

impl Call {
    /// A bearer token.
    pub fn token(self, token: &str) -> Call {
        Call(self.0.bearer_auth(token))
    }

    /// A bearer token if there is one.
    pub fn token_opt(self, token: Option<&str>) -> Call {
        match token {
            Some(t) => self.token(t),
            None => self,
        }
    }

    pub fn header(self, name: &str, value: &str) -> Call {
        Call(self.0.header(name, value))
    }

    /// A JSON body.
    pub fn json(self, body: &Value) -> Call {
        Call(self.0.json(body))
    }

    /// A JSON body if there is one.
    pub fn json_opt(self, body: Option<&Value>) -> Call {
        match body {
            Some(b) => self.json(b),
            None => self,
        }
    }

    pub async fn send(self) -> (StatusCode, String) {
        let r = self.0.send().await.expect("request");
        (r.status(), r.text().await.unwrap())
    }
}

/// A deposit event about `subject`, with personal fields.
pub fn deposit(id: uuid::Uuid, subject: &str, amount: &str) -> Value {
    json!({
        "id": id,
        "type": "MoneyDeposited",
        "subject": subject,
        "data": {"account": "ACC-1", "amount": amount, "currency": "EUR",
                 "payer_name": format!("Payer of {subject}"), "payer_iban": "DE89370400440532013000"},
        "metadata": {"channel": "mobile"}
    })
}

pub fn batch(events: Vec<Value>) -> Value {
    json!({ "events": events })
}

/// The `eventvault` binary as a child process, for tests that need real,
/// separate processes.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub base: String,
    /// Everything the process printed on stdout before it was ready.
    pub stdout_lines: Vec<String>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_eventvault")
}

/// A client binary of the workspace member `tools` (`cargo test` builds
/// them beside this test's own binary, in the same target directory).
pub fn tool_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/integration-… → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lies in target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo test` (which builds the workspace's tools), or `cargo build -p eventvault-tools` first",
        path.display()
    );
    path
}

/// Command line pointing the binary at `env`'s databases and key.
pub fn command(env: &TestEnv, args: &[&str]) -> tokio::process::Command {
    command_with_policies(env, &policies_dir(), args)
}

/// Runs the binary on `env` to its end: success, stdout, stderr.
pub async fn run(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = command(env, args).output().await.expect("run eventvault");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the binary on `env` and insists on success; returns its stdout.
pub async fn run_ok(env: &TestEnv, args: &[&str]) -> String {
    let (ok, out, err) = run(env, args).await;
    assert!(ok, "eventvault {args:?} failed: {err}");
    out
}

pub fn command_with_policies(
    env: &TestEnv,
    policies: &std::path::Path,
    args: &[&str],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args([
        "--database-url",
        &env.database_url,
        "--keystore-url",
        &env.keystore_url,
    ])
    .arg("--master-key-file")
    .arg(env.master_key_file())
    .arg("--policies-dir")
    .arg(policies)
    .args(args)
    .env_remove("EVENTVAULT_MASTER_KEY")
    .env("RUST_LOG", "debug,sqlx=info")
    .kill_on_drop(true);
    cmd
}

impl ServerProcess {
    /// Starts `eventvault serve` on a free port and waits until it listens
    /// (it prints its address on stdout, after the first-start token) and
    /// is ready (`eventvault ready`, once the forget ledger is re-applied),
    /// or returns what it printed if it exits first.
    pub async fn start(env: &TestEnv) -> Result<ServerProcess, String> {
        Self::start_command(env, command(env, &["serve", "--listen", "127.0.0.1:0"])).await
    }

    /// [`ServerProcess::start`] with further `serve` flags.
    pub async fn start_with(env: &TestEnv, flags: &[&str]) -> Result<ServerProcess, String> {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        Self::start_command(env, command(env, &args)).await
    }

    /// [`ServerProcess::start`] with a command of the caller's (more flags,
    /// another environment).
    pub async fn start_command(
        env: &TestEnv,
        mut cmd: tokio::process::Command,
    ) -> Result<ServerProcess, String> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn eventvault");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = child.stderr.take().unwrap();
        // Collect stderr concurrently, so the child never blocks on it and
        // its messages can be shown if it fails to start.
        let errors = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut all = Vec::new();
            while let Ok(Some(l)) = lines.next_line().await {
                append_to_log(&l);
                all.push(l);
            }
            all
        });
        let mut stdout_lines = Vec::new();
        let mut listening = None;
        while let Ok(Some(line)) = stdout.next_line().await {
            if let Some(base) = line.strip_prefix("eventvault listening on ") {
                listening = Some(base.to_owned());
                continue;
            }
            if let (Some(base), "eventvault ready") = (&listening, line.as_str()) {
                tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
                if let Some(t) = stdout_lines
                    .iter()
                    .find(|t: &&String| t.starts_with("evt_"))
                {
                    env.set_token(t);
                }
                if let Ok(key) = std::fs::read_to_string(env.master_key_file()) {
                    remember_secret(key.trim());
                }
                return Ok(ServerProcess {
                    child,
                    base: base.clone(),
                    stdout_lines,
                });
            }
            if listening.is_none() {
                stdout_lines.push(line);
            }
        }
        let _ = child.wait().await;
        let mut printed = errors.await.unwrap_or_default();
        printed.extend(stdout_lines);
        Err(printed.join("\n"))
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        self.child.wait().await.unwrap()
    }
}

/// A transaction another session holds open on one of a test's databases
/// (an operator's shell, a maintenance job): begun with the statements for
/// its backend, held until [`Held::release`] rolls it back.
pub enum Held {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Held {
    /// Connects to `url` and runs `sqlite` or `postgres` (whichever the URL
    /// is), leaving the transaction they begin open. SQLite is opened in
    /// WAL mode, as the service opens it.
    pub async fn begin(url: &str, sqlite: &'static str, postgres: &'static str) -> Held {
        if url.starts_with("sqlite:") {
            use std::str::FromStr as _;
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .unwrap()
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
            sqlx::raw_sql(sqlite).execute(&mut conn).await.unwrap();
            Held::Sqlite(conn)
        } else {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql(postgres).execute(&mut conn).await.unwrap();
            Held::Postgres(conn)
        }
    }

    /// Rolls the transaction back and disconnects.
    pub async fn release(self) {
        match self {
            Held::Sqlite(mut c) => {
                sqlx::raw_sql("rollback").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
            Held::Postgres(mut c) => {
                sqlx::raw_sql("rollback").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
        }
    }
}
