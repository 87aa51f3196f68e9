//! Load tool: drives a running eventvault over HTTP with C concurrent
//! clients appending events (each with a subject and personal fields), then
//! (optionally) reads streams with personal data decrypted, then reads the
//! global log back. Reports events/s and latency percentiles.
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
#[command(about)]
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
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
