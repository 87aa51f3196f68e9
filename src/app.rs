//! Building and running the service: `Application::build` opens both stores,
//! proves the master key, loads policies, starts the writer and binds the
//! listener; `run_until` re-applies the forget ledger while it already serves
//! (`/healthz` answers, `/readyz` and every data route answer 503 until the
//! ledger is applied), with the outbox relay beside it when NATS is
//! configured, until a shutdown signal, and then drains.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::http::conn;
use crate::http::unauthenticated::{self, Unauthenticated};
use crate::http::{AppState, HttpConfig, router};
use crate::keys::uri::MasterKeyUri;
use crate::keys::{KeyError, KeyManager, next_master_key_path, open_master_key};
use crate::metrics::Metrics;
use crate::policy::{Policies, PolicyError};
use crate::principals::{PrincipalError, Principals};
use crate::relay::{RelayConfig, RelayConfigError};
use crate::service::{Events, KeyCheck, LedgerState, ServiceError};
use crate::shutdown::Shutdown;
use crate::store::feed::{self, Feed};
use crate::store::keystore::Keystore;
use crate::store::writer::Writer;
use crate::store::{Db, EventStore, Purpose, StoreError, redact_url};
use crate::tls::{Certificates, TlsFiles};
use tokio_util::sync::DropGuard;

pub use crate::config::{Config, RateLimit};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Principal(#[from] PrincipalError),
    #[error("re-applying the forget ledger failed: {0}")]
    Forget(crate::service::ServiceError),
    #[error("re-applying the forget ledger failed: the task panicked (see the log)")]
    ForgetPanicked,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "principal {principal:?} has role {role:?}, which {roles_file} does not define; define it, or remove the principal with `eventvault principal remove {principal}`"
    )]
    UndefinedRole {
        principal: String,
        role: String,
        roles_file: String,
    },
    #[error("the keystore must be a separate database from the event store (both are {0})")]
    SharedDatabase(String),
    #[error(transparent)]
    Relay(#[from] RelayConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Cors(#[from] crate::http::cors::BadOrigin),
    #[error(transparent)]
    Jwt(#[from] crate::jwt::JwtError),
}

/// Opens the event store and loads the policies: what every command needs.
pub async fn open_event_store(cfg: &Config) -> Result<(EventStore, Arc<Policies>), StartError> {
    let policies = Arc::new(Policies::load(&cfg.policies_dir)?);
    let db = Db::connect_bounded(
        &cfg.database_url,
        Purpose::Events,
        cfg.max_db_connections,
        cfg.store_wait(),
    )
    .await?;
    Ok((EventStore::new(db), policies))
}

/// Opens the keystore alone (for the `keys` commands).
pub async fn open_keystore(cfg: &Config) -> Result<Keystore, StartError> {
    if cfg.database_url == cfg.keystore_url {
        return Err(StartError::SharedDatabase(redact_url(&cfg.database_url)));
    }
    let db = Db::connect_bounded(
        &cfg.keystore_url,
        Purpose::Keystore,
        cfg.max_db_connections,
        cfg.store_wait(),
    )
    .await?;
    Ok(Keystore::new(db))
}

/// Opens the keystore and proves the master key against it.
/// Cache look-ups are counted in `metrics`.
pub async fn open_key_manager(
    cfg: &Config,
    metrics: &Metrics,
) -> Result<(KeyManager, bool), StartError> {
    if cfg.database_url == cfg.keystore_url {
        return Err(StartError::SharedDatabase(redact_url(&cfg.database_url)));
    }
    let uri = cfg.master_key_uri()?;
    if let MasterKeyUri::File(path) = &uri
        && cfg.master_key.is_none()
        && next_master_key_path(path).exists()
    {
        return Err(StartError::Key(KeyError::MasterKey(format!(
            "a master key rotation is unfinished ({} exists); run `eventvault keys rotate-kek` again to finish it",
            next_master_key_path(path).display()
        ))));
    }
    let (kek, created) = open_master_key(&cfg.master_key_source(&uri), true).await?;
    let kek = kek.with_timeout(cfg.store_timeout);
    let db = Db::connect_bounded(
        &cfg.keystore_url,
        Purpose::Keystore,
        cfg.max_db_connections,
        cfg.store_wait(),
    )
    .await?;
    Ok((
        KeyManager::open(
            Keystore::new(db),
            kek,
            cfg.key_cache_capacity,
            cfg.dek_max_encryptions,
            metrics.clone(),
        )
        .await?,
        created,
    ))
}

/// Every role a principal holds must be defined: a role that vanished from
/// the policies stops the start rather than silently granting nothing.
async fn check_principal_roles(
    principals: &Principals,
    policies: &Policies,
    cfg: &Config,
) -> Result<(), StartError> {
    for p in principals.list().await? {
        if let Some(role) = p.roles.iter().find(|r| policies.role(r).is_none()) {
            return Err(StartError::UndefinedRole {
                principal: p.name,
                role: role.clone(),
                roles_file: cfg.policies_dir.join("roles.toml").display().to_string(),
            });
        }
    }
    Ok(())
}

/// Watches on what a running application has done, for whoever embeds it:
/// `changed()` completes when the value moves, so nobody has to poll.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Where the start-up re-apply of the forget ledger stands.
    pub ledger: watch::Receiver<LedgerState>,
    /// The sequence number of the newest audit record this process
    /// committed (0: none yet). It moves before the requests of its group
    /// are answered.
    pub audit_head: watch::Receiver<u64>,
    /// Moves when a forget (here, or on PostgreSQL in another process) has
    /// dropped the rows of the log that subscriptions read from memory.
    pub tail_clears: watch::Receiver<u64>,
    /// Subscriptions open now (as `eventvault_subscriptions_open`).
    pub subscriptions_open: watch::Receiver<i64>,
    /// The key caches: which subjects have a key in memory, what the
    /// eviction follower did, and a hold on fetches (to order one against
    /// a forget).
    pub key_cache: crate::keys::KeyCacheProbe,
    /// Requests without a valid token accounted for by the aggregate audit
    /// records committed so far (the sum of their counts).
    pub unauthenticated_aggregated: watch::Receiver<u64>,
    /// Where the start-up check of the data keys stands.
    pub data_keys: watch::Receiver<KeyCheck>,
    /// Recorded forgets waiting to be finished in the background (as
    /// `eventvault_forgets_pending`).
    pub forgets_pending: watch::Receiver<usize>,
}

impl Progress {
    /// Waits until the service serves data (`Ok`), or until it is clear it
    /// will not: the re-apply of the forget ledger failed, or data keys are
    /// missing (`Err` with what `/readyz` says).
    pub async fn ready(&mut self) -> Result<(), String> {
        let ledger = self
            .ledger
            .wait_for(|s| *s != LedgerState::Reapplying)
            .await
            .map(|s| *s)
            .map_err(|_| "the service stopped".to_owned())?;
        if ledger != LedgerState::Applied {
            return Err(format!("forget_ledger: {}", ledger.as_str()));
        }
        let keys = self
            .data_keys
            .wait_for(|s| *s != KeyCheck::Checking)
            .await
            .map(|s| *s)
            .map_err(|_| "the service stopped".to_owned())?;
        match keys {
            KeyCheck::Complete => Ok(()),
            KeyCheck::Missing(n) => Err(format!("data_keys: {n} missing")),
            KeyCheck::Checking => unreachable!("waited for another state"),
        }
    }
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
    writer_task: tokio::task::JoinHandle<()>,
    admin_token: Option<Zeroizing<String>>,
    /// The stop signal and the tracker of the background tasks.
    shutdown: Shutdown,
    /// Stops every background task if the application is dropped without
    /// `run_until` (or before it finished).
    stop_on_drop: DropGuard,
    /// What every client connection is held to.
    limits: conn::Limits,
    /// Where the outbox relay publishes; `None`: no relay.
    relay: Option<RelayConfig>,
    /// Where the re-apply of the forget ledger stands; the HTTP layer holds
    /// the receiving end and serves no data before it is `Applied`.
    ledger: watch::Sender<LedgerState>,
    /// Where the start-up check of the data keys stands; no data is served
    /// before it is `Complete`.
    data_keys: watch::Sender<KeyCheck>,
    /// Accept the loss of missing data keys (`--accept-missing-keys`).
    accept_missing_keys: bool,
    /// The TLS configuration new connections get; `None`: plain HTTP.
    tls: Option<Arc<Certificates>>,
}

impl Application {
    pub async fn build(cfg: &Config) -> Result<Self, StartError> {
        // What the flags name is checked before anything is opened.
        let tls = TlsFiles::from_flags(
            cfg.tls_cert.as_deref(),
            cfg.tls_key.as_deref(),
            cfg.tls_client_ca.as_deref(),
            cfg.require_client_cert,
        )?
        .map(Certificates::load)
        .transpose()?
        .map(Arc::new);
        let cors = crate::http::cors::Cors::new(&cfg.cors_origins)?;
        let relay = cfg
            .nats_url
            .as_deref()
            .map(|url| RelayConfig::parse(url, &cfg.nats_stream, &cfg.nats_subject_prefix))
            .transpose()?;
        // JWT callers as configured, their key set loaded: or no start.
        let jwt = match &cfg.jwt {
            Some(c) => Some(Arc::new(crate::jwt::Verifier::start(c).await?)),
            None => None,
        };
        let (store, policies) = open_event_store(cfg).await?;
        // This application's own registry: several applications in one
        // process (the tests) each count only what they did.
        let metrics = Metrics::new();
        let (keys, created) = open_key_manager(cfg, &metrics).await?;
        if created {
            tracing::warn!(
                uri = %keys.master_key_uri(),
                "created a new master key; back it up apart from the keystore (on a token: as its vendor says)"
            );
        }
        let keys = Arc::new(keys);
        let principals = Arc::new(Principals::new(store.clone()));
        let admin_token = principals.bootstrap_admin(&policies).await?;
        check_principal_roles(&principals, &policies, cfg).await?;
        let feed = Feed::new(store.head_position().await?);
        // A start that fails from here on stops what it has started.
        let shutdown = Shutdown::new();
        let stop_on_drop = shutdown.guard();
        feed::follow_other_processes(&store, &feed, &shutdown);
        feed::Tail::spawn_reader(&feed, store.clone(), &shutdown);
        let (writer, writer_task) = Writer::spawn(
            store.db.clone(),
            feed,
            metrics.clone(),
            cfg.store_wait(),
            &shutdown,
        );
        keys.follow_evictions(store.clone(), &shutdown);
        let events = Events::new(
            store.clone(),
            writer,
            keys.clone(),
            policies.clone(),
            metrics.clone(),
        );
        // The forget ledger is re-applied by `run_until`, while the listener
        // answers: until then no data route serves (see `http::starting`).
        let (ledger, ledger_rx) = watch::channel(LedgerState::Reapplying);
        let (data_keys, data_keys_rx) = watch::channel(KeyCheck::Checking);
        if !keys.keystore().can_vacuum().await? {
            tracing::warn!(
                "the keystore's database role may not VACUUM deks (it is not the table's owner; PostgreSQL 17 and later: grant it MAINTAIN): after a forget, PostgreSQL leaves the deleted keys' rows to autovacuum"
            );
        }
        let state = AppState {
            events,
            store,
            keys,
            principals,
            jwt,
            policies,
            config: Arc::new(HttpConfig {
                max_body_bytes: cfg.max_body_bytes,
                body_read_timeout: cfg.body_read_timeout,
                subscription_recheck: cfg.subscription_recheck,
                store_timeout: cfg.store_timeout,
            }),
            shutdown: shutdown.clone(),
            subscriptions: Arc::new(tokio::sync::Semaphore::new(cfg.max_subscriptions)),
            rate_limit: cfg.rate_limit.and_then(RateLimit::limiter).map(Arc::new),
            turns: crate::http::Turns::new(cfg.max_in_flight, cfg.max_in_flight_alone)
                .map(Arc::new),
            unauthenticated: Arc::new(Unauthenticated::new(
                unauthenticated::Settings {
                    limit: cfg
                        .unauthenticated_rate_limit
                        .map(|r| (r.period, r.burst.max(1))),
                    interval: Some(cfg.unauthenticated_audit_interval).filter(|i| !i.is_zero()),
                    max_addresses: cfg.max_unauthenticated_addresses.max(1),
                },
                metrics.clone(),
            )),
            metrics,
            ledger: ledger_rx,
            data_keys: data_keys_rx,
            cors,
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: cfg.listen,
                source,
            })?;
        Ok(Self {
            listener,
            state,
            writer_task,
            admin_token,
            shutdown,
            stop_on_drop,
            limits: conn::Limits {
                max_connections: cfg.max_connections,
                max_header_bytes: cfg.max_header_bytes,
                header_read_timeout: cfg.header_read_timeout,
                idle_timeout: cfg.idle_timeout,
                write_timeout: cfg.write_timeout,
            },
            relay,
            ledger,
            data_keys,
            accept_missing_keys: cfg.accept_missing_keys,
            tls,
        })
    }

    /// The TLS configuration, to reload it (on SIGHUP, `main`); `None`
    /// when the service speaks plain HTTP.
    pub fn certificates(&self) -> Option<Arc<Certificates>> {
        self.tls.clone()
    }

    /// Watches on the application's progress (readiness, audit records,
    /// subscriptions); take them before `run_until`.
    pub fn progress(&self) -> Progress {
        Progress {
            ledger: self.ledger.subscribe(),
            audit_head: self.state.events.audit_head(),
            tail_clears: self.state.events.tail_clears(),
            subscriptions_open: self.state.metrics.subscriptions_open(),
            key_cache: self.state.keys.probe(),
            unauthenticated_aggregated: self.state.unauthenticated.aggregated(),
            data_keys: self.data_keys.subscribe(),
            forgets_pending: self.state.events.pending_forgets(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The token of the `admin` principal created on a first start, once.
    pub fn take_admin_token(&mut self) -> Option<Zeroizing<String>> {
        self.admin_token.take()
    }

    /// Re-applies the forget ledger and serves until `shutdown` completes,
    /// then stops accepting, lets in-flight requests finish, drains the
    /// writer's queue, stops the relay and closes the databases.
    ///
    /// The listener answers from the start, but data routes only once the
    /// ledger is applied. If the re-apply fails the service stops without
    /// ever having served data, and this returns the failure.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Self {
            listener,
            state,
            writer_task,
            shutdown: tasks,
            stop_on_drop,
            limits,
            relay,
            ledger,
            data_keys,
            accept_missing_keys,
            tls,
            ..
        } = self;
        let store = state.store.clone();
        let keystore = state.keys.keystore().clone();
        // Whatever the relay has not published when the last connection
        // closes, it publishes after the next start, from its checkpoint.
        if let Some(cfg) = relay {
            crate::relay::spawn(store.clone(), cfg, state.events.commits(), &tasks);
        }
        // The aggregate audit records of requests without a valid token, at
        // the end of every window and, after the last connection closed,
        // of the window still open.
        {
            let (gate, events) = (state.unauthenticated.clone(), state.events.clone());
            let stop = tasks.clone();
            tasks.spawn(async move { gate.record_windows(events, stop).await });
        }
        let mut ledger_failed = ledger.subscribe();
        let reapply = tasks.spawn(start_up(
            state.events.clone(),
            ledger,
            data_keys,
            accept_missing_keys,
        ));
        // Forgets recorded while the keystore does not answer are finished
        // in the background as soon as it does; what one had not finished
        // when the last connection closes, the next start finishes.
        tasks.spawn(state.events.clone().complete_pending_forgets(tasks.clone()));
        let metrics = state.metrics.clone();
        let app = router(state);
        tracing::info!(
            addr = %listener.local_addr()?,
            tls = tls.is_some(),
            client_certificates = tls.as_ref().is_some_and(|t| t.asks_for_client_certificates()),
            "eventvault listening"
        );
        // Nothing is served without the ledger: a re-apply that fails (or
        // ends without a verdict: it panicked) stops the service at once.
        // Once it is applied, only `shutdown` stops the service.
        let failed = async move {
            let verdict = ledger_failed
                .wait_for(|s| *s != LedgerState::Reapplying)
                .await
                .map(|s| *s);
            if let Ok(LedgerState::Applied) = verdict {
                std::future::pending::<()>().await;
            }
        };
        let stopping = tasks.clone();
        let shutdown = async move {
            tokio::select! {
                () = shutdown => {}
                () = failed => {}
            }
            // Subscriptions end, so that their connections can close.
            stopping.stop_serving();
        };
        let served = conn::serve(listener, app, limits, metrics, tls, shutdown).await;
        // A stop during the re-apply cancels it: every step is repeated at
        // the next start, and the task holds a writer handle.
        if !reapply.is_finished() {
            tracing::warn!(
                "stopping before the start-up work (forget ledger, data key check) was done; the next start does it again"
            );
            reapply.abort();
        }
        // Every connection is closed: no request is refused any more. The
        // last records are written, every background task ends, then the
        // writer commits what is queued and stops.
        tasks.finish(writer_task).await;
        served?;
        let failure = match reapply.await {
            Ok(result) => result.err().map(StartError::Forget),
            Err(e) if e.is_cancelled() => None,
            Err(_) => {
                tracing::error!("the re-apply of the forget ledger panicked");
                Some(StartError::ForgetPanicked)
            }
        };
        store.db.close().await;
        keystore.db.close().await;
        drop(stop_on_drop);
        if let Some(e) = failure {
            return Err(std::io::Error::other(e));
        }
        tracing::info!("eventvault stopped");
        Ok(())
    }
}

/// What a start does before the service serves data: re-applies the forget
/// ledger (a restored keystore must not bring a forgotten subject back, and
/// an interrupted forget is finished), saying how it went on `ledger`; then
/// checks that the keystore holds every data key the event store refers to,
/// saying so on `data_keys`.
async fn start_up(
    events: Events,
    ledger: watch::Sender<LedgerState>,
    data_keys: watch::Sender<KeyCheck>,
    accept_missing_keys: bool,
) -> Result<(), ServiceError> {
    reapply_ledger(&events, &ledger).await?;
    check_data_keys(&events, &data_keys, accept_missing_keys).await;
    Ok(())
}

async fn reapply_ledger(
    events: &Events,
    ledger: &watch::Sender<LedgerState>,
) -> Result<(), ServiceError> {
    // A store that does not answer yet is asked again (not ready
    // meanwhile); any other failure stops the service.
    let mut wait = std::time::Duration::from_millis(500);
    let reapplied = loop {
        match events.reapply_forgets().await {
            Err(e) if e.fault().is_some() => {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot re-apply the forget ledger yet; eventvault is not ready");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            other => break other,
        }
    };
    match reapplied {
        Ok(reapplied) => {
            if reapplied.reshredded > 0 {
                tracing::warn!(
                    subjects = reapplied.reshredded,
                    "forgotten subjects had data keys again (a restored keystore?); shredded them again"
                );
            }
            if reapplied.completed > 0 {
                tracing::warn!(
                    subjects = reapplied.completed,
                    "completed forgets that had been interrupted"
                );
            }
            ledger.send_replace(LedgerState::Applied);
            tracing::info!("forget ledger re-applied");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "re-applying the forget ledger failed; eventvault stops without serving data");
            ledger.send_replace(LedgerState::Failed);
            Err(e)
        }
    }
}

/// The start-up check of the data keys. A store that does not answer is
/// asked again (the service stays not ready meanwhile). Missing keys leave
/// the service running but never ready, the log saying how many (never
/// which subjects), unless `accept` records their loss.
async fn check_data_keys(events: &Events, data_keys: &watch::Sender<KeyCheck>, accept: bool) {
    let mut wait = std::time::Duration::from_millis(500);
    let found = loop {
        match events.check_data_keys(accept).await {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot check the data keys yet; eventvault is not ready");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
        }
    };
    let missing = found.missing - found.accepted;
    if found.accepted > 0 {
        tracing::warn!(
            keys = found.accepted,
            "data keys the event store refers to are missing from the keystore; their loss is accepted (--accept-missing-keys, audited as keys.accept_missing): their events read \"lost\""
        );
    }
    if missing > 0 {
        tracing::error!(
            keys = missing,
            expected = found.expected,
            "data keys the event store refers to are missing from the keystore (restored from a backup older than the event store's, or a replica that was behind?); eventvault does not become ready: restore a keystore backup taken after the event store's, or accept the loss with --accept-missing-keys"
        );
        data_keys.send_replace(KeyCheck::Missing(missing));
        return;
    }
    data_keys.send_replace(KeyCheck::Complete);
    tracing::info!(
        keys = found.expected,
        "every data key is in the keystore; eventvault is ready"
    );
}

/// A future that completes on SIGINT or SIGTERM. The handlers are installed
/// now, when this is called, not when the future is first polled: a signal
/// that arrives as soon as the service says it listens is not lost (nor does
/// it kill the process with the default action).
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutdown requested; finishing in-flight requests");
    })
}
