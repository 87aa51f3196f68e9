//! The `eventvault` command: parse the command line, set up logging, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eventvault::app::{self, Application, Config};
use eventvault::keys::rotate_master_key;
use eventvault::principals::Principals;
use eventvault::store::audit::{ChainReport, parse_expectation};
use eventvault::store::{Db, EventStore, Purpose};
use zeroize::Zeroizing;

/// The request path allocates and frees many small buffers (JSON, rows,
/// ciphertexts); mimalloc serves that pattern far better than glibc malloc,
/// which dominated the profile (see docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A GDPR-aware, encrypted event store served over HTTP.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Event store database: a SQLite URL or postgres://user@host/db.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_DATABASE_URL",
        // A URL may hold a password: `--help` names the variable, never
        // its value.
        hide_env_values = true,
        default_value = "sqlite://data/eventvault.db"
    )]
    database_url: String,
    /// Keystore database, separate from the event store: SQLite URL or postgres://….
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_KEYSTORE_URL",
        // A URL may hold a password: `--help` names the variable, never
        // its value.
        hide_env_values = true,
        default_value = "sqlite://keys/keystore.db"
    )]
    keystore_url: String,
    /// File holding the master key (base64), created with mode 0600 on first
    /// start. Ignored when EVENTVAULT_MASTER_KEY (base64) is set.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_MASTER_KEY_FILE",
        default_value = "keys/master.key"
    )]
    master_key_file: PathBuf,
    /// Directory with classification.toml and roles.toml.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_POLICIES_DIR",
        default_value = "policies"
    )]
    policies_dir: PathBuf,
    /// Connections per database pool.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_DB_CONNECTIONS",
        default_value_t = 16
    )]
    db_connections: u32,
    /// Seconds a request waits for a database that does not answer (no
    /// connection, no commit) before it is answered 503 with Retry-After.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_STORE_TIMEOUT_SECS",
        default_value_t = 5
    )]
    store_timeout_secs: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve {
        /// Address and port to listen on.
        #[arg(long, env = "EVENTVAULT_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Largest accepted request body in bytes (larger ones get 413).
        #[arg(long, env = "EVENTVAULT_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
        max_body_bytes: usize,
        /// Unwrapped data keys kept in memory.
        #[arg(long, env = "EVENTVAULT_KEY_CACHE", default_value_t = 100_000)]
        key_cache: usize,
        /// Seconds a write may wait for a client that does not read (a
        /// stalled subscriber) before its connection is closed.
        #[arg(long, env = "EVENTVAULT_WRITE_TIMEOUT_SECS", default_value_t = 30)]
        write_timeout_secs: u64,
        /// Client connections open at once; more are answered 503 (with
        /// Retry-After) and closed. Keep it below the process's open-file
        /// limit (`ulimit -n`), which also has to cover database connections.
        #[arg(long, env = "EVENTVAULT_MAX_CONNECTIONS", default_value_t = 10_000)]
        max_connections: usize,
        /// Largest request line and headers, in bytes; larger ones are
        /// answered 431 and the connection closed.
        #[arg(long, env = "EVENTVAULT_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
        max_header_bytes: usize,
        /// Seconds a client has to send a request's line and headers, from
        /// connecting or from the request's first byte; slower ones are
        /// disconnected.
        #[arg(
            long,
            env = "EVENTVAULT_HEADER_READ_TIMEOUT_SECS",
            default_value_t = 10
        )]
        header_read_timeout_secs: u64,
        /// Seconds a request body may take to arrive in full; slower ones
        /// are answered 408 and the connection closed.
        #[arg(long, env = "EVENTVAULT_BODY_READ_TIMEOUT_SECS", default_value_t = 30)]
        body_read_timeout_secs: u64,
        /// Seconds a kept-alive connection may wait for its next request
        /// before it is closed (a request being answered, such as a
        /// subscription, is never cut by it).
        #[arg(long, env = "EVENTVAULT_IDLE_TIMEOUT_SECS", default_value_t = 60)]
        idle_timeout_secs: u64,
        /// Live subscriptions open at once; more are refused with 503.
        #[arg(long, env = "EVENTVAULT_MAX_SUBSCRIPTIONS", default_value_t = 1000)]
        max_subscriptions: usize,
        /// Requests per second one principal may make (429 with Retry-After
        /// beyond); 0: unlimited.
        #[arg(long, env = "EVENTVAULT_RATE_LIMIT", default_value_t = 5000)]
        rate_limit: u32,
        /// Requests one principal may make at once after a quiet spell.
        #[arg(long, env = "EVENTVAULT_RATE_LIMIT_BURST", default_value_t = 10000)]
        rate_limit_burst: u32,
        /// Requests of one principal served at once while other principals
        /// are active (made a request in the last second); the others wait
        /// their turn, so that one principal's flood leaves the others
        /// their share. 0: unlimited.
        #[arg(long, env = "EVENTVAULT_MAX_IN_FLIGHT", default_value_t = 4)]
        max_in_flight: usize,
        /// Requests of one principal served at once while no other is
        /// active.
        #[arg(long, env = "EVENTVAULT_MAX_IN_FLIGHT_ALONE", default_value_t = 64)]
        max_in_flight_alone: usize,
        /// Requests per second one client address may make without a valid
        /// token (no token, a malformed or an unknown one) before they are
        /// answered 429 with Retry-After instead of 401; 0: unlimited.
        /// Requests with a valid token are never limited by it.
        #[arg(
            long,
            env = "EVENTVAULT_UNAUTHENTICATED_RATE_LIMIT",
            default_value_t = 10
        )]
        unauthenticated_rate_limit: u32,
        /// Such requests one client address may make at once after a quiet
        /// spell.
        #[arg(
            long,
            env = "EVENTVAULT_UNAUTHENTICATED_RATE_LIMIT_BURST",
            default_value_t = 20
        )]
        unauthenticated_rate_limit_burst: u32,
        /// Seconds over which the audit records of requests without a valid
        /// token are aggregated per client address: the first of an
        /// address has a record of its own, the others are counted into
        /// one record when the interval ends. 0: every one has a record of
        /// its own (only behind a proxy that limits them by address).
        #[arg(
            long,
            env = "EVENTVAULT_UNAUTHENTICATED_AUDIT_INTERVAL_SECS",
            default_value_t = 60
        )]
        unauthenticated_audit_interval_secs: u64,
        /// Client addresses (IPv4, or IPv6 /64) tracked at once for the
        /// limit and the aggregation above; further addresses share one
        /// allowance and one record.
        #[arg(
            long,
            env = "EVENTVAULT_MAX_UNAUTHENTICATED_ADDRESSES",
            default_value_t = 4096
        )]
        max_unauthenticated_addresses: usize,
        /// NATS server URL (several: comma-separated). When set, every
        /// committed event is published to JetStream: clear fields and the
        /// sealed personal blob, never personal data in clear.
        #[arg(long, env = "EVENTVAULT_NATS_URL", hide_env_values = true)]
        nats_url: Option<String>,
        /// JetStream stream the events are published to (created if missing).
        #[arg(long, env = "EVENTVAULT_NATS_STREAM", default_value = eventvault::relay::DEFAULT_STREAM)]
        nats_stream: String,
        /// First token(s) of every subject: <prefix>.<category>.<type>.
        #[arg(
            long,
            env = "EVENTVAULT_NATS_SUBJECT_PREFIX",
            default_value = eventvault::relay::DEFAULT_SUBJECT_PREFIX
        )]
        nats_subject_prefix: String,
        /// Accept the loss of the data keys the start-up check finds missing
        /// from the keystore (a keystore restored from a backup older than
        /// the event store's): their events then read "lost", the loss is
        /// recorded and audited, and the service becomes ready. Without it
        /// the service does not become ready while keys are missing. Pass it
        /// once, for a loss you have looked at, then remove it.
        #[arg(long, env = "EVENTVAULT_ACCEPT_MISSING_KEYS")]
        accept_missing_keys: bool,
    },
    /// Run the migrations of both databases and exit (as the owner of their
    /// tables; `serve` as the owner does this by itself, `serve` as a
    /// least-privilege role only checks them). On a first run with no
    /// principal, creates the `admin` principal and prints its token once.
    Migrate {
        /// PostgreSQL: also grant this existing role the least privileges
        /// eventvault serves with (migrations/postgres/grants/): no UPDATE,
        /// DELETE or TRUNCATE on events, the audit log or the forget ledger.
        #[arg(long)]
        grant_to: Option<String>,
    },
    /// Manage principals (callers and their tokens).
    #[command(subcommand)]
    Principal(PrincipalCommand),
    /// Work with the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Manage the master key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Write a consistent copy of one of the two databases (take and keep
    /// the two apart; see docs/OPERATIONS.md). Safe while the service runs.
    #[command(subcommand)]
    Backup(BackupCommand),
}

#[derive(Subcommand)]
enum BackupCommand {
    /// The event store (events, snapshots, forget ledger, audit log,
    /// principals).
    Events {
        /// The file to write (it must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// The keystore (wrapped data keys; useless without the master key).
    Keystore {
        /// The file to write (it must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Both, in the order a restore needs: the event store first, then the
    /// keystore, so the keystore's copy holds every key the events' copy
    /// refers to.
    All {
        /// The file for the event store (it must not exist).
        #[arg(long)]
        events_to: PathBuf,
        /// The file for the keystore (it must not exist; keep it apart).
        #[arg(long)]
        keystore_to: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a new master key and re-wrap every data key under it (no
    /// event is touched). Run it with every eventvault process stopped; it
    /// is safe to interrupt and run again.
    RotateKek {
        /// Data keys re-wrapped per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: u32,
    },
    /// The master keys the keystore knows and how many data keys each wraps.
    Status,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain of the audit log: exit 0 if it holds, 1 naming the
    /// first bad record if not. Opens the event store read-only.
    Verify {
        /// `SEQ:HASH` printed by an earlier run: that record must still be
        /// there with that hash (finds the newest records cut off).
        #[arg(long)]
        expect: Option<String>,
    },
}

#[derive(Subcommand)]
enum PrincipalCommand {
    /// Add a principal and print its token once, as the last line.
    Add {
        /// Unique name of the principal.
        name: String,
        /// A role from policies/roles.toml; repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
    },
    /// List principals and their roles (never tokens).
    List,
    /// Remove a principal; its token stops working.
    Remove {
        /// Name of the principal.
        name: String,
    },
}

fn config(cli: &Cli, listen: SocketAddr, max_body_bytes: usize, key_cache: usize) -> Config {
    let secs = |s: u64| std::time::Duration::from_secs(s.max(1));
    let (write_timeout_secs, max_subscriptions, rate_limit, max_in_flight) = match &cli.command {
        Command::Serve {
            write_timeout_secs,
            max_subscriptions,
            rate_limit,
            rate_limit_burst,
            max_in_flight,
            max_in_flight_alone,
            ..
        } => (
            *write_timeout_secs,
            *max_subscriptions,
            app::RateLimit::per_second(*rate_limit, *rate_limit_burst),
            (*max_in_flight, *max_in_flight_alone),
        ),
        _ => (30, 0, None, (0, 0)),
    };
    let (max_in_flight, max_in_flight_alone) = max_in_flight;
    let unauthenticated = match &cli.command {
        Command::Serve {
            unauthenticated_rate_limit,
            unauthenticated_rate_limit_burst,
            unauthenticated_audit_interval_secs,
            max_unauthenticated_addresses,
            ..
        } => (
            app::RateLimit::per_second(
                *unauthenticated_rate_limit,
                *unauthenticated_rate_limit_burst,
            ),
            std::time::Duration::from_secs(*unauthenticated_audit_interval_secs),
            *max_unauthenticated_addresses,
        ),
        _ => (None, std::time::Duration::ZERO, 1),
    };
    let (unauthenticated_rate_limit, unauthenticated_audit_interval, max_unauthenticated_addresses) =
        unauthenticated;
    let connections = match &cli.command {
        Command::Serve {
            max_connections,
            max_header_bytes,
            header_read_timeout_secs,
            body_read_timeout_secs,
            idle_timeout_secs,
            ..
        } => (
            *max_connections,
            *max_header_bytes,
            *header_read_timeout_secs,
            *body_read_timeout_secs,
            *idle_timeout_secs,
        ),
        _ => (0, 16 * 1024, 10, 30, 60),
    };
    let (max_connections, max_header_bytes, header_read, body_read, idle) = connections;
    Config {
        listen,
        database_url: cli.database_url.clone(),
        keystore_url: cli.keystore_url.clone(),
        master_key_file: cli.master_key_file.clone(),
        master_key: std::env::var("EVENTVAULT_MASTER_KEY")
            .ok()
            .map(Zeroizing::new),
        policies_dir: cli.policies_dir.clone(),
        max_body_bytes,
        key_cache_capacity: key_cache,
        dek_max_encryptions: eventvault::keys::DEFAULT_MAX_ENCRYPTIONS,
        max_db_connections: cli.db_connections,
        store_timeout: secs(cli.store_timeout_secs),
        write_timeout: secs(write_timeout_secs),
        max_connections: max_connections.max(1),
        // Below a request line and a few headers nothing could be served.
        max_header_bytes: max_header_bytes.max(1024),
        header_read_timeout: secs(header_read),
        body_read_timeout: secs(body_read),
        idle_timeout: secs(idle),
        max_subscriptions,
        rate_limit,
        max_in_flight,
        max_in_flight_alone,
        unauthenticated_rate_limit,
        unauthenticated_audit_interval,
        max_unauthenticated_addresses,
        subscription_recheck: std::time::Duration::from_secs(15),
        nats_url: None,
        nats_stream: eventvault::relay::DEFAULT_STREAM.into(),
        nats_subject_prefix: eventvault::relay::DEFAULT_SUBJECT_PREFIX.into(),
        accept_missing_keys: false,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match &cli.command {
        Command::Serve {
            listen,
            max_body_bytes,
            key_cache,
            nats_url,
            nats_stream,
            nats_subject_prefix,
            accept_missing_keys,
            ..
        } => {
            let cfg = Config {
                accept_missing_keys: *accept_missing_keys,
                // An empty EVENTVAULT_NATS_URL means no relay, as unset does.
                nats_url: nats_url.clone().filter(|url| !url.trim().is_empty()),
                nats_stream: nats_stream.clone(),
                nats_subject_prefix: nats_subject_prefix.clone(),
                ..config(&cli, *listen, *max_body_bytes, *key_cache)
            };
            let mut application = Application::build(&cfg).await?;
            if let Some(token) = application.take_admin_token() {
                println!(
                    "First start: created principal 'admin' with role 'admin'. Its token, shown only this once:"
                );
                println!("{}", token.as_str());
            }
            // Signal handlers first: a SIGTERM right after the address is
            // printed must shut down gracefully, not kill the process.
            let shutdown = app::shutdown_signal()?;
            println!(
                "eventvault listening on http://{}",
                application.local_addr()
            );
            // Data is served once the forget ledger is re-applied and the
            // data keys are checked; the line says so to whoever started the
            // process (as `/readyz` does).
            let mut progress = application.progress();
            tokio::spawn(async move {
                if progress.ready().await.is_ok() {
                    println!("eventvault ready");
                }
            });
            application.run_until(shutdown).await?;
        }
        Command::Principal(cmd) => {
            let cfg = config(&cli, "127.0.0.1:0".parse()?, 0, 1);
            let (store, policies) = app::open_event_store(&cfg).await?;
            let principals = Principals::new(store);
            match cmd {
                PrincipalCommand::Add { name, roles } => {
                    let token = principals.add(&policies, name, roles).await?;
                    println!(
                        "Added principal {name:?} with roles {}. Its token, shown only this once:",
                        roles.join(", ")
                    );
                    println!("{}", token.as_str());
                }
                PrincipalCommand::List => {
                    for p in principals.list().await? {
                        println!("{}\t{}", p.name, p.roles.join(","));
                    }
                }
                PrincipalCommand::Remove { name } => {
                    principals.remove(name).await?;
                    println!("Removed principal {name:?}.");
                }
            }
        }
        Command::Keys(KeysCommand::RotateKek { batch_size }) => {
            if std::env::var_os("EVENTVAULT_MASTER_KEY").is_some() {
                return Err("keys rotate-kek works on the master key file; unset EVENTVAULT_MASTER_KEY and point --master-key-file at the key (or rotate in your secret manager with the file as a staging copy)".into());
            }
            let cfg = config(&cli, "127.0.0.1:0".parse()?, 0, 1);
            let keystore = app::open_keystore(&cfg).await?;
            let rotation = rotate_master_key(
                &keystore,
                &cfg.master_key_file,
                *batch_size,
                |done, total| {
                    eprint!("\rre-wrapping data keys: {done}/{total}");
                },
            )
            .await;
            eprintln!();
            let r = rotation?;
            println!(
                "Rotated the master key: {} -> {}; {} data keys re-wrapped.",
                r.old_kek_id, r.new_kek_id, r.rewrapped
            );
            println!(
                "The old master key is now {}: keep it until every keystore backup taken before now has expired, then destroy it.",
                r.retired_key_file.display()
            );
        }
        Command::Backup(which) => {
            let copies = match which {
                BackupCommand::Events { to } => vec![(&cli.database_url, to, "event store")],
                BackupCommand::Keystore { to } => vec![(&cli.keystore_url, to, "keystore")],
                // The keystore after the event store: every key the events'
                // copy refers to was created before the keystore's copy.
                BackupCommand::All {
                    events_to,
                    keystore_to,
                } => {
                    if events_to == keystore_to {
                        return Err("--events-to and --keystore-to must be different files".into());
                    }
                    vec![
                        (&cli.database_url, events_to, "event store"),
                        (&cli.keystore_url, keystore_to, "keystore"),
                    ]
                }
            };
            if let Some((_, to, _)) = copies.iter().find(|(_, to, _)| to.exists()) {
                return Err(
                    format!("{} exists; a backup never overwrites a file", to.display()).into(),
                );
            }
            for (url, to, what) in copies {
                let bytes = eventvault::backup::backup(url, to).await?;
                println!(
                    "wrote {} ({bytes} bytes): a consistent copy of the {what}",
                    to.display()
                );
            }
        }
        Command::Migrate { grant_to } => {
            let cfg = config(&cli, "127.0.0.1:0".parse()?, 0, 1);
            if cfg.database_url == cfg.keystore_url {
                return Err("the keystore must be a separate database from the event store".into());
            }
            let postgres =
                |url: &str| url.starts_with("postgres:") || url.starts_with("postgresql:");
            if grant_to.is_some() && !(postgres(&cfg.database_url) && postgres(&cfg.keystore_url)) {
                return Err(eventvault::store::StoreError::NoRoles.into());
            }
            let policies = eventvault::policy::Policies::load(&cfg.policies_dir)?;
            let mut admin = None;
            for (url, purpose) in [
                (&cfg.database_url, Purpose::Events),
                (&cfg.keystore_url, Purpose::Keystore),
            ] {
                let db = Db::migrate(url, purpose, cfg.store_timeout).await?;
                if let Some(role) = grant_to {
                    db.grant_serving_role(purpose, role).await?;
                }
                if purpose == Purpose::Events {
                    let principals = Principals::new(EventStore::new(db.clone()));
                    admin = principals.bootstrap_admin(&policies).await?;
                }
                db.close().await;
            }
            match grant_to {
                Some(role) => println!(
                    "migrated the event store and the keystore; granted {role:?} what eventvault serves with"
                ),
                None => println!("migrated the event store and the keystore"),
            }
            // The token last, as `principal add` prints it.
            if let Some(token) = admin {
                println!(
                    "First start: created principal 'admin' with role 'admin'. Its token, shown only this once:"
                );
                println!("{}", token.as_str());
            }
        }
        Command::Keys(KeysCommand::Status) => {
            let cfg = config(&cli, "127.0.0.1:0".parse()?, 0, 1);
            let keystore = app::open_keystore(&cfg).await?;
            let configured = std::fs::metadata(&cfg.master_key_file)
                .ok()
                .and_then(|_| eventvault::keys::load_master_key(None, &cfg.master_key_file).ok())
                .map(|(k, _)| k.id().to_owned());
            for (kek_id, count) in keystore.dek_counts_by_kek().await? {
                let mark = if configured.as_deref() == Some(kek_id.as_str()) {
                    " (configured)"
                } else {
                    ""
                };
                println!("{kek_id}\t{count} data keys{mark}");
            }
            if eventvault::keys::next_master_key_path(&cfg.master_key_file).exists() {
                println!("a rotation is unfinished: run `eventvault keys rotate-kek` to finish it");
            }
        }
        Command::Audit(AuditCommand::Verify { expect }) => {
            let expect = expect
                .as_deref()
                .map(|e| {
                    parse_expectation(e).ok_or(
                        "--expect must be SEQ:HASH, a record number and its 64 hex digit hash",
                    )
                })
                .transpose()?;
            let store = EventStore::new(Db::open_existing(&cli.database_url).await?);
            match store.verify_audit_chain(expect).await? {
                ChainReport::Intact { records, head_hash } => {
                    let head = hex::encode(head_hash);
                    println!("audit log intact: {records} records, head hash {head}");
                    println!(
                        "keep this line where the database's administrators cannot write, and check later with: --expect {records}:{head}"
                    );
                }
                ChainReport::Broken {
                    first_bad_seq,
                    reason,
                } => {
                    return Err(
                        format!("audit log broken at record {first_bad_seq}: {reason}").into(),
                    );
                }
            }
        }
    }
    Ok(())
}
