//! The key manager: owns every data-encryption key. It finds or creates a
//! subject's key, unwraps stored keys with the master key, and keeps the
//! unwrapped ones in bounded caches (which a forget will evict).
//!
//! It also owns the master key's life: loading it from
//! `EVENTVAULT_MASTER_KEY` or the key file, creating that file (mode 0600) on
//! first start, or opening it on a PKCS#11 token ([`uri`]); refusing to start
//! when the master key does not open the keystore; and rotating it.

pub mod uri;

use std::collections::{HashSet, VecDeque};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, Dek, Kek};
use crate::domain::Subject;
use crate::metrics::{KeyCache, Metrics};
use crate::shutdown::Shutdown;
use crate::store::keystore::{Keystore, WrappedDek};
use crate::store::{EventStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("key material failed its integrity check")]
    Crypto(#[from] CryptoError),
    #[error(
        "the master key (id {configured}) does not open this keystore, whose keys are wrapped by master key id(s) {known}; \
         start with the master key that created it (EVENTVAULT_MASTER_KEY or the master key file)"
    )]
    WrongMasterKey { configured: String, known: String },
    #[error("master key: {0}")]
    MasterKey(String),
    #[error("data key {0} is wrapped by a master key this process does not have")]
    UnknownKek(String),
    #[error("master key {uri}: {source}")]
    Token {
        uri: String,
        source: crate::crypto::pkcs11::TokenError,
    },
    #[error(
        "data keys are still wrapped by master key {kek_id} ({uri}) as well as by the configured one \
         ({configured}): a rotation between them is unfinished; finish it with `eventvault keys \
         rotate-kek`, the old key as --master-key-uri and the new one as --to"
    )]
    RotationUnfinished {
        kek_id: String,
        uri: String,
        configured: String,
    },
}

/// How long a call into the master key's token may take before the request
/// that needs it is answered 503 (a network HSM that stops answering must
/// not hang the service).
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(5);

/// The master key and where it lives. Operations on a key held by a token
/// run off the async threads, bounded by a timeout.
#[derive(Clone)]
pub struct MasterKey {
    kek: Arc<Kek>,
    uri: uri::MasterKeyUri,
    timeout: Duration,
}

impl MasterKey {
    pub fn new(kek: Kek, uri: uri::MasterKeyUri) -> Self {
        Self {
            kek: Arc::new(kek),
            uri,
            timeout: TOKEN_TIMEOUT,
        }
    }

    /// The same key, with calls into its token bounded by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn id(&self) -> &str {
        self.kek.id()
    }

    pub fn uri(&self) -> &uri::MasterKeyUri {
        &self.uri
    }

    /// Runs `op` with the key: here for a key in this process; for a key on
    /// a token on a blocking thread, [`CryptoError::Unavailable`] if the
    /// token takes longer than the timeout.
    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Kek) -> Result<T, CryptoError> + Send + 'static,
    ) -> Result<T, CryptoError> {
        if !self.kek.is_on_token() {
            return op(&self.kek);
        }
        let kek = self.kek.clone();
        match tokio::time::timeout(self.timeout, tokio::task::spawn_blocking(move || op(&kek)))
            .await
        {
            Ok(Ok(result)) => result,
            Ok(Err(_panicked)) => Err(CryptoError::Unavailable),
            Err(_elapsed) => {
                tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    "the master key's token did not answer in time"
                );
                Err(CryptoError::Unavailable)
            }
        }
    }
}

/// Where the master key comes from, as configured.
pub struct MasterKeySource<'a> {
    pub uri: &'a uri::MasterKeyUri,
    /// `EVENTVAULT_MASTER_KEY` (base64), which stands in for a key file.
    pub env_value: Option<&'a str>,
    /// `--pkcs11-module`.
    pub pkcs11_module: Option<&'a Path>,
    /// `EVENTVAULT_PKCS11_PIN`.
    pub pkcs11_pin: Option<&'a Zeroizing<String>>,
}

/// Opens the master key: from the file (see [`load_master_key`]) or on its
/// token; with `create`, a key that does not exist yet is created there.
/// Returns it and whether it was just created.
pub async fn open_master_key(
    source: &MasterKeySource<'_>,
    create: bool,
) -> Result<(MasterKey, bool), KeyError> {
    match source.uri {
        uri::MasterKeyUri::File(path) => {
            if !create && source.env_value.is_none() && !path.exists() {
                return Err(KeyError::MasterKey(format!(
                    "{} does not exist",
                    path.display()
                )));
            }
            let (kek, created) = load_master_key(source.env_value, path)?;
            Ok((MasterKey::new(kek, source.uri.clone()), created))
        }
        uri::MasterKeyUri::Pkcs11(name) => {
            if source.env_value.is_some() {
                return Err(KeyError::MasterKey(format!(
                    "EVENTVAULT_MASTER_KEY is set, but the master key is on a token ({}): unset one of them",
                    source.uri
                )));
            }
            let module = source.pkcs11_module.ok_or_else(|| {
                KeyError::MasterKey(format!(
                    "the master key is on a token ({}): name its PKCS#11 module with --pkcs11-module or EVENTVAULT_PKCS11_MODULE",
                    source.uri
                ))
            })?;
            let pin = source.pkcs11_pin.ok_or_else(|| {
                KeyError::MasterKey(format!(
                    "the master key is on a token ({}): set its user PIN in EVENTVAULT_PKCS11_PIN",
                    source.uri
                ))
            })?;
            let (module, name, pin) = (module.to_owned(), name.clone(), pin.clone());
            let opened = tokio::task::spawn_blocking(move || {
                crate::crypto::pkcs11::open(&module, &name, &pin, create)
            })
            .await
            .map_err(|_| KeyError::MasterKey("opening the token failed".into()))?;
            let (kek, created) = opened.map_err(|source_err| KeyError::Token {
                uri: source.uri.to_string(),
                source: source_err,
            })?;
            Ok((MasterKey::new(kek, source.uri.clone()), created))
        }
    }
}

/// Loads the master key: from `env_value` (base64) when given, else from
/// `path`, which is created with 32 fresh random bytes (base64, mode 0600) if
/// it does not exist. Returns the key and whether it was just created.
pub fn load_master_key(env_value: Option<&str>, path: &Path) -> Result<(Kek, bool), KeyError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    if let Some(text) = env_value {
        let kek = Kek::from_base64(text).map_err(|_| {
            KeyError::MasterKey("EVENTVAULT_MASTER_KEY is not 32 bytes in base64".into())
        })?;
        return Ok((kek, false));
    }
    // The key's directory (`keys/`) is owner-only, also when it exists
    // already with access for others.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::store::private_dir(dir)?;
    }
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::MasterKey(format!(
                    "{} is readable by others (mode {mode:o}); run `chmod 600 {}`",
                    path.display(),
                    path.display()
                )));
            }
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                KeyError::MasterKey(format!("cannot read {}: {e}", path.display()))
            })?);
            let kek = Kek::from_base64(&text).map_err(|_| {
                KeyError::MasterKey(format!(
                    "{} does not hold 32 bytes in base64",
                    path.display()
                ))
            })?;
            Ok((kek, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (kek, encoded) = Kek::generate()?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    KeyError::MasterKey(format!("cannot create {}: {e}", path.display()))
                })?;
            file.write_all(encoded.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
                .map_err(|e| {
                    KeyError::MasterKey(format!("cannot write {}: {e}", path.display()))
                })?;
            Ok((kek, true))
        }
        Err(e) => Err(KeyError::MasterKey(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Where a forget records the ids of the data keys it destroys, durably and
/// idempotently, before they are deleted (the event store implements it).
pub trait DestructionLedger {
    fn record_destroyed(
        &self,
        subject: &Subject,
        key_ids: &[String],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The PostgreSQL channel on which a forget tells every process to evict.
const EVICT_CHANNEL: &str = "eventvault_key_evictions";

/// While the `LISTEN` for evictions cannot be re-established, how often the
/// caches are reconciled with the forget ledger all the same.
pub const RECONCILE_WHILE_DEAF: Duration = Duration::from_secs(10);

#[derive(serde::Deserialize)]
struct Eviction {
    subject: String,
}

/// A cached data key and the subject it belongs to (a forget evicts by
/// subject).
struct CachedDek {
    subject: String,
    dek: Arc<Dek>,
}

/// A subject's current key for new encryptions, with the encryptions this
/// process has reserved for it in the keystore and not used yet.
#[derive(Clone)]
pub struct ActiveKey {
    pub key_id: Arc<str>,
    pub dek: Arc<Dek>,
    budget: Arc<std::sync::atomic::AtomicU64>,
}

impl ActiveKey {
    /// Takes `n` encryptions from the reserved budget, if there are that many.
    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(n))
            .is_ok()
    }
}

/// A data key is retired (and the subject given a new one) before it has
/// sealed this many events: half the 2^32 random-nonce limit of AES-GCM
/// (NIST SP 800-38D), a wide margin.
pub const DEFAULT_MAX_ENCRYPTIONS: u64 = 1 << 31;

/// Encryptions reserved in the keystore at a time (per process and key), so
/// that counting costs one keystore write per this many events, not one per
/// event. The stored count is thus an upper bound: never an underestimate.
const RESERVATION: u64 = 1 << 16;

/// Owns the data keys. Shared by all handlers behind an `Arc`.
pub struct KeyManager {
    /// Where wrapped keys live.
    keystore: Keystore,
    /// The master key that wraps them.
    kek: MasterKey,
    /// Subject → its active key, for appends.
    by_subject: Mutex<LruCache<String, ActiveKey>>,
    /// Key id → key, for reads.
    by_id: Mutex<LruCache<String, CachedDek>>,
    /// What the caches dropped lately: checked before a fetched key is
    /// cached, so that a fetch that began before an eviction cannot put the
    /// key back after it. Locked before either cache.
    evictions: Mutex<Evictions>,
    /// Encryptions after which a key is retired.
    max_encryptions: u64,
    /// Counts cache hits and misses.
    metrics: Metrics,
    /// What the eviction follower has done, for [`KeyCacheProbe::events`].
    follower: watch::Sender<FollowerEvents>,
    /// A hold on fetches, while a [`FetchHold`] is alive.
    hold: Mutex<Option<HoldPoint>>,
}

/// The latest evictions, by an epoch that every eviction moves on. A fetch
/// notes the epoch before it reads the keystore and may cache what it read
/// only if its subject was not evicted since, and no barrier (a cleared
/// cache, a re-established `LISTEN`, evictions too many to remember) was
/// raised since. Memory is bounded: at most [`EVICTIONS_REMEMBERED`]
/// subjects; forgetting older ones raises the barrier instead, which only
/// costs the fetches that began before it a second look-up later.
#[derive(Default)]
struct Evictions {
    epoch: u64,
    /// `(epoch, subject)`, oldest first.
    recent: VecDeque<(u64, String)>,
    /// Fetches that began before this epoch cache nothing.
    barrier: u64,
}

/// Subjects whose evictions are remembered for fetches in flight.
const EVICTIONS_REMEMBERED: usize = 1024;

impl Evictions {
    fn evict(&mut self, subject: &str) {
        self.epoch += 1;
        self.recent.push_back((self.epoch, subject.to_owned()));
        while self.recent.len() > EVICTIONS_REMEMBERED {
            if let Some((epoch, _)) = self.recent.pop_front() {
                self.barrier = self.barrier.max(epoch);
            }
        }
    }

    /// No fetch that began before now caches anything.
    fn raise_barrier(&mut self) {
        self.epoch += 1;
        self.barrier = self.epoch;
        self.recent.clear();
    }

    /// Whether a fetch of `subject` that began at epoch `since` may cache it.
    fn admits(&self, subject: &str, since: u64) -> bool {
        since >= self.barrier
            && !self
                .recent
                .iter()
                .rev()
                .take_while(|(epoch, _)| *epoch > since)
                .any(|(_, s)| s == subject)
    }
}

/// What the eviction follower (PostgreSQL keystore) has done so far; a
/// [`KeyCacheProbe`] hands out a watch on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FollowerEvents {
    /// Whether the `LISTEN` for evictions is established now.
    pub listening: bool,
    /// Eviction notices heard and applied.
    pub notices: u64,
    /// Times the caches were reconciled with the forget ledger after the
    /// `LISTEN` was (re-)established.
    pub resyncs: u64,
}

/// Where held fetches wait (see [`FetchHold`]).
#[derive(Clone)]
struct HoldPoint {
    fetched: mpsc::UnboundedSender<String>,
    go: watch::Receiver<bool>,
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys: only which master key is in use.
        f.debug_struct("KeyManager")
            .field("kek_id", &self.kek.id())
            .finish_non_exhaustive()
    }
}

impl KeyManager {
    /// Opens the key manager after proving that `kek` is the keystore's master
    /// key (a brand-new keystore adopts it).
    pub async fn open(
        keystore: Keystore,
        kek: MasterKey,
        cache_capacity: usize,
        max_encryptions: u64,
        metrics: Metrics,
    ) -> Result<Self, KeyError> {
        prove_master_key(&keystore, &kek, false).await?;
        refuse_unfinished_rotation(&keystore, &kek).await?;
        let cap = NonZeroUsize::new(cache_capacity.max(1)).expect("max(1) is non-zero");
        Ok(Self {
            keystore,
            kek,
            by_subject: Mutex::new(LruCache::new(cap)),
            by_id: Mutex::new(LruCache::new(cap)),
            evictions: Mutex::new(Evictions::default()),
            max_encryptions: max_encryptions.max(1),
            metrics,
            follower: watch::Sender::new(FollowerEvents::default()),
            hold: Mutex::new(None),
        })
    }

    /// A read-only view of the caches (which subjects they hold, what the
    /// eviction follower did) that holds no key and keeps nothing alive.
    pub fn probe(self: &Arc<Self>) -> KeyCacheProbe {
        KeyCacheProbe(Arc::downgrade(self))
    }

    pub fn keystore(&self) -> &Keystore {
        &self.keystore
    }

    /// Where the master key in use lives (never a secret).
    pub fn master_key_uri(&self) -> &uri::MasterKeyUri {
        self.kek.uri()
    }

    /// The subject's active key, with `n` encryptions taken from its budget:
    /// created (and stored wrapped) on first use; retired, and replaced by a
    /// new one, when its count would pass the limit. Two requests racing to
    /// create a key end up with the same key: the keystore keeps one active
    /// key per subject and the loser reads it back.
    /// Whether the subject's active key is cached here (an append about
    /// it then needs no keystore, and creates no key).
    pub fn has_active_key_cached(&self, subject: &Subject) -> bool {
        self.by_subject
            .lock()
            .expect("cache lock")
            .contains(subject.as_str())
    }

    pub async fn key_for_subject(&self, subject: &str, n: u64) -> Result<ActiveKey, KeyError> {
        if n > self.max_encryptions {
            return Err(KeyError::MasterKey(format!(
                "{n} events about one subject exceed a data key's limit of {} encryptions",
                self.max_encryptions
            )));
        }
        loop {
            let cached = self
                .by_subject
                .lock()
                .expect("cache lock")
                .get(subject)
                .cloned();
            self.metrics
                .key_cache(KeyCache::BySubject, cached.is_some());
            let key = match cached {
                Some(k) => k,
                None => self.load_active(subject).await?,
            };
            if key.take(n) {
                return Ok(key);
            }
            let want = RESERVATION.min(self.max_encryptions).max(n);
            let reserved = self
                .keystore
                .reserve_encryptions(&key.key_id, want, self.max_encryptions)
                .await?;
            if reserved {
                key.budget
                    .fetch_add(want, std::sync::atomic::Ordering::AcqRel);
            } else {
                // The key has sealed (or reserved) all it may: retire it; the
                // next round creates the subject's new key.
                self.keystore.retire_dek(&key.key_id).await?;
                self.by_subject.lock().expect("cache lock").pop(subject);
            }
        }
    }

    /// Reads or creates the subject's active key and caches it. A key it
    /// creates comes with a first reservation of encryptions; a key it reads
    /// comes with none (reserved as they are needed).
    async fn load_active(&self, subject: &str) -> Result<ActiveKey, KeyError> {
        let reservation = RESERVATION.min(self.max_encryptions);
        let mut budget = 0;
        let since = self.fetch_begins();
        let stored = match self.keystore.active_dek(subject).await? {
            Some(w) => w,
            None => {
                let key_id = Uuid::new_v4().to_string();
                let fresh = {
                    let (key_id, subject) = (key_id.clone(), subject.to_owned());
                    self.kek
                        .run(move |kek| kek.new_dek(&key_id, &subject))
                        .await?
                };
                let row = WrappedDek {
                    key_id,
                    subject: subject.to_owned(),
                    kek_id: self.kek.id().to_owned(),
                    wrapped: fresh.wrapped,
                };
                if self.keystore.insert_dek_if_none(&row, reservation).await? {
                    budget = reservation;
                    row
                } else {
                    self.keystore.active_dek(subject).await?.ok_or_else(|| {
                        StoreError::Corrupt("a subject's key vanished while being created".into())
                    })?
                }
            }
        };
        let (stored, dek) = self.unwrap(stored).await?;
        let key = ActiveKey {
            key_id: Arc::from(stored.key_id.as_str()),
            dek,
            budget: Arc::new(budget.into()),
        };
        self.held(&stored.subject).await;
        self.cache_fetched(since, &stored, &key.dek, Some(&key));
        Ok(key)
    }

    /// The key with this id, or `None` when the keystore does not have it.
    /// `None` is not the answer to a reader by itself: the key of a
    /// forgotten subject is gone on purpose (`erased`), any other missing
    /// key is an integrity failure of the stores (see
    /// `service::Events::open_all`).
    pub async fn key_by_id(&self, key_id: &str) -> Result<Option<Arc<Dek>>, KeyError> {
        let cached = self
            .by_id
            .lock()
            .expect("cache lock")
            .get(key_id)
            .map(|k| k.dek.clone());
        self.metrics.key_cache(KeyCache::ById, cached.is_some());
        if cached.is_some() {
            return Ok(cached);
        }
        let since = self.fetch_begins();
        let Some(stored) = self.keystore.dek_by_id(key_id).await? else {
            return Ok(None);
        };
        let (stored, dek) = self.unwrap(stored).await?;
        self.held(&stored.subject).await;
        self.cache_fetched(since, &stored, &dek, None);
        Ok(Some(dek))
    }

    /// Notes when a keystore fetch begins (before it reads anything), for
    /// [`KeyManager::cache_fetched`].
    fn fetch_begins(&self) -> u64 {
        self.evictions.lock().expect("evictions lock").epoch
    }

    /// Caches a key that a fetch begun at `since` read from the keystore
    /// (and, with `active`, as its subject's active key), unless its subject
    /// was evicted meanwhile: a forget may have deleted the key after the
    /// fetch read it, and its eviction must not be undone. The key still
    /// serves the request that fetched it (which began before the forget:
    /// appends are refused by the writer's ledger check, reads read the
    /// ledger with their rows), but no later one. Checked and cached under
    /// the evictions lock, so that no eviction falls between the two.
    fn cache_fetched(
        &self,
        since: u64,
        stored: &WrappedDek,
        dek: &Arc<Dek>,
        active: Option<&ActiveKey>,
    ) {
        let evictions = self.evictions.lock().expect("evictions lock");
        if !evictions.admits(&stored.subject, since) {
            tracing::debug!("a data key fetched before an eviction is not cached");
            return;
        }
        self.by_id.lock().expect("cache lock").put(
            stored.key_id.clone(),
            CachedDek {
                subject: stored.subject.clone(),
                dek: dek.clone(),
            },
        );
        if let Some(key) = active {
            self.by_subject
                .lock()
                .expect("cache lock")
                .put(stored.subject.clone(), key.clone());
        }
    }

    /// Waits while a [`FetchHold`] is held (after a fetch read the keystore,
    /// before it caches what it read); returns at once otherwise.
    async fn held(&self, subject: &str) {
        let point = self.hold.lock().expect("hold lock").clone();
        if let Some(mut point) = point {
            let _ = point.fetched.send(subject.to_owned());
            // Released, or the hold dropped: either way, go on.
            let _ = point.go.wait_for(|go| *go).await;
        }
    }

    /// Destroys every key of `subject`: each one is first recorded in
    /// `ledger` (the event store, so that the count of a forget survives a
    /// failure of any later step and its retry), then deleted from the
    /// keystore, until none is left; then evicted from this process's
    /// caches. With `scrub` (a forget) the eviction is also announced to
    /// every other process (PostgreSQL keystore), and only then are the
    /// deleted bytes scrubbed from the keystore's files (which may wait for
    /// readers). The scrub runs even when there was nothing left to delete,
    /// so a retry after a failed scrub completes it. Returns how many keys
    /// this call deleted.
    pub async fn destroy_subject(
        &self,
        subject: &Subject,
        ledger: &impl DestructionLedger,
        scrub: bool,
    ) -> Result<u64, KeyError> {
        /// Rounds of list, record, delete: a key made meanwhile (a racing
        /// append, refused since the subject is in the forget ledger) is
        /// taken by the next round; more rounds than this mean keys keep
        /// coming, and the forget is retried later.
        const ROUNDS: usize = 8;
        let mut deleted = 0;
        let mut left = true;
        for _ in 0..ROUNDS {
            let ids = self.keystore.subject_key_ids(subject).await?;
            if ids.is_empty() {
                left = false;
                break;
            }
            ledger.record_destroyed(subject, &ids).await?;
            deleted += self.keystore.delete_keys(subject, &ids).await?;
        }
        self.evict(subject);
        if left {
            return Err(KeyError::Store(StoreError::Busy(
                "new data keys of a forgotten subject kept appearing while its keys were deleted; the forget is retried",
            )));
        }
        if scrub {
            let payload = serde_json::json!({ "subject": subject }).to_string();
            self.keystore.announce(EVICT_CHANNEL, &payload).await?;
            self.keystore.scrub_deleted_keys().await?;
        }
        Ok(deleted)
    }

    /// Drops every cached key of `subject`, and keeps a fetch in flight
    /// from caching one again.
    fn evict(&self, subject: &Subject) {
        let subject = subject.as_str();
        let mut evictions = self.evictions.lock().expect("evictions lock");
        evictions.evict(subject);
        self.by_subject.lock().expect("cache lock").pop(subject);
        let mut by_id = self.by_id.lock().expect("cache lock");
        let ids: Vec<String> = by_id
            .iter()
            .filter(|(_, k)| k.subject == subject)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            by_id.pop(&id);
        }
    }

    /// On a PostgreSQL keystore, follows the evictions of other processes
    /// (`LISTEN`), so that a forget anywhere takes effect here at once. The
    /// task ends with the last connection (`shutdown`).
    ///
    /// Notices sent while the `LISTEN` is down are lost. The caches are not
    /// dropped meanwhile: every use of a cached key is checked against the
    /// forget ledger anyway (appends by the writer in its transaction, reads
    /// and snapshots with their rows), and the subjects whose keys are
    /// cached go on being served through a keystore outage. What a missed
    /// notice would leave is a forgotten subject's key in this process's
    /// memory. So once the `LISTEN` is back (and every
    /// [`RECONCILE_WHILE_DEAF`] while it is not), the caches are reconciled
    /// with the forget ledger in `ledger` (the event store): every cached
    /// subject it lists is evicted. Fetches that began before the `LISTEN`
    /// was back cache nothing (they may have read a key that a missed
    /// forget then deleted). If the ledger cannot be read, the caches are
    /// dropped instead.
    pub fn follow_evictions(self: &Arc<Self>, ledger: EventStore, shutdown: &Shutdown) {
        if !self.keystore.can_announce() {
            return;
        }
        let keystore = self.keystore.clone();
        let km = self.clone();
        shutdown.spawn_follower(async move {
            let mut deaf_since = Instant::now();
            loop {
                let mut listener = match keystore.listen(EVICT_CHANNEL).await {
                    Ok(Some(l)) => l,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for key evictions; retrying in 1 s");
                        if deaf_since.elapsed() >= RECONCILE_WHILE_DEAF {
                            km.reconcile(&ledger).await;
                            deaf_since = Instant::now();
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                km.resync(&ledger).await;
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => match serde_json::from_str::<Eviction>(n.payload()) {
                            Ok(ev) => {
                                km.evict(&Subject::from_store(ev.subject));
                                km.follower.send_modify(|f| f.notices += 1);
                            }
                            Err(_) => km.clear_caches(),
                        },
                        // The connection was lost and is made again, with
                        // its `LISTEN` (sqlx reconnects before it says so):
                        // what was sent meanwhile is gone.
                        Ok(None) => km.resync(&ledger).await,
                        Err(_) => {
                            km.follower.send_modify(|f| f.listening = false);
                            deaf_since = Instant::now();
                            break;
                        }
                    }
                }
            }
        });
    }

    /// After the `LISTEN` was (re-)established: no fetch begun before caches
    /// anything, and the caches are reconciled with the forget ledger.
    async fn resync(&self, ledger: &EventStore) {
        self.evictions
            .lock()
            .expect("evictions lock")
            .raise_barrier();
        self.follower.send_modify(|f| f.listening = true);
        self.reconcile(ledger).await;
        self.follower.send_modify(|f| f.resyncs += 1);
    }

    /// Evicts every cached subject that the forget ledger lists; drops the
    /// whole cache if the ledger cannot be read.
    async fn reconcile(&self, ledger: &EventStore) {
        /// Subjects asked about in one statement.
        const PAGE: usize = 1000;
        let cached: Vec<Subject> = {
            let mut subjects: HashSet<String> = self
                .by_subject
                .lock()
                .expect("cache lock")
                .iter()
                .map(|(s, _)| s.clone())
                .collect();
            subjects.extend(
                self.by_id
                    .lock()
                    .expect("cache lock")
                    .iter()
                    .map(|(_, k)| k.subject.clone()),
            );
            subjects.into_iter().map(Subject::from_store).collect()
        };
        let mut evicted = 0;
        for page in cached.chunks(PAGE) {
            match ledger.forgotten_among(page).await {
                Ok(forgotten) => {
                    for s in &forgotten {
                        self.evict(s);
                    }
                    evicted += forgotten.len();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the forget ledger to reconcile the key caches; dropping them");
                    self.clear_caches();
                    return;
                }
            }
        }
        if evicted > 0 {
            tracing::warn!(
                subjects = evicted,
                "evicted the keys of subjects forgotten while key evictions were not heard"
            );
        }
    }

    fn clear_caches(&self) {
        let mut evictions = self.evictions.lock().expect("evictions lock");
        evictions.raise_barrier();
        self.by_subject.lock().expect("cache lock").clear();
        self.by_id.lock().expect("cache lock").clear();
    }

    /// Unwraps a stored key (and gives the row back, for the caller's
    /// bookkeeping).
    async fn unwrap(&self, stored: WrappedDek) -> Result<(WrappedDek, Arc<Dek>), KeyError> {
        if stored.kek_id != self.kek.id() {
            return Err(KeyError::UnknownKek(stored.key_id.clone()));
        }
        Ok(self
            .kek
            .run(move |kek| {
                let dek = kek.unwrap_dek(&stored.wrapped, &stored.key_id, &stored.subject)?;
                Ok((stored, Arc::new(dek)))
            })
            .await?)
    }
}

/// A read-only view of a key manager's caches, for whoever embeds the
/// service (the tests above all): which subjects have a key in memory, and
/// what the eviction follower did. It holds no key, and does not keep the
/// key manager alive.
#[derive(Clone)]
pub struct KeyCacheProbe(Weak<KeyManager>);

impl std::fmt::Debug for KeyCacheProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCacheProbe").finish_non_exhaustive()
    }
}

impl KeyCacheProbe {
    /// Whether a key of `subject` is in either cache.
    pub fn holds_key_of(&self, subject: &str) -> bool {
        let Some(km) = self.0.upgrade() else {
            return false;
        };
        // One cache lock at a time.
        let active = km.by_subject.lock().expect("cache lock").contains(subject);
        active
            || km
                .by_id
                .lock()
                .expect("cache lock")
                .iter()
                .any(|(_, k)| k.subject == subject)
    }

    /// What the eviction follower has done; `changed()` completes when it
    /// does more. Stays at its default on a SQLite keystore (no follower).
    pub fn events(&self) -> watch::Receiver<FollowerEvents> {
        match self.0.upgrade() {
            Some(km) => km.follower.subscribe(),
            None => watch::Sender::new(FollowerEvents::default()).subscribe(),
        }
    }

    /// Holds every keystore fetch of the key manager after it has read its
    /// row and before it caches the key, until the hold is released or
    /// dropped: a test orders a fetch against a forget with it. Unheld,
    /// a fetch only looks at an empty slot.
    pub fn hold_fetches(&self) -> FetchHold {
        let (fetched_tx, fetched) = mpsc::unbounded_channel();
        let (go, go_rx) = watch::channel(false);
        if let Some(km) = self.0.upgrade() {
            *km.hold.lock().expect("hold lock") = Some(HoldPoint {
                fetched: fetched_tx,
                go: go_rx,
            });
        }
        FetchHold {
            km: self.0.clone(),
            fetched,
            go,
        }
    }
}

/// Fetches held by [`KeyCacheProbe::hold_fetches`].
pub struct FetchHold {
    km: Weak<KeyManager>,
    fetched: mpsc::UnboundedReceiver<String>,
    go: watch::Sender<bool>,
}

impl FetchHold {
    /// Waits until a fetch has read a key from the keystore and is held;
    /// returns the key's subject (`None` if the key manager is gone).
    pub async fn fetched(&mut self) -> Option<String> {
        self.fetched.recv().await
    }

    /// Lets every held fetch go on; later fetches are not held.
    pub fn release(self) {}
}

impl Drop for FetchHold {
    fn drop(&mut self) {
        if let Some(km) = self.km.upgrade() {
            km.hold.lock().expect("hold lock").take();
        }
        self.go.send_replace(true);
    }
}

/// Where the next master key waits while a rotation runs.
pub fn next_master_key_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".next");
    p.into()
}

/// What a finished master-key rotation did.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub old_kek_id: String,
    pub new_kek_id: String,
    pub rewrapped: u64,
    /// Where the old master key now is, when it was a file of the rotation
    /// (`<path>.retired-<id>`): to be destroyed once no backup that it
    /// could open is kept any more.
    pub retired_key_file: Option<std::path::PathBuf>,
}

/// Proves that `kek` is a master key of this keystore (its check opens) and
/// records where it lives. A keystore that knows no master key adopts it;
/// with `adopt`, any keystore does (the target of a rotation).
async fn prove_master_key(
    keystore: &Keystore,
    kek: &MasterKey,
    adopt: bool,
) -> Result<(), KeyError> {
    let known = keystore.keks().await?;
    let uri = kek.uri().to_string();
    match known.iter().find(|(id, _, _)| id == kek.id()) {
        Some((_, check, recorded)) => {
            let check = check.clone();
            kek.run(move |k| k.verify_check(&check))
                .await
                .map_err(|e| match e {
                    CryptoError::Unavailable => KeyError::Crypto(e),
                    _ => KeyError::WrongMasterKey {
                        configured: kek.id().to_owned(),
                        known: kek.id().to_owned(),
                    },
                })?;
            if recorded.as_deref() == Some(uri.as_str()) {
                // Nothing to write: a start writes to the keystore only
                // when there is something new to record.
                return Ok(());
            }
        }
        None if adopt || known.is_empty() => {}
        None => {
            return Err(KeyError::WrongMasterKey {
                configured: kek.id().to_owned(),
                known: known
                    .iter()
                    .map(|(id, _, _)| id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let check = kek.run(|k| k.seal_check()).await?;
    keystore.insert_kek(kek.id(), &check, &uri).await?;
    Ok(())
}

/// Refuses a keystore whose data keys are not all wrapped by `kek`: a
/// rotation between master keys that has not finished. The data keys are
/// read only if the keystore knows another master key at all.
async fn refuse_unfinished_rotation(keystore: &Keystore, kek: &MasterKey) -> Result<(), KeyError> {
    let others = keystore.keks().await?;
    if others.iter().all(|(id, _, _)| id == kek.id()) {
        return Ok(());
    }
    match keystore.other_kek_in_use(kek.id()).await? {
        Some((kek_id, uri)) => Err(KeyError::RotationUnfinished {
            kek_id,
            uri: uri.unwrap_or_else(|| "where it was".into()),
            configured: kek.uri().to_string(),
        }),
        None => Ok(()),
    }
}

/// Re-wraps every data key under `old` so that `new` opens it, in
/// transactions of `batch` keys (`progress` is told `(done, total)` after
/// each). Keys re-wrapped by an earlier, interrupted run are under `new`
/// already and are not touched again. Returns how many this run re-wrapped.
async fn rewrap_all(
    keystore: &Keystore,
    old: &MasterKey,
    new: &MasterKey,
    batch: u32,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, KeyError> {
    prove_master_key(keystore, old, false).await?;
    prove_master_key(keystore, new, true).await?;
    let counts = keystore.dek_counts_by_kek().await?;
    if let Some(stray) = counts
        .iter()
        .find(|k| k.data_keys > 0 && k.kek_id != old.id() && k.kek_id != new.id())
    {
        return Err(KeyError::MasterKey(format!(
            "{} data key(s) are wrapped by master key {} ({}), which is neither the configured one nor the new one",
            stray.data_keys,
            stray.kek_id,
            stray.uri.as_deref().unwrap_or("where it was")
        )));
    }
    let total = counts
        .iter()
        .find(|k| k.kek_id == old.id())
        .map_or(0, |k| k.data_keys);
    let mut done = 0;
    progress(done, total);
    loop {
        let keys = keystore.deks_wrapped_by(old.id(), batch.max(1)).await?;
        if keys.is_empty() {
            break;
        }
        let (from, to) = (old.kek.clone(), new.kek.clone());
        // A token's calls block: the batch runs on a blocking thread.
        let rewrapped = tokio::task::spawn_blocking(move || {
            keys.iter()
                .map(|k| {
                    Ok((
                        k.key_id.clone(),
                        to.rewrap_from(&from, &k.wrapped, &k.key_id, &k.subject)?,
                    ))
                })
                .collect::<Result<Vec<_>, CryptoError>>()
        })
        .await
        .map_err(|_| KeyError::MasterKey("re-wrapping a batch of data keys failed".into()))??;
        keystore
            .store_rewrapped(old.id(), new.id(), &rewrapped)
            .await?;
        done += rewrapped.len() as u64;
        progress(done, total.max(done));
    }
    Ok(done)
}

/// Rotates the master key kept in `path`: a new key is written beside it
/// (`<path>.next`, mode 0600), registered in the keystore, and every data
/// key is re-wrapped under it ([`rewrap_all`]). Only when none is left under
/// the old key are the files swapped: the old key is kept as
/// `<path>.retired-<id>`. Safe to interrupt and run again: the next key,
/// and the keys already re-wrapped, are picked up where they were. No event
/// is touched.
pub async fn rotate_master_key(
    keystore: &Keystore,
    path: &Path,
    batch: u32,
    progress: impl FnMut(u64, u64),
) -> Result<Rotation, KeyError> {
    let next_path = next_master_key_path(path);
    if !path.exists() {
        return Err(KeyError::MasterKey(format!(
            "{} does not exist: there is no master key to rotate",
            path.display()
        )));
    }
    let (old, _) = load_master_key(None, path)?;
    let old = MasterKey::new(old, uri::MasterKeyUri::File(path.to_owned()));
    let (new, _) = load_master_key(None, &next_path)?;
    // Recorded under the name it will have once the files are swapped.
    let new = MasterKey::new(new, uri::MasterKeyUri::File(path.to_owned()));
    let done = rewrap_all(keystore, &old, &new, batch, progress).await?;
    let mut retired = path.as_os_str().to_owned();
    retired.push(format!(".retired-{}", old.id()));
    let retired: std::path::PathBuf = retired.into();
    let swap = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|e| {
            KeyError::MasterKey(format!(
                "cannot rename {} to {}: {e}",
                from.display(),
                to.display()
            ))
        })
    };
    swap(path, &retired)?;
    swap(&next_path, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| KeyError::MasterKey(format!("cannot sync {}: {e}", dir.display())))?;
    }
    keystore.delete_unused_keks(new.id()).await?;
    Ok(Rotation {
        old_kek_id: old.id().to_owned(),
        new_kek_id: new.id().to_owned(),
        rewrapped: done,
        retired_key_file: Some(retired),
    })
}

/// Moves every data key from the configured master key `old` to `new`,
/// which lives elsewhere (another file, a key on a token, another token's
/// key): `new` is registered in the keystore, every data key re-wrapped
/// ([`rewrap_all`]), and `old` forgotten by the keystore once it wraps
/// nothing. Neither key is deleted. Until it has finished, the service
/// refuses to start with either key; run again, it goes on where it
/// stopped.
pub async fn rotate_master_key_to(
    keystore: &Keystore,
    old: &MasterKey,
    new: &MasterKey,
    batch: u32,
    progress: impl FnMut(u64, u64),
) -> Result<Rotation, KeyError> {
    if old.id() == new.id() {
        refuse_unfinished_rotation(keystore, new).await?;
        return Err(KeyError::MasterKey(format!(
            "{} is the configured master key already: every data key is wrapped by it",
            new.uri()
        )));
    }
    let done = rewrap_all(keystore, old, new, batch, progress).await?;
    keystore.delete_unused_keks(new.id()).await?;
    Ok(Rotation {
        old_kek_id: old.id().to_owned(),
        new_kek_id: new.id().to_owned(),
        rewrapped: done,
        retired_key_file: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_caches_nothing_of_a_subject_evicted_since_it_began() {
        let mut ev = Evictions::default();
        let before = ev.epoch;
        ev.evict("cust-1");
        assert!(
            !ev.admits("cust-1", before),
            "evicted after the fetch began"
        );
        assert!(ev.admits("cust-2", before), "others are not concerned");
        assert!(ev.admits("cust-1", ev.epoch), "a fetch begun after it");
        ev.raise_barrier();
        assert!(!ev.admits("cust-2", before), "a barrier stops every fetch");
        assert!(ev.admits("cust-1", ev.epoch));
    }

    #[test]
    fn evictions_too_many_to_remember_raise_the_barrier() {
        let mut ev = Evictions::default();
        let before = ev.epoch;
        ev.evict("cust-old");
        let after_first = ev.epoch;
        for i in 0..EVICTIONS_REMEMBERED {
            ev.evict(&format!("cust-{i}"));
        }
        assert_eq!(ev.recent.len(), EVICTIONS_REMEMBERED, "bounded");
        // The first eviction is no longer remembered: a fetch that began
        // before it may not cache, whatever its subject.
        assert!(!ev.admits("cust-old", before));
        assert!(!ev.admits("cust-unrelated", before));
        // One that began after it is still told apart precisely.
        assert!(ev.admits("cust-unrelated", after_first));
        assert!(!ev.admits("cust-5", after_first));
    }
}
