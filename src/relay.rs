//! The outbox relay: publishes every committed event, in position order, to
//! NATS JetStream, at least once, resuming from a checkpoint kept in the event
//! store.
//!
//! What leaves is what the event store holds: the clear fields, and the
//! personal fields still sealed, with the id of the key that sealed them. The
//! relay never opens a blob and never talks to the key manager, so the broker
//! never receives personal data in clear, and a forget, which destroys the
//! key, leaves the broker's copies as unreadable as the store's.
//!
//! Subjects are `<prefix>.<category>.<type>`: the category is the stream id
//! up to its first `-` (`accounts-42` → `accounts`), the whole id when it has
//! none. A NATS subject token may not hold `.`, `*`, `>` or whitespace, so
//! category and type are escaped, one-to-one ([`token`]): letters, digits,
//! `-`, `:` and `@` stay, `_` becomes `__`, and every other byte `_` and its
//! two hex digits (`$subjects` → `_24subjects`, a type `Money.Deposited` →
//! `Money_2EDeposited`). Two different categories or types never share a
//! token (`a.b` → `a_2Eb`, `a_b` → `a__b`), and only a category that begins
//! with `$`, which only system streams have, gives a token beginning with
//! `_24`: no user stream publishes where a system stream does.
//!
//! Order and delivery: events are read in position order and published in a
//! pipelined batch; the checkpoint moves only past events JetStream has
//! acknowledged. Each message carries the event id as `Nats-Msg-Id`, so the
//! stream drops a repeat within its duplicate window, and every message but
//! the first of a batch (whose predecessor is acknowledged already) names the
//! event before it in `Nats-Expected-Last-Msg-Id`, so that JetStream stores
//! nothing behind a message it did not store. A failure anywhere in a batch
//! thus leaves a stored prefix, and the relay publishes again from the first
//! unacknowledged event: never a gap, never a reordering.
//!
//! Waking: the relay reads until it has caught up, then waits for the head
//! position it is given to pass what it has published (and, as a safety net
//! against a lost wake-up, re-reads after [`IDLE_RECHECK`]).
//!
//! One publisher: on PostgreSQL only the process holding the relay's lease
//! ([`crate::store::relay::RelayLease`]) publishes; the others stand by.
//!
//! Failures never stop the service: NATS unreachable, a refused publish or a
//! database error is logged (never a payload) and retried with a bounded
//! exponential backoff, from the checkpoint, skipping nothing.

use std::time::{Duration, Instant};

use async_nats::ServerAddr;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use base64::Engine as _;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::{EventId, Position, Subject, Version, rfc3339};
use crate::shutdown::Shutdown;
use crate::store::relay::RelayLease;
use crate::store::{EventStore, StoreError, StoredEvent};

/// JetStream stream the events go to, unless configured otherwise.
pub const DEFAULT_STREAM: &str = "EVENTVAULT";

/// First token of every subject, unless configured otherwise.
pub const DEFAULT_SUBJECT_PREFIX: &str = "eventvault";

/// Header carrying the event's global position (the payload has it too; a
/// consumer can order or skip by it without parsing the body).
pub const POSITION_HEADER: &str = "Eventvault-Position";

/// How long JetStream remembers a message id: a repeat published within it
/// (a relay restarted between the broker's acknowledgement and its checkpoint,
/// or a retry after a lost acknowledgement) is dropped. Beyond it a consumer
/// may see a repeat, with the same event id.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Events read and published per batch.
const BATCH: u32 = 500;

/// When caught up and not woken, the relay looks at the store again after
/// this long, in case a wake-up was lost.
pub const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// Bounds of the retry delay after a failure (doubling from the first).
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// How often a process without the lease tries to take it.
const STANDBY_FIRST: Duration = Duration::from_secs(1);
const STANDBY_MAX: Duration = Duration::from_secs(5);

/// How long one connection attempt to NATS may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Least time between two progress lines in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// A relay setting that cannot work; stops the start.
#[derive(Debug, thiserror::Error)]
pub enum RelayConfigError {
    #[error("--nats-url names no server")]
    NoServer,
    #[error("--nats-url: {0}")]
    Url(String),
    #[error(
        "--nats-stream {0:?} is not a usable JetStream stream name: 1 to 64 letters, digits, '-' or '_'"
    )]
    Stream(String),
    #[error(
        "--nats-subject-prefix {0:?} is not a usable subject prefix: dot-separated tokens of letters, digits, '-', '_', ':' or '@', 1 to 100 characters"
    )]
    SubjectPrefix(String),
}

/// Where and how the relay publishes; made only by [`RelayConfig::parse`].
#[derive(Clone)]
pub struct RelayConfig {
    /// The NATS servers (credentials in a URL stay inside, for the client).
    servers: Vec<ServerAddr>,
    /// The same, with credentials replaced, for the log.
    servers_shown: String,
    /// The JetStream stream, created if missing.
    stream: String,
    /// First token(s) of every subject; the stream captures `<prefix>.>`.
    subject_prefix: String,
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("servers", &self.servers_shown)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .finish()
    }
}

impl RelayConfig {
    /// `url`: one NATS URL or several, comma-separated (`nats://host:4222`,
    /// `tls://…`; a bare `host:port` means `nats://`).
    pub fn parse(url: &str, stream: &str, subject_prefix: &str) -> Result<Self, RelayConfigError> {
        let servers = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ServerAddr>()
                    .map_err(|e| RelayConfigError::Url(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(RelayConfigError::NoServer);
        }
        let stream_ok = (1..=64).contains(&stream.len())
            && stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if !stream_ok {
            return Err(RelayConfigError::Stream(stream.to_owned()));
        }
        let prefix_ok = (1..=100).contains(&subject_prefix.len())
            && subject_prefix
                .split('.')
                .all(|t| !t.is_empty() && t.chars().all(prefix_char));
        if !prefix_ok {
            return Err(RelayConfigError::SubjectPrefix(subject_prefix.to_owned()));
        }
        let servers_shown = servers.iter().map(shown).collect::<Vec<_>>().join(",");
        Ok(Self {
            servers,
            servers_shown,
            stream: stream.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
        })
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn subject_prefix(&self) -> &str {
        &self.subject_prefix
    }

    /// The name of this relay's row in `relay_checkpoints`: one per stream,
    /// so a new stream is filled from the start of the log.
    pub fn checkpoint_name(&self) -> String {
        checkpoint_name(&self.stream)
    }
}

/// The checkpoint row of the relay publishing to the JetStream `stream`.
pub fn checkpoint_name(stream: &str) -> String {
    format!("nats:{stream}")
}

/// A server address fit for a log line: a password, or a token given as the
/// user name, becomes `***`.
fn shown(addr: &ServerAddr) -> String {
    let mut url = addr.clone().into_inner();
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    } else if !url.username().is_empty() {
        let _ = url.set_username("***");
    }
    url.to_string()
}

/// Characters a configured subject prefix may hold in its tokens.
fn prefix_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '@')
}

/// Bytes a token keeps as they are: never `.`, `*`, `>`, white space, nor
/// `_`, the escape character.
fn kept(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b':' | b'@')
}

/// `s` as one subject token, one-to-one: kept bytes stay, `_` becomes `__`,
/// every other byte `_XX` (its value in uppercase hex); the empty string is
/// `_` alone. Read left to right, a `_` is always followed by a second `_`
/// or by two hex digits (and by nothing only in `_` alone), so a token
/// decodes to exactly one string: two strings never share a token.
pub fn token(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'_' => out.push_str("__"),
            b if kept(b) => out.push(char::from(b)),
            b => {
                use std::fmt::Write as _;
                write!(out, "_{b:02X}").expect("writing to a String cannot fail");
            }
        }
    }
    out
}

/// The subject an event is published on: `<prefix>.<category>.<type>`,
/// category and type each one [`token`].
pub fn subject_for(prefix: &str, stream_id: &str, event_type: &str) -> String {
    let category = stream_id.split_once('-').map_or(stream_id, |(c, _)| c);
    format!("{prefix}.{}.{}", token(category), token(event_type))
}

/// The message body: the event as stored, personal fields still sealed.
#[derive(Serialize)]
struct Payload<'a> {
    id: EventId,
    stream_id: &'a str,
    version: Version,
    position: Position,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: Option<&'a str>,
    key_id: Option<&'a str>,
    /// The clear fields, verbatim (numbers keep every digit).
    data: &'a RawValue,
    /// The personal fields: the stored blob in standard base64, or `null`.
    sealed: Option<String>,
    metadata: &'a RawValue,
    recorded_at: String,
}

/// One event ready to publish.
struct Outgoing {
    position: u64,
    event_id: String,
    subject: String,
    payload: Vec<u8>,
}

fn encode(prefix: &str, e: &StoredEvent) -> Result<Outgoing, RelayError> {
    let corrupt = |reason: String| RelayError::Encode {
        position: e.position,
        reason,
    };
    let data: &RawValue =
        serde_json::from_str(&e.data).map_err(|_| corrupt("stored data is not JSON".into()))?;
    let metadata: &RawValue = serde_json::from_str(&e.metadata)
        .map_err(|_| corrupt("stored metadata is not JSON".into()))?;
    let payload = serde_json::to_vec(&Payload {
        id: e.event_id,
        stream_id: e.stream_id.as_str(),
        version: e.version,
        position: e.position,
        event_type: &e.event_type,
        subject: e.subject.as_ref().map(Subject::as_str),
        key_id: e.key_id.as_deref(),
        data,
        sealed: e
            .sealed
            .as_deref()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
        metadata,
        recorded_at: rfc3339(e.recorded_at),
    })
    .map_err(|_| corrupt("encoding failed".into()))?;
    Ok(Outgoing {
        position: e.position.get(),
        event_id: e.event_id.to_string(),
        subject: subject_for(prefix, e.stream_id.as_str(), &e.event_type),
        payload,
    })
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("cannot set up JetStream stream: {0}")]
    Stream(String),
    #[error("publishing position {position} failed: {reason}")]
    Publish { position: u64, reason: String },
    #[error("the event at position {position} cannot be published: {reason}")]
    Encode { position: Position, reason: String },
}

/// Starts the relay on `shutdown`. It publishes until the last connection
/// is closed (then what it has not published yet, it publishes after the
/// next start, from its checkpoint), waking
/// when `head` (the newest committed position) passes what it has
/// published. The task ends only then; every failure on the way is logged
/// and retried. Stopping anywhere is safe: what was published but not yet
/// checkpointed is published again next time, and dropped by JetStream as
/// a duplicate.
pub fn spawn(
    store: EventStore,
    cfg: RelayConfig,
    head: watch::Receiver<u64>,
    shutdown: &Shutdown,
) -> JoinHandle<()> {
    let stop = shutdown.connections_closed();
    shutdown.spawn(async move {
        let stream = cfg.stream.clone();
        tokio::select! {
            () = stop => {}
            () = Relay::new(store, cfg, head).run() => {}
        }
        tracing::info!(stream = %stream, "outbox relay stopped");
    })
}

/// A doubling delay between `first` and `max`.
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

struct Relay {
    store: EventStore,
    cfg: RelayConfig,
    head: watch::Receiver<u64>,
    retry: Backoff,
    /// When the last progress line was logged, and at which position.
    progress: Option<(Instant, u64)>,
}

impl Relay {
    fn new(store: EventStore, cfg: RelayConfig, head: watch::Receiver<u64>) -> Self {
        Self {
            store,
            cfg,
            head,
            retry: Backoff::new(RETRY_FIRST, RETRY_MAX),
            progress: None,
        }
    }

    async fn run(mut self) {
        tracing::info!(
            nats = %self.cfg.servers_shown,
            stream = %self.cfg.stream,
            subjects = %format!("{}.>", self.cfg.subject_prefix),
            "outbox relay starting"
        );
        let mut standby = Backoff::new(STANDBY_FIRST, STANDBY_MAX);
        let mut standing_by = false;
        loop {
            let lease = RelayLease::try_acquire(&self.store.db, &self.cfg.checkpoint_name()).await;
            let mut lease = match lease {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    if !standing_by {
                        tracing::info!(
                            stream = %self.cfg.stream,
                            "outbox relay standing by: another eventvault process publishes"
                        );
                        standing_by = true;
                    }
                    tokio::time::sleep(standby.next()).await;
                    continue;
                }
                Err(e) => {
                    self.pause(&RelayError::Store(e)).await;
                    continue;
                }
            };
            if standing_by {
                tracing::info!(stream = %self.cfg.stream, "outbox relay taking over");
                standing_by = false;
            }
            standby.reset();
            // Returns only when the event store fails (the lease may be
            // lost with it): give the lease up and take it anew.
            let e = self.publish_while_leased(&mut lease).await;
            lease.release().await;
            self.pause(&RelayError::Store(e)).await;
        }
    }

    /// Logs a failure and waits before the next attempt.
    async fn pause(&mut self, e: &RelayError) {
        let delay = self.retry.next();
        tracing::warn!(
            stream = %self.cfg.stream,
            error = %e,
            retry_in_ms = delay.as_millis() as u64,
            "outbox relay: {}; retrying",
            match e {
                RelayError::Connect(_) => "NATS unreachable",
                RelayError::Stream(_) => "JetStream stream unavailable",
                RelayError::Publish { .. } => "publish not acknowledged",
                RelayError::Encode { .. } => "event cannot be encoded",
                RelayError::Store(_) => "event store unavailable",
            }
        );
        tokio::time::sleep(delay).await;
    }

    /// Connects to NATS and publishes, reconnecting after NATS failures,
    /// until the event store fails.
    async fn publish_while_leased(&mut self, lease: &mut RelayLease) -> StoreError {
        loop {
            let result = match self.connect().await {
                Ok(js) => self.publish_from_checkpoint(lease, &js).await,
                Err(e) => Err(e),
            };
            match result {
                Err(RelayError::Store(e)) => return e,
                Err(e) => {
                    self.pause(&e).await;
                    if let Err(e) = lease.confirm().await {
                        return e;
                    }
                }
                Ok(never) => match never {},
            }
        }
    }

    async fn connect(&self) -> Result<jetstream::Context, RelayError> {
        let client = async_nats::ConnectOptions::new()
            .name("eventvault-relay")
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(self.cfg.servers.clone())
            .await
            .map_err(|e| RelayError::Connect(e.to_string()))?;
        let js = jetstream::new(client);
        js.get_or_create_stream(stream::Config {
            name: self.cfg.stream.clone(),
            subjects: vec![format!("{}.>", self.cfg.subject_prefix)],
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map_err(|e| RelayError::Stream(e.to_string()))?;
        Ok(js)
    }

    /// Publishes from the checkpoint on; returns only on a failure.
    async fn publish_from_checkpoint(
        &mut self,
        lease: &mut RelayLease,
        js: &jetstream::Context,
    ) -> Result<std::convert::Infallible, RelayError> {
        let mut position = lease.checkpoint().await?;
        loop {
            let rows = self.store.read_all(position, BATCH, None).await?;
            if !rows.is_empty() {
                let (acked, failure) = self.publish(js, &rows).await;
                if let Some(acked) = acked {
                    lease.save_checkpoint(acked).await?;
                    position = acked;
                    self.retry.reset();
                    self.log_progress(position);
                }
                if let Some(e) = failure {
                    return Err(e);
                }
            }
            if rows.len() < BATCH as usize {
                self.wait_for_events(position).await;
                lease.confirm().await?;
            }
        }
    }

    /// Publishes `rows` in order, pipelined. Returns the position of the
    /// last event of the acknowledged prefix, and the failure that ended it.
    async fn publish(
        &self,
        js: &jetstream::Context,
        rows: &[StoredEvent],
    ) -> (Option<u64>, Option<RelayError>) {
        let mut pending = Vec::with_capacity(rows.len());
        let mut failure = None;
        let mut previous_id: Option<String> = None;
        for row in rows {
            let out = match encode(&self.cfg.subject_prefix, row) {
                Ok(out) => out,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let mut message = PublishMessage::build()
                .payload(out.payload.into())
                .message_id(&out.event_id)
                .header(POSITION_HEADER, out.position.to_string().as_str());
            if let Some(previous) = &previous_id {
                message = message.expected_last_message_id(previous);
            }
            match js.send_publish(out.subject, message).await {
                Ok(ack) => pending.push((out.position, ack)),
                Err(e) => {
                    failure = Some(RelayError::Publish {
                        position: out.position,
                        reason: e.to_string(),
                    });
                    break;
                }
            }
            previous_id = Some(out.event_id);
        }
        let mut acked = None;
        for (position, ack) in pending {
            match ack.await {
                Ok(_) => acked = Some(position),
                Err(e) => {
                    // Nothing after it was stored (each later message
                    // expected its predecessor), or it is a repeat.
                    failure = Some(RelayError::Publish {
                        position,
                        reason: e.to_string(),
                    });
                    break;
                }
            }
        }
        (acked, failure)
    }

    /// Waits until the head passes `position`, or [`IDLE_RECHECK`] elapses.
    async fn wait_for_events(&mut self, position: u64) {
        let woken = tokio::time::timeout(IDLE_RECHECK, self.head.wait_for(|head| *head > position))
            .await
            .map(|woken| woken.is_ok());
        if woken == Ok(false) {
            // Nobody announces commits any more: only the re-check is left.
            tokio::time::sleep(IDLE_RECHECK).await;
        }
    }

    fn log_progress(&mut self, position: u64) {
        let due = self
            .progress
            .is_none_or(|(at, _)| at.elapsed() >= PROGRESS_EVERY);
        if due {
            tracing::info!(stream = %self.cfg.stream, position, "outbox relay published up to position {position}");
            self.progress = Some((Instant::now(), position));
        } else {
            tracing::debug!(stream = %self.cfg.stream, position, "outbox relay published a batch");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_category_and_type_escaped_one_to_one() {
        assert_eq!(
            subject_for("eventvault", "accounts-42", "MoneyDeposited"),
            "eventvault.accounts.MoneyDeposited"
        );
        assert_eq!(
            subject_for("ev", "ledger", "Opened"),
            "ev.ledger.Opened",
            "no '-': the whole id"
        );
        assert_eq!(
            subject_for("ev", "$subjects", "SubjectForgotten"),
            "ev._24subjects.SubjectForgotten"
        );
        // The stream that used to share the system stream's subject.
        assert_eq!(
            subject_for("ev", "_subjects", "SubjectForgotten"),
            "ev.__subjects.SubjectForgotten"
        );
        assert_eq!(subject_for("ev", "a.b-1", "T"), "ev.a_2Eb.T");
        assert_eq!(subject_for("ev", "a_b-1", "T"), "ev.a__b.T");
        assert_eq!(
            subject_for("a.b", "x.y:z@w-1", "Money.Moved v2*>"),
            "a.b.x_2Ey:z@w.Money_2EMoved_20v2_2A_3E"
        );
        assert_eq!(subject_for("ev", "-odd", "T"), "ev._.T", "empty category");
        assert_eq!(token("ü"), "_C3_BC", "byte by byte");
    }

    #[test]
    fn settings_are_checked_and_credentials_never_shown() {
        let cfg = RelayConfig::parse(
            "nats://user:secret@127.0.0.1:4222, nats://tok3n@10.0.0.2:4222",
            "EVENTS_1",
            "bank.events",
        )
        .unwrap();
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("tok3n"),
            "{shown}"
        );
        assert!(shown.contains("user:***@127.0.0.1:4222"), "{shown}");
        assert_eq!(cfg.checkpoint_name(), "nats:EVENTS_1");
        for (url, stream, prefix) in [
            ("", "S", "p"),
            ("http://h:1", "S", "p"),
            ("nats://h:1", "a.b", "p"),
            ("nats://h:1", "", "p"),
            ("nats://h:1", "S", "p.>"),
            ("nats://h:1", "S", "p..q"),
            ("nats://h:1", "S", ""),
            ("nats://h:1", "S", "p q"),
        ] {
            assert!(
                RelayConfig::parse(url, stream, prefix).is_err(),
                "{url:?} {stream:?} {prefix:?}"
            );
        }
    }

    #[test]
    fn the_payload_keeps_digits_and_carries_the_sealed_blob() {
        let e = StoredEvent {
            position: Position::new(7),
            stream_id: crate::domain::StreamId::parse("accounts-1").unwrap(),
            version: Version::new(3),
            event_id: EventId::new(
                uuid::Uuid::parse_str("0190c0de-0000-7000-8000-000000000001").unwrap(),
            ),
            event_type: "MoneyDeposited".into(),
            subject: Some(Subject::parse("cust-1").unwrap()),
            key_id: Some("k1".into()),
            data: r#"{"amount":12345678901234567890.000000000000000001,"currency":"EUR"}"#.into(),
            sealed: Some(vec![1, 2, 3, 250]),
            metadata: r#"{"channel":"mobile"}"#.into(),
            recorded_at: 1_700_000_000_000_001,
            forgotten: false,
        };
        let out = encode("ev", &e).unwrap();
        assert_eq!(out.subject, "ev.accounts.MoneyDeposited");
        assert_eq!(out.position, 7);
        let text = String::from_utf8(out.payload).unwrap();
        assert!(
            text.contains(r#""amount":12345678901234567890.000000000000000001"#),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["sealed"], "AQID+g==");
        assert_eq!(v["key_id"], "k1");
        assert_eq!(v["type"], "MoneyDeposited");
        assert_eq!(v["recorded_at"], "2023-11-14T22:13:20.000001Z");
        assert_eq!(v["metadata"]["channel"], "mobile");
    }
}

/// Property tests of subject tokens: one-to-one, valid NATS tokens, and no
/// user stream reaches a system stream's subjects.
#[cfg(test)]
mod properties {
    use super::*;
    use crate::domain::StreamId;
    use proptest::prelude::*;

    /// The inverse of [`token`]; `None` for text no string encodes to.
    fn decode(t: &str) -> Option<String> {
        if t == "_" {
            return Some(String::new());
        }
        let b = t.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'_' if b.get(i + 1) == Some(&b'_') => {
                    out.push(b'_');
                    i += 2;
                }
                b'_' => {
                    let hex = t.get(i + 1..i + 3)?;
                    if !hex
                        .bytes()
                        .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
                    {
                        return None;
                    }
                    let byte = u8::from_str_radix(hex, 16).ok()?;
                    if byte == b'_' || kept(byte) {
                        return None;
                    }
                    out.push(byte);
                    i += 3;
                }
                c if kept(c) => {
                    out.push(c);
                    i += 1;
                }
                _ => return None,
            }
        }
        if out.is_empty() {
            return None;
        }
        String::from_utf8(out).ok()
    }

    /// Stream ids as `StreamId::parse` takes them, often with the
    /// characters that escape.
    fn stream_ids() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._:@-]{1,40}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn tokens_decode_back_and_are_valid_nats_tokens(s in prop_oneof![any::<String>(), "[a-z._$:@ *>-]{0,12}"]) {
            let t = token(&s);
            prop_assert_eq!(decode(&t), Some(s.clone()), "{}", t);
            prop_assert!(!t.is_empty());
            prop_assert!(
                t.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>')),
                "{}", t
            );
        }

        #[test]
        fn different_categories_and_types_never_share_a_subject(
            // A small alphabet, so that near misses (`a.b`, `a_b`, `$b`,
            // `_b`) are frequent.
            a in prop_oneof!["[ab._$]{1,4}(-[ab]{0,2})?", stream_ids()],
            b in prop_oneof!["[ab._$]{1,4}(-[ab]{0,2})?", stream_ids()],
            ta in prop_oneof!["[ab._]{1,3}", "[A-Za-z0-9._:-]{1,12}"],
            tb in prop_oneof!["[ab._]{1,3}", "[A-Za-z0-9._:-]{1,12}"],
        ) {
            let category = |s: &str| s.split_once('-').map_or(s, |(c, _)| c).to_owned();
            let (ca, cb) = (category(&a), category(&b));
            let same = subject_for("ev", &a, &ta) == subject_for("ev", &b, &tb);
            prop_assert_eq!(same, ca == cb && ta == tb);
        }

        #[test]
        fn no_user_stream_reaches_a_system_streams_subjects(id in stream_ids(), t in "[A-Za-z0-9._:-]{1,12}") {
            prop_assume!(StreamId::parse(&id).is_ok());
            let subject = subject_for("ev", &id, &t);
            let system = subject_for("ev", "$subjects", &t);
            prop_assert_ne!(&subject, &system);
            prop_assert!(!subject.starts_with("ev._24"), "{}", subject);
            prop_assert!(system.starts_with("ev._24"));
        }
    }
}
