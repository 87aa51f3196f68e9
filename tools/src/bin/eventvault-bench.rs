//! Load tool: drives a running eventvault over HTTP with C concurrent
//! clients appending events (each with a subject and personal fields), then
//! (optionally) reads streams with personal data decrypted, then reads the
//! global log back. Reports events/s and latency percentiles.
//!
//! With `--subscribers N` it measures live subscriptions instead: N idle
//! subscribers' cost to the server (its CPU over `--idle-seconds`, from
//! `/proc/<--server-pid>/stat`), then the delay from an append being sent to
//! its arrival at every subscriber, with one append every `--interval-ms`.
//!
//! With `--soak-minutes M` it runs mixed work for M minutes — appends,
//! personal reads (with `X-Purpose`) and redacted reads, 20 subscribers
//! following the log, a forget every two seconds — and prints every minute
//! the throughput, p50/p99/p999 per kind and the server's memory (`VmRSS`,
//! `VmHWM` of `--server-pid`).
//!
//! With `--flood-seconds N` it measures what one principal's flood does to
//! another's latency: principal B (`--token`) runs a steady, paced workload
//! (`--steady-rate` appends and as many reads a second, each sent on time
//! whether or not the previous one was answered) for N seconds alone, then
//! N seconds more while principal A (`--flood-token`) sends requests as fast
//! as `--flood-clients` connections allow. It prints B's p50/p99 in both
//! phases, the ratio of the p99s, and what A got (answered, 429, 503).
//!
//! Bounded: every phase stops by itself after `--seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use uuid::Uuid;

/// Same allocator as the server: the load tool shares the cores with it, so
/// every cycle it wastes is taken from the server.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for eventvault.
#[derive(Parser, Clone)]
struct Args {
    /// Base URL of the server.
    #[arg(long, env = "EVENTVAULT_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token of a principal allowed to append and read.
    #[arg(long, env = "EVENTVAULT_TOKEN", hide_env_values = true)]
    token: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Events per append.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Length of the append phase in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Distinct data subjects (customers) the events are about.
    #[arg(long, default_value_t = 1000)]
    subjects: usize,
    /// Distinct streams appended to.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Skip the global-log read phase.
    #[arg(long)]
    no_read: bool,
    /// Length of a phase of concurrent stream reads (10 events per read,
    /// personal data decrypted, with `X-Purpose`); 0 skips it.
    #[arg(long, default_value_t = 0)]
    stream_read_seconds: u64,
    /// Measure live subscriptions with this many subscribers (and nothing
    /// else).
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// Length of the idle phase of the subscription measurement.
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// The server's process id, to read its CPU time while subscribers idle.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Token the subscribers use (default: `--token`); e.g. a `service`
    /// principal's, whose deliveries are redacted and not audited per batch.
    #[arg(long, env = "EVENTVAULT_SUBSCRIBER_TOKEN", hide_env_values = true)]
    subscriber_token: Option<String>,
    /// Pause between appends while measuring delivery delays.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Soak: run mixed work (appends, reads by role, subscriptions,
    /// forgets) for this many minutes, reporting every minute (and nothing
    /// else).
    #[arg(long, default_value_t = 0)]
    soak_minutes: u64,
    /// Token for the soak's redacted reads (a `service` principal's);
    /// default `--token`.
    #[arg(long, env = "EVENTVAULT_SERVICE_TOKEN", hide_env_values = true)]
    service_token: Option<String>,
    /// Flood: the length of each phase (unloaded, then flooded) in seconds
    /// (and nothing else).
    #[arg(long, default_value_t = 0)]
    flood_seconds: u64,
    /// Flood: the token of the flooding principal A (another principal
    /// than `--token`'s; a `service` principal may append to and read
    /// `accounts-*`).
    #[arg(long, env = "EVENTVAULT_FLOOD_TOKEN", hide_env_values = true)]
    flood_token: Option<String>,
    /// Flood: concurrent connections of the flooding principal.
    #[arg(long, default_value_t = 64)]
    flood_clients: usize,
    /// Flood: threads of the flooding principal's own runtime (apart from
    /// B's, so that B's requests never queue behind A's in this process).
    #[arg(long, default_value_t = 1)]
    flood_threads: usize,
    /// Flood: appends a second of the steady principal B (and as many
    /// reads).
    #[arg(long, default_value_t = 50)]
    steady_rate: u32,
}

/// Runs `op` from `clients` concurrent tasks until `seconds` have passed;
/// `op(client, n)` returns how many events a successful request moved, or
/// `None` for a failed one. Prints one line of figures under `label`.
async fn phase<F, Fut>(
    label: &str,
    clients: usize,
    seconds: u64,
    op: F,
) -> Result<(), Box<dyn std::error::Error>>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<u64>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut hist =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let (mut events, mut errors, mut n) = (0u64, 0u64, c as u64);
                while Instant::now() < deadline {
                    n += clients as u64;
                    let t = Instant::now();
                    match op(c, n).await {
                        Some(e) => {
                            hist.record(t.elapsed().as_micros() as u64)
                                .expect("in bounds");
                            events += e;
                        }
                        None => errors += 1,
                    }
                }
                (hist, events, errors)
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut events, mut errors) = (0, 0);
    for t in tasks {
        let (h, e, x) = t.await?;
        hist.add(h)?;
        events += e;
        errors += x;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{label}: {events} events in {secs:.1} s = {:.0} events/s ({:.0} requests/s); latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; errors {errors}",
        events as f64 / secs,
        hist.len() as f64 / secs,
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    );
    Ok(())
}

fn event(subject: usize, n: u64) -> Value {
    json!({
        "id": Uuid::new_v4(),
        "type": "MoneyDeposited",
        "subject": format!("cust-{subject}"),
        "data": {"account": format!("ACC-{subject}"), "amount": format!("{}.{:02}", n % 10_000, n % 100), "currency": "EUR",
                 "payer_name": "Jane Roe", "payer_iban": "DE89370400440532013000"},
        "metadata": {"channel": "bench"}
    })
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').ok_or("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()?
            .stdout,
    )?
    .trim()
    .parse()?;
    Ok(ticks / hz)
}

/// The subscription measurement (see the module documentation).
async fn subscriptions(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use eventvault_tools::sse::SseParser;
    use futures::StreamExt;
    use std::collections::HashMap;
    use std::sync::Mutex;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.subscribers + 1)
        .build()?;
    // When each event was sent, by event id; taken before the request
    // leaves, so that a delivery can never come first.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let append = |n: u64| {
        let (client, sent) = (client.clone(), sent.clone());
        let url = format!("{}/streams/accounts-sub/events", args.url);
        let token = args.token.clone();
        async move {
            let e = event(n as usize % 1000, n);
            let id = e["id"].as_str().unwrap_or_default().to_owned();
            sent.lock().expect("lock").insert(id, Instant::now());
            let r: Value = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"events": [e]}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            Ok::<_, reqwest::Error>(r["last_position"].as_u64().unwrap_or(0))
        }
    };
    let head = append(0).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for _ in 0..args.subscribers {
        let r = client
            .get(format!("{}/events/subscribe", args.url))
            .bearer_auth(args.subscriber_token.as_ref().unwrap_or(&args.token))
            .header("Last-Event-ID", head.to_string())
            .header("X-Purpose", "load test")
            .send()
            .await?
            .error_for_status()?;
        let (sent, mut stopped) = (sent.clone(), stopped.clone());
        readers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut body = r.bytes_stream();
            let mut parser = SseParser::default();
            loop {
                let chunk = tokio::select! {
                    c = body.next() => c,
                    _ = stopped.changed() => break,
                };
                let Some(Ok(chunk)) = chunk else { break };
                for e in parser.push(&chunk) {
                    let at = serde_json::from_str::<Value>(&e.data)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_owned))
                        .and_then(|id| sent.lock().expect("lock").get(&id).copied());
                    if let Some(at) = at {
                        hist.record(at.elapsed().as_micros() as u64)
                            .expect("in bounds");
                    }
                }
            }
            hist
        }));
    }
    println!("{} subscribers connected", args.subscribers);
    if let Some(pid) = args.server_pid {
        let before = cpu_seconds(pid)?;
        tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
        let used = cpu_seconds(pid)? - before;
        println!(
            "idle: the server used {used:.3} CPU s in {} s with {} idle subscribers = {:.2} % of one core",
            args.idle_seconds,
            args.subscribers,
            100.0 * used / args.idle_seconds as f64
        );
    }
    let cpu_before = args.server_pid.map(cpu_seconds).transpose()?;
    let started = Instant::now();
    let mut appends = 0u64;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        appends += 1;
        append(appends).await?;
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    if let (Some(pid), Some(before)) = (args.server_pid, cpu_before) {
        let used = cpu_seconds(pid)? - before;
        println!(
            "delivering: the server used {:.1} % of one core",
            100.0 * used / started.elapsed().as_secs_f64()
        );
    }
    // The last deliveries arrive, then the subscriptions end.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(true);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for r in readers {
        hist.add(r.await?)?;
    }
    println!(
        "delivery: {appends} appends, {} deliveries of {} expected; append sent -> event received p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        hist.len(),
        appends * args.subscribers as u64,
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    );
    Ok(())
}

/// The server's resident and peak memory in MB, from `/proc/<pid>/status`.
fn memory_mb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |field: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(field))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((kb("VmRSS:")? / 1024, kb("VmHWM:")? / 1024))
}

/// Latencies and counts of one kind of soak work, for the current minute.
struct Kind {
    name: &'static str,
    hist: std::sync::Mutex<Histogram<u64>>,
    done: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl Kind {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            hist: std::sync::Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            ),
            done: 0.into(),
            failed: 0.into(),
        }
    }

    fn record(&self, started: Instant, ok: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if ok {
            let us = started.elapsed().as_micros() as u64;
            let _ = self.hist.lock().expect("lock").record(us.max(1));
            self.done.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    /// This minute's line, and a fresh start for the next.
    fn report(&self, secs: f64) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let mut h = self.hist.lock().expect("lock");
        let line = format!(
            "{} {:.0}/s p50 {:.1} p99 {:.1} p999 {:.1} ms, failed {}",
            self.name,
            self.done.swap(0, Relaxed) as f64 / secs,
            h.value_at_quantile(0.50) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.value_at_quantile(0.999) as f64 / 1000.0,
            self.failed.swap(0, Relaxed),
        );
        h.reset();
        line
    }
}

/// The soak run (see the module documentation).
async fn soak(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(30))
        .build()?;
    let kinds = Arc::new([
        Kind::new("append"),
        Kind::new("personal read"),
        Kind::new("redacted read"),
        Kind::new("forget"),
    ]);
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(args.soak_minutes * 60);
    let service = args
        .service_token
        .clone()
        .unwrap_or_else(|| args.token.clone());
    let mut tasks = Vec::new();
    // Appends (kind 0), personal reads (1), redacted reads (2).
    for c in 0..24usize {
        let (client, kinds, stop) = (client.clone(), kinds.clone(), stop.clone());
        let (url, token, service) = (args.url.clone(), args.token.clone(), service.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = c as u64;
            while !stop.load(Relaxed) {
                n += 24;
                let stream = format!("accounts-{}", n % 1000);
                let t = Instant::now();
                let (kind, ok) = match c % 3 {
                    0 | 1 => {
                        let r = client
                            .post(format!("{url}/streams/{stream}/events"))
                            .bearer_auth(&token)
                            .json(&json!({"events": [event((n as usize * 7919) % 100_000, n)]}))
                            .send()
                            .await;
                        // A forgotten subject's 410 is an answer, not a failure.
                        (
                            0,
                            r.is_ok_and(|r| r.status().is_success() || r.status() == 410),
                        )
                    }
                    _ => {
                        let personal = n.is_multiple_of(2);
                        let mut req = client
                            .get(format!("{url}/streams/{stream}/events?limit=10"))
                            .bearer_auth(if personal { &token } else { &service });
                        if personal {
                            req = req.header("X-Purpose", "soak");
                        }
                        let r = req.send().await;
                        let ok = match r {
                            Ok(r) if r.status().is_success() || r.status() == 404 => {
                                r.bytes().await.is_ok()
                            }
                            _ => false,
                        };
                        (if personal { 1 } else { 2 }, ok)
                    }
                };
                kinds[kind].record(t, ok);
            }
        }));
    }
    // Subscribers, reconnecting from their last id if cut off.
    for _ in 0..20 {
        let (stop, delivered) = (stop.clone(), delivered.clone());
        let (url, token) = (args.url.clone(), service.clone());
        tasks.push(tokio::spawn(async move {
            // No request timeout: a subscription lasts.
            let client = reqwest::Client::new();
            let mut last = String::from("0");
            while !stop.load(Relaxed) {
                let Ok(r) = client
                    .get(format!("{url}/events/subscribe"))
                    .bearer_auth(&token)
                    .header("Last-Event-ID", &last)
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let mut body = r.bytes_stream();
                let mut parser = eventvault_tools::sse::SseParser::default();
                while let Some(Ok(chunk)) = body.next().await {
                    for e in parser.push(&chunk) {
                        delivered.fetch_add(1, Relaxed);
                        if let Some(id) = e.id {
                            last = id;
                        }
                    }
                    if stop.load(Relaxed) {
                        return;
                    }
                }
            }
        }));
    }
    // A forget every two seconds.
    {
        let (client, kinds, stop) = (client.clone(), kinds.clone(), stop.clone());
        let (url, token) = (args.url.clone(), args.token.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                n += 1;
                let t = Instant::now();
                let r = client
                    .post(format!(
                        "{url}/subjects/cust-{}/forget",
                        (n * 104_729) % 100_000
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await;
                kinds[3].record(t, r.is_ok_and(|r| r.status().is_success()));
            }
        }));
    }
    println!(
        "soak: {} minutes; 16 appending, 8 reading, 20 subscribed, a forget every 2 s",
        args.soak_minutes
    );
    let mut minute = 0;
    let mut last_delivered = 0;
    while Instant::now() < deadline {
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(60).min(deadline - Instant::now())).await;
        minute += 1;
        let secs = started.elapsed().as_secs_f64();
        let memory = args
            .server_pid
            .and_then(memory_mb)
            .map_or_else(String::new, |(rss, peak)| {
                format!("; server RSS {rss} MB, peak {peak} MB")
            });
        let d = delivered.load(Relaxed);
        let lines: Vec<String> = kinds.iter().map(|k| k.report(secs)).collect();
        println!(
            "minute {minute}: {}; subscribers {:.0} events/s{memory}",
            lines.join("; "),
            (d - last_delivered) as f64 / secs
        );
        last_delivered = d;
    }
    stop.store(true, Relaxed);
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Latencies of the steady principal's requests in one phase.
struct Steady {
    append: Histogram<u64>,
    read: Histogram<u64>,
    all: Histogram<u64>,
    failed: u64,
}

/// One request of the flood measurement: the `n`th appends one event to
/// `stream` when `n` is even, and reads the stream's first ten events when
/// it is odd.
fn append_or_read(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    stream: &str,
    n: u64,
) -> reqwest::RequestBuilder {
    if n.is_multiple_of(2) {
        client
            .post(format!("{url}/streams/{stream}/events"))
            .bearer_auth(token)
            .json(&json!({"events": [event(n as usize % 1000, n)]}))
    } else {
        client
            .get(format!("{url}/streams/{stream}/events?limit=10"))
            .bearer_auth(token)
    }
}

/// Principal B's paced workload for `seconds`: `rate` appends and `rate`
/// reads a second, each sent at its time (open loop: a slow answer does
/// not delay the next request, so it cannot hide a stall).
async fn steady(
    args: &Args,
    client: &reqwest::Client,
    seconds: u64,
) -> Result<Steady, Box<dyn std::error::Error>> {
    use std::sync::Mutex;
    let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let results = Arc::new(Mutex::new(Steady {
        append: hist(),
        read: hist(),
        all: hist(),
        failed: 0,
    }));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / (2 * args.steady_rate.max(1)));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        n += 1;
        let (client, results) = (client.clone(), results.clone());
        let (url, token) = (args.url.clone(), args.token.clone());
        tasks.push(tokio::spawn(async move {
            let stream = format!("accounts-steady-{}", n % 100);
            let is_append = n.is_multiple_of(2);
            let t = Instant::now();
            let mut request = append_or_read(&client, &url, &token, &stream, n);
            if !is_append {
                request = request.header("X-Purpose", "flood measurement");
            }
            let ok = match request.send().await {
                // The first reads may come before the stream's first append.
                Ok(r) if r.status().is_success() || (!is_append && r.status() == 404) => {
                    r.bytes().await.is_ok()
                }
                _ => false,
            };
            let us = t.elapsed().as_micros() as u64;
            let mut r = results.lock().expect("lock");
            if ok {
                let h = if is_append {
                    &mut r.append
                } else {
                    &mut r.read
                };
                h.record(us.max(1)).expect("in bounds");
                r.all.record(us.max(1)).expect("in bounds");
            } else {
                r.failed += 1;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let results = Arc::try_unwrap(results)
        .map_err(|_| "a request outlived its phase")?
        .into_inner()
        .expect("lock");
    Ok(results)
}

fn steady_line(label: &str, s: &Steady) -> String {
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{label}: {} requests; all p50 {:.2} ms p99 {:.2} ms max {:.2} ms; appends p99 {:.2} ms; reads p99 {:.2} ms; failed {}",
        s.all.len(),
        ms(&s.all, 0.5),
        ms(&s.all, 0.99),
        s.all.max() as f64 / 1000.0,
        ms(&s.append, 0.99),
        ms(&s.read, 0.99),
        s.failed,
    )
}

/// The flood measurement (see the module documentation).
async fn flood(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let flood_token = args
        .flood_token
        .clone()
        .ok_or("--flood-seconds needs --flood-token, another principal than --token's")?;
    // Each principal has its own connection pool, as two services would.
    let steady_client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    let flood_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.flood_threads.max(1))
        .enable_all()
        .build()?;
    let flood_client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.flood_clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    println!(
        "flood: B sends {} appends/s and {} reads/s; {} s alone, then {} s while A floods from {} connections ({} thread(s))",
        args.steady_rate,
        args.steady_rate,
        args.flood_seconds,
        args.flood_seconds,
        args.flood_clients,
        args.flood_threads
    );
    let cpu = |pid: Option<u32>| pid.map(cpu_seconds).transpose();
    let (cpu_before, started) = (cpu(args.server_pid)?, Instant::now());
    let alone = steady(args, &steady_client, args.flood_seconds).await?;
    let server_cpu = |before: Option<f64>, started: Instant| -> String {
        match (args.server_pid.map(cpu_seconds), before) {
            (Some(Ok(now)), Some(before)) => format!(
                "; server CPU {:.0} % of one core",
                100.0 * (now - before) / started.elapsed().as_secs_f64()
            ),
            _ => String::new(),
        }
    };
    println!(
        "{}{}",
        steady_line("B alone", &alone),
        server_cpu(cpu_before, started)
    );

    // A: appends and reads alternately, as fast as answers come back.
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // ok, 429, 503, other
    let mut flooders = Vec::new();
    for c in 0..args.flood_clients {
        let (client, stop, counts) = (flood_client.clone(), stop.clone(), counts.clone());
        let (url, token) = (args.url.clone(), flood_token.clone());
        flooders.push(flood_runtime.spawn(async move {
            let mut n = c as u64;
            while !stop.load(Relaxed) {
                n += 1;
                let stream = format!("accounts-flood-{}", n % 1000);
                let r = append_or_read(&client, &url, &token, &stream, n)
                    .send()
                    .await;
                let slot = match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let _ = r.bytes().await;
                        match status {
                            200..=299 | 404 => 0,
                            429 => 1,
                            503 => 2,
                            _ => 3,
                        }
                    }
                    Err(_) => 3,
                };
                counts[slot].fetch_add(1, Relaxed);
            }
        }));
    }
    let (cpu_before, started) = (cpu(args.server_pid)?, Instant::now());
    let flooded = steady(args, &steady_client, args.flood_seconds).await?;
    let secs = started.elapsed().as_secs_f64();
    let line = steady_line("B while A floods", &flooded);
    let cpu_line = server_cpu(cpu_before, started);
    stop.store(true, Relaxed);
    for f in flooders {
        f.await?;
    }
    flood_runtime.shutdown_background();
    let c: Vec<u64> = counts.iter().map(|c| c.load(Relaxed)).collect();
    println!("{line}{cpu_line}");
    println!(
        "A: {:.0} requests/s answered, {:.0}/s 429 (rate limit), {:.0}/s 503, {} other failures",
        c[0] as f64 / secs,
        c[1] as f64 / secs,
        c[2] as f64 / secs,
        c[3],
    );
    let p99 = |s: &Steady| s.all.value_at_quantile(0.99) as f64;
    println!(
        "B's p99 flooded / alone: {:.2}x (p50 {:.2}x)",
        p99(&flooded) / p99(&alone),
        flooded.all.value_at_quantile(0.5) as f64 / alone.all.value_at_quantile(0.5) as f64
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.flood_seconds > 0 {
        return flood(&args).await;
    }
    if args.soak_minutes > 0 {
        return soak(&args).await;
    }
    if args.subscribers > 0 {
        return subscriptions(&args).await;
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()?;
    println!(
        "appending: {} clients, {} event(s) per append, {} s",
        args.clients, args.batch, args.seconds
    );
    let shared = Arc::new(args.clone());
    let (c, a) = (client.clone(), shared.clone());
    phase("append", args.clients, args.seconds, move |_, n| {
        let (client, args) = (c.clone(), a.clone());
        async move {
            let batch: Vec<Value> = (0..args.batch)
                .map(|i| event((n as usize + i) % args.subjects, n))
                .collect();
            let stream = format!("accounts-{}", n as usize % args.streams);
            let r = client
                .post(format!("{}/streams/{stream}/events", args.url))
                .bearer_auth(&args.token)
                .json(&json!({"events": batch}))
                .send()
                .await;
            r.ok()
                .filter(|r| r.status().is_success())
                .map(|_| args.batch as u64)
        }
    })
    .await?;
    if args.stream_read_seconds > 0 {
        println!(
            "reading streams: {} clients, 10 events per read, personal data decrypted, {} s",
            args.clients, args.stream_read_seconds
        );
        let (c, a) = (client.clone(), shared.clone());
        phase(
            "stream read",
            args.clients,
            args.stream_read_seconds,
            move |_, n| {
                let (client, args) = (c.clone(), a.clone());
                async move {
                    let stream = format!("accounts-{}", n as usize % args.streams);
                    let r = client
                        .get(format!("{}/streams/{stream}/events?limit=10", args.url))
                        .bearer_auth(&args.token)
                        .header("X-Purpose", "load test")
                        .send()
                        .await
                        .ok()
                        .filter(|r| r.status().is_success())?;
                    let page: Value = r.json().await.ok()?;
                    page["events"].as_array().map(|e| e.len() as u64)
                }
            },
        )
        .await?;
    }
    if args.no_read {
        return Ok(());
    }

    // Read the whole global log back, page by page, until it is exhausted
    // (or 60 s have passed).
    let started = Instant::now();
    let (mut after, mut read) = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(60) {
        let page: Value = client
            .get(format!("{}/events?after={after}&limit=1000", args.url))
            .bearer_auth(&args.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let n = page["events"].as_array().map_or(0, |e| e.len() as u64);
        if n == 0 {
            break;
        }
        read += n;
        after = page["next"].as_u64().ok_or("page without next")?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "read: {read} events of the global log in {secs:.2} s = {:.0} events/s (decrypted)",
        read as f64 / secs
    );
    Ok(())
}
