//! The outbox relay, against the NATS server on 127.0.0.1:4222 (JetStream
//! enabled): every committed event published once, in position order, with
//! its clear fields and sealed blob; restarts and a rewound checkpoint leave
//! no gap and no duplicate; an unreachable broker stops neither the service
//! nor holds back anything for later; after a forget the broker holds only
//! blobs whose key is gone.
//!
//! Each test publishes to a JetStream stream and subject prefix of its own,
//! deleted when the test ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, PullConsumer, pull},
};
use base64::Engine as _;
use futures::StreamExt as _;

use serde_json::Value;
use tokio::sync::watch;
use uuid::Uuid;

use crate::at_rest::{events_db, key_ids_of, keystore_db};
use crate::common::{
    Backend, NatsTarget, TestApp, TestEnv, assert_no_personal_value, batch, deposit,
    wait_for_log_lines, wait_for_log_lines_where,
};
use crate::{both_backends, postgres_only};
use eventvault::relay::{POSITION_HEADER, RelayConfig, checkpoint_name};
use eventvault::store::{Db, EventStore};

both_backends!(
    every_committed_event_is_published_once_in_position_order,
    a_restarted_relay_leaves_no_gap_and_no_duplicate,
    the_relay_wakes_on_the_head_it_is_given_and_stops_when_told,
    an_unreachable_broker_neither_stops_the_service_nor_moves_the_checkpoint,
    a_broker_outage_in_the_middle_of_a_run_loses_and_repeats_nothing,
    after_a_forget_the_broker_holds_only_blobs_whose_key_is_gone,
    no_user_stream_publishes_where_another_category_or_a_system_stream_does,
);

// Several processes share one database only on PostgreSQL.
postgres_only!(one_process_publishes_at_a_time_and_another_takes_over,);

const NATS_URL: &str = "nats://127.0.0.1:4222";

/// The longest wait for the relay to get somewhere.
const PATIENCE: Duration = Duration::from_secs(15);

/// A JetStream stream and subject prefix of this test's own; the stream is
/// deleted when this is dropped, also when the test fails.
pub struct Broker {
    js: jetstream::Context,
    pub target: NatsTarget,
}

impl Broker {
    pub async fn new() -> Broker {
        let client = async_nats::connect(NATS_URL).await.unwrap_or_else(|e| {
            panic!("these tests need a NATS server with JetStream on {NATS_URL}: {e}")
        });
        let id = Uuid::new_v4().simple().to_string();
        Broker {
            js: jetstream::new(client),
            target: NatsTarget {
                url: NATS_URL.into(),
                stream: format!("EVTEST_{}", &id[..16]),
                subject_prefix: format!("evtest{}", &id[..16]),
            },
        }
    }

    fn stream(&self) -> &str {
        &self.target.stream
    }

    fn prefix(&self) -> &str {
        &self.target.subject_prefix
    }

    /// Messages stored in the stream (0 while it does not exist).
    async fn stored(&self) -> u64 {
        match self.js.get_stream(self.stream()).await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        }
    }

    /// The stream, once the relay has created it: JetStream announces a
    /// new stream on an advisory subject, which is subscribed to before the
    /// stream is looked for (so an announcement in between is not missed).
    async fn created_stream(&self) -> jetstream::stream::Stream {
        let client = self.js.client();
        let mut created = client
            .subscribe(format!(
                "$JS.EVENT.ADVISORY.STREAM.CREATED.{}",
                self.stream()
            ))
            .await
            .unwrap();
        // The server has the subscription once it answers the flush.
        client.flush().await.unwrap();
        if let Ok(stream) = self.js.get_stream(self.stream()).await {
            return stream;
        }
        created
            .next()
            .await
            .expect("the advisory subscription lives");
        self.js
            .get_stream(self.stream())
            .await
            .expect("the relay created the stream")
    }

    /// Waits until the stream holds `n` messages, and insists on no more:
    /// an ordered consumer of its own (from the first message, not
    /// acknowledging) receives them as JetStream stores them.
    #[track_caller]
    pub fn wait_until_stored(&self, n: u64) -> impl Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let received = tokio::time::timeout(PATIENCE, async {
                let consumer = self
                    .created_stream()
                    .await
                    .create_consumer(pull::OrderedConfig::default())
                    .await
                    .unwrap();
                let mut messages = consumer.messages().await.unwrap();
                for _ in 0..n {
                    messages
                        .next()
                        .await
                        .expect("the consumer's messages go on")
                        .unwrap();
                }
            })
            .await;
            let stored = self.stored().await;
            assert!(
                received.is_ok(),
                "at {caller}: after {PATIENCE:?} the stream holds {stored} messages, expected {n}"
            );
            assert_eq!(
                stored, n,
                "at {caller}: the stream holds {stored} messages, expected {n}"
            );
        }
    }

    /// A durable pull consumer from the stream's first message on.
    async fn consumer(&self, name: &str) -> PullConsumer {
        self.consumer_of(name, "").await
    }

    /// [`Broker::consumer`] of the messages whose subject matches `filter`
    /// (`""`: every one).
    async fn consumer_of(&self, name: &str, filter: &str) -> PullConsumer {
        self.js
            .get_stream(self.stream())
            .await
            .expect("the relay created the stream")
            .get_or_create_consumer(
                name,
                pull::Config {
                    durable_name: Some(name.into()),
                    ack_policy: AckPolicy::Explicit,
                    filter_subject: filter.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let stream = self.target.stream.clone();
        // Drop runs outside async context: a small runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(client) = async_nats::connect(NATS_URL).await {
                    let _ = jetstream::new(client).delete_stream(&stream).await;
                }
            })
        })
        .join();
    }
}

/// One message as the consumer received it.
struct Received {
    subject: String,
    msg_id: String,
    position_header: u64,
    /// The payload as text, to search for what must not be in it.
    text: String,
    body: Value,
}

/// Every message the consumer has not received yet, acknowledged.
async fn drain(consumer: &PullConsumer) -> Vec<Received> {
    let mut out = Vec::new();
    loop {
        // `fetch` does not wait: it returns what is there now.
        let mut messages = consumer.fetch().max_messages(500).messages().await.unwrap();
        let before = out.len();
        while let Some(m) = messages.next().await {
            let m = m.unwrap();
            let headers = m.headers.clone().expect("the relay sends headers");
            let header = |name: &str| {
                headers
                    .get(name)
                    .unwrap_or_else(|| panic!("no {name} header"))
                    .as_str()
                    .to_owned()
            };
            let text = String::from_utf8(m.payload.to_vec()).expect("UTF-8 payload");
            out.push(Received {
                subject: m.subject.to_string(),
                msg_id: header("Nats-Msg-Id"),
                position_header: header(POSITION_HEADER).parse().unwrap(),
                body: serde_json::from_str(&text).expect("a JSON payload"),
                text,
            });
            m.ack().await.unwrap();
        }
        if out.len() == before {
            return out;
        }
    }
}

fn positions(received: &[Received]) -> Vec<u64> {
    received
        .iter()
        .map(|r| r.body["position"].as_u64().unwrap())
        .collect()
}

/// What the broker received, subjects and bodies, one a line (no personal
/// value holds a line break), for [`assert_no_personal_value`].
fn broker_text(received: &[Received]) -> String {
    received
        .iter()
        .flat_map(|r| [r.subject.as_str(), r.text.as_str()])
        .collect::<Vec<_>>()
        .join("\n")
}

/// The relay's checkpoint for `stream` (`None` before its first save).
async fn checkpoint(db: &Db, stream: &str) -> Option<i64> {
    let q = "select position from relay_checkpoints where name = $1";
    let name = checkpoint_name(stream);
    match db {
        Db::Sqlite(p) => sqlx::query_scalar(q).bind(&name).fetch_optional(p).await,
        Db::Postgres(p) => sqlx::query_scalar(q).bind(&name).fetch_optional(p).await,
    }
    .unwrap()
}

/// Waits until the relay for `stream` has saved the checkpoint `position`
/// (it logs each saved checkpoint: `… stream=<stream> position=<n>`, at
/// debug or info level), then checks the saved row.
#[track_caller]
pub fn wait_for_checkpoint<'a>(
    db: &'a Db,
    stream: &'a str,
    position: i64,
) -> impl Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let saved = format!("stream={stream} position={position}");
        wait_for_log_lines_where(
            |l| l.contains("outbox relay published") && l.ends_with(&saved),
            1,
            PATIENCE,
            caller,
        )
        .await;
        let at = checkpoint(db, stream).await;
        assert_eq!(
            at,
            Some(position),
            "at {caller}: the relay logged checkpoint {position}, the store holds {at:?}"
        );
    }
}

/// The key id and sealed blob stored with the event at `position`.
async fn stored_seal(db: &Db, position: u64) -> (Option<String>, Option<Vec<u8>>) {
    let q = "select key_id, sealed from events where position = $1";
    let position = position as i64;
    match db {
        Db::Sqlite(p) => sqlx::query_as(q).bind(position).fetch_one(p).await,
        Db::Postgres(p) => sqlx::query_as(q).bind(position).fetch_one(p).await,
    }
    .unwrap()
}

/// `n` deposits about `subject` in one append to `stream`.
async fn deposits(app: &TestApp, stream: &str, subject: &str, n: usize) {
    let events = (0..n)
        .map(|i| deposit(Uuid::new_v4(), subject, &format!("{i}.01")))
        .collect();
    app.append_ok(stream, &batch(events)).await;
}

async fn every_committed_event_is_published_once_in_position_order(backend: Backend) {
    let broker = Broker::new().await;
    let env = TestEnv::new(&backend).await;
    env.set_nats(Some(broker.target.clone()));
    let app = TestApp::start(env.clone()).await;

    crate::forget::two_deposits(&app).await;
    // A number no float holds, to be published digit for digit.
    let exact: Value = serde_json::from_str(
        r#"{"type":"MoneyDeposited","subject":"cust-3","data":{"account":"ACC-3",
            "amount":12345678901234567890.000000000000000001,"currency":"EUR",
            "payer_name":"Jane Roe"}}"#,
    )
    .unwrap();
    app.append_ok("accounts-2", &batch(vec![exact])).await;
    // No subject: stored, and published, in clear. A '.' in the type
    // cannot stand in a subject token.
    let fee: Value =
        serde_json::from_str(r#"{"type":"Fee.Charged","data":{"account":"ACC-1","fee":0.10}}"#)
            .unwrap();
    app.append_ok("ledger", &batch(vec![fee])).await;
    app.append_ok(
        "payments-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "0.25")]),
    )
    .await;
    let log = app.whole_log().await;
    assert_eq!(log.len(), 5);

    broker.wait_until_stored(5).await;
    let consumer = broker.consumer("reader").await;
    let got = drain(&consumer).await;
    assert_eq!(positions(&got), [1, 2, 3, 4, 5], "once each, in order");
    let p = broker.prefix();
    let subjects: Vec<&str> = got.iter().map(|r| r.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            format!("{p}.accounts.MoneyDeposited"),
            format!("{p}.accounts.MoneyDeposited"),
            format!("{p}.accounts.MoneyDeposited"),
            format!("{p}.ledger.Fee_2ECharged"),
            format!("{p}.payments.MoneyDeposited"),
        ]
    );

    let db = events_db(&env).await;
    for (r, e) in got.iter().zip(&log) {
        let b = &r.body;
        for field in [
            "id",
            "stream_id",
            "version",
            "position",
            "type",
            "subject",
            "metadata",
            "recorded_at",
        ] {
            assert_eq!(b[field], e[field], "{field} of {e}");
        }
        assert_eq!(r.msg_id, e["id"].as_str().unwrap(), "the event id dedups");
        assert_eq!(r.position_header, e["position"].as_u64().unwrap());
        let (key_id, sealed) = stored_seal(&db, r.position_header).await;
        assert_eq!(b["key_id"].as_str(), key_id.as_deref());
        match sealed {
            Some(blob) => {
                let published = base64::engine::general_purpose::STANDARD
                    .decode(b["sealed"].as_str().expect("sealed in base64"))
                    .unwrap();
                assert_eq!(published, blob, "the blob as the store holds it");
            }
            None => assert!(b["sealed"].is_null(), "{b}"),
        }
    }
    // Personal events: clear fields only, and the sealed rest with its key.
    for r in got.iter().filter(|r| r.body["subject"].is_string()) {
        let keys: Vec<&String> = r.body["data"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["account", "amount", "currency"], "{}", r.text);
        assert!(r.body["sealed"].is_string() && r.body["key_id"].is_string());
    }
    assert!(
        got[2]
            .text
            .contains(r#""amount":12345678901234567890.000000000000000001"#),
        "{}",
        got[2].text
    );
    assert!(got[3].text.contains(r#""fee":0.10"#), "{}", got[3].text);
    assert_eq!(got[0].body["data"]["amount"], "10.50");
    assert_no_personal_value(broker_text(&got));

    wait_for_checkpoint(&db, broker.stream(), 5).await;
    assert!(drain(&consumer).await.is_empty(), "nothing twice");
    app.stop().await;
    db.close().await;
}

async fn a_restarted_relay_leaves_no_gap_and_no_duplicate(backend: Backend) {
    let broker = Broker::new().await;
    let env = TestEnv::new(&backend).await;
    env.set_nats(Some(broker.target.clone()));
    let app = TestApp::start(env.clone()).await;
    deposits(&app, "accounts-1", "cust-1", 3).await;
    broker.wait_until_stored(3).await;
    let consumer = broker.consumer("reader").await;
    let mut seen = drain(&consumer).await;
    assert_eq!(positions(&seen), [1, 2, 3]);

    // The relay is down (the service runs without one) while more commits.
    let env = app.stop().await;
    env.set_nats(None);
    let app = TestApp::start(env.clone()).await;
    deposits(&app, "accounts-1", "cust-1", 2).await;
    deposits(&app, "payments-1", "cust-2", 2).await;
    let env = app.stop().await;
    assert_eq!(broker.stored().await, 3);

    // Back up: it resumes from its checkpoint.
    env.set_nats(Some(broker.target.clone()));
    let app = TestApp::start(env.clone()).await;
    broker.wait_until_stored(7).await;
    seen.extend(drain(&consumer).await);
    assert_eq!(positions(&seen), [1, 2, 3, 4, 5, 6, 7]);
    let db = events_db(&env).await;
    wait_for_checkpoint(&db, broker.stream(), 7).await;

    // A crash between the broker's acknowledgement and the checkpoint: the
    // checkpoint lags what the broker holds. The relay publishes 3..=7
    // again, JetStream drops them by event id, and the consumer sees only
    // what is new.
    let env = app.stop().await;
    let sql = "update relay_checkpoints set position = 2 where name = $1";
    let name = checkpoint_name(broker.stream());
    match &db {
        Db::Sqlite(p) => sqlx::query(sql).bind(&name).execute(p).await.map(|_| ()),
        Db::Postgres(p) => sqlx::query(sql).bind(&name).execute(p).await.map(|_| ()),
    }
    .unwrap();
    let app = TestApp::start(env.clone()).await;
    deposits(&app, "accounts-1", "cust-1", 1).await;
    // The checkpoint reaches 8 only through acknowledgements of 3..=8.
    wait_for_checkpoint(&db, broker.stream(), 8).await;
    assert_eq!(broker.stored().await, 8, "the repeats were dropped");
    seen.extend(drain(&consumer).await);
    assert_eq!(positions(&seen), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_no_personal_value(broker_text(&seen));
    app.stop().await;
    db.close().await;
}

async fn the_relay_wakes_on_the_head_it_is_given_and_stops_when_told(backend: Backend) {
    let broker = Broker::new().await;
    // The application runs no relay; this test runs one by hand.
    let app = TestApp::spawn(&backend).await;
    deposits(&app, "accounts-1", "cust-1", 2).await;
    let store = EventStore::new(events_db(&app.env).await);
    let (head_tx, head_rx) = watch::channel(store.head_position().await.unwrap());
    let shutdown = eventvault::shutdown::Shutdown::new();
    let cfg = RelayConfig::parse(NATS_URL, broker.stream(), broker.prefix()).unwrap();
    let relay = eventvault::relay::spawn(store.clone(), cfg, head_rx, &shutdown);
    broker.wait_until_stored(2).await;

    // Caught up, it waits for the head; its own re-check is far off
    // (longer than PATIENCE), so only the announcement can wake it.
    assert!(eventvault::relay::IDLE_RECHECK > PATIENCE);
    deposits(&app, "payments-1", "cust-2", 3).await;
    head_tx.send(store.head_position().await.unwrap()).unwrap();
    broker.wait_until_stored(5).await;
    wait_for_checkpoint(&store.db, broker.stream(), 5).await;

    shutdown.stop_all();
    tokio::time::timeout(Duration::from_secs(5), relay)
        .await
        .expect("the relay stops when told")
        .expect("the relay did not panic");
    let consumer = broker.consumer("reader").await;
    assert_eq!(positions(&drain(&consumer).await), [1, 2, 3, 4, 5]);
    app.stop().await;
    store.db.close().await;
}

async fn an_unreachable_broker_neither_stops_the_service_nor_moves_the_checkpoint(
    backend: Backend,
) {
    let broker = Broker::new().await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = TestEnv::new(&backend).await;
    env.set_nats(Some(NatsTarget {
        url: format!("nats://127.0.0.1:{closed}"),
        ..broker.target.clone()
    }));
    let app = TestApp::start(env.clone()).await;
    deposits(&app, "accounts-1", "cust-1", 2).await;
    // The relay reports the unreachable broker, and again on its retry.
    wait_for_log_lines(&[broker.stream(), "NATS unreachable"], 2, PATIENCE).await;
    // The service goes on serving.
    deposits(&app, "payments-1", "cust-2", 1).await;
    assert_eq!(app.whole_log().await.len(), 3);
    let db = events_db(&env).await;
    assert_eq!(
        checkpoint(&db, broker.stream()).await,
        None,
        "nothing acknowledged, nothing checkpointed"
    );
    // Stopping does not wait for the broker either.
    let env = tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("a graceful shutdown while the broker is unreachable");

    // Nothing was skipped: with a broker that answers, all of it goes out.
    env.set_nats(Some(broker.target.clone()));
    let app = TestApp::start(env.clone()).await;
    broker.wait_until_stored(3).await;
    wait_for_checkpoint(&db, broker.stream(), 3).await;
    let consumer = broker.consumer("reader").await;
    assert_eq!(positions(&drain(&consumer).await), [1, 2, 3]);
    app.stop().await;
    db.close().await;
}

async fn one_process_publishes_at_a_time_and_another_takes_over(backend: Backend) {
    let broker = Broker::new().await;
    let env = TestEnv::new(&backend).await;
    env.set_nats(Some(broker.target.clone()));
    let first = TestApp::start(env.clone()).await;
    deposits(&first, "accounts-1", "cust-1", 2).await;
    let db = events_db(&env).await;
    // The first process's relay has published: it holds the lease.
    wait_for_checkpoint(&db, broker.stream(), 2).await;

    let second = TestApp::start(env.clone()).await;
    // The second relay stands by.
    wait_for_log_lines(&[broker.stream(), "standing by"], 1, PATIENCE).await;
    deposits(&second, "accounts-1", "cust-1", 1).await;
    deposits(&first, "payments-1", "cust-2", 1).await;
    broker.wait_until_stored(4).await;
    wait_for_checkpoint(&db, broker.stream(), 4).await;

    // The publisher stops; the one standing by takes over.
    first.stop().await;
    deposits(&second, "accounts-2", "cust-3", 2).await;
    broker.wait_until_stored(6).await;
    wait_for_checkpoint(&db, broker.stream(), 6).await;
    let consumer = broker.consumer("reader").await;
    assert_eq!(positions(&drain(&consumer).await), [1, 2, 3, 4, 5, 6]);
    second.stop().await;
    db.close().await;
}

/// A TCP proxy to the NATS server that can cut every connection and refuse
/// new ones (an outage), then let them through again.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (open, connections) = (open.clone(), connections.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect("127.0.0.1:4222").await
                        {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(pipe);
                }
            }
        });
        Proxy {
            port,
            open,
            connections,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Refuses new connections and closes the open ones; returns once they
    /// are closed (an aborted pipe may still forward until it stops).
    async fn cut(&self) {
        let pipes: Vec<_> = {
            self.open.store(false, Ordering::SeqCst);
            self.connections.lock().unwrap().drain(..).collect()
        };
        for pipe in pipes {
            pipe.abort();
            let _ = pipe.await;
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.open.store(false, Ordering::SeqCst);
        for pipe in self.connections.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

async fn a_broker_outage_in_the_middle_of_a_run_loses_and_repeats_nothing(backend: Backend) {
    let broker = Broker::new().await;
    let proxy = Proxy::start().await;
    let env = TestEnv::new(&backend).await;
    env.set_nats(Some(NatsTarget {
        url: proxy.url(),
        ..broker.target.clone()
    }));
    let app = TestApp::start(env.clone()).await;
    deposits(&app, "accounts-1", "cust-1", 3).await;
    broker.wait_until_stored(3).await;
    // Stored by the broker is not yet acknowledged and checkpointed.
    let db = events_db(&env).await;
    wait_for_checkpoint(&db, broker.stream(), 3).await;

    // The broker goes away while the service keeps committing.
    proxy.cut().await;
    deposits(&app, "accounts-1", "cust-1", 2).await;
    deposits(&app, "payments-1", "cust-2", 1).await;
    // The relay notices the outage; the checkpoint does not move.
    wait_for_log_lines(&[broker.stream(), "NATS unreachable"], 1, PATIENCE).await;
    assert_eq!(checkpoint(&db, broker.stream()).await, Some(3));

    proxy.restore();
    broker.wait_until_stored(6).await;
    wait_for_checkpoint(&db, broker.stream(), 6).await;
    let consumer = broker.consumer("reader").await;
    assert_eq!(positions(&drain(&consumer).await), [1, 2, 3, 4, 5, 6]);
    app.stop().await;
    db.close().await;
}

async fn after_a_forget_the_broker_holds_only_blobs_whose_key_is_gone(backend: Backend) {
    let broker = Broker::new().await;
    let env = TestEnv::new(&backend).await;
    env.set_nats(Some(broker.target.clone()));
    let app = TestApp::start(env.clone()).await;
    crate::forget::seed(&app).await;
    broker.wait_until_stored(3).await;

    let dpo = env.add_principal("dpo", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-1").await;
    // The `$subjects` event goes out too: read models learn of the forget.
    broker.wait_until_stored(4).await;
    let consumer = broker.consumer("reader").await;
    let got = drain(&consumer).await;
    assert_eq!(positions(&got), [1, 2, 3, 4]);
    assert_no_personal_value(broker_text(&got));

    let keystore = keystore_db(&env).await;
    assert!(key_ids_of(&keystore, "cust-1").await.is_empty());
    let forgotten: Vec<&Received> = got
        .iter()
        .filter(|r| r.body["subject"] == "cust-1")
        .collect();
    assert_eq!(forgotten.len(), 2);
    for r in &forgotten {
        let key_id = r.body["key_id"].as_str().expect("a key id");
        assert!(r.body["sealed"].is_string(), "the blob is still there");
        assert!(
            !key_exists(&keystore, key_id).await,
            "key {key_id} is gone, so the blob cannot be opened"
        );
        assert!(r.body["data"]["amount"].is_string(), "clear fields stay");
    }
    // The same check finds a key that was not destroyed.
    let other = got.iter().find(|r| r.body["subject"] == "cust-2").unwrap();
    assert!(key_exists(&keystore, other.body["key_id"].as_str().unwrap()).await);

    let ledger = &got[3];
    assert_eq!(
        ledger.subject,
        format!("{}._24subjects.SubjectForgotten", broker.prefix())
    );
    assert_eq!(ledger.body["stream_id"], "$subjects");
    assert_eq!(ledger.body["data"]["subject"], "cust-1");
    assert!(ledger.body["sealed"].is_null());
    assert!(
        !ledger.text.contains("ticket 81"),
        "the reason stays in the ledger"
    );
    app.stop().await;
    keystore.close().await;
}

/// Subjects are one-to-one: `_subjects` (a user stream) no longer publishes
/// where `$subjects` does, so it cannot forge the `SubjectForgotten`
/// messages read models obey; `a.b-1` and `a_b-1` no longer share a
/// category. A consumer of the system stream's subjects gets the real
/// forget alone. (And a nested value in a clear field, personal, goes out
/// sealed.)
async fn no_user_stream_publishes_where_another_category_or_a_system_stream_does(backend: Backend) {
    let broker = Broker::new().await;
    let env = TestEnv::new(&backend).await;
    env.set_nats(Some(broker.target.clone()));
    let app = TestApp::start(env.clone()).await;
    let forged: Value = serde_json::json!({"type": "SubjectForgotten",
        "data": {"subject": "cust-2", "keys_destroyed": 1, "events_affected": 1}});
    app.append_ok("_subjects", &batch(vec![forged])).await;
    let t = || serde_json::json!({"type": "T", "data": {"n": 1}});
    app.append_ok("a.b-1", &batch(vec![t()])).await;
    app.append_ok("a_b-1", &batch(vec![t()])).await;
    let nested: Value = serde_json::json!({"type": "MoneyDeposited", "subject": "cust-1",
        "data": {"account": {"holder": "Jane Roe"}, "amount": "1.00", "currency": "EUR"}});
    app.append_ok("accounts-1", &batch(vec![nested])).await;
    let dpo = env.add_principal("dpo", &["dpo"]).await;
    crate::forget::forget_ok(&app, &dpo, "cust-1").await;

    broker.wait_until_stored(5).await;
    let got = drain(&broker.consumer("reader").await).await;
    assert_eq!(positions(&got), [1, 2, 3, 4, 5]);
    let p = broker.prefix();
    let subjects: Vec<&str> = got.iter().map(|r| r.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            format!("{p}.__subjects.SubjectForgotten"),
            format!("{p}.a_2Eb.T"),
            format!("{p}.a__b.T"),
            format!("{p}.accounts.MoneyDeposited"),
            format!("{p}._24subjects.SubjectForgotten"),
        ]
    );
    assert_no_personal_value(broker_text(&got));
    assert_eq!(
        got[3].body["data"],
        serde_json::json!({"amount": "1.00", "currency": "EUR"})
    );
    assert!(got[3].body["sealed"].is_string());

    // What a read model following the forgets receives.
    let forgets = drain(
        &broker
            .consumer_of("forgets", &format!("{p}._24subjects.>"))
            .await,
    )
    .await;
    assert_eq!(forgets.len(), 1);
    assert_eq!(forgets[0].body["stream_id"], "$subjects");
    assert_eq!(forgets[0].body["data"]["subject"], "cust-1");
    let categories = drain(&broker.consumer_of("a_b", &format!("{p}.a__b.>")).await).await;
    assert_eq!(categories.len(), 1);
    assert_eq!(categories[0].body["stream_id"], "a_b-1");
    app.stop().await;
}

pub async fn key_exists(keystore: &Db, key_id: &str) -> bool {
    let q = "select count(*) from deks where key_id = $1";
    let n: i64 = match keystore {
        Db::Sqlite(p) => sqlx::query_scalar(q).bind(key_id).fetch_one(p).await,
        Db::Postgres(p) => sqlx::query_scalar(q).bind(key_id).fetch_one(p).await,
    }
    .unwrap();
    n > 0
}
