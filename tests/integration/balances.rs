//! The example read model (`eventvault-balances`): 10,000 random deposits,
//! withdrawals and transfers across 100 accounts give the balances an
//! independent sum gives, after a kill at a random moment and a restart,
//! and again when rebuilt after half the account holders were forgotten.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv, batch};
use eventvault::store::Db;

both_backends!(
    balances_equal_an_independent_sum_before_and_after_a_forget,
    a_malformed_event_is_skipped_counted_and_logged_and_the_projection_goes_on,
);

const ACCOUNTS: usize = 100;
const MOVES: usize = 10_000;

/// A small deterministic generator (xorshift64*); the seed is printed so
/// that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn projector(base: &str, token: &str, db: &str, stop_at: Option<u64>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(crate::common::tool_binary("eventvault-balances"));
    cmd.args(["--url", base, "--database-url", db])
        .env("EVENTVAULT_TOKEN", token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(p) = stop_at {
        cmd.args(["--stop-at", &p.to_string()]);
    }
    cmd
}

/// Runs the projector until it has applied `stop_at`; its stderr goes to
/// the suite's log capture, and is returned.
async fn project(base: &str, token: &str, db: &str, stop_at: u64) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        projector(base, token, db, Some(stop_at)).output(),
    )
    .await
    .expect("the projector caught up within two minutes")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    crate::common::append_to_log(&stderr);
    assert!(out.status.success(), "projector failed: {stderr}");
    stderr.into_owned()
}

/// The balances the projector stored.
async fn stored_balances(db_url: &str) -> HashMap<String, Decimal> {
    let db = if db_url.starts_with("postgres") {
        Db::Postgres(sqlx::PgPool::connect(db_url).await.unwrap())
    } else {
        Db::Sqlite(sqlx::SqlitePool::connect(db_url).await.unwrap())
    };
    let q = "select account, balance from balances";
    let rows: Vec<(String, String)> = match &db {
        Db::Sqlite(p) => sqlx::query_as(q).fetch_all(p).await.unwrap(),
        Db::Postgres(p) => sqlx::query_as(q).fetch_all(p).await.unwrap(),
    };
    db.close().await;
    rows.into_iter()
        .map(|(a, b)| (a, Decimal::from_str(&b).unwrap()))
        .collect()
}

/// The position the projector has applied, if it has made its tables.
async fn checkpoint(db_url: &str) -> Option<u64> {
    let q = "select position from balances_checkpoint where id = 1";
    let p: Option<i64> = if db_url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(db_url).await.ok()?;
        let p = sqlx::query_scalar(q).fetch_optional(&pool).await.ok()?;
        pool.close().await;
        p
    } else {
        let pool = sqlx::SqlitePool::connect(db_url).await.ok()?;
        let p = sqlx::query_scalar(q).fetch_optional(&pool).await.ok()?;
        pool.close().await;
        p
    };
    p.map(|p| p as u64)
}

/// A database of its own for each run of the projector.
async fn projection_db(backend: &Backend, env: &TestEnv, name: &str) -> String {
    match backend {
        Backend::Sqlite => format!(
            "sqlite://{}?mode=rwc",
            env.dir.path().join(format!("{name}.db")).display()
        ),
        Backend::Postgres(_) => {
            // The event store's database, with tables of its own; a second
            // run gets them emptied.
            let db = Db::Postgres(sqlx::PgPool::connect(&env.database_url).await.unwrap());
            if let Db::Postgres(p) = &db {
                sqlx::raw_sql(
                    "drop table if exists balances; drop table if exists balances_checkpoint;
                     drop table if exists balances_skipped;",
                )
                .execute(p)
                .await
                .unwrap();
            }
            db.close().await;
            env.database_url.clone()
        }
    }
}

async fn balances_equal_an_independent_sum_before_and_after_a_forget(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let service = app.env.add_principal("balances", &["service"]).await;
    let dpo = app.env.add_principal("privacy", &["dpo"]).await;
    let seed = u64::from_le_bytes(Uuid::new_v4().as_bytes()[..8].try_into().unwrap()) | 1;
    eprintln!("balances seed: {seed}");
    let mut rng = Rng(seed);
    let account = |i: usize| format!("ACC-{i:03}");
    let mut expected: HashMap<String, Decimal> = HashMap::new();
    let mut per_stream: Vec<Vec<Value>> = vec![Vec::new(); ACCOUNTS];
    for (i, events) in per_stream.iter_mut().enumerate() {
        expected.insert(account(i), Decimal::ZERO);
        events.push(json!({
            "type": "AccountOpened", "subject": format!("cust-{i}"),
            "data": {"account": account(i), "currency": "EUR", "holder_name": format!("Holder Number {i}")}
        }));
    }
    let mut transfers = Vec::new();
    for _ in 0..MOVES {
        let i = rng.below(ACCOUNTS as u64) as usize;
        let cents = rng.below(1_000_000) as i64 + 1;
        let amount = Decimal::new(cents, 2);
        match rng.below(10) {
            0..=4 => {
                *expected.get_mut(&account(i)).unwrap() += amount;
                per_stream[i].push(json!({
                    "type": "MoneyDeposited", "subject": format!("cust-{i}"),
                    "data": {"account": account(i), "amount": amount.to_string(), "currency": "EUR",
                             "payer_name": format!("Payer of cust-{i}")}
                }));
            }
            5..=8 => {
                *expected.get_mut(&account(i)).unwrap() -= amount;
                per_stream[i].push(json!({
                    "type": "MoneyWithdrawn", "subject": format!("cust-{i}"),
                    "data": {"account": account(i), "amount": amount.to_string(), "currency": "EUR"}
                }));
            }
            _ => {
                let j = rng.below(ACCOUNTS as u64) as usize;
                *expected.get_mut(&account(i)).unwrap() -= amount;
                *expected.get_mut(&account(j)).unwrap() += amount;
                transfers.push(json!({
                    "type": "TransferCompleted", "subject": format!("cust-{i}"),
                    "data": {"from_account": account(i), "to_account": account(j),
                             "amount": amount.to_string(), "currency": "EUR", "reference": "rent"}
                }));
            }
        }
    }
    let mut head = 0;
    for (i, events) in per_stream.into_iter().enumerate() {
        let r = app
            .append_ok(&format!("accounts-{i}"), &batch(events))
            .await;
        head = head.max(r["last_position"].as_u64().unwrap());
    }
    for chunk in transfers.chunks(1000) {
        let r = app.append_ok("payments-1", &batch(chunk.to_vec())).await;
        head = head.max(r["last_position"].as_u64().unwrap());
    }
    // Events of streams the service role may not read are skipped.
    app.append_ok(
        "loans-1",
        &batch(vec![json!({"type": "MoneyDeposited",
            "data": {"account": account(1), "amount": "1000000", "currency": "EUR"}})]),
    )
    .await;

    // A run killed at a random moment, then a run to the end.
    let db = projection_db(&backend, &app.env, "balances").await;
    let mut first = projector(&app.base, &service, &db, None).spawn().unwrap();
    // The kill lands in the middle of the run: after a random number of
    // its progress lines (one per 1000 positions applied).
    let mut lines = tokio::io::BufReader::new(first.stderr.take().unwrap()).lines();
    let mut progress = 0;
    let target = 1 + rng.below(5);
    while progress < target {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the projector makes progress")
            .unwrap()
            .expect("the projector runs");
        crate::common::append_to_log(&line);
        progress += u64::from(line.starts_with("applied up to position"));
    }
    first.start_kill().unwrap();
    let _ = first.wait().await;
    let killed_at = checkpoint(&db).await.unwrap();
    eprintln!("balances: killed at position {killed_at} of {head}");
    assert!(killed_at > 0);
    let stderr = project(&app.base, &service, &db, head).await;
    assert!(!stderr.contains("skipped the malformed event"), "{stderr}");
    assert_eq!(stored_balances(&db).await, expected, "seed {seed}");

    // Forget half of the account holders: the amounts are clear fields, so
    // a projection rebuilt from scratch gives the same balances; the
    // holders' names are gone.
    for i in 0..ACCOUNTS / 2 {
        crate::forget::forget_ok(&app, &dpo, &format!("cust-{i}")).await;
    }
    let rebuilt = projection_db(&backend, &app.env, "rebuilt").await;
    project(&app.base, &service, &rebuilt, head).await;
    assert_eq!(stored_balances(&rebuilt).await, expected, "seed {seed}");
    for (i, state) in [(0, "erased"), (ACCOUNTS - 1, "decrypted")] {
        let (_, text) = app
            .get(
                &format!("/streams/accounts-{i}/events?limit=1"),
                &app.token(),
            )
            .await;
        let page: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(page["events"][0]["personal_data"], state, "{text}");
        assert_eq!(
            text.contains(&format!("Holder Number {i}")),
            state == "decrypted",
            "{text}"
        );
    }
}

/// The positions and reasons the projector recorded as skipped.
async fn skipped(db_url: &str) -> Vec<(i64, String)> {
    let q = "select position, reason from balances_skipped order by position";
    if db_url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(db_url).await.unwrap();
        let rows = sqlx::query_as(q).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    } else {
        let pool = sqlx::SqlitePool::connect(db_url).await.unwrap();
        let rows = sqlx::query_as(q).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    }
}

/// Any `service` principal can append: an amount that is no number, one
/// that a classification makes personal (an object: the projector does not
/// see it), a balance that would overflow. Each such event is skipped
/// whole, recorded and logged with its position (never its value), and the
/// projection reaches the end; a restart counts none of them twice.
async fn a_malformed_event_is_skipped_counted_and_logged_and_the_projection_goes_on(
    backend: Backend,
) {
    let app = TestApp::spawn(&backend).await;
    let service = app.env.add_principal("balances", &["service"]).await;
    let max = Decimal::MAX.to_string();
    let deposit = |account: &str, amount: Value| {
        json!({"type": "MoneyDeposited", "subject": "cust-1",
               "data": {"account": account, "amount": amount, "currency": "EUR"}})
    };
    let events = vec![
        json!({"type": "AccountOpened", "subject": "cust-1", "data": {"account": "ACC-1", "currency": "EUR"}}),
        deposit("ACC-1", json!("10.00")),
        deposit("ACC-1", json!("abc-not-a-number")),
        deposit("ACC-1", json!({"value": "5.00"})),
        deposit("ACC-2", json!(max)),
        // Both legs or neither: the credit to ACC-2 would overflow.
        json!({"type": "TransferCompleted", "subject": "cust-1",
               "data": {"from_account": "ACC-1", "to_account": "ACC-2", "amount": "1.00", "currency": "EUR"}}),
        json!({"type": "MoneyWithdrawn", "subject": "cust-1", "data": {"amount": "1.00", "currency": "EUR"}}),
        deposit("ACC-1", json!("2.50")),
    ];
    let r = app.append_ok("accounts-1", &batch(events)).await;
    let head = r["last_position"].as_u64().unwrap();
    assert_eq!(head, 8);

    let db = projection_db(&backend, &app.env, "skipping").await;
    let stderr = project(&app.base, &service, &db, head).await;
    let want: HashMap<String, Decimal> = [
        ("ACC-1".to_owned(), Decimal::from_str("12.50").unwrap()),
        ("ACC-2".to_owned(), Decimal::MAX),
    ]
    .into();
    assert_eq!(stored_balances(&db).await, want);
    assert_eq!(checkpoint(&db).await, Some(head));
    let recorded = skipped(&db).await;
    let positions: Vec<i64> = recorded.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, [3, 4, 6, 7], "{recorded:?}");
    assert_eq!(recorded[0].1, "its amount is not an exact decimal number");
    assert_eq!(recorded[1].1, "it has no amount", "the object was redacted");
    assert_eq!(recorded[2].1, "a balance would overflow");
    assert_eq!(recorded[3].1, "it has no account");
    for (n, p) in positions.iter().enumerate() {
        let line = format!(
            "skipped the malformed event at position {p}: {} ({} skipped so far)",
            recorded[n].1,
            n + 1
        );
        assert!(stderr.contains(&line), "{line:?} not in {stderr}");
    }
    assert!(
        !stderr.contains("abc-not-a-number"),
        "never a value: {stderr}"
    );

    // A restart goes on from the checkpoint and counts nothing twice.
    let r = app
        .append_ok("accounts-1", &batch(vec![deposit("ACC-1", json!("0.50"))]))
        .await;
    let head = r["last_position"].as_u64().unwrap();
    let stderr = project(&app.base, &service, &db, head).await;
    assert!(
        stderr.contains("resuming after position 8 (4 malformed events skipped so far)"),
        "{stderr}"
    );
    assert!(!stderr.contains("skipped the malformed event"), "{stderr}");
    assert_eq!(skipped(&db).await.len(), 4);
    assert_eq!(
        stored_balances(&db).await["ACC-1"],
        Decimal::from_str("13.00").unwrap()
    );
}
