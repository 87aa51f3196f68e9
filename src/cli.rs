//! The command line: [`Cli`] as `eventvault` parses it, and the commands
//! other than `serve` (migrations, principals, the audit log, the master
//! key, backups), which open what they need, do their work and exit.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app;
use crate::config::{ServeArgs, StoreArgs};
use crate::keys::uri::MasterKeyUri;
use crate::keys::{open_master_key, rotate_master_key, rotate_master_key_to};
use crate::principals::Principals;
use crate::store::audit::{ChainReport, parse_expectation};
use crate::store::{Db, EventStore, Purpose};

/// A GDPR-aware, encrypted event store served over HTTP.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP service.
    Serve(Box<ServeArgs>),
    #[command(flatten)]
    Admin(AdminCommand),
}

/// The commands that work on the databases, the keys and the principals.
#[derive(Subcommand)]
pub enum AdminCommand {
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
pub enum BackupCommand {
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
pub enum KeysCommand {
    /// Re-wrap every data key under a new master key (no event is
    /// touched): without --to, a new key generated into the master key
    /// file; with --to, the key at that URI (a file, or a key on a PKCS#11
    /// token, created there if absent). Run it with every eventvault process
    /// stopped; it is safe to interrupt and run again.
    RotateKek {
        /// Data keys re-wrapped per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: u32,
        /// Where the new master key lives: `file:PATH` or
        /// `pkcs11:token=LABEL;object=LABEL` (the token of --pkcs11-module,
        /// its PIN from EVENTVAULT_PKCS11_PIN). Start the service with it as
        /// --master-key-uri afterwards.
        #[arg(long, value_name = "URI")]
        to: Option<String>,
    },
    /// The master keys the keystore knows, where each lives (its URI), and
    /// how many data keys each wraps.
    Status,
}

#[derive(Subcommand)]
pub enum AuditCommand {
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
pub enum PrincipalCommand {
    /// Add a principal and print its token once, as the last line; with
    /// --client-cert, bind it to that certificate instead (no token).
    Add {
        /// Unique name of the principal.
        name: String,
        /// A role from policies/roles.toml; repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// The principal's client certificate (PEM): a request over TLS
        /// with this certificate, verified against --tls-client-ca, is
        /// this principal without a token. Its SHA-256 fingerprint is
        /// stored, nothing secret.
        #[arg(long)]
        client_cert: Option<PathBuf>,
    },
    /// List principals, their roles and, for a certificate-bound one, the
    /// certificate's fingerprint (never tokens).
    List,
    /// Remove a principal; its token stops working.
    Remove {
        /// Name of the principal.
        name: String,
    },
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

/// Runs one of the commands other than `serve`.
pub async fn run(store: &StoreArgs, command: AdminCommand) -> CliResult {
    match command {
        AdminCommand::Migrate { grant_to } => migrate(store, grant_to.as_deref()).await,
        AdminCommand::Principal(cmd) => principal(store, cmd).await,
        AdminCommand::Audit(AuditCommand::Verify { expect }) => {
            verify_audit(store, expect.as_deref()).await
        }
        AdminCommand::Keys(KeysCommand::RotateKek { batch_size, to }) => match to {
            None => rotate_kek(store, batch_size).await,
            Some(to) => rotate_kek_to(store, batch_size, &to).await,
        },
        AdminCommand::Keys(KeysCommand::Status) => keys_status(store).await,
        AdminCommand::Backup(which) => backup(store, which).await,
    }
}

async fn principal(store: &StoreArgs, cmd: PrincipalCommand) -> CliResult {
    let cfg = store.config();
    let (store, policies) = app::open_event_store(&cfg).await?;
    let principals = Principals::new(store);
    match cmd {
        PrincipalCommand::Add {
            name,
            roles,
            client_cert: Some(cert),
        } => {
            let fingerprint = crate::tls::fingerprint_of_file(&cert)?;
            principals
                .add_with_certificate(&policies, &name, &roles, &fingerprint)
                .await?;
            println!(
                "Added principal {name:?} with roles {}, bound to the client certificate with SHA-256 fingerprint {fingerprint}.",
                roles.join(", ")
            );
        }
        PrincipalCommand::Add {
            name,
            roles,
            client_cert: None,
        } => {
            let token = principals.add(&policies, &name, &roles).await?;
            println!(
                "Added principal {name:?} with roles {}. Its token, shown only this once:",
                roles.join(", ")
            );
            println!("{}", token.as_str());
        }
        PrincipalCommand::List => {
            for p in principals.list().await? {
                match &p.client_cert_sha256 {
                    Some(f) => {
                        println!("{}\t{}\tclient-cert sha256:{f}", p.name, p.roles.join(","))
                    }
                    None => println!("{}\t{}", p.name, p.roles.join(",")),
                }
            }
        }
        PrincipalCommand::Remove { name } => {
            principals.remove(&name).await?;
            println!("Removed principal {name:?}.");
        }
    }
    Ok(())
}

/// Shows how far a rotation has come, on standard error.
fn show_progress(done: u64, total: u64) {
    eprint!("\rre-wrapping data keys: {done}/{total}");
}

async fn rotate_kek(store: &StoreArgs, batch_size: u32) -> CliResult {
    if std::env::var_os("EVENTVAULT_MASTER_KEY").is_some() {
        return Err("keys rotate-kek without --to works on the master key file; unset EVENTVAULT_MASTER_KEY and point --master-key-file at the key, or name the new key with --to".into());
    }
    let cfg = store.config();
    let MasterKeyUri::File(path) = cfg.master_key_uri()? else {
        return Err("the master key is on a token: name the new one with --to pkcs11:token=…;object=… (or --to file:PATH)".into());
    };
    let keystore = app::open_keystore(&cfg).await?;
    let rotation = rotate_master_key(&keystore, &path, batch_size, show_progress).await;
    eprintln!();
    let r = rotation?;
    println!(
        "Rotated the master key: {} -> {}; {} data keys re-wrapped.",
        r.old_kek_id, r.new_kek_id, r.rewrapped
    );
    if let Some(retired) = r.retired_key_file {
        println!(
            "The old master key is now {}: keep it until every keystore backup taken before now has expired, then destroy it.",
            retired.display()
        );
    }
    Ok(())
}

async fn rotate_kek_to(store: &StoreArgs, batch_size: u32, to: &str) -> CliResult {
    let cfg = store.config();
    let from = cfg.master_key_uri()?;
    let to = MasterKeyUri::parse(to).map_err(|e| format!("--to: {e}"))?;
    let keystore = app::open_keystore(&cfg).await?;
    let (old, _) = open_master_key(&cfg.master_key_source(&from), false).await?;
    let target = crate::keys::MasterKeySource {
        env_value: None,
        ..cfg.master_key_source(&to)
    };
    let (new, created) = open_master_key(&target, true).await?;
    if created {
        eprintln!("created the new master key at {to}");
    }
    let rotation = rotate_master_key_to(&keystore, &old, &new, batch_size, show_progress).await;
    eprintln!();
    let r = rotation?;
    println!(
        "Rotated the master key: {} ({from}) -> {} ({to}); {} data keys re-wrapped.",
        r.old_kek_id, r.new_kek_id, r.rewrapped
    );
    println!("Start eventvault with --master-key-uri {to} from now on.");
    println!(
        "The old master key ({from}) is untouched: keep it until every keystore backup taken before now has expired, then destroy it."
    );
    Ok(())
}

async fn keys_status(store: &StoreArgs) -> CliResult {
    let cfg = store.config();
    let keystore = app::open_keystore(&cfg).await?;
    let uri = cfg.master_key_uri()?;
    // Which one is configured, if it can be opened (nothing is created).
    let configured = open_master_key(&cfg.master_key_source(&uri), false)
        .await
        .map_err(|e| eprintln!("the configured master key ({uri}) cannot be opened: {e}"))
        .ok()
        .map(|(k, _)| k.id().to_owned());
    for k in keystore.dek_counts_by_kek().await? {
        let mark = if configured.as_deref() == Some(k.kek_id.as_str()) {
            " (configured)"
        } else {
            ""
        };
        println!(
            "{}\t{}\t{} data keys{mark}",
            k.kek_id,
            k.uri.as_deref().unwrap_or("(location not recorded)"),
            k.data_keys
        );
    }
    if let MasterKeyUri::File(path) = &uri
        && crate::keys::next_master_key_path(path).exists()
    {
        println!("a rotation is unfinished: run `eventvault keys rotate-kek` to finish it");
    }
    Ok(())
}

async fn backup(store: &StoreArgs, which: BackupCommand) -> CliResult {
    let copies = match &which {
        BackupCommand::Events { to } => vec![(&store.database_url, to, "event store")],
        BackupCommand::Keystore { to } => vec![(&store.keystore_url, to, "keystore")],
        // The keystore after the event store: every key the events' copy
        // refers to was created before the keystore's copy.
        BackupCommand::All {
            events_to,
            keystore_to,
        } => {
            if events_to == keystore_to {
                return Err("--events-to and --keystore-to must be different files".into());
            }
            vec![
                (&store.database_url, events_to, "event store"),
                (&store.keystore_url, keystore_to, "keystore"),
            ]
        }
    };
    if let Some((_, to, _)) = copies.iter().find(|(_, to, _)| to.exists()) {
        return Err(format!("{} exists; a backup never overwrites a file", to.display()).into());
    }
    for (url, to, what) in copies {
        let bytes = crate::backup::backup(url, to).await?;
        println!(
            "wrote {} ({bytes} bytes): a consistent copy of the {what}",
            to.display()
        );
    }
    Ok(())
}

async fn migrate(store: &StoreArgs, grant_to: Option<&str>) -> CliResult {
    let cfg = store.config();
    if cfg.database_url == cfg.keystore_url {
        return Err("the keystore must be a separate database from the event store".into());
    }
    let postgres = |url: &str| url.starts_with("postgres:") || url.starts_with("postgresql:");
    if grant_to.is_some() && !(postgres(&cfg.database_url) && postgres(&cfg.keystore_url)) {
        return Err(crate::store::StoreError::NoRoles.into());
    }
    let policies = crate::policy::Policies::load(&cfg.policies_dir)?;
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
        print_admin_token(&token);
    }
    Ok(())
}

async fn verify_audit(store: &StoreArgs, expect: Option<&str>) -> CliResult {
    let expect = expect
        .map(|e| {
            parse_expectation(e)
                .ok_or("--expect must be SEQ:HASH, a record number and its 64 hex digit hash")
        })
        .transpose()?;
    let store = EventStore::new(Db::open_existing(&store.database_url).await?);
    match store.verify_audit_chain(expect).await? {
        ChainReport::Intact { records, head_hash } => {
            let head = hex::encode(head_hash);
            println!("audit log intact: {records} records, head hash {head}");
            println!(
                "keep this line where the database's administrators cannot write, and check later with: --expect {records}:{head}"
            );
            Ok(())
        }
        ChainReport::Broken {
            first_bad_seq,
            reason,
        } => Err(format!("audit log broken at record {first_bad_seq}: {reason}").into()),
    }
}

/// Prints the token of the `admin` principal a first start created, once.
pub fn print_admin_token(token: &str) {
    println!(
        "First start: created principal 'admin' with role 'admin'. Its token, shown only this once:"
    );
    println!("{token}");
}
