//! An example read model: account balances, kept from the global log.
//!
//! It follows `GET /events/subscribe` (a `service` token is enough: amounts
//! and account numbers are clear fields), folds `AccountOpened`,
//! `MoneyDeposited`, `MoneyWithdrawn` and `TransferCompleted` into balances
//! with `rust_decimal` (never floats), and stores them in its own database
//! (SQLite or PostgreSQL) together with the position it has applied. Each
//! batch of events and the new position commit in one transaction, and a
//! restart subscribes after the stored position: every event takes effect
//! exactly once, however the process stops.
//!
//! Any `service` principal can append, so an event may be malformed (an
//! amount that is not a number, a missing account, a balance that would
//! overflow). Such an event is skipped, not applied in part: it is recorded
//! in `balances_skipped` (its position and why, never a value of it) in the
//! transaction of its batch, counted, and logged with its position, and the
//! projection goes on. Otherwise one bad event would stop it for good, as it
//! would resume before that event and meet it again.
//!
//! ```text
//! eventvault-balances --url http://127.0.0.1:8080 --token "$TOKEN" \
//!     --database-url sqlite://balances.db
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use eventvault_tools::sse::SseParser;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{AnyConnection, Connection};

/// Keeps account balances from an eventvault's global log.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Base URL of the eventvault service.
    #[arg(long, env = "EVENTVAULT_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token (a `service` principal is enough).
    #[arg(long, env = "EVENTVAULT_TOKEN", hide_env_values = true)]
    token: String,
    /// Where the balances live: a SQLite URL or postgres://….
    #[arg(
        long,
        env = "BALANCES_DATABASE_URL",
        // A URL may hold a password: `--help` names the variable only.
        hide_env_values = true,
        default_value = "sqlite://balances.db?mode=rwc"
    )]
    database_url: String,
    /// Stop once every event up to this position is applied (for batch
    /// runs and tests); without it, follow the log for ever. It must be the
    /// position of an event the token may read (events of other streams are
    /// never delivered, so the projection cannot tell it passed them).
    #[arg(long)]
    stop_at: Option<u64>,
}

/// One change to a balance.
struct Change<'a> {
    account: &'a str,
    currency: Option<&'a str>,
    delta: Decimal,
}

/// What an event does to balances; `Err` says what is malformed, in words
/// of its own (never a value of the event: the log must not hold payloads).
fn changes(event: &Value) -> Result<Vec<Change<'_>>, &'static str> {
    let data = &event["data"];
    let text = |field: &str| data[field].as_str();
    let amount = || -> Result<Decimal, &'static str> {
        let raw = match &data["amount"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Null => return Err("it has no amount"),
            _ => return Err("its amount is neither a string nor a number"),
        };
        // Exact or refused: an amount is never rounded.
        Decimal::from_str_exact(&raw).map_err(|_| "its amount is not an exact decimal number")
    };
    let account = |field: &'static str| {
        text(field).ok_or(match field {
            "from_account" => "it has no from_account",
            "to_account" => "it has no to_account",
            _ => "it has no account",
        })
    };
    let currency = text("currency");
    Ok(match event["type"].as_str().unwrap_or_default() {
        "AccountOpened" => vec![Change {
            account: account("account")?,
            currency,
            delta: Decimal::ZERO,
        }],
        "MoneyDeposited" => vec![Change {
            account: account("account")?,
            currency,
            delta: amount()?,
        }],
        "MoneyWithdrawn" => vec![Change {
            account: account("account")?,
            currency,
            delta: -amount()?,
        }],
        "TransferCompleted" => {
            let a = amount()?;
            vec![
                Change {
                    account: account("from_account")?,
                    currency,
                    delta: -a,
                },
                Change {
                    account: account("to_account")?,
                    currency,
                    delta: a,
                },
            ]
        }
        _ => vec![],
    })
}

/// A balance: its currency (the first one seen) and amount.
type Balance = (Option<String>, Decimal);

/// The balances `changes` leave, for the accounts they touch; all of them
/// or none (`Err`: one would overflow).
fn fold(
    balances: &HashMap<String, Balance>,
    changes: &[Change<'_>],
) -> Result<Vec<(String, Balance)>, &'static str> {
    let mut after: Vec<(String, Balance)> = Vec::new();
    for c in changes {
        let i = match after.iter().position(|(a, _)| a == c.account) {
            Some(i) => i,
            None => {
                let now = balances
                    .get(c.account)
                    .cloned()
                    .unwrap_or((None, Decimal::ZERO));
                after.push((c.account.to_owned(), now));
                after.len() - 1
            }
        };
        let entry = &mut after[i].1;
        if entry.0.is_none() {
            entry.0 = c.currency.map(str::to_owned);
        }
        entry.1 = entry
            .1
            .checked_add(c.delta)
            .ok_or("a balance would overflow")?;
    }
    Ok(after)
}

/// The read model: balances in memory, mirrored in the database.
struct Model {
    db: AnyConnection,
    balances: HashMap<String, Balance>,
    position: u64,
    /// Malformed events skipped so far (the rows of `balances_skipped`).
    skipped: u64,
}

impl Model {
    async fn open(url: &str) -> Result<Self, Box<dyn std::error::Error>> {
        sqlx::any::install_default_drivers();
        let mut db = AnyConnection::connect(url).await?;
        sqlx::raw_sql(
            "create table if not exists balances (
                 account  text primary key,
                 currency text,
                 balance  text not null
             );
             create table if not exists balances_checkpoint (
                 id       integer primary key check (id = 1),
                 position bigint not null
             );
             -- Malformed events, skipped: where, and why in words of the
             -- projection's own (never a value of the event).
             create table if not exists balances_skipped (
                 position bigint primary key,
                 reason   text not null
             );",
        )
        .execute(&mut db)
        .await?;
        let position: Option<i64> =
            sqlx::query_scalar("select position from balances_checkpoint where id = 1")
                .fetch_optional(&mut db)
                .await?;
        let rows: Vec<(String, Option<String>, String)> =
            sqlx::query_as("select account, currency, balance from balances")
                .fetch_all(&mut db)
                .await?;
        let mut balances = HashMap::new();
        for (account, currency, balance) in rows {
            balances.insert(account, (currency, Decimal::from_str_exact(&balance)?));
        }
        let skipped: i64 = sqlx::query_scalar("select count(*) from balances_skipped")
            .fetch_one(&mut db)
            .await?;
        Ok(Self {
            db,
            balances,
            position: position.unwrap_or(0) as u64,
            skipped: skipped as u64,
        })
    }

    /// Applies a batch of events and their last position in one
    /// transaction; events at or before the stored position are ignored,
    /// and malformed ones are skipped whole and recorded as such.
    async fn apply(&mut self, events: &[(u64, Value)]) -> Result<(), Box<dyn std::error::Error>> {
        let fresh: Vec<&(u64, Value)> = events.iter().filter(|(p, _)| *p > self.position).collect();
        let Some(last) = fresh.last().map(|(p, _)| *p) else {
            return Ok(());
        };
        let mut next = self.balances.clone();
        let mut touched = Vec::new();
        let mut skipped: Vec<(u64, &'static str)> = Vec::new();
        for (position, event) in &fresh {
            match changes(event).and_then(|c| fold(&next, &c)) {
                Ok(after) => {
                    for (account, balance) in after {
                        touched.push(account.clone());
                        next.insert(account, balance);
                    }
                }
                Err(reason) => skipped.push((*position, reason)),
            }
        }
        touched.sort();
        touched.dedup();
        let mut tx = self.db.begin().await?;
        for account in &touched {
            let (currency, balance) = &next[account];
            sqlx::query(
                "insert into balances (account, currency, balance) values ($1, $2, $3)
                 on conflict (account) do update set currency = excluded.currency, balance = excluded.balance",
            )
            .bind(account)
            .bind(currency.as_deref())
            .bind(balance.to_string())
            .execute(&mut *tx)
            .await?;
        }
        for (position, reason) in &skipped {
            sqlx::query("insert into balances_skipped (position, reason) values ($1, $2)")
                .bind(*position as i64)
                .bind(*reason)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "insert into balances_checkpoint (id, position) values (1, $1)
             on conflict (id) do update set position = excluded.position",
        )
        .bind(last as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        // Only what committed is believed (and told).
        self.balances = next;
        self.position = last;
        for (position, reason) in skipped {
            self.skipped += 1;
            eprintln!(
                "skipped the malformed event at position {position}: {reason} ({} skipped so far)",
                self.skipped
            );
        }
        Ok(())
    }
}

/// Follows the log from the model's position until `stop_at` (or for
/// ever), reconnecting after a dropped connection.
async fn follow(args: &Args, model: &mut Model) -> Result<(), Box<dyn std::error::Error>> {
    let client = reqwest::Client::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        if args.stop_at.is_some_and(|p| model.position >= p) {
            return Ok(());
        }
        let response = client
            .get(format!(
                "{}/events/subscribe",
                args.url.trim_end_matches('/')
            ))
            .bearer_auth(&args.token)
            .header("Last-Event-ID", model.position.to_string())
            .send()
            .await;
        let response = match response {
            Ok(r) if r.status().is_success() => r,
            Ok(r) if r.status().is_client_error() => {
                return Err(format!("the service refused the subscription: {}", r.status()).into());
            }
            Ok(r) => {
                eprintln!("subscription answered {}; retrying", r.status());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
            Err(e) => {
                eprintln!("cannot reach the service ({e}); retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let mut body = response.bytes_stream();
        let mut parser = SseParser::default();
        let mut reported = model.position;
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            let batch = parser
                .push(&chunk)
                .into_iter()
                .map(|e| {
                    let position = e.id.as_deref().and_then(|i| i.parse().ok());
                    let event: Option<Value> = serde_json::from_str(&e.data).ok();
                    position
                        .zip(event)
                        .ok_or_else(|| "a malformed event arrived".to_string())
                })
                .collect::<Result<Vec<_>, _>>()?;
            model.apply(&batch).await?;
            if model.position >= reported + 1000 {
                eprintln!("applied up to position {}", model.position);
                reported = model.position;
            }
            if args.stop_at.is_some_and(|p| model.position >= p) {
                return Ok(());
            }
        }
        eprintln!(
            "the subscription ended at position {}; resuming",
            model.position
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = async {
        let mut model = Model::open(&args.database_url).await?;
        eprintln!(
            "balances: {} accounts, resuming after position {} ({} malformed events skipped so far)",
            model.balances.len(),
            model.position,
            model.skipped
        );
        follow(&args, &mut model).await?;
        eprintln!("applied up to position {}", model.position);
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
