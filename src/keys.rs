//! The key manager: owns every data-encryption key. It finds or creates a
//! subject's key, unwraps stored keys with the master key, and keeps the
//! unwrapped ones in bounded caches (which a forget will evict).
//!
//! It also owns the master key's life on disk: loading it from
//! `EVENTVAULT_MASTER_KEY` or the key file, creating that file (mode 0600) on
//! first start, and refusing to start when the master key does not open the
//! keystore.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, Dek, Kek};
use crate::metrics::{KeyCache, Metrics};
use crate::store::StoreError;
use crate::store::keystore::{Keystore, WrappedDek};

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
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::store::create_private_dir(dir)?;
            }
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
        subject: &str,
        key_ids: &[String],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The PostgreSQL channel on which a forget tells every process to evict.
const EVICT_CHANNEL: &str = "eventvault_key_evictions";

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
    kek: Kek,
    /// Subject → its active key, for appends.
    by_subject: Mutex<LruCache<String, ActiveKey>>,
    /// Key id → key, for reads.
    by_id: Mutex<LruCache<String, CachedDek>>,
    /// Encryptions after which a key is retired.
    max_encryptions: u64,
    /// Counts cache hits and misses.
    metrics: Metrics,
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
        kek: Kek,
        cache_capacity: usize,
        max_encryptions: u64,
        metrics: Metrics,
    ) -> Result<Self, KeyError> {
        let known = keystore.keks().await?;
        match known.iter().find(|(id, _)| id == kek.id()) {
            Some((_, check)) => kek
                .verify_check(check)
                .map_err(|_| KeyError::WrongMasterKey {
                    configured: kek.id().to_owned(),
                    known: kek.id().to_owned(),
                })?,
            None if known.is_empty() => keystore.insert_kek(kek.id(), &kek.seal_check()?).await?,
            None => {
                return Err(KeyError::WrongMasterKey {
                    configured: kek.id().to_owned(),
                    known: known
                        .iter()
                        .map(|(id, _)| id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        let cap = NonZeroUsize::new(cache_capacity.max(1)).expect("max(1) is non-zero");
        Ok(Self {
            keystore,
            kek,
            by_subject: Mutex::new(LruCache::new(cap)),
            by_id: Mutex::new(LruCache::new(cap)),
            max_encryptions: max_encryptions.max(1),
            metrics,
        })
    }

    pub fn keystore(&self) -> &Keystore {
        &self.keystore
    }

    /// The subject's active key, with `n` encryptions taken from its budget:
    /// created (and stored wrapped) on first use; retired, and replaced by a
    /// new one, when its count would pass the limit. Two requests racing to
    /// create a key end up with the same key: the keystore keeps one active
    /// key per subject and the loser reads it back.
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
        let stored = match self.keystore.active_dek(subject).await? {
            Some(w) => w,
            None => {
                let key_id = Uuid::new_v4().to_string();
                let fresh = self.kek.new_dek(&key_id, subject)?;
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
        let dek = self.unwrap(&stored)?;
        let key = ActiveKey {
            key_id: Arc::from(stored.key_id.as_str()),
            dek,
            budget: Arc::new(budget.into()),
        };
        self.by_id.lock().expect("cache lock").put(
            stored.key_id,
            CachedDek {
                subject: stored.subject,
                dek: key.dek.clone(),
            },
        );
        self.by_subject
            .lock()
            .expect("cache lock")
            .put(subject.to_owned(), key.clone());
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
        let Some(stored) = self.keystore.dek_by_id(key_id).await? else {
            return Ok(None);
        };
        let dek = self.unwrap(&stored)?;
        self.by_id.lock().expect("cache lock").put(
            stored.key_id,
            CachedDek {
                subject: stored.subject,
                dek: dek.clone(),
            },
        );
        Ok(Some(dek))
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
        subject: &str,
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

    /// Drops every cached key of `subject`.
    fn evict(&self, subject: &str) {
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
    /// task ends when the key manager is dropped. If the connection fails it
    /// reconnects; while it is down, the whole cache is dropped on every
    /// reconnect so that no eviction can have been missed.
    pub fn follow_evictions(self: &Arc<Self>) {
        if !self.keystore.can_announce() {
            return;
        }
        let keystore = self.keystore.clone();
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let mut listener = match keystore.listen(EVICT_CHANNEL).await {
                    Ok(Some(l)) => l,
                    Ok(None) => return,
                    Err(_) if this.strong_count() == 0 => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for key evictions; retrying in 1 s");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                // Anything cached before listening may have missed a notice.
                match this.upgrade() {
                    Some(km) => km.clear_caches(),
                    None => return,
                }
                loop {
                    // `try_recv` says `None` when the connection was lost
                    // (sqlx then reconnects by itself): notices sent
                    // meanwhile are gone, so the whole cache goes.
                    let next = listener.try_recv().await;
                    let Some(km) = this.upgrade() else { return };
                    match next {
                        Ok(Some(n)) => match serde_json::from_str::<Eviction>(n.payload()) {
                            Ok(ev) => km.evict(&ev.subject),
                            Err(_) => km.clear_caches(),
                        },
                        Ok(None) => km.clear_caches(),
                        Err(_) => {
                            km.clear_caches();
                            break;
                        }
                    }
                }
            }
        });
    }

    fn clear_caches(&self) {
        self.by_subject.lock().expect("cache lock").clear();
        self.by_id.lock().expect("cache lock").clear();
    }

    fn unwrap(&self, stored: &WrappedDek) -> Result<Arc<Dek>, KeyError> {
        if stored.kek_id != self.kek.id() {
            return Err(KeyError::UnknownKek(stored.key_id.clone()));
        }
        Ok(Arc::new(self.kek.unwrap_dek(
            &stored.wrapped,
            &stored.key_id,
            &stored.subject,
        )?))
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
    /// Where the old master key now is: to be destroyed once no backup that
    /// it could open is kept any more.
    pub retired_key_file: std::path::PathBuf,
}

/// Rotates the master key kept in `path`: a new key is written beside it
/// (`<path>.next`, mode 0600), registered in the keystore, and every data
/// key is re-wrapped under it in transactions of `batch` keys (`progress`
/// is told `(done, total)` after each). Only when none is left under the old
/// key are the files swapped: the old key is kept as `<path>.retired-<id>`.
/// Safe to interrupt and run again: the next key, and the keys already
/// re-wrapped, are picked up where they were. No event is touched.
pub async fn rotate_master_key(
    keystore: &Keystore,
    path: &Path,
    batch: u32,
    mut progress: impl FnMut(u64, u64),
) -> Result<Rotation, KeyError> {
    let next_path = next_master_key_path(path);
    if !path.exists() {
        return Err(KeyError::MasterKey(format!(
            "{} does not exist: there is no master key to rotate",
            path.display()
        )));
    }
    let (old, _) = load_master_key(None, path)?;
    let known = keystore.keks().await?;
    match known.iter().find(|(id, _)| id == old.id()) {
        Some((_, check)) => old.verify_check(check)?,
        None => {
            return Err(KeyError::WrongMasterKey {
                configured: old.id().to_owned(),
                known: known
                    .iter()
                    .map(|(id, _)| id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let (new, _) = load_master_key(None, &next_path)?;
    keystore.insert_kek(new.id(), &new.seal_check()?).await?;
    let counts = keystore.dek_counts_by_kek().await?;
    if let Some((stray, n)) = counts
        .iter()
        .find(|(id, n)| *n > 0 && id != old.id() && id != new.id())
    {
        return Err(KeyError::MasterKey(format!(
            "{n} data key(s) are wrapped by master key {stray}, which is neither the configured one nor the new one"
        )));
    }
    let total = counts
        .iter()
        .find(|(id, _)| id == old.id())
        .map_or(0, |(_, n)| *n as u64);
    let mut done = 0;
    progress(done, total);
    loop {
        let keys = keystore.deks_wrapped_by(old.id(), batch.max(1)).await?;
        if keys.is_empty() {
            break;
        }
        let rewrapped = keys
            .iter()
            .map(|k| {
                Ok((
                    k.key_id.clone(),
                    new.rewrap_from(&old, &k.wrapped, &k.key_id, &k.subject)?,
                ))
            })
            .collect::<Result<Vec<_>, CryptoError>>()?;
        keystore
            .store_rewrapped(old.id(), new.id(), &rewrapped)
            .await?;
        done += rewrapped.len() as u64;
        progress(done, total.max(done));
    }
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
    keystore.delete_kek(old.id()).await?;
    Ok(Rotation {
        old_kek_id: old.id().to_owned(),
        new_kek_id: new.id().to_owned(),
        rewrapped: done,
        retired_key_file: retired,
    })
}
