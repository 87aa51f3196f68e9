//! The service's configuration: [`Config`], what `Application::build`
//! takes, with [`Config::default`] for whoever embeds the service, and the
//! command line's flags ([`StoreArgs`], shared by every command, and
//! [`ServeArgs`], those of `serve`), which convert into it. The flags'
//! defaults are the constants of [`defaults`], which `Config::default` uses
//! too: one source for both.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::store::redact_url;

/// The defaults of the flags and of [`Config::default`].
pub mod defaults {
    use std::time::Duration;

    pub const DATABASE_URL: &str = "sqlite://data/eventvault.db";
    pub const KEYSTORE_URL: &str = "sqlite://keys/keystore.db";
    pub const MASTER_KEY_FILE: &str = "keys/master.key";
    pub const POLICIES_DIR: &str = "policies";
    pub const DB_CONNECTIONS: u32 = 16;
    pub const STORE_TIMEOUT_SECS: u64 = crate::store::DEFAULT_STORE_TIMEOUT.as_secs();
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
    pub const KEY_CACHE: usize = 100_000;
    pub const WRITE_TIMEOUT_SECS: u64 = 30;
    pub const MAX_CONNECTIONS: usize = 10_000;
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
    pub const HEADER_READ_TIMEOUT_SECS: u64 = 10;
    pub const BODY_READ_TIMEOUT_SECS: u64 = 30;
    pub const IDLE_TIMEOUT_SECS: u64 = 60;
    pub const MAX_SUBSCRIPTIONS: usize = 1000;
    pub const RATE_LIMIT: u32 = 5000;
    pub const RATE_LIMIT_BURST: u32 = 10_000;
    pub const MAX_IN_FLIGHT: usize = 4;
    pub const MAX_IN_FLIGHT_ALONE: usize = 64;
    pub const UNAUTHENTICATED_RATE_LIMIT: u32 = 10;
    pub const UNAUTHENTICATED_RATE_LIMIT_BURST: u32 = 20;
    pub const UNAUTHENTICATED_AUDIT_INTERVAL_SECS: u64 = 60;
    pub const MAX_UNAUTHENTICATED_ADDRESSES: usize = 4096;
    pub const NATS_STREAM: &str = crate::relay::DEFAULT_STREAM;
    pub const NATS_SUBJECT_PREFIX: &str = crate::relay::DEFAULT_SUBJECT_PREFIX;
    /// How often a subscription authenticates its caller again.
    pub const SUBSCRIPTION_RECHECK: Duration = Duration::from_secs(15);
}

/// Everything the service needs to start.
#[derive(Clone)]
pub struct Config {
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// Event store: `sqlite:…` or `postgres://…`.
    pub database_url: String,
    /// Keystore, a separate database: `sqlite:…` or `postgres://…`.
    pub keystore_url: String,
    /// Master key file, used (and created 0600) when `master_key` is `None`.
    pub master_key_file: PathBuf,
    /// Master key in base64, from `EVENTVAULT_MASTER_KEY`.
    pub master_key: Option<Zeroizing<String>>,
    /// Where the master key lives (`file:PATH` or `pkcs11:token=…;object=…`);
    /// `None`: the file `master_key_file`.
    pub master_key_uri: Option<String>,
    /// The PKCS#11 module (a shared library) of the token a `pkcs11:`
    /// master key is on.
    pub pkcs11_module: Option<PathBuf>,
    /// The token's user PIN, from `EVENTVAULT_PKCS11_PIN` only.
    pub pkcs11_pin: Option<Zeroizing<String>>,
    /// Directory holding `classification.toml` and `roles.toml`.
    pub policies_dir: PathBuf,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Unwrapped data keys kept in memory (per cache).
    pub key_cache_capacity: usize,
    /// Events a data key seals before it is retired.
    pub dek_max_encryptions: u64,
    /// Connections per database pool.
    pub max_db_connections: u32,
    /// The longest a request waits for a store that does not answer (a
    /// connection from the pool, the writer's commit): then it is answered
    /// 503 with `Retry-After`.
    pub store_timeout: std::time::Duration,
    /// How long a write to a client may wait for it to read before the
    /// connection is closed (stalled subscribers, slow readers).
    pub write_timeout: std::time::Duration,
    /// Client connections open at once (503 beyond).
    pub max_connections: usize,
    /// Largest request line and headers in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Time a client has to send a request's line and headers, from the
    /// connection's start or the request's first byte (closed beyond).
    pub header_read_timeout: std::time::Duration,
    /// Time a whole request body may take to arrive (408 beyond).
    pub body_read_timeout: std::time::Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: std::time::Duration,
    /// Subscriptions open at once (503 beyond).
    pub max_subscriptions: usize,
    /// Requests per principal: one per `period`, with bursts of `burst`
    /// (429 beyond); `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Requests of one principal served at once while others are active
    /// (the rest wait their turn); 0: unlimited.
    pub max_in_flight: usize,
    /// The same for a principal alone.
    pub max_in_flight_alone: usize,
    /// Requests refused for want of a valid token, per client address: one
    /// per `period`, with bursts of `burst` (429 beyond); `None`: unlimited.
    pub unauthenticated_rate_limit: Option<RateLimit>,
    /// The window over which the audit records of requests without a
    /// valid token are aggregated per client address (the first of an
    /// address has a record of its own, the others are counted into one
    /// record at the window's end); zero: every one has its own record.
    pub unauthenticated_audit_interval: std::time::Duration,
    /// Client addresses tracked at once for the two above; further ones
    /// share one entry.
    pub max_unauthenticated_addresses: usize,
    /// How often a subscription authenticates its caller again (a removed
    /// principal's subscriptions end within this).
    pub subscription_recheck: std::time::Duration,
    /// NATS server URL(s): when set, every committed event is published to
    /// JetStream by the outbox relay.
    pub nats_url: Option<String>,
    /// The JetStream stream the relay publishes to (created if missing).
    pub nats_stream: String,
    /// First token(s) of the relay's subjects: `<prefix>.<category>.<type>`.
    pub nats_subject_prefix: String,
    /// Accept the loss of data keys the start-up check finds missing from
    /// the keystore (their events then read `lost`; recorded and audited)
    /// instead of refusing to become ready.
    pub accept_missing_keys: bool,
    /// The server's certificate chain (PEM): with `tls_key`, the service
    /// speaks HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) client certificates are verified against; a verified
    /// certificate bound to a principal authenticates as it.
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse a TLS handshake without a client certificate.
    pub require_client_cert: bool,
    /// Browser origins (`scheme://host[:port]`) allowed to call the API
    /// (CORS); none: no CORS header is ever sent.
    pub cors_origins: Vec<String>,
    /// Callers from the identity provider (bearer JWTs); `None`: only
    /// eventvault's own tokens.
    pub jwt: Option<crate::jwt::JwtConfig>,
}

impl Config {
    /// Where the master key lives: `--master-key-uri`, else the file of
    /// `--master-key-file`.
    pub fn master_key_uri(&self) -> Result<crate::keys::uri::MasterKeyUri, crate::keys::KeyError> {
        match &self.master_key_uri {
            Some(text) => crate::keys::uri::MasterKeyUri::parse(text)
                .map_err(|e| crate::keys::KeyError::MasterKey(format!("--master-key-uri: {e}"))),
            None => Ok(crate::keys::uri::MasterKeyUri::File(
                self.master_key_file.clone(),
            )),
        }
    }

    /// Where the master key at `uri` comes from, with this configuration's
    /// secrets and module.
    pub fn master_key_source<'a>(
        &'a self,
        uri: &'a crate::keys::uri::MasterKeyUri,
    ) -> crate::keys::MasterKeySource<'a> {
        crate::keys::MasterKeySource {
            uri,
            env_value: self.master_key.as_deref().map(String::as_str),
            pkcs11_module: self.pkcs11_module.as_deref(),
            pkcs11_pin: self.pkcs11_pin.as_ref(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("database_url", &redact_url(&self.database_url))
            .field("keystore_url", &redact_url(&self.keystore_url))
            .field("master_key_file", &self.master_key_file)
            .field(
                "master_key",
                &self.master_key.as_ref().map(|_| "<from environment>"),
            )
            .field("master_key_uri", &self.master_key_uri)
            .field("pkcs11_module", &self.pkcs11_module)
            .field(
                "pkcs11_pin",
                &self.pkcs11_pin.as_ref().map(|_| "<from environment>"),
            )
            .field("policies_dir", &self.policies_dir)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("key_cache_capacity", &self.key_cache_capacity)
            .field("dek_max_encryptions", &self.dek_max_encryptions)
            .field("max_db_connections", &self.max_db_connections)
            .field("store_timeout", &self.store_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("rate_limit", &self.rate_limit)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_in_flight_alone", &self.max_in_flight_alone)
            .field(
                "unauthenticated_rate_limit",
                &self.unauthenticated_rate_limit,
            )
            .field(
                "unauthenticated_audit_interval",
                &self.unauthenticated_audit_interval,
            )
            .field(
                "max_unauthenticated_addresses",
                &self.max_unauthenticated_addresses,
            )
            .field("subscription_recheck", &self.subscription_recheck)
            .field(
                "nats_url",
                &self
                    .nats_url
                    .as_ref()
                    .map(|_| "<set; see the relay's start line>"),
            )
            .field("nats_stream", &self.nats_stream)
            .field("nats_subject_prefix", &self.nats_subject_prefix)
            .field("accept_missing_keys", &self.accept_missing_keys)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_client_ca", &self.tls_client_ca)
            .field("require_client_cert", &self.require_client_cert)
            .field("cors_origins", &self.cors_origins)
            .field("jwt", &self.jwt)
            .finish()
    }
}

impl Config {
    /// How long one wait for a store lasts (a pool connection, a SQLite
    /// lock, the writer's answer): four fifths of the request's budget, so
    /// that a request whose store does not answer is refused by that wait,
    /// with its own answer and its audit record, and the request's deadline
    /// (`--store-timeout-secs`) is only the last resort.
    pub fn store_wait(&self) -> std::time::Duration {
        self.store_timeout.mul_f64(0.8)
    }
}

/// A per-principal request rate.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// One request per this much time, sustained.
    pub period: std::time::Duration,
    /// Requests allowed at once after a quiet spell.
    pub burst: u32,
}

impl RateLimit {
    /// `per_second` requests a second with bursts of `burst`; `None` for 0.
    pub fn per_second(per_second: u32, burst: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            period: std::time::Duration::from_secs(1) / per_second,
            burst: burst.max(1),
        })
    }

    pub(crate) fn limiter(self) -> Option<governor::DefaultKeyedRateLimiter<String>> {
        let quota = governor::Quota::with_period(self.period)?
            .allow_burst(std::num::NonZeroU32::new(self.burst)?);
        Some(governor::RateLimiter::keyed(quota))
    }
}

/// The flags every command takes: where the two databases, the master key
/// and the policies are, and how the stores are reached.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Event store database: a SQLite URL or postgres://user@host/db.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_DATABASE_URL",
        // A URL may hold a password: `--help` names the variable, never
        // its value.
        hide_env_values = true,
        default_value = defaults::DATABASE_URL
    )]
    pub database_url: String,
    /// Keystore database, separate from the event store: SQLite URL or postgres://….
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_KEYSTORE_URL",
        // A URL may hold a password: `--help` names the variable, never
        // its value.
        hide_env_values = true,
        default_value = defaults::KEYSTORE_URL
    )]
    pub keystore_url: String,
    /// File holding the master key (base64), created with mode 0600 on first
    /// start. Ignored when EVENTVAULT_MASTER_KEY (base64) is set.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_MASTER_KEY_FILE",
        default_value = defaults::MASTER_KEY_FILE
    )]
    pub master_key_file: PathBuf,
    /// Where the master key lives: `file:PATH` (the default is the file of
    /// --master-key-file) or a PKCS#11 URI, `pkcs11:token=LABEL;object=LABEL`,
    /// for a key on a hardware token (created there on first start), whose
    /// user PIN is read from EVENTVAULT_PKCS11_PIN alone.
    #[arg(long, global = true, env = "EVENTVAULT_MASTER_KEY_URI")]
    pub master_key_uri: Option<String>,
    /// The PKCS#11 module (shared library) of the token named by a
    /// `pkcs11:` --master-key-uri, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, global = true, env = "EVENTVAULT_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// Directory with classification.toml and roles.toml.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_POLICIES_DIR",
        default_value = defaults::POLICIES_DIR
    )]
    pub policies_dir: PathBuf,
    /// Connections per database pool.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_DB_CONNECTIONS",
        default_value_t = defaults::DB_CONNECTIONS
    )]
    pub db_connections: u32,
    /// Seconds a request waits for a database that does not answer (no
    /// connection, no commit) before it is answered 503 with Retry-After.
    #[arg(
        long,
        global = true,
        env = "EVENTVAULT_STORE_TIMEOUT_SECS",
        default_value_t = defaults::STORE_TIMEOUT_SECS
    )]
    pub store_timeout_secs: u64,
}

/// The flags of `eventvault serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "EVENTVAULT_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes (larger ones get 413).
    #[arg(long, env = "EVENTVAULT_MAX_BODY_BYTES", default_value_t = defaults::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Unwrapped data keys kept in memory.
    #[arg(long, env = "EVENTVAULT_KEY_CACHE", default_value_t = defaults::KEY_CACHE)]
    pub key_cache: usize,
    /// Seconds a write may wait for a client that does not read (a
    /// stalled subscriber) before its connection is closed.
    #[arg(long, env = "EVENTVAULT_WRITE_TIMEOUT_SECS", default_value_t = defaults::WRITE_TIMEOUT_SECS)]
    pub write_timeout_secs: u64,
    /// Client connections open at once; more are answered 503 (with
    /// Retry-After) and closed. Keep it below the process's open-file
    /// limit (`ulimit -n`), which also has to cover database connections.
    #[arg(long, env = "EVENTVAULT_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Largest request line and headers, in bytes; larger ones are
    /// answered 431 and the connection closed.
    #[arg(long, env = "EVENTVAULT_MAX_HEADER_BYTES", default_value_t = defaults::MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Seconds a client has to send a request's line and headers, from
    /// connecting or from the request's first byte; slower ones are
    /// disconnected.
    #[arg(
        long,
        env = "EVENTVAULT_HEADER_READ_TIMEOUT_SECS",
        default_value_t = defaults::HEADER_READ_TIMEOUT_SECS
    )]
    pub header_read_timeout_secs: u64,
    /// Seconds a request body may take to arrive in full; slower ones
    /// are answered 408 and the connection closed.
    #[arg(long, env = "EVENTVAULT_BODY_READ_TIMEOUT_SECS", default_value_t = defaults::BODY_READ_TIMEOUT_SECS)]
    pub body_read_timeout_secs: u64,
    /// Seconds a kept-alive connection may wait for its next request
    /// before it is closed (a request being answered, such as a
    /// subscription, is never cut by it).
    #[arg(long, env = "EVENTVAULT_IDLE_TIMEOUT_SECS", default_value_t = defaults::IDLE_TIMEOUT_SECS)]
    pub idle_timeout_secs: u64,
    /// Live subscriptions open at once; more are refused with 503.
    #[arg(long, env = "EVENTVAULT_MAX_SUBSCRIPTIONS", default_value_t = defaults::MAX_SUBSCRIPTIONS)]
    pub max_subscriptions: usize,
    /// Requests per second one principal may make (429 with Retry-After
    /// beyond); 0: unlimited.
    #[arg(long, env = "EVENTVAULT_RATE_LIMIT", default_value_t = defaults::RATE_LIMIT)]
    pub rate_limit: u32,
    /// Requests one principal may make at once after a quiet spell.
    #[arg(long, env = "EVENTVAULT_RATE_LIMIT_BURST", default_value_t = defaults::RATE_LIMIT_BURST)]
    pub rate_limit_burst: u32,
    /// Requests of one principal served at once while other principals
    /// are active (made a request in the last second); the others wait
    /// their turn, so that one principal's flood leaves the others
    /// their share. 0: unlimited.
    #[arg(long, env = "EVENTVAULT_MAX_IN_FLIGHT", default_value_t = defaults::MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Requests of one principal served at once while no other is
    /// active.
    #[arg(long, env = "EVENTVAULT_MAX_IN_FLIGHT_ALONE", default_value_t = defaults::MAX_IN_FLIGHT_ALONE)]
    pub max_in_flight_alone: usize,
    /// Requests per second one client address may make without a valid
    /// token (no token, a malformed or an unknown one) before they are
    /// answered 429 with Retry-After instead of 401; 0: unlimited.
    /// Requests with a valid token are never limited by it.
    #[arg(
        long,
        env = "EVENTVAULT_UNAUTHENTICATED_RATE_LIMIT",
        default_value_t = defaults::UNAUTHENTICATED_RATE_LIMIT
    )]
    pub unauthenticated_rate_limit: u32,
    /// Such requests one client address may make at once after a quiet
    /// spell.
    #[arg(
        long,
        env = "EVENTVAULT_UNAUTHENTICATED_RATE_LIMIT_BURST",
        default_value_t = defaults::UNAUTHENTICATED_RATE_LIMIT_BURST
    )]
    pub unauthenticated_rate_limit_burst: u32,
    /// Seconds over which the audit records of requests without a valid
    /// token are aggregated per client address: the first of an
    /// address has a record of its own, the others are counted into
    /// one record when the interval ends. 0: every one has a record of
    /// its own (only behind a proxy that limits them by address).
    #[arg(
        long,
        env = "EVENTVAULT_UNAUTHENTICATED_AUDIT_INTERVAL_SECS",
        default_value_t = defaults::UNAUTHENTICATED_AUDIT_INTERVAL_SECS
    )]
    pub unauthenticated_audit_interval_secs: u64,
    /// Client addresses (IPv4, or IPv6 /64) tracked at once for the
    /// limit and the aggregation above; further addresses share one
    /// allowance and one record.
    #[arg(
        long,
        env = "EVENTVAULT_MAX_UNAUTHENTICATED_ADDRESSES",
        default_value_t = defaults::MAX_UNAUTHENTICATED_ADDRESSES
    )]
    pub max_unauthenticated_addresses: usize,
    /// NATS server URL (several: comma-separated). When set, every
    /// committed event is published to JetStream: clear fields and the
    /// sealed personal blob, never personal data in clear.
    #[arg(long, env = "EVENTVAULT_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,
    /// JetStream stream the events are published to (created if missing).
    #[arg(long, env = "EVENTVAULT_NATS_STREAM", default_value = defaults::NATS_STREAM)]
    pub nats_stream: String,
    /// First token(s) of every subject: <prefix>.<category>.<type>.
    #[arg(
        long,
        env = "EVENTVAULT_NATS_SUBJECT_PREFIX",
        default_value = defaults::NATS_SUBJECT_PREFIX
    )]
    pub nats_subject_prefix: String,
    /// Accept the loss of the data keys the start-up check finds missing
    /// from the keystore (a keystore restored from a backup older than
    /// the event store's): their events then read "lost", the loss is
    /// recorded and audited, and the service becomes ready. Without it
    /// the service does not become ready while keys are missing. Pass it
    /// once, for a loss you have looked at, then remove it.
    #[arg(long, env = "EVENTVAULT_ACCEPT_MISSING_KEYS")]
    pub accept_missing_keys: bool,
    /// Server certificate chain (PEM, leaf first). With --tls-key the
    /// service speaks HTTPS only (TLS 1.2 and 1.3); SIGHUP re-reads it.
    #[arg(long, env = "EVENTVAULT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of the server certificate (PEM: PKCS#8, PKCS#1 or
    /// SEC1); SIGHUP re-reads it.
    #[arg(long, env = "EVENTVAULT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) client certificates are verified against.
    /// A verified certificate bound to a principal (`principal add
    /// --client-cert`) authenticates as that principal; without
    /// --require-client-cert a client may also connect without one.
    #[arg(long, env = "EVENTVAULT_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse a TLS handshake without a client certificate signed by
    /// --tls-client-ca.
    #[arg(long, env = "EVENTVAULT_REQUIRE_CLIENT_CERT")]
    pub require_client_cert: bool,
    /// A browser origin (scheme://host[:port]) allowed to call the API
    /// (CORS); repeat for several (environment: comma-separated). Other
    /// origins get no CORS header.
    #[arg(
        long = "cors-origin",
        env = "EVENTVAULT_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Accept bearer JWTs from the identity provider with this issuer
    /// (`iss`), beside eventvault's own tokens. Needs --jwt-audience and
    /// one of --jwt-jwks-url or --jwt-jwks-file.
    #[arg(long, env = "EVENTVAULT_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The audience (`aud`) such a token must name.
    #[arg(long, env = "EVENTVAULT_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// http(s) URL of the identity provider's JWK set: fetched at start
    /// (the start fails if it cannot be) and again for an unknown key id,
    /// at most every 30 seconds.
    #[arg(long, env = "EVENTVAULT_JWT_JWKS_URL", hide_env_values = true)]
    pub jwt_jwks_url: Option<String>,
    /// File holding the identity provider's JWK set, in place of
    /// --jwt-jwks-url: read at start and again for an unknown key id.
    #[arg(long, env = "EVENTVAULT_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// The claim of a JWT that holds the caller's role names (an array of
    /// strings, or one string) from roles.toml.
    #[arg(long, env = "EVENTVAULT_JWT_ROLES_CLAIM", default_value = crate::jwt::DEFAULT_ROLES_CLAIM)]
    pub jwt_roles_claim: String,
}

/// A number of seconds from the command line as a duration of at least one
/// second (zero would make every wait fail at once).
fn secs(s: u64) -> Duration {
    Duration::from_secs(s.max(1))
}

impl Default for Config {
    /// The defaults of `eventvault serve` (on 127.0.0.1:8080, with the
    /// databases, master key file and policies under the working
    /// directory), except the master key, which comes from the file here
    /// rather than from the environment.
    fn default() -> Self {
        Config {
            listen: defaults::LISTEN.parse().expect("a socket address"),
            database_url: defaults::DATABASE_URL.into(),
            keystore_url: defaults::KEYSTORE_URL.into(),
            master_key_file: defaults::MASTER_KEY_FILE.into(),
            master_key: None,
            master_key_uri: None,
            pkcs11_module: None,
            pkcs11_pin: None,
            policies_dir: defaults::POLICIES_DIR.into(),
            max_body_bytes: defaults::MAX_BODY_BYTES,
            key_cache_capacity: defaults::KEY_CACHE,
            dek_max_encryptions: crate::keys::DEFAULT_MAX_ENCRYPTIONS,
            max_db_connections: defaults::DB_CONNECTIONS,
            store_timeout: secs(defaults::STORE_TIMEOUT_SECS),
            write_timeout: secs(defaults::WRITE_TIMEOUT_SECS),
            max_connections: defaults::MAX_CONNECTIONS,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            header_read_timeout: secs(defaults::HEADER_READ_TIMEOUT_SECS),
            body_read_timeout: secs(defaults::BODY_READ_TIMEOUT_SECS),
            idle_timeout: secs(defaults::IDLE_TIMEOUT_SECS),
            max_subscriptions: defaults::MAX_SUBSCRIPTIONS,
            rate_limit: RateLimit::per_second(defaults::RATE_LIMIT, defaults::RATE_LIMIT_BURST),
            max_in_flight: defaults::MAX_IN_FLIGHT,
            max_in_flight_alone: defaults::MAX_IN_FLIGHT_ALONE,
            unauthenticated_rate_limit: RateLimit::per_second(
                defaults::UNAUTHENTICATED_RATE_LIMIT,
                defaults::UNAUTHENTICATED_RATE_LIMIT_BURST,
            ),
            unauthenticated_audit_interval: Duration::from_secs(
                defaults::UNAUTHENTICATED_AUDIT_INTERVAL_SECS,
            ),
            max_unauthenticated_addresses: defaults::MAX_UNAUTHENTICATED_ADDRESSES,
            subscription_recheck: defaults::SUBSCRIPTION_RECHECK,
            nats_url: None,
            nats_stream: defaults::NATS_STREAM.into(),
            nats_subject_prefix: defaults::NATS_SUBJECT_PREFIX.into(),
            accept_missing_keys: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            require_client_cert: false,
            cors_origins: Vec::new(),
            jwt: None,
        }
    }
}

impl StoreArgs {
    /// The configuration of a command other than `serve`: these flags, the
    /// master key from `EVENTVAULT_MASTER_KEY` if it is set, and the
    /// defaults for the rest.
    pub fn config(&self) -> Config {
        Config {
            database_url: self.database_url.clone(),
            keystore_url: self.keystore_url.clone(),
            master_key_file: self.master_key_file.clone(),
            master_key: std::env::var("EVENTVAULT_MASTER_KEY")
                .ok()
                .map(Zeroizing::new),
            master_key_uri: self.master_key_uri.clone(),
            pkcs11_module: self.pkcs11_module.clone(),
            pkcs11_pin: std::env::var("EVENTVAULT_PKCS11_PIN")
                .ok()
                .map(Zeroizing::new),
            policies_dir: self.policies_dir.clone(),
            max_db_connections: self.db_connections,
            store_timeout: secs(self.store_timeout_secs),
            ..Config::default()
        }
    }
}

impl ServeArgs {
    /// The configuration of `serve`: these flags over `store`'s.
    pub fn config(&self, store: &StoreArgs) -> Config {
        Config {
            listen: self.listen,
            max_body_bytes: self.max_body_bytes,
            key_cache_capacity: self.key_cache,
            write_timeout: secs(self.write_timeout_secs),
            max_connections: self.max_connections.max(1),
            // Below a request line and a few headers nothing could be served.
            max_header_bytes: self.max_header_bytes.max(1024),
            header_read_timeout: secs(self.header_read_timeout_secs),
            body_read_timeout: secs(self.body_read_timeout_secs),
            idle_timeout: secs(self.idle_timeout_secs),
            max_subscriptions: self.max_subscriptions,
            rate_limit: RateLimit::per_second(self.rate_limit, self.rate_limit_burst),
            max_in_flight: self.max_in_flight,
            max_in_flight_alone: self.max_in_flight_alone,
            unauthenticated_rate_limit: RateLimit::per_second(
                self.unauthenticated_rate_limit,
                self.unauthenticated_rate_limit_burst,
            ),
            unauthenticated_audit_interval: Duration::from_secs(
                self.unauthenticated_audit_interval_secs,
            ),
            max_unauthenticated_addresses: self.max_unauthenticated_addresses,
            // An empty EVENTVAULT_NATS_URL means no relay, as unset does.
            nats_url: self.nats_url.clone().filter(|url| !url.trim().is_empty()),
            nats_stream: self.nats_stream.clone(),
            nats_subject_prefix: self.nats_subject_prefix.clone(),
            accept_missing_keys: self.accept_missing_keys,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            require_client_cert: self.require_client_cert,
            cors_origins: self.cors_origins.clone(),
            jwt: crate::jwt::JwtConfig::from_flags(
                self.jwt_issuer.as_deref(),
                self.jwt_audience.as_deref(),
                self.jwt_jwks_url.as_deref(),
                self.jwt_jwks_file.as_deref(),
                &self.jwt_roles_claim,
            ),
            ..store.config()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// The flags' defaults and `Config::default` are one configuration.
    #[test]
    fn the_flags_defaults_are_the_default_config() {
        let flags = Flags::try_parse_from(["eventvault"]).expect("no flag is required");
        let from_flags = format!("{:#?}", flags.serve.config(&flags.store));
        let default = format!("{:#?}", Config::default());
        // The master key and the PIN may come from the environment of
        // whoever runs the tests; everything else must agree.
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.contains("master_key:") && !l.contains("pkcs11_pin:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&from_flags), strip(&default));
    }
}
