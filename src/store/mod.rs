//! Everything that speaks SQL: connecting to SQLite or PostgreSQL, running the
//! migrations compiled into the binary, reading events, the group-commit
//! [`writer`], the [`keystore`], the principals table and the outbox relay's
//! checkpoint and lease ([`relay`]).
//!
//! Both backends share one code path wherever the SQL is the same (`$N`
//! placeholders work on both); where they differ (array parameters, advisory
//! locks, `uuid` columns) each has its own small function next to the other.

pub mod audit;
pub mod data_keys;
pub mod feed;
pub mod keystore;
pub mod principals;
pub mod relay;
pub mod snapshots;
pub mod subjects;
pub mod tx;
pub mod types;
pub mod writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::domain::{EventId, Position, StreamId, Subject, Version};

static EVENTS_SQLITE: Migrator = sqlx::migrate!("migrations/sqlite/events");
static EVENTS_POSTGRES: Migrator = sqlx::migrate!("migrations/postgres/events");
static KEYSTORE_SQLITE: Migrator = sqlx::migrate!("migrations/sqlite/keystore");
static KEYSTORE_POSTGRES: Migrator = sqlx::migrate!("migrations/postgres/keystore");

/// A failure of the database layer. The message is for the operator's log;
/// the HTTP layer shows callers a generic 5xx.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL {0:?} is neither sqlite: nor postgres:")]
    UnsupportedUrl(String),
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create or make owner-only {path}: {source}")]
    PrivateFile {
        path: String,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The transaction of a group of appends failed; its cause is logged
    /// once by the writer, and every request of the group gets this, with
    /// the store's condition if that was the cause, and whether the failure
    /// came while committing (the outcome is then unknown: the commit may
    /// have reached the database before the connection was lost).
    #[error("the group commit failed")]
    GroupCommit {
        fault: Option<Fault>,
        maybe_committed: bool,
    },
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// Work that must wait for other connections found them busy for too
    /// long; retrying it is safe.
    #[error("{0}")]
    Busy(&'static str),
    /// The connection was lost while committing: the work may or may not
    /// have been recorded (retrying it is safe: it is idempotent).
    #[error("the outcome of a commit is unknown: {0}")]
    RecordedOrNot(Box<StoreError>),
    /// This database role does not own the schema and the schema lacks
    /// migrations this binary needs (or has some it does not know).
    #[error(
        "the {store} schema is not what this binary needs: {detail}; the database role {role:?} does not own it, so it does not migrate it: run `eventvault migrate` as the owner first"
    )]
    NotMigrated {
        store: &'static str,
        role: String,
        detail: String,
    },
    /// Roles asked of SQLite, which has none.
    #[error(
        "SQLite has no database roles: --grant-to applies to PostgreSQL only (on SQLite, the files' owner and modes are the boundary)"
    )]
    NoRoles,
    /// `eventvault migrate` by a role that may not create or change the
    /// schema.
    #[error(
        "the database role {role:?} may not migrate the {store} schema ({cause}); run `eventvault migrate` as the owner of the database's tables"
    )]
    NotOwner {
        store: &'static str,
        role: String,
        cause: String,
    },
}

/// Why a store cannot serve now, when the cause is the store's condition
/// rather than the request or the data: the answer is then 503 with
/// `Retry-After` (retrying later may succeed), never a 500, which stays
/// for integrity failures and bugs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The database does not answer: connection refused or lost, the pool
    /// found no connection in time, the server is shutting down or is a
    /// standby that refuses writes.
    Unreachable,
    /// The database (or its disk) is full: reads may work, writes cannot
    /// commit until space is freed.
    Full,
    /// Other connections hold what this work must wait for (a lock, the
    /// WAL), longer than the busy timeout.
    Busy,
}

impl Fault {
    /// The word readiness reports for a store in this condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Full => "full",
            Self::Busy => "busy",
        }
    }
}

impl StoreError {
    /// The store's condition behind this error, if it is one (see
    /// [`Fault`]); `None` for errors a retry would not cure (a bad
    /// statement, corrupt data).
    pub fn fault(&self) -> Option<Fault> {
        match self {
            Self::Database(e) => sqlx_fault(e),
            Self::GroupCommit { fault, .. } => *fault,
            Self::RecordedOrNot(e) => e.fault(),
            Self::Busy(_) => Some(Fault::Busy),
            _ => None,
        }
    }
}

/// The [`Fault`] behind a sqlx error, by its kind and, for errors the
/// server returned, by SQLSTATE (PostgreSQL) or result code (SQLite).
pub fn sqlx_fault(e: &sqlx::Error) -> Option<Fault> {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Some(Fault::Unreachable),
        sqlx::Error::Database(db) => {
            let code = db.code()?;
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                pg_fault(&code)
            } else {
                code.parse::<i32>().ok().and_then(sqlite_fault)
            }
        }
        _ => None,
    }
}

/// PostgreSQL SQLSTATEs that describe the server's condition.
fn pg_fault(state: &str) -> Option<Fault> {
    match state {
        // insufficient resources: disk full, out of memory, too many
        // connections
        "53100" => Some(Fault::Full),
        s if s.starts_with("53") => Some(Fault::Unreachable),
        // connection exception; admin shutdown, crash shutdown, cannot
        // connect now (starting, recovering); system I/O errors; a standby
        // that refuses writes (read_only_sql_transaction)
        s if s.starts_with("08") || s.starts_with("57P") || s.starts_with("58") => {
            Some(Fault::Unreachable)
        }
        "25006" => Some(Fault::Unreachable),
        // object not in prerequisite state: what a new connection is told
        // by a database that accepts none now (`allow_connections false`,
        // a database being dropped or restored); never raised by the
        // statements eventvault runs
        "55000" => Some(Fault::Unreachable),
        // serialization failure, deadlock, lock not available
        "40001" | "40P01" | "55P03" => Some(Fault::Busy),
        _ => None,
    }
}

/// SQLite result codes (primary code: the low byte of the extended one)
/// that describe the file's or the disk's condition.
fn sqlite_fault(extended: i32) -> Option<Fault> {
    match extended & 0xff {
        // SQLITE_FULL
        13 => Some(Fault::Full),
        // SQLITE_BUSY, SQLITE_LOCKED
        5 | 6 => Some(Fault::Busy),
        // SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_READONLY, SQLITE_PROTOCOL
        10 | 14 | 8 | 15 => Some(Fault::Unreachable),
        _ => None,
    }
}

/// How long work waits for a store that does not answer, unless configured
/// otherwise (`--store-timeout-secs`).
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// How every PostgreSQL connection is opened. `plan_cache_mode =
/// force_custom_plan`: a statement is planned with its parameters each time.
/// PostgreSQL otherwise settles, after five executions, on a generic plan
/// made with the statistics of that moment, and keeps it for the
/// connection's life: made on an empty table, the writer's look-up of event
/// ids (`event_id = any($1)`) stayed a sequential scan while the table grew,
/// and appends slowed down with every event stored.
fn pg_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)?
        .application_name("eventvault")
        .options([("plan_cache_mode", "force_custom_plan")]))
}

/// [`pg_options`] for `purpose`. The keystore's connections also give up
/// waiting for a table lock after `timeout` (`lock_timeout`): a forget's
/// `VACUUM deks` waits for any other maintenance of the table (autovacuum,
/// `ANALYZE`, an operator's `VACUUM`) and would otherwise hold the forget
/// for as long as that runs; it fails instead, and the forget is finished
/// later. The event store's writer waits for other processes' writers on an
/// advisory lock, which is not bounded this way.
fn pg_options_for(
    url: &str,
    purpose: Purpose,
    timeout: Duration,
) -> Result<PgConnectOptions, StoreError> {
    let opts = pg_options(url)?;
    Ok(match purpose {
        Purpose::Events => opts,
        Purpose::Keystore => {
            opts.options([("lock_timeout", format!("{}ms", timeout.as_millis().max(1)))])
        }
    })
}

/// Which of the two databases a pool serves; they have separate migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Events,
    Keystore,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Self::Events => "event store",
            Self::Keystore => "keystore",
        }
    }

    /// The least privileges of a serving role that does not own the
    /// schema, on PostgreSQL (`migrations/postgres/grants/`), with psql's
    /// `:"role"` and `:"DBNAME"` variables.
    pub fn postgres_grants(self) -> &'static str {
        match self {
            Self::Events => include_str!("../../migrations/postgres/grants/events.sql"),
            Self::Keystore => include_str!("../../migrations/postgres/grants/keystore.sql"),
        }
    }
}

/// A connection pool to one of the two supported backends.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same expression against whichever pool `db` holds; for queries
/// whose SQL and types are the same on both backends.
macro_rules! on_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::store::Db::Sqlite($pool) => $body,
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_db;

/// Like [`on_db`], for a query whose SQL differs per backend: `$sql` is bound
/// to the SQLite or the PostgreSQL text of the `(sqlite, postgres)` pair.
macro_rules! on_db_sql {
    ($db:expr, $pair:expr, |$pool:ident, $sql:ident| $body:expr) => {{
        let (sqlite_sql, postgres_sql) = $pair;
        match $db {
            $crate::store::Db::Sqlite($pool) => {
                let $sql = sqlite_sql;
                $body
            }
            $crate::store::Db::Postgres($pool) => {
                let $sql = postgres_sql;
                $body
            }
        }
    }};
}
pub(crate) use on_db_sql;

impl Db {
    /// Connects to `url` (`sqlite:…` or `postgres://…`), creating a SQLite
    /// file and its directory if needed, and runs the migrations for
    /// `purpose`; waits at most [`DEFAULT_STORE_TIMEOUT`] for a connection.
    pub async fn connect(
        url: &str,
        purpose: Purpose,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        Self::connect_bounded(url, purpose, max_connections, DEFAULT_STORE_TIMEOUT).await
    }

    /// [`Db::connect`], waiting at most `timeout` for a connection from the
    /// pool (a new one included) and, on SQLite, for another connection's
    /// lock on the file (`busy_timeout`): while the database does not
    /// answer, work fails after that long instead of waiting for it to come
    /// back.
    ///
    /// The schema: a role that owns it (or a new, empty database) runs the
    /// migrations; on PostgreSQL a role that does not own it (the
    /// least-privilege serving role) only checks that every migration of
    /// this binary is applied, and fails with [`StoreError::NotMigrated`]
    /// otherwise.
    pub async fn connect_bounded(
        url: &str,
        purpose: Purpose,
        max_connections: u32,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let db = Self::open_pool(url, purpose, max_connections, timeout).await?;
        match &db {
            Db::Sqlite(pool) => migrator(&db, purpose).run(pool).await?,
            Db::Postgres(pool) => match pg_schema_owner(pool).await? {
                Ownership::Owner | Ownership::Empty => run_migrations(&db, purpose).await?,
                Ownership::Other(role) => check_migrations(pool, purpose, role).await?,
            },
        }
        Ok(db)
    }

    /// Runs the migrations for `purpose` on `url` (`eventvault migrate`):
    /// as the owner of the schema, or on an empty database.
    pub async fn migrate(
        url: &str,
        purpose: Purpose,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let db = Self::open_pool(url, purpose, 2, timeout).await?;
        run_migrations(&db, purpose).await?;
        Ok(db)
    }

    async fn open_pool(
        url: &str,
        purpose: Purpose,
        max_connections: u32,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let db = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = pg_options_for(url, purpose, timeout)?;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(timeout)
                .connect_with(opts)
                .await?;
            Db::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                // WAL lets readers run beside the writer; FULL syncs the WAL at
                // every commit, so an acknowledged append survives power loss.
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                // Another connection holding the file locked (a backup, an
                // operator's shell, a checkpoint) is waited for as long as
                // for a connection, then answered 503 busy: never longer.
                .busy_timeout(timeout)
                .foreign_keys(true)
                // Deleted keystore rows are overwritten with zeros rather than
                // left in free pages (crypto-shredding relies on it).
                .pragma("secure_delete", "on");
            let file = opts.get_filename().to_owned();
            if sqlite_on_disk(url, &file) {
                if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                    private_dir(dir)?;
                }
                // Owner-only before SQLite opens it: SQLite gives the
                // journal, `-wal` and `-shm` files it creates the database
                // file's mode, so none of them is ever readable by others.
                private_sqlite_file(&file)?;
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(timeout)
                .connect_with(opts)
                .await?;
            Db::Sqlite(pool)
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        Ok(db)
    }

    /// Grants `role` the least privileges of a serving role on this
    /// PostgreSQL database (`migrations/postgres/grants/`); run by the
    /// owner after the migrations.
    pub async fn grant_serving_role(&self, purpose: Purpose, role: &str) -> Result<(), StoreError> {
        let Db::Postgres(pool) = self else {
            return Err(StoreError::NoRoles);
        };
        let database: String = sqlx::query_scalar("select current_database()")
            .fetch_one(pool)
            .await?;
        let mut tx = tx::Tx::begin(pool, "begin").await?;
        // Split before the names go in: they are quoted, and may hold
        // anything a quoted identifier may.
        for statement in sql_statements(purpose.postgres_grants()) {
            let statement = statement
                .replace(":\"role\"", &quote_ident(role))
                .replace(":\"DBNAME\"", &quote_ident(&database));
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(tx.conn())
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Opens an existing event store to read it (SQLite read-only): creates
    /// nothing and runs no migration, so a mistyped URL fails instead of
    /// checking an empty new database.
    pub async fn open_existing(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = pg_options(url)?;
            Ok(Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect_with(opts)
                    .await?,
            ))
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .read_only(true)
                .create_if_missing(false);
            Ok(Db::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(opts)
                    .await?,
            ))
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    /// Writes a transactionally consistent copy of the SQLite database at
    /// `url`, holding only live rows (a deleted key's bytes are not carried
    /// into it), into the empty file `to` (`VACUUM INTO`).
    pub async fn copy_sqlite(url: &str, to: &str) -> Result<(), StoreError> {
        let db = Self::open_existing(url).await?;
        let Db::Sqlite(pool) = &db else {
            db.close().await;
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        let copied = sqlx::query("vacuum into $1").bind(to).execute(pool).await;
        db.close().await;
        copied?;
        Ok(())
    }

    /// A trivial round trip, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_db!(self, |pool| sqlx::query("select 1")
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        on_db!(self, |pool| pool.is_closed())
    }

    pub async fn close(&self) {
        on_db!(self, |pool| pool.close().await)
    }
}

fn migrator(db: &Db, purpose: Purpose) -> &'static Migrator {
    match (db, purpose) {
        (Db::Sqlite(_), Purpose::Events) => &EVENTS_SQLITE,
        (Db::Sqlite(_), Purpose::Keystore) => &KEYSTORE_SQLITE,
        (Db::Postgres(_), Purpose::Events) => &EVENTS_POSTGRES,
        (Db::Postgres(_), Purpose::Keystore) => &KEYSTORE_POSTGRES,
    }
}

/// Runs the migrations; a PostgreSQL role refused the privilege to change
/// the schema gets [`StoreError::NotOwner`], which says what to do.
async fn run_migrations(db: &Db, purpose: Purpose) -> Result<(), StoreError> {
    let migrator = migrator(db, purpose);
    let result = on_db!(db, |pool| migrator.run(pool).await);
    match (result, db) {
        (Ok(()), _) => Ok(()),
        (Err(e), Db::Postgres(pool)) if insufficient_privilege(&e) => {
            let role: String = sqlx::query_scalar("select current_user::text")
                .fetch_one(pool)
                .await?;
            Err(StoreError::NotOwner {
                store: purpose.name(),
                role,
                cause: e.to_string(),
            })
        }
        (Err(e), _) => Err(e.into()),
    }
}

fn insufficient_privilege(e: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    match e {
        MigrateError::Execute(sqlx::Error::Database(d))
        | MigrateError::ExecuteMigration(sqlx::Error::Database(d), _) => {
            // insufficient_privilege, or must be owner (42501 as well)
            d.code().as_deref() == Some("42501")
        }
        _ => false,
    }
}

/// Who owns a PostgreSQL database's schema, as the migrations table says.
enum Ownership {
    /// No migration has run yet.
    Empty,
    /// The connected role owns it (or is a member of its owner, or a
    /// superuser).
    Owner,
    /// Another role does: this one is the serving role, named here.
    Other(String),
}

async fn pg_schema_owner(pool: &PgPool) -> Result<Ownership, StoreError> {
    let (exists, owner, role): (bool, Option<bool>, String) = sqlx::query_as(
        "select to_regclass('_sqlx_migrations') is not null,
                (select pg_has_role(current_user, c.relowner, 'USAGE') from pg_class c
                  where c.oid = to_regclass('_sqlx_migrations')),
                current_user::text",
    )
    .fetch_one(pool)
    .await?;
    Ok(match (exists, owner) {
        (false, _) => Ownership::Empty,
        (true, Some(true)) => Ownership::Owner,
        _ => Ownership::Other(role),
    })
}

/// Checks, as a role that does not own the schema, that the database has
/// exactly the migrations of this binary, each applied whole and unchanged.
async fn check_migrations(pool: &PgPool, purpose: Purpose, role: String) -> Result<(), StoreError> {
    let applied: Vec<(i64, Vec<u8>, bool)> =
        sqlx::query_as("select version, checksum, success from _sqlx_migrations order by version")
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::NotMigrated {
                store: purpose.name(),
                role: role.clone(),
                detail: format!(
                    "its migrations cannot be read ({e}); grant the role SELECT on _sqlx_migrations"
                ),
            })?;
    let known: Vec<_> = migrator(&Db::Postgres(pool.clone()), purpose)
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .collect();
    let fail = |detail: String| StoreError::NotMigrated {
        store: purpose.name(),
        role: role.clone(),
        detail,
    };
    let missing: Vec<String> = known
        .iter()
        .filter(|m| !applied.iter().any(|(v, _, ok)| *v == m.version && *ok))
        .map(|m| format!("{} ({})", m.version, m.description))
        .collect();
    if !missing.is_empty() {
        return Err(fail(format!(
            "migration(s) {} not applied",
            missing.join(", ")
        )));
    }
    if let Some(m) = known.iter().find(|m| {
        applied
            .iter()
            .any(|(v, sum, _)| *v == m.version && sum.as_slice() != &*m.checksum)
    }) {
        return Err(fail(format!(
            "migration {} was applied from a different file than this binary's",
            m.version
        )));
    }
    if let Some((v, _, _)) = applied
        .iter()
        .find(|(v, _, _)| !known.iter().any(|m| m.version == *v))
    {
        return Err(fail(format!(
            "it has migration {v}, which this binary does not know (a newer eventvault migrated it)"
        )));
    }
    Ok(())
}

/// An SQL identifier in double quotes (quotes inside doubled).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The statements of a grants file: comments dropped, split at `;`.
fn sql_statements(sql: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .map(|l| l.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Creates a directory (and parents) readable by the owner only, so that
/// neither the event database nor the keystore is world-readable. An
/// existing directory is left as it is (a backup's target directory may be
/// shared on purpose); see [`private_dir`] for eventvault's own.
pub fn create_private_dir(dir: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::CreateDir {
            path: dir.display().to_string(),
            source,
        })
}

/// A directory of eventvault's own (`data/`, `keys/`: the one holding a
/// SQLite database or the master key file): created owner-only (0700), and
/// tightened to 0700 when it exists with access for others (made by hand, by
/// an older version, or under a loose umask). A directory with the sticky bit
/// (`/tmp`) is shared by design and is never changed; nor is one this user
/// may not change (owned by another user, read-only): both are only warned
/// about, since the files inside are owner-only in any case.
pub fn private_dir(dir: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return create_private_dir(dir),
        Err(source) => {
            return Err(StoreError::CreateDir {
                path: dir.display().to_string(),
                source,
            });
        }
    };
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() || mode & 0o077 == 0 {
        return Ok(());
    }
    if mode & 0o1000 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "a shared directory (sticky bit) holds eventvault's files; give them a directory of their own");
        return Ok(());
    }
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        Ok(()) => {
            tracing::warn!(dir = %dir.display(), was = format!("{mode:o}"), "the directory was accessible to others; made it owner-only (700)");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), error = %e, "the directory is accessible to others and cannot be made owner-only");
            Ok(())
        }
    }
}

/// Whether a SQLite URL names a file on disk (not an in-memory database).
fn sqlite_on_disk(url: &str, file: &std::path::Path) -> bool {
    let in_memory = file
        .to_str()
        .is_some_and(|f| f.starts_with("file:sqlx-in-memory-"))
        || url
            .split_once('?')
            .is_some_and(|(_, query)| query.split('&').any(|p| p == "mode=memory"));
    !in_memory
}

/// Creates the SQLite database file empty and owner-only (0600) if it does
/// not exist (SQLite takes an empty file as an empty database), or makes an
/// existing one and its `-wal`, `-shm` and `-journal` files owner-only.
fn private_sqlite_file(file: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed = |path: &std::path::Path, source| StoreError::PrivateFile {
        path: path.display().to_string(),
        source,
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(failed(file, e)),
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut path = file.as_os_str().to_owned();
        path.push(suffix);
        let path = std::path::PathBuf::from(path);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| failed(&path, e))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// A database URL fit for a log line: any password is replaced, in the user
/// information and in `password` / `sslpassword` parameters.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &base[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &base[..scheme_end + 3],
                    &userinfo[..colon],
                    &base[at..]
                ),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if matches!(k, "password" | "sslpassword") => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// A count read back from SQL (`count(*)`, a counter column), which is
/// never negative.
pub(crate) fn count(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("a count of {n}")))
}

/// A number for a `BIGINT` column: refused, not wrapped, past `i64::MAX`.
pub(crate) fn to_i64(n: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(n)
        .map_err(|_| StoreError::Corrupt(format!("{what} {n} does not fit in a BIGINT")))
}

/// Microseconds since the Unix epoch, UTC: the time unit of every stored time.
pub fn now_us() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

/// An event row as stored: clear fields as JSON text, personal fields sealed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    pub position: Position,
    pub stream_id: StreamId,
    pub version: Version,
    pub event_id: EventId,
    pub event_type: String,
    pub subject: Option<Subject>,
    pub key_id: Option<String>,
    pub data: String,
    pub sealed: Option<Vec<u8>>,
    pub metadata: String,
    pub recorded_at: i64,
    /// The subject is in the forget ledger (read with the row, so that no
    /// cache can outlive a forget).
    pub forgotten: bool,
}

/// Builds one `select` of event rows for each backend; PostgreSQL keeps ids
/// as `uuid` and hands them out as text so both decode alike.
macro_rules! select_events {
    ($rest:literal) => {
        (
            concat!(
                "select position, stream_id, version, event_id, event_type, subject, key_id, data, sealed, metadata, recorded_at, ",
                "exists (select 1 from forgotten_subjects f where f.subject = events.subject) as forgotten from events ",
                $rest
            ),
            concat!(
                "select position, stream_id, version, event_id::text as event_id, event_type, subject, key_id, data, sealed, metadata, recorded_at, ",
                "exists (select 1 from forgotten_subjects f where f.subject = events.subject) as forgotten from events ",
                $rest
            ),
        )
    };
}

/// Direction of a stream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// Reads of the event store (writes go through [`writer`]).
#[derive(Clone, Debug)]
pub struct EventStore {
    pub db: Db,
}

impl EventStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The stream's version at or before `as_of_us` (its current version when
    /// `None`); `None` when the stream had no event by then.
    pub async fn stream_version(
        &self,
        stream: &StreamId,
        as_of_us: Option<i64>,
    ) -> Result<Option<Version>, StoreError> {
        let v: Option<Version> = match as_of_us {
            None => on_db!(&self.db, |pool| {
                sqlx::query_scalar("select version from streams where stream_id = $1")
                    .bind(stream.as_str())
                    .fetch_optional(pool)
                    .await
            })?,
            Some(t) => {
                on_db!(&self.db, |pool| {
                    sqlx::query_scalar("select max(version) from events where stream_id = $1 and recorded_at <= $2")
                    .bind(stream.as_str())
                    .bind(t)
                    .fetch_one(pool)
                    .await
                })?
            }
        };
        Ok(v)
    }

    /// Up to `limit` events of a stream starting at version `from` (inclusive)
    /// in `direction`, up to version `to` and recorded at or before `as_of_us`.
    pub async fn read_stream(
        &self,
        stream: &StreamId,
        (from, to): (u64, u64),
        limit: u32,
        direction: Direction,
        as_of_us: Option<i64>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = match direction {
            Direction::Forward => select_events!(
                "where stream_id = $1 and version >= $2 and version <= $5 and recorded_at <= $3 order by version asc limit $4"
            ),
            Direction::Backward => select_events!(
                "where stream_id = $1 and version <= $2 and version <= $5 and recorded_at <= $3 order by version desc limit $4"
            ),
        };
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let as_of = as_of_us.unwrap_or(i64::MAX);
        let rows = on_db_sql!(&self.db, sql, |pool, sql| {
            sqlx::query_as(sql)
                .bind(stream.as_str())
                .bind(from)
                .bind(as_of)
                .bind(i64::from(limit))
                .bind(i64::try_from(to).unwrap_or(i64::MAX))
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }

    /// Up to `limit` events about `subject` after position `after` and up
    /// to position `until`, in position order.
    pub async fn read_subject(
        &self,
        subject: &Subject,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = select_events!(
            "where subject = $1 and position > $2 and position <= $4 order by position asc limit $3"
        );
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let until = i64::try_from(until).unwrap_or(i64::MAX);
        let rows = on_db_sql!(&self.db, sql, |pool, sql| {
            sqlx::query_as(sql)
                .bind(subject)
                .bind(after)
                .bind(i64::from(limit))
                .bind(until)
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }

    /// The position of the last event (0 for an empty store).
    pub async fn head_position(&self) -> Result<u64, StoreError> {
        let p: Option<Position> = on_db!(&self.db, |pool| {
            sqlx::query_scalar("select max(position) from events")
                .fetch_one(pool)
                .await
        })?;
        Ok(p.map_or(0, Position::get))
    }

    /// Up to `limit` events of the global log after position `after`,
    /// recorded at or before `as_of_us`.
    pub async fn read_all(
        &self,
        after: u64,
        limit: u32,
        as_of_us: Option<i64>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = select_events!(
            "where position > $1 and recorded_at <= $2 order by position asc limit $3"
        );
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let as_of = as_of_us.unwrap_or(i64::MAX);
        let rows = on_db_sql!(&self.db, sql, |pool, sql| {
            sqlx::query_as(sql)
                .bind(after)
                .bind(as_of)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_conditions_are_told_apart_from_errors() {
        assert_eq!(pg_fault("53100"), Some(Fault::Full));
        assert_eq!(
            pg_fault("57P01"),
            Some(Fault::Unreachable),
            "admin shutdown"
        );
        assert_eq!(pg_fault("08006"), Some(Fault::Unreachable));
        assert_eq!(pg_fault("25006"), Some(Fault::Unreachable), "a standby");
        assert_eq!(
            pg_fault("55000"),
            Some(Fault::Unreachable),
            "not accepting connections"
        );
        assert_eq!(pg_fault("40001"), Some(Fault::Busy));
        assert_eq!(pg_fault("23505"), None, "a unique violation is not a fault");
        assert_eq!(pg_fault("42P01"), None, "nor an unknown table");
        assert_eq!(sqlite_fault(13), Some(Fault::Full));
        assert_eq!(
            sqlite_fault(5 | (2 << 8)),
            Some(Fault::Busy),
            "SQLITE_BUSY_SNAPSHOT"
        );
        assert_eq!(
            sqlite_fault(10 | (3 << 8)),
            Some(Fault::Unreachable),
            "SQLITE_IOERR_WRITE"
        );
        assert_eq!(sqlite_fault(2067), None, "SQLITE_CONSTRAINT_UNIQUE");
        assert_eq!(
            sqlx_fault(&sqlx::Error::PoolTimedOut),
            Some(Fault::Unreachable)
        );
        assert_eq!(sqlx_fault(&sqlx::Error::RowNotFound), None);
    }

    #[test]
    fn grants_split_into_statements_and_names_are_quoted() {
        for purpose in [Purpose::Events, Purpose::Keystore] {
            let statements = sql_statements(purpose.postgres_grants());
            assert!(statements.len() >= 4, "{statements:?}");
            for s in &statements {
                assert!(s.starts_with("grant "), "{s}");
                assert!(s.contains(":\"role\""), "{s}");
                assert!(!s.contains("--"), "{s}");
            }
        }
        // No grant of what history must never have.
        let events = sql_statements(Purpose::Events.postgres_grants()).join("\n");
        for line in events.lines().filter(|l| {
            l.contains(" events ") || l.contains(" audit_log ") || l.contains("forgotten_subjects")
        }) {
            for word in ["update", "delete", "truncate"] {
                assert!(!line.contains(word), "{line}");
            }
        }
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("a\"b; drop"), "\"a\"\"b; drop\"");
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db?sslmode=require&password=two&sslpassword=three"),
            "postgres://u:***@h/db?sslmode=require&password=***&sslpassword=***"
        );
    }

    #[test]
    fn own_directories_are_made_owner_only_but_shared_ones_are_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let root = tempfile::tempdir().unwrap();
        // Created: 0700, parents too.
        let new = root.path().join("a/keys");
        private_dir(&new).unwrap();
        assert_eq!((mode(&new), mode(new.parent().unwrap())), (0o700, 0o700));
        // Existing and open to others: tightened.
        let open = root.path().join("data");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
        // Shared by design (sticky, like /tmp): left as it is.
        let shared = root.path().join("tmp");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o1777);
        // A database file open to others, and its -shm, become 0600; a new
        // one is created 0600 and empty.
        let db = open.join("x.db");
        for f in ["x.db", "x.db-shm"] {
            std::fs::write(open.join(f), b"").unwrap();
            std::fs::set_permissions(open.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        private_sqlite_file(&db).unwrap();
        assert_eq!((mode(&db), mode(&open.join("x.db-shm"))), (0o600, 0o600));
        let fresh = open.join("y.db");
        private_sqlite_file(&fresh).unwrap();
        assert_eq!(
            (mode(&fresh), std::fs::metadata(&fresh).unwrap().len()),
            (0o600, 0)
        );
        assert!(sqlite_on_disk(
            "sqlite://data/x.db",
            std::path::Path::new("data/x.db")
        ));
        assert!(!sqlite_on_disk(
            "sqlite://x.db?mode=memory",
            std::path::Path::new("x.db")
        ));
    }
}
