//! The service's Prometheus metrics: one registry per `Application`, handed
//! to the parts that count (the writer, the service, the key manager, the
//! HTTP layer, subscriptions) and rendered by `GET /metrics` in the text
//! exposition format.
//!
//! A registry per application rather than the process-wide default one: the
//! integration tests run many applications in one process, and each must
//! report only its own counts.
//!
//! Labels never hold an identifier: only route templates (`/streams/{stream}/events`,
//! never the path with the id in it), methods, status codes and fixed outcome
//! names. No stream id, subject, principal or token reaches a metric, so the
//! endpoint can be served without authentication.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The `Content-Type` of the text exposition format (version 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets for durations, in seconds: from 100 µs (a commit on SQLite in
/// memory) to 10 s (a stalled database).
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets for sizes and counts of events: one append alone up to a full
/// group (10,000 events).
const COUNTS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Buckets for a subscriber's lag, in positions behind the head; 0 is a
/// subscriber that is up to date.
const LAG: &[f64] = &[0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0];

/// What kind of ciphertext was sealed or opened.
#[derive(Debug, Clone, Copy)]
pub enum Sealed {
    Event,
    Snapshot,
}

impl Sealed {
    fn label(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Snapshot => "snapshot",
        }
    }
}

/// Which key cache was asked.
#[derive(Debug, Clone, Copy)]
pub enum KeyCache {
    /// A subject's active key, for appends.
    BySubject,
    /// A key by its id, for reads.
    ById,
}

/// The service's metrics. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

struct Inner {
    registry: Registry,
    /// Append requests decided by the writer, by outcome (counted once
    /// their transaction committed).
    appends: IntCounterVec,
    /// Events written (appends' events and system events such as
    /// `$subjects`).
    events_appended: IntCounter,
    /// Transactions the writer committed, and those that failed.
    commits: IntCounter,
    commit_failures: IntCounter,
    /// Events per committed transaction that wrote events.
    group_events: Histogram,
    /// Requests (appends and audit records) per transaction.
    group_requests: Histogram,
    /// A request's time from entering the writer's queue until its
    /// transaction committed (queueing + commit).
    commit_wait: Histogram,
    /// The time of one group's transaction.
    commit_duration: Histogram,
    /// Audit records committed.
    audit_records: IntCounter,
    /// HTTP requests by method, route template and status.
    requests: HistogramVec,
    /// Ciphertexts sealed and opened, by kind (and, opened, by outcome).
    encryptions: IntCounterVec,
    decryptions: IntCounterVec,
    /// Key cache look-ups by cache and hit or miss.
    key_cache: IntCounterVec,
    /// Forgets that ran to their end (by request or resumed at start).
    forgets: IntCounter,
    /// Data keys destroyed by forgets.
    keys_destroyed: IntCounter,
    /// Recorded forgets waiting to be finished in the background.
    forgets_pending: IntGauge,
    /// Attempts of the background completion that failed.
    forget_retries: IntCounter,
    /// Reads that needed a data key the keystore lacks although its
    /// subject was not forgotten (an integrity failure).
    keys_missing: IntCounter,
    /// Data keys the start-up check found missing, their loss not accepted.
    data_keys_missing: IntGauge,
    /// Subscriptions open now.
    subscriptions: IntGauge,
    /// The same number, for whoever waits for it to change (the gauge
    /// itself can only be read).
    subscriptions_watch: tokio::sync::watch::Sender<i64>,
    /// How far behind the commit head each delivered event was.
    subscription_lag: Histogram,
    /// The newest committed position, set when scraped.
    head: IntGauge,
    /// Client connections open now.
    connections: IntGauge,
    /// Times a connection-level limit was applied, by limit.
    limits: IntCounterVec,
    /// Requests without an authenticated principal, by whether they got an
    /// audit record of their own or were counted into an aggregate one.
    unauthenticated: IntCounterVec,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("a valid metric name")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric name")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("a valid metric name")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let inner = Inner {
            registry: Registry::new(),
            appends: counter_vec(
                "eventvault_appends_total",
                "Append requests decided by the group-commit writer, by outcome (created, already_appended, rejected).",
                &["outcome"],
            ),
            events_appended: counter(
                "eventvault_events_appended_total",
                "Events written to the event store (including $subjects system events).",
            ),
            commits: counter(
                "eventvault_commits_total",
                "Transactions committed by the group-commit writer.",
            ),
            commit_failures: counter(
                "eventvault_commit_failures_total",
                "Group-commit transactions that failed (every request in them got an error).",
            ),
            group_events: histogram(
                "eventvault_commit_group_events",
                "Events per committed transaction that wrote events.",
                COUNTS,
            ),
            group_requests: histogram(
                "eventvault_commit_group_requests",
                "Requests (appends and audit records) per group-commit transaction.",
                COUNTS,
            ),
            commit_wait: histogram(
                "eventvault_commit_wait_seconds",
                "Time from handing a request to the writer until its transaction committed (queue wait and commit).",
                SECONDS,
            ),
            commit_duration: histogram(
                "eventvault_commit_duration_seconds",
                "Time of one group-commit transaction, from begin to commit.",
                SECONDS,
            ),
            audit_records: counter(
                "eventvault_audit_records_written_total",
                "Audit records committed.",
            ),
            requests: HistogramVec::new(
                HistogramOpts::new(
                    "eventvault_http_request_duration_seconds",
                    "HTTP requests by method, route template and status, until the response head (subscriptions: until they open).",
                )
                .buckets(SECONDS.to_vec()),
                &["method", "route", "status"],
            )
            .expect("a valid metric name"),
            encryptions: counter_vec(
                "eventvault_encryptions_total",
                "Personal data sealed under a data key, by kind (event, snapshot).",
                &["kind"],
            ),
            decryptions: counter_vec(
                "eventvault_decryptions_total",
                "Sealed personal data opened for a reader, by kind (event, snapshot) and outcome (ok, failed).",
                &["kind", "outcome"],
            ),
            key_cache: counter_vec(
                "eventvault_key_cache_requests_total",
                "Data key look-ups, by cache (by_subject for appends, by_id for reads) and outcome (hit, miss).",
                &["cache", "outcome"],
            ),
            forgets: counter(
                "eventvault_forgets_total",
                "Forgets that ran to their end (requested, or resumed at start).",
            ),
            keys_destroyed: counter(
                "eventvault_keys_destroyed_total",
                "Data keys destroyed by forgets.",
            ),
            forgets_pending: IntGauge::new(
                "eventvault_forgets_pending",
                "Recorded forgets (their subjects erased for every reader) whose keys are not all destroyed yet: the service finishes them in the background as soon as the keystore answers.",
            )
            .expect("a valid metric name"),
            forget_retries: counter(
                "eventvault_forget_retries_total",
                "Attempts to finish a recorded forget in the background that failed (the keystore did not answer); each is tried again.",
            ),
            keys_missing: counter(
                "eventvault_data_key_missing_total",
                "Reads refused because a data key the event store refers to is missing from the keystore although its subject was not forgotten (problem key-missing).",
            ),
            data_keys_missing: IntGauge::new(
                "eventvault_data_keys_missing",
                "Data keys the event store refers to that the start-up check found missing from the keystore, their loss not accepted (non-zero: the service is not ready).",
            )
            .expect("a valid metric name"),
            subscriptions: IntGauge::new(
                "eventvault_subscriptions_open",
                "Live subscriptions open now.",
            )
            .expect("a valid metric name"),
            subscriptions_watch: tokio::sync::watch::Sender::new(0),
            subscription_lag: histogram(
                "eventvault_subscription_lag_events",
                "For each event a subscription delivers, how many positions it was behind the newest commit.",
                LAG,
            ),
            head: IntGauge::new(
                "eventvault_commit_head_position",
                "The newest committed position of the global log, as this process knows it.",
            )
            .expect("a valid metric name"),
            connections: IntGauge::new(
                "eventvault_connections_open",
                "Client connections open now (within --max-connections).",
            )
            .expect("a valid metric name"),
            limits: counter_vec(
                "eventvault_connection_limits_total",
                "Times a connection-level limit was applied, by limit: max_connections (503), max_header_bytes (431), body_read_timeout (408), header_read_timeout, idle_timeout, write_timeout (connection closed), unauthenticated_rate_limit (429 to a request without a valid token).",
                &["limit"],
            ),
            unauthenticated: counter_vec(
                "eventvault_unauthenticated_requests_total",
                "Requests to data routes that ended without an authenticated principal (401 and the like), by audit: recorded (a record of their own) or aggregated (counted into their address's record of the interval).",
                &["audit"],
            ),
        };
        let i = &inner;
        let all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(i.appends.clone()),
            Box::new(i.events_appended.clone()),
            Box::new(i.commits.clone()),
            Box::new(i.commit_failures.clone()),
            Box::new(i.group_events.clone()),
            Box::new(i.group_requests.clone()),
            Box::new(i.commit_wait.clone()),
            Box::new(i.commit_duration.clone()),
            Box::new(i.audit_records.clone()),
            Box::new(i.requests.clone()),
            Box::new(i.encryptions.clone()),
            Box::new(i.decryptions.clone()),
            Box::new(i.key_cache.clone()),
            Box::new(i.forgets.clone()),
            Box::new(i.keys_destroyed.clone()),
            Box::new(i.forgets_pending.clone()),
            Box::new(i.forget_retries.clone()),
            Box::new(i.keys_missing.clone()),
            Box::new(i.data_keys_missing.clone()),
            Box::new(i.subscriptions.clone()),
            Box::new(i.subscription_lag.clone()),
            Box::new(i.head.clone()),
            Box::new(i.connections.clone()),
            Box::new(i.limits.clone()),
            Box::new(i.unauthenticated.clone()),
        ];
        for c in all {
            inner
                .registry
                .register(c)
                .expect("each metric is registered once");
        }
        // Labelled series that exist from the start, so that a scrape shows
        // a zero instead of nothing.
        for outcome in ["created", "already_appended", "rejected"] {
            inner.appends.with_label_values(&[outcome]);
        }
        for kind in [Sealed::Event, Sealed::Snapshot] {
            inner.encryptions.with_label_values(&[kind.label()]);
            for outcome in ["ok", "failed"] {
                inner
                    .decryptions
                    .with_label_values(&[kind.label(), outcome]);
            }
        }
        for cache in [KeyCache::BySubject, KeyCache::ById] {
            for hit in [true, false] {
                Self::key_cache_series(&inner, cache, hit);
            }
        }
        for limit in Limit::ALL {
            inner.limits.with_label_values(&[limit.label()]);
        }
        for audit in ["recorded", "aggregated"] {
            inner.unauthenticated.with_label_values(&[audit]);
        }
        Self(Arc::new(inner))
    }

    /// The text exposition of every metric; `head` is the newest committed
    /// position (read when scraped rather than kept up to date on every
    /// commit of every process).
    pub fn render(&self, head: u64) -> String {
        self.0.head.set(i64::try_from(head).unwrap_or(i64::MAX));
        TextEncoder::new()
            .encode_to_string(&self.0.registry.gather())
            .expect("the text encoder writes to memory")
    }

    /// A committed group: the outcome of each append, the events and audit
    /// records written, the requests in it and its transaction's time.
    pub fn committed(&self, c: Committed) {
        let i = &self.0;
        i.commits.inc();
        i.appends.with_label_values(&["created"]).inc_by(c.created);
        i.appends
            .with_label_values(&["already_appended"])
            .inc_by(c.already_appended);
        i.appends
            .with_label_values(&["rejected"])
            .inc_by(c.rejected);
        i.events_appended.inc_by(c.events);
        if c.events > 0 {
            i.group_events.observe(c.events as f64);
        }
        i.group_requests.observe(c.requests as f64);
        i.audit_records.inc_by(c.audit_records);
        i.commit_duration.observe(c.took.as_secs_f64());
    }

    /// A group whose transaction failed.
    pub fn commit_failed(&self, took: Duration) {
        self.0.commit_failures.inc();
        self.0.commit_duration.observe(took.as_secs_f64());
    }

    /// One request's time in the writer (queue and commit).
    pub fn commit_waited(&self, took: Duration) {
        self.0.commit_wait.observe(took.as_secs_f64());
    }

    /// An HTTP request answered. `route` is the route template, or `None`
    /// for a path no route matched (never the path itself: it holds ids).
    pub fn request(&self, method: &str, route: Option<&str>, status: u16, took: Duration) {
        // A client may send any method name: only the known ones are
        // labels, so that the number of series stays bounded.
        let method = match method {
            "GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "OPTIONS" | "PATCH" => method,
            _ => "other",
        };
        let status = status.to_string();
        self.0
            .requests
            .with_label_values(&[method, route.unwrap_or("unmatched"), status.as_str()])
            .observe(took.as_secs_f64());
    }

    pub fn sealed(&self, kind: Sealed, n: u64) {
        if n > 0 {
            self.0
                .encryptions
                .with_label_values(&[kind.label()])
                .inc_by(n);
        }
    }

    pub fn opened(&self, kind: Sealed, n: u64) {
        if n > 0 {
            self.0
                .decryptions
                .with_label_values(&[kind.label(), "ok"])
                .inc_by(n);
        }
    }

    /// A sealed blob that failed its integrity check.
    pub fn open_failed(&self, kind: Sealed) {
        self.0
            .decryptions
            .with_label_values(&[kind.label(), "failed"])
            .inc();
    }

    pub fn key_cache(&self, cache: KeyCache, hit: bool) {
        Self::key_cache_series(&self.0, cache, hit).inc();
    }

    fn key_cache_series(inner: &Inner, cache: KeyCache, hit: bool) -> IntCounter {
        let cache = match cache {
            KeyCache::BySubject => "by_subject",
            KeyCache::ById => "by_id",
        };
        inner
            .key_cache
            .with_label_values(&[cache, if hit { "hit" } else { "miss" }])
    }

    /// A forget ran to its end.
    pub fn forgot(&self) {
        self.0.forgets.inc();
    }

    /// Data keys destroyed by a forget (or by re-applying one at start).
    pub fn keys_destroyed(&self, n: u64) {
        self.0.keys_destroyed.inc_by(n);
    }

    /// How many recorded forgets wait to be finished in the background.
    pub fn forgets_pending(&self, n: usize) {
        self.0
            .forgets_pending
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An attempt to finish a recorded forget in the background failed.
    pub fn forget_retried(&self) {
        self.0.forget_retries.inc();
    }

    /// A read needed a data key the keystore lacks (not a forget).
    pub fn key_missing(&self) {
        self.0.keys_missing.inc();
    }

    /// What the start-up check of the data keys found missing.
    pub fn data_keys_missing(&self, n: u64) {
        self.0
            .data_keys_missing
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A subscription opened: the gauge goes down when the guard drops.
    pub fn subscription_opened(&self) -> SubscriptionGuard {
        self.0.subscriptions.inc();
        self.0
            .subscriptions_watch
            .send_replace(self.0.subscriptions.get());
        SubscriptionGuard(self.clone())
    }

    /// The number of open subscriptions: `changed()` completes when one
    /// opens or ends (after the gauge has moved).
    pub fn subscriptions_open(&self) -> tokio::sync::watch::Receiver<i64> {
        self.0.subscriptions_watch.subscribe()
    }

    /// A subscription delivered an event `lag` positions behind the head.
    pub fn delivered(&self, lag: u64) {
        self.0.subscription_lag.observe(lag as f64);
    }

    /// A client connection was accepted within the connection limit.
    pub fn connection_opened(&self) {
        self.0.connections.inc();
    }

    /// A connection counted by `connection_opened` was closed.
    pub fn connection_closed(&self) {
        self.0.connections.dec();
    }

    /// A connection-level limit refused a connection or a request, or
    /// closed a connection.
    pub fn limit_applied(&self, limit: Limit) {
        self.0.limits.with_label_values(&[limit.label()]).inc();
    }

    /// A request without an authenticated principal: `recorded` with a
    /// record of its own, or counted into an aggregate one.
    pub fn unauthenticated_request(&self, recorded: bool) {
        let audit = if recorded { "recorded" } else { "aggregated" };
        self.0.unauthenticated.with_label_values(&[audit]).inc();
    }
}

/// The connection-level limits, as counted by
/// `eventvault_connection_limits_total{limit}` (the labels are the names of
/// the `serve` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MaxConnections,
    MaxHeaderBytes,
    HeaderReadTimeout,
    BodyReadTimeout,
    IdleTimeout,
    WriteTimeout,
    /// A request without a valid token beyond its address's allowance.
    UnauthenticatedRateLimit,
}

impl Limit {
    const ALL: [Limit; 7] = [
        Self::MaxConnections,
        Self::MaxHeaderBytes,
        Self::HeaderReadTimeout,
        Self::BodyReadTimeout,
        Self::IdleTimeout,
        Self::WriteTimeout,
        Self::UnauthenticatedRateLimit,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::MaxHeaderBytes => "max_header_bytes",
            Self::HeaderReadTimeout => "header_read_timeout",
            Self::BodyReadTimeout => "body_read_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::WriteTimeout => "write_timeout",
            Self::UnauthenticatedRateLimit => "unauthenticated_rate_limit",
        }
    }
}

/// What one committed group did, for [`Metrics::committed`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Committed {
    pub created: u64,
    pub already_appended: u64,
    pub rejected: u64,
    pub events: u64,
    pub audit_records: u64,
    pub requests: u64,
    pub took: Duration,
}

/// Counts one open subscription while it lives.
#[derive(Debug)]
pub struct SubscriptionGuard(Metrics);

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let inner = &self.0.0;
        inner.subscriptions.dec();
        inner
            .subscriptions_watch
            .send_replace(inner.subscriptions.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_in_the_text_format() {
        let m = Metrics::new();
        m.committed(Committed {
            created: 2,
            events: 3,
            audit_records: 2,
            requests: 2,
            ..Committed::default()
        });
        m.request(
            "GET",
            Some("/streams/{stream}/events"),
            200,
            Duration::from_millis(3),
        );
        m.request("BREW", None, 404, Duration::from_millis(1));
        let guard = m.subscription_opened();
        let text = m.render(42);
        for line in [
            "eventvault_appends_total{outcome=\"created\"} 2",
            "eventvault_appends_total{outcome=\"rejected\"} 0",
            "eventvault_events_appended_total 3",
            "eventvault_commit_group_events_count 1",
            "eventvault_audit_records_written_total 2",
            "eventvault_http_request_duration_seconds_count{method=\"GET\",route=\"/streams/{stream}/events\",status=\"200\"} 1",
            "eventvault_http_request_duration_seconds_count{method=\"other\",route=\"unmatched\",status=\"404\"} 1",
            "eventvault_key_cache_requests_total{cache=\"by_id\",outcome=\"hit\"} 0",
            "eventvault_subscriptions_open 1",
            "eventvault_commit_head_position 42",
            "# TYPE eventvault_commit_wait_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        drop(guard);
        assert!(m.render(42).contains("eventvault_subscriptions_open 0"));
    }

    #[test]
    fn each_application_counts_apart() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.forgot();
        assert!(a.render(0).contains("eventvault_forgets_total 1"));
        assert!(b.render(0).contains("eventvault_forgets_total 0"));
    }
}
