//! Faults of the stores, provoked for real under load: a full disk
//! (SQLite on a filesystem of a few MiB), an event store locked by another
//! session (both backends), a PostgreSQL server stopped and a PostgreSQL
//! server frozen (a cluster of the test's own). In each, every request is
//! answered promptly — 503 problem+json with `Retry-After` within the
//! store timeout, never a 500, never a hang — `/readyz` says why within
//! 2 s, and once the fault is gone the service serves again without a
//! restart; afterwards every acknowledged append is there exactly once,
//! every other one entirely or not at all, the log and the streams have no
//! gap, and the audit chain holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::Connection as _;
use tokio::sync::watch;
use uuid::Uuid;

use crate::both_backends;
use crate::cluster::PgCluster;
use crate::common::*;

/// The store timeout the tests run with.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// The latest a 503 may come: the store timeout and some slack for a
/// machine that runs other tests meanwhile.
const PROMPT: Duration = Duration::from_millis(3500);

/// Whatever the stores do, a client never waits longer than this.
const HANG: Duration = Duration::from_secs(8);

/// Events per append: enough for "all or nothing" to mean something.
const BATCH: usize = 3;

/// What became of one request of the load.
#[derive(Debug)]
enum Answer {
    /// 201, with the positions it was given.
    Acked { first_position: u64 },
    /// A prompt 503 problem+json with `Retry-After`.
    Unavailable,
    /// Anything else: a wrong status, a slow 503, no answer at all.
    Broken(String),
}

#[derive(Debug)]
struct Attempt {
    stream: String,
    ids: Vec<Uuid>,
    answer: Answer,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    acked: u64,
    unavailable: u64,
    reads_ok: u64,
    reads_unavailable: u64,
}

/// Clients appending (and one reading) until told to stop; every answer
/// is checked as it comes and counted in a watch the test waits on.
struct Load {
    stop: watch::Sender<bool>,
    counts: watch::Receiver<Counts>,
    appenders: Vec<tokio::task::JoinHandle<Vec<Attempt>>>,
    reader: tokio::task::JoinHandle<Vec<String>>,
}

/// Checks a 503: problem+json with `Retry-After`, in time.
async fn check_unavailable(r: reqwest::Response, took: Duration) -> Result<(), String> {
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = r.text().await.unwrap_or_default();
    if took > PROMPT {
        return Err(format!("a 503 after {took:?}: {body}"));
    }
    if retry.is_none() || ct != "application/problem+json" {
        return Err(format!(
            "a 503 without Retry-After or problem+json ({ct}): {body}"
        ));
    }
    let problem: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if problem["type"] != "urn:eventvault:problem:unavailable"
        && problem["type"] != "urn:eventvault:problem:starting"
    {
        return Err(format!("a 503 of another kind: {body}"));
    }
    Ok(())
}

impl Load {
    fn start(app: &TestApp, appenders: usize) -> Load {
        let (stop, stopped) = watch::channel(false);
        let counts = Arc::new(watch::Sender::new(Counts::default()));
        let client = reqwest::Client::builder().timeout(HANG).build().unwrap();
        let tasks = (0..appenders)
            .map(|n| {
                let (client, base, token) = (client.clone(), app.base.clone(), app.token());
                let (stopped, counts) = (stopped.clone(), counts.clone());
                tokio::spawn(async move {
                    let stream = format!("accounts-fault-{n}");
                    let mut attempts = Vec::new();
                    while !*stopped.borrow() {
                        let ids: Vec<Uuid> = (0..BATCH).map(|_| Uuid::new_v4()).collect();
                        let events = ids
                            .iter()
                            .map(|id| deposit(*id, &format!("cust-fault-{n}"), "10.00"))
                            .collect();
                        let began = Instant::now();
                        let sent = client
                            .post(format!("{base}/streams/{stream}/events"))
                            .bearer_auth(&token)
                            .json(&batch(events))
                            .send()
                            .await;
                        let took = began.elapsed();
                        let answer = match sent {
                            Err(e) => Answer::Broken(format!("no answer after {took:?}: {e}")),
                            Ok(r) if r.status() == StatusCode::CREATED => {
                                let v: Value = r.json().await.unwrap();
                                counts.send_modify(|c| c.acked += 1);
                                Answer::Acked {
                                    first_position: v["first_position"].as_u64().unwrap(),
                                }
                            }
                            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                                match check_unavailable(r, took).await {
                                    Ok(()) => {
                                        counts.send_modify(|c| c.unavailable += 1);
                                        Answer::Unavailable
                                    }
                                    Err(e) => Answer::Broken(e),
                                }
                            }
                            Ok(r) => Answer::Broken(format!(
                                "{} after {took:?}: {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                        };
                        attempts.push(Attempt {
                            stream: stream.clone(),
                            ids,
                            answer,
                        });
                    }
                    attempts
                })
            })
            .collect();
        let reader = {
            let (client, base, token) = (client.clone(), app.base.clone(), app.token());
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut broken = Vec::new();
                while !*stopped.borrow() {
                    let began = Instant::now();
                    let sent = client
                        .get(format!("{base}/events?after=0&limit=20"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    let took = began.elapsed();
                    match sent {
                        Err(e) => broken.push(format!("a read: no answer after {took:?}: {e}")),
                        Ok(r) if r.status() == StatusCode::OK => {
                            counts.send_modify(|c| c.reads_ok += 1)
                        }
                        Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                            match check_unavailable(r, took).await {
                                Ok(()) => counts.send_modify(|c| c.reads_unavailable += 1),
                                Err(e) => broken.push(format!("a read: {e}")),
                            }
                        }
                        Ok(r) => broken.push(format!("a read: {} after {took:?}", r.status())),
                    }
                }
                broken
            })
        };
        Load {
            stop,
            counts: counts.subscribe(),
            appenders: tasks,
            reader,
        }
    }

    fn now(&self) -> Counts {
        *self.counts.borrow()
    }

    /// Waits until the counts satisfy `enough` (a minute at most).
    #[track_caller]
    fn until(
        &self,
        what: &'static str,
        enough: impl Fn(&Counts) -> bool,
    ) -> impl Future<Output = ()> {
        let caller = std::panic::Location::caller();
        let mut counts = self.counts.clone();
        async move {
            let waited =
                tokio::time::timeout(Duration::from_secs(60), counts.wait_for(|c| enough(c)))
                    .await
                    .is_ok();
            assert!(
                waited,
                "at {caller}: {what} did not happen within a minute ({:?})",
                *counts.borrow()
            );
        }
    }

    /// Waits for `n` more appends acknowledged, and for reads served again.
    async fn serves_again(&self, n: u64) {
        let (acked, reads) = (self.now().acked, self.now().reads_ok);
        self.until("appends acknowledged again", |c| {
            c.acked >= acked + n && c.reads_ok > reads
        })
        .await;
    }

    /// Waits for `n` more prompt 503s to appends and one to a read.
    async fn refused(&self, n: u64) {
        let (refused, reads) = (self.now().unavailable, self.now().reads_unavailable);
        self.until("prompt 503s", |c| {
            c.unavailable >= refused + n && c.reads_unavailable > reads
        })
        .await;
    }

    /// Stops the clients; every request they made, and what was wrong.
    async fn finish(self) -> Vec<Attempt> {
        self.stop.send_replace(true);
        let mut attempts = Vec::new();
        for t in self.appenders {
            attempts.extend(t.await.unwrap());
        }
        let broken_reads = self.reader.await.unwrap();
        assert!(broken_reads.is_empty(), "{broken_reads:#?}");
        let broken: Vec<&String> = attempts
            .iter()
            .filter_map(|a| match &a.answer {
                Answer::Broken(why) => Some(why),
                _ => None,
            })
            .collect();
        assert!(
            broken.is_empty(),
            "answers that were not prompt: {broken:#?}"
        );
        attempts
    }
}

/// `/readyz` answers within 2 s; returns its status and body.
async fn readyz(app: &TestApp) -> (StatusCode, Value) {
    let began = Instant::now();
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .expect("/readyz answers within 2 s");
    assert!(began.elapsed() < Duration::from_secs(2));
    // Not ready says when to ask again; ready does not.
    assert_eq!(
        r.headers().contains_key("retry-after"),
        r.status() == StatusCode::SERVICE_UNAVAILABLE
    );
    (r.status(), r.json().await.unwrap())
}

#[track_caller]
fn assert_not_ready<'a>(app: &'a TestApp, words: &'a [&'a str]) -> impl Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let (status, body) = readyz(app).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "at {caller}: {body}"
        );
        let word = body["event_store"].as_str().unwrap_or_default();
        assert!(words.contains(&word), "at {caller}: {body}");
    }
}

async fn assert_ready(app: &TestApp) {
    let (status, body) = readyz(app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Every acknowledged append is there once, in order; every other one
/// entirely or not at all; positions and versions have no gap; the audit
/// chain holds. Returns how many appends were acknowledged.
async fn assert_nothing_lost(app: &TestApp, attempts: &[Attempt]) -> usize {
    let log = app.whole_log().await;
    let mut at: HashMap<Uuid, (String, u64, u64)> = HashMap::new();
    let mut versions: HashMap<String, u64> = HashMap::new();
    for (i, e) in log.iter().enumerate() {
        let id: Uuid = e["id"].as_str().unwrap().parse().unwrap();
        let (stream, version, position) = (
            e["stream_id"].as_str().unwrap().to_owned(),
            e["version"].as_u64().unwrap(),
            e["position"].as_u64().unwrap(),
        );
        assert_eq!(
            position,
            i as u64 + 1,
            "the log has a gap before {position}"
        );
        let v = versions.entry(stream.clone()).or_default();
        *v += 1;
        assert_eq!(version, *v, "{stream} has a gap before version {version}");
        assert!(
            at.insert(id, (stream, version, position)).is_none(),
            "event {id} is stored twice"
        );
    }
    let mut acked = 0;
    for a in attempts {
        let found: Vec<_> = a.ids.iter().filter_map(|id| at.get(id)).collect();
        match a.answer {
            Answer::Acked { first_position } => {
                acked += 1;
                assert_eq!(
                    found.len(),
                    BATCH,
                    "an acknowledged append is missing events"
                );
                for (i, (stream, _, position)) in found.iter().enumerate() {
                    assert_eq!(stream, &a.stream);
                    assert_eq!(*position, first_position + i as u64);
                }
            }
            _ => assert!(
                found.is_empty() || found.len() == BATCH,
                "an unacknowledged append is stored in part"
            ),
        }
    }
    let verify: Value = app
        .client
        .get(format!("{}/audit/verify", app.base))
        .bearer_auth(app.token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
    acked
}

async fn env_with_short_timeout(backend: &Backend) -> Arc<TestEnv> {
    let env = TestEnv::new(backend).await;
    env.configure(|c| c.store_timeout = STORE_TIMEOUT);
    env
}

/// Another session holds the event store's write lock (an operator's
/// shell, a careless maintenance job): appends and audited reads get a
/// prompt 503, `/readyz` says `unavailable`; once the lock is gone they are
/// served again.
async fn a_locked_event_store_is_answered_promptly_and_then_served(backend: Backend) {
    let env = env_with_short_timeout(&backend).await;
    let app = TestApp::start(env.clone()).await;
    let load = Load::start(&app, 3);
    load.until("appends", |c| c.acked >= 10 && c.reads_ok >= 1)
        .await;

    let lock = Held::begin(
        &env.database_url,
        "begin immediate",
        "begin; lock table events in access exclusive mode",
    )
    .await;
    load.refused(6).await;
    assert_not_ready(&app, &["unavailable"]).await;

    lock.release().await;
    load.serves_again(10).await;
    assert_ready(&app).await;
    let attempts = load.finish().await;
    let acked = assert_nothing_lost(&app, &attempts).await;
    eprintln!(
        "locked event store: {} appends, {acked} acknowledged",
        attempts.len()
    );
    app.stop().await;
}

both_backends!(a_locked_event_store_is_answered_promptly_and_then_served);

/// A filesystem of its own for the SQLite event store (tmpfs, a few MiB),
/// unmounted when dropped.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts `size` of tmpfs on `dir`; `None` where mounting is not
    /// permitted (not root), which fails the test when
    /// `EVENTVAULT_REQUIRE_MOUNT=1` (as CI sets).
    fn mount(dir: &std::path::Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        if out.status.success() {
            return Some(SmallDisk {
                dir: dir.to_owned(),
            });
        }
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var("EVENTVAULT_REQUIRE_MOUNT").as_deref() != Ok("1"),
            "a tmpfs is required (EVENTVAULT_REQUIRE_MOUNT=1) but mount failed: {why}"
        );
        eprintln!("SKIPPED: the full-disk test needs to mount a tmpfs (root): {why}");
        None
    }

    /// Fills the filesystem with ballast files up to the last byte.
    fn fill(&self) -> usize {
        use std::io::Write as _;
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut files = 0;
        'files: loop {
            let path = self.dir.join(format!("ballast-{files}"));
            let Ok(mut f) = std::fs::File::create(&path) else {
                break;
            };
            files += 1;
            for _ in 0..16 {
                if f.write_all(&chunk).and_then(|()| f.sync_all()).is_err() {
                    break 'files;
                }
            }
        }
        files
    }

    /// Removes the ballast.
    fn free(&self) {
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("ballast-") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Saves the snapshot of the first appender's stream at its version 1.
async fn save_snapshot(app: &TestApp) -> reqwest::Response {
    app.client
        .put(format!("{}/streams/accounts-fault-0/snapshot", app.base))
        .bearer_auth(app.token())
        .json(&serde_json::json!({"version": 1, "state": {"balance": "10.00"}}))
        .send()
        .await
        .unwrap()
}

/// The SQLite event store's disk fills up under load: appends and audited
/// reads get a prompt 503, `/readyz` says `full`; once space is freed the
/// next append succeeds without a restart (the failed transactions were
/// rolled back, not left open on their connections), nothing acknowledged
/// is lost and the database passes `PRAGMA integrity_check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_full_disk_is_answered_promptly_and_then_served() {
    capture_logs();
    let env = env_with_short_timeout(&Backend::Sqlite).await;
    // The event store's directory (data/) on a filesystem of its own.
    let Some(disk) = SmallDisk::mount(&env.dir.path().join("data"), "8m") else {
        return;
    };
    let app = TestApp::start(env.clone()).await;
    let load = Load::start(&app, 3);
    load.until("appends", |c| c.acked >= 10 && c.reads_ok >= 1)
        .await;

    let ballast = disk.fill();
    load.refused(6).await;
    assert_not_ready(&app, &["full", "unavailable"]).await;
    // A snapshot's transaction, too, is refused and rolled back.
    let r = save_snapshot(&app).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    check_unavailable(r, Duration::ZERO).await.unwrap();

    disk.free();
    // Readiness finds out by itself that writes commit again.
    assert_ready(&app).await;
    load.serves_again(10).await;
    // Its connection did not go back to the pool inside a transaction that
    // SQLite had ended: snapshots are saved again.
    for _ in 0..3 {
        let r = save_snapshot(&app).await;
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    }
    let attempts = load.finish().await;
    let acked = assert_nothing_lost(&app, &attempts).await;
    let refused = attempts
        .iter()
        .filter(|a| matches!(a.answer, Answer::Unavailable))
        .count();
    eprintln!(
        "full disk: {} appends, {acked} acknowledged, {refused} refused with 503 ({ballast} ballast files)",
        attempts.len()
    );
    app.stop().await;
    let mut db = sqlx::SqliteConnection::connect(&env.database_url)
        .await
        .unwrap();
    let check: String = sqlx::query_scalar("pragma integrity_check")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    db.close().await.unwrap();
    drop(disk);
    assert_logs_hold_no_secret();
}

/// The PostgreSQL server holding both stores is stopped, started again,
/// then frozen (SIGSTOP: it neither answers nor closes connections) and
/// let go, all under load: every request is answered promptly, `/readyz`
/// says `unreachable` within 2 s, and the service serves again after each
/// outage without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_stopped_or_frozen_server_is_answered_promptly_and_then_served() {
    capture_logs();
    let cluster = PgCluster::start().await;
    let env = env_with_short_timeout(&Backend::Postgres(cluster.admin_url())).await;
    let app = TestApp::start(env.clone()).await;
    let load = Load::start(&app, 3);
    load.until("appends", |c| c.acked >= 10 && c.reads_ok >= 1)
        .await;

    cluster.stop().await;
    load.refused(6).await;
    assert_not_ready(&app, &["unreachable"]).await;
    cluster.restart().await;
    load.serves_again(10).await;
    assert_ready(&app).await;

    cluster.freeze();
    load.refused(6).await;
    assert_not_ready(&app, &["unreachable"]).await;
    cluster.thaw();
    load.serves_again(10).await;
    assert_ready(&app).await;

    let attempts = load.finish().await;
    let acked = assert_nothing_lost(&app, &attempts).await;
    eprintln!(
        "postgres outages: {} appends, {acked} acknowledged",
        attempts.len()
    );
    app.stop().await;
    drop(cluster);
    assert_logs_hold_no_secret();
}
