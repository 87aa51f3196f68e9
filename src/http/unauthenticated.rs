//! Requests without an authenticated principal, per client address: the
//! rate limit of those refused for want of a valid token, and the
//! aggregation of their audit records.
//!
//! Rate limits and turns (`auth`) are per principal, so they cannot reach a
//! request without a valid token, and every such request used to write an
//! audit record of its own: whoever reaches the port could grow the audit
//! log without bound and fill the writer's queue. Here:
//!
//! - **Limit.** Requests refused 401 (no token, a malformed `Authorization`
//!   header, an unknown token) are limited per client address (GCRA: one
//!   per `period`, bursts of `burst`); beyond it they are answered 429
//!   `rate-limited` with `Retry-After`. A valid token from the same address
//!   is never refused by it: the limit counts refusals only.
//! - **Aggregation.** Time is cut into consecutive windows of `interval`.
//!   The first request without a principal of an address in a window is
//!   recorded at once with a record of its own, as every request is
//!   (its details: action, resource, request id). The others are only
//!   counted in memory, and when the window ends one record per address
//!   says how many there were in all (`unauthenticated.refused`, resource
//!   `client:<address>`, outcome `denied`, `event_count` = every request
//!   of the window without a principal, the first one included,
//!   `correlation_id` = the request id of that first one). The windows still
//!   open at shutdown are written before the writer stops. So each address
//!   costs at most two records per window, whatever it sends.
//!
//! An address is an IPv4 address, or the /64 prefix of an IPv6 address (one
//! host usually holds a whole /64). At most `max_addresses` are tracked at
//! once; beyond that, further addresses share one entry, `client:other`
//! (their limit and their count), so that the memory held is bounded too.
//! Entries without state worth keeping (no open window, a full allowance)
//! are dropped when a window ends.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::audit::{AuditEntry, Outcome};
use crate::metrics::{Limit, Metrics};
use crate::service::Events;
use crate::shutdown::Shutdown;

/// The audit action of an aggregate record.
pub const AGGREGATE_ACTION: &str = "unauthenticated.refused";

/// How requests without a principal are limited and recorded.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Requests refused for want of a valid token, per address: one per
    /// `.0`, bursts of `.1`; `None`: not limited.
    pub limit: Option<(Duration, u32)>,
    /// The aggregation window; `None`: every request has a record of its
    /// own (for a service behind a proxy that limits by address).
    pub interval: Option<Duration>,
    /// Addresses tracked at once; further ones share one entry.
    pub max_addresses: usize,
}

/// Where a request came from, as limited and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
    /// Addresses beyond `max_addresses`, and requests whose address is not
    /// known.
    Other,
}

impl Client {
    fn of(addr: Option<IpAddr>) -> Self {
        match addr {
            Some(IpAddr::V4(a)) => Self::V4(a),
            Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4),
                None => Self::V6((u128::from(a) >> 64) as u64),
            },
            None => Self::Other,
        }
    }

    /// The address as an audit record names it.
    fn resource(self) -> String {
        match self {
            Self::V4(a) => format!("client:{a}"),
            Self::V6(prefix) => format!("client:{}/64", Ipv6Addr::from(u128::from(prefix) << 64)),
            Self::Other => "client:other".into(),
        }
    }
}

/// The requests of one address in the current window.
#[derive(Debug)]
struct Window {
    requests: u64,
    /// The request id of the first one, which has a record of its own.
    first_request_id: Option<String>,
}

#[derive(Debug)]
struct Entry {
    /// GCRA: when the allowance is whole again.
    tat: Instant,
    window: Option<Window>,
}

/// What to do with one request without a principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Answer 429 with this `Retry-After` (seconds) instead of the refusal.
    pub retry_after: Option<u64>,
    /// Write the request's own audit record (else it is only counted).
    pub record: bool,
}

/// See the module documentation. One per application.
#[derive(Debug)]
pub struct Unauthenticated {
    settings: Settings,
    entries: Mutex<HashMap<Client, Entry>>,
    metrics: Metrics,
    /// Requests accounted for by the aggregate records committed so far
    /// (the sum of their counts), for whoever waits for one.
    aggregated: tokio::sync::watch::Sender<u64>,
}

impl Unauthenticated {
    pub fn new(settings: Settings, metrics: Metrics) -> Self {
        Self {
            settings,
            entries: Mutex::new(HashMap::new()),
            metrics,
            aggregated: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The number of requests accounted for by the aggregate records
    /// committed so far; moves after each window's records committed.
    pub fn aggregated(&self) -> tokio::sync::watch::Receiver<u64> {
        self.aggregated.subscribe()
    }

    /// A request refused for want of a valid token (401), from `addr`:
    /// limited, then recorded or counted.
    pub fn refused(&self, addr: Option<IpAddr>, request_id: Option<&str>) -> Verdict {
        self.decide(addr, request_id, true)
    }

    /// Another request that ends without a principal (refused before its
    /// token was looked at, e.g. while the service starts, or its look-up
    /// failed): not limited here, but recorded or counted like a refusal.
    pub fn unattributed(&self, addr: Option<IpAddr>, request_id: Option<&str>) -> Verdict {
        self.decide(addr, request_id, false)
    }

    fn decide(&self, addr: Option<IpAddr>, request_id: Option<&str>, limited: bool) -> Verdict {
        let limit = self.settings.limit.filter(|_| limited);
        if limit.is_none() && self.settings.interval.is_none() {
            self.metrics.unauthenticated_request(true);
            return Verdict {
                retry_after: None,
                record: true,
            };
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("unauthenticated lock");
        let mut client = Client::of(addr);
        if !entries.contains_key(&client) && entries.len() >= self.settings.max_addresses {
            client = Client::Other;
        }
        let entry = entries.entry(client).or_insert(Entry {
            tat: now,
            window: None,
        });
        let retry_after = limit.and_then(|(period, burst)| {
            // GCRA: a request is allowed while the allowance, `tat`, is at
            // most `burst - 1` periods ahead of now; each takes a period.
            let tolerance = period * burst.saturating_sub(1);
            let tat = entry.tat.max(now);
            let ahead = tat - now;
            if ahead > tolerance {
                let wait = ahead - tolerance;
                Some(wait.as_secs_f64().ceil().max(1.0) as u64)
            } else {
                entry.tat = tat + period;
                None
            }
        });
        if retry_after.is_some() {
            self.metrics.limit_applied(Limit::UnauthenticatedRateLimit);
        }
        let record = match (self.settings.interval, &mut entry.window) {
            (None, _) => true,
            (Some(_), Some(window)) => {
                window.requests += 1;
                false
            }
            (Some(_), window @ None) => {
                *window = Some(Window {
                    requests: 1,
                    first_request_id: request_id.map(str::to_owned),
                });
                true
            }
        };
        self.metrics.unauthenticated_request(record);
        Verdict {
            retry_after,
            record,
        }
    }

    /// Ends the current window: the aggregate records of every address
    /// that sent a request in it, and drops the entries that hold nothing
    /// worth keeping.
    fn end_window(&self) -> Vec<(Client, Window)> {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("unauthenticated lock");
        let mut ended = Vec::new();
        entries.retain(|client, entry| {
            if let Some(window) = entry.window.take() {
                ended.push((*client, window));
            }
            entry.tat > now
        });
        ended
    }

    /// Counts of a window whose records could not be written go back into
    /// the current one, so that they are written with it.
    fn put_back(&self, client: Client, lost: Window) {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("unauthenticated lock");
        let client = if entries.contains_key(&client) || entries.len() < self.settings.max_addresses
        {
            client
        } else {
            Client::Other
        };
        let entry = entries.entry(client).or_insert(Entry {
            tat: now,
            window: None,
        });
        match &mut entry.window {
            Some(w) => w.requests += lost.requests,
            None => entry.window = Some(lost),
        }
    }

    /// Writes the aggregate records of the window that just ended.
    async fn record_window(&self, events: &Events) {
        let ended = self.end_window();
        if ended.is_empty() {
            return;
        }
        let writes = ended.into_iter().map(|(client, window)| async move {
            let entry = AuditEntry {
                correlation_id: window.first_request_id.clone(),
                ..AuditEntry::by_the_service(
                    AGGREGATE_ACTION,
                    client.resource(),
                    Outcome::Denied,
                    window.requests,
                )
            };
            match events.audit(entry).await {
                Ok(()) => Ok(window.requests),
                Err(e) => Err((client, window, e)),
            }
        });
        let (written, failed): (Vec<_>, Vec<_>) = futures::future::join_all(writes)
            .await
            .into_iter()
            .partition(Result::is_ok);
        let written: u64 = written.into_iter().flatten().sum();
        self.aggregated.send_modify(|n| *n += written);
        for (client, window, e) in failed.into_iter().filter_map(Result::err) {
            tracing::error!(error = %e, client = %client.resource(), requests = window.requests, "the aggregate audit record of requests without a valid token could not be written; it is kept for the next window");
            self.put_back(client, window);
        }
    }

    /// Writes the aggregate records at the end of every window until the
    /// last connection is closed, then those of the window still open.
    /// Holds a writer handle: a tracked task of `shutdown`, which the
    /// writer outlives.
    pub async fn record_windows(&self, events: Events, shutdown: Shutdown) {
        if let Some(interval) = self.settings.interval {
            let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stopped = std::pin::pin!(shutdown.connections_closed());
            loop {
                tokio::select! {
                    _ = ticks.tick() => self.record_window(&events).await,
                    () = &mut stopped => break,
                }
            }
        }
        self.record_window(&events).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(
        limit: Option<(Duration, u32)>,
        interval: Option<Duration>,
        max: usize,
    ) -> Unauthenticated {
        Unauthenticated::new(
            Settings {
                limit,
                interval,
                max_addresses: max,
            },
            Metrics::new(),
        )
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_limited_per_address_and_the_allowance_comes_back() {
        let g = gate(Some((Duration::from_secs(2), 3)), None, 100);
        for _ in 0..3 {
            assert_eq!(g.refused(ip("192.0.2.1"), None).retry_after, None);
        }
        // The fourth is limited: the next allowance is 2 s away.
        assert_eq!(g.refused(ip("192.0.2.1"), None).retry_after, Some(2));
        // Another address has its own allowance.
        assert_eq!(g.refused(ip("192.0.2.2"), None).retry_after, None);
        // Requests refused for another reason take none of it.
        for _ in 0..10 {
            assert_eq!(g.unattributed(ip("192.0.2.2"), None).retry_after, None);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(g.refused(ip("192.0.2.1"), None).retry_after, None);
        assert_eq!(g.refused(ip("192.0.2.1"), None).retry_after, Some(2));
        // Without aggregation every refusal is recorded, limited or not.
        assert!(g.refused(ip("192.0.2.1"), None).record);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_of_a_window_is_recorded_and_the_rest_counted() {
        let g = gate(None, Some(Duration::from_secs(60)), 100);
        assert!(g.refused(ip("192.0.2.1"), Some("r-1")).record);
        for _ in 0..99 {
            assert!(!g.refused(ip("192.0.2.1"), Some("r-x")).record);
        }
        assert!(g.unattributed(ip("2001:db8:1:2::7"), Some("r-2")).record);
        // The same /64 is the same client.
        assert!(!g.refused(ip("2001:db8:1:2:ffff::1"), None).record);
        // An IPv4 address mapped into IPv6 is that IPv4 address.
        assert!(!g.refused(ip("::ffff:192.0.2.1"), None).record);
        let mut ended: Vec<(String, u64, Option<String>)> = g
            .end_window()
            .into_iter()
            .map(|(c, w)| (c.resource(), w.requests, w.first_request_id))
            .collect();
        ended.sort();
        assert_eq!(
            ended,
            vec![
                ("client:192.0.2.1".into(), 101, Some("r-1".into())),
                ("client:2001:db8:1:2::/64".into(), 2, Some("r-2".into())),
            ]
        );
        // A new window: the first is recorded again; nothing is left over.
        assert!(g.end_window().is_empty());
        assert!(g.refused(ip("192.0.2.1"), None).record);
        // Without a limit nothing is kept after a window ends.
        g.end_window();
        assert!(g.entries.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_beyond_the_bound_share_one_entry() {
        let g = gate(
            Some((Duration::from_secs(60), 2)),
            Some(Duration::from_secs(60)),
            2,
        );
        assert!(g.refused(ip("192.0.2.1"), None).record);
        assert!(g.refused(ip("192.0.2.2"), None).record);
        // Every further address is `other`: one record, one allowance.
        assert!(g.refused(ip("192.0.2.3"), None).record);
        assert!(!g.refused(ip("192.0.2.4"), None).record);
        assert_eq!(g.refused(ip("192.0.2.5"), None).retry_after, Some(60));
        assert!(g.entries.lock().unwrap().len() <= 3);
        let ended: HashMap<String, u64> = g
            .end_window()
            .into_iter()
            .map(|(c, w)| (c.resource(), w.requests))
            .collect();
        assert_eq!(ended["client:other"], 3);
        // Limited entries are kept (their allowance is not whole), and a
        // lost window's count comes back into the next one.
        g.put_back(
            Client::V4("192.0.2.1".parse().unwrap()),
            Window {
                requests: 5,
                first_request_id: None,
            },
        );
        assert!(!g.refused(ip("192.0.2.1"), None).record);
        let ended: HashMap<String, u64> = g
            .end_window()
            .into_iter()
            .map(|(c, w)| (c.resource(), w.requests))
            .collect();
        assert_eq!(ended["client:192.0.2.1"], 6);
    }
}
