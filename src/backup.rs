//! Backups: a consistent copy of the event store and, taken apart, of the
//! keystore (their backups are kept and expired apart: see
//! docs/OPERATIONS.md for what a restore means for forgotten subjects).
//!
//! SQLite: `VACUUM INTO`, a transactionally consistent copy holding only
//! live rows (a deleted key's bytes are not carried into it). PostgreSQL:
//! `pg_dump --format=custom`, one repeatable-read snapshot; the password of
//! the URL is handed over in `PGPASSWORD`, never on a command line.

use crate::store::{Db, StoreError, create_private_dir, redact_url};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists; a backup never overwrites a file")]
    Exists(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot run pg_dump (is the PostgreSQL client installed?): {0}")]
    PgDump(std::io::Error),
    #[error("pg_dump failed: {0}")]
    PgDumpFailed(String),
    /// The database URL cannot be handed to pg_dump as it is.
    #[error("cannot hand the database URL {url} to pg_dump: {why}")]
    PgDumpUrl { url: String, why: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Writes a consistent copy of the database at `url` to `to` (mode 0600);
/// returns its size in bytes.
pub async fn backup(url: &str, to: &Path) -> Result<u64, BackupError> {
    let shown = to.display().to_string();
    if to.exists() {
        return Err(BackupError::Exists(shown));
    }
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    let io = |source| BackupError::Io {
        path: shown.clone(),
        source,
    };
    // Created here, empty and owner-only, before anything is written into
    // it: the copy is never readable by others, not even while it is being
    // written (`VACUUM INTO` and `pg_dump` both write into an empty file).
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => BackupError::Exists(shown.clone()),
                _ => io(e),
            })?;
    }
    let copied = copy(url, to, &shown).await;
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(std::fs::metadata(to).map_err(io)?.len())
}

/// Writes the copy into the empty file `to`.
async fn copy(url: &str, to: &Path, shown: &str) -> Result<(), BackupError> {
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        pg_dump(url, to).await
    } else {
        let target = to.to_str().ok_or_else(|| BackupError::Io {
            path: shown.to_owned(),
            source: std::io::Error::other("the path is not UTF-8"),
        })?;
        Ok(Db::copy_sqlite(url, target).await?)
    }
}

async fn pg_dump(url: &str, to: &Path) -> Result<(), BackupError> {
    let conn = PgDumpConnection::from_url(url)?;
    let mut cmd = tokio::process::Command::new("pg_dump");
    // The whole URL is pg_dump's connection string, so that every parameter
    // (TLS, several hosts, `target_session_attrs`, `options`, …) applies to
    // the backup as it does to the service; only the password is taken out
    // of it, into the environment, never onto a command line.
    cmd.arg("--format=custom")
        .arg("--no-owner")
        .arg("--file")
        .arg(to)
        .arg(format!("--dbname={}", conn.url));
    if let Some(password) = conn.password {
        cmd.env("PGPASSWORD", password);
    }
    let out = cmd.output().await.map_err(BackupError::PgDump)?;
    if !out.status.success() {
        let _ = std::fs::remove_file(to);
        return Err(BackupError::PgDumpFailed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// How pg_dump connects to the database of a `postgres://` URL: the URL
/// without its password (fit for a command line), and the password.
#[derive(PartialEq, Eq)]
struct PgDumpConnection {
    url: String,
    password: Option<std::ffi::OsString>,
}

impl std::fmt::Debug for PgDumpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDumpConnection")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl PgDumpConnection {
    /// Splits a libpq URL (`postgres[ql]://[user[:password]@][host[:port]
    /// [,host[:port]…]][/dbname][?param=value&…]`, what the service takes)
    /// into the URL pg_dump gets and the password, which comes from the
    /// user information or from a `password` parameter (the parameter wins,
    /// as in libpq). Everything else is kept as written, hosts included,
    /// except the few parameters only sqlx knows: its spellings of the TLS
    /// parameters (`ssl-mode`, `ssl-root-cert`, `ssl-ca`, `ssl-cert`,
    /// `ssl-key`) become libpq's, `options[NAME]=VALUE` becomes `-c
    /// NAME=VALUE` in `options`, and `statement-cache-capacity` (a setting
    /// of sqlx's own) is dropped. `sslpassword` is refused: libpq takes it
    /// only from the connection string, which would show it on a command
    /// line.
    fn from_url(url: &str) -> Result<Self, BackupError> {
        let bad = |why| BackupError::PgDumpUrl {
            url: redact_url(url),
            why,
        };
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "postgres" | "postgresql"))
            .ok_or_else(|| bad("it must start with postgres:// or postgresql://"))?;
        // The user information ends at the last '@' before the path, as the
        // service reads the URL (sqlx), so that a raw '@' in a password is
        // part of the password here too, never of a host that pg_dump would
        // then show on its command line. (libpq would stop at the first one:
        // the URL handed over carries no password, and its user part is
        // re-encoded.)
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (userinfo, rest) = match rest[..authority_end].rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let mut password = None;
        let user = userinfo.map(|u| match u.split_once(':') {
            Some((user, pw)) => {
                password = Some(crate::percent::decode(pw));
                user
            }
            None => u,
        });
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (query, fragment) = match query.map(|q| q.split_once('#').unwrap_or((q, ""))) {
            Some((q, f)) => (q, f),
            None => ("", ""),
        };
        let mut params = Vec::new();
        let mut options: Vec<String> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded_key = String::from_utf8_lossy(&crate::percent::decode(key)).into_owned();
            match decoded_key.as_str() {
                "password" => password = Some(crate::percent::decode(value)),
                "sslpassword" => {
                    return Err(bad(
                        "sslpassword would show on pg_dump's command line; use a client key file readable only by eventvault instead",
                    ));
                }
                "statement-cache-capacity" => {}
                "ssl-mode" => params.push(format!("sslmode={value}")),
                "ssl-root-cert" | "ssl-ca" => params.push(format!("sslrootcert={value}")),
                "ssl-cert" => params.push(format!("sslcert={value}")),
                "ssl-key" => params.push(format!("sslkey={value}")),
                "options" => {
                    options.push(String::from_utf8_lossy(&crate::percent::decode(value)).into())
                }
                k if k.starts_with("options[") && k.ends_with(']') => {
                    let name = &k["options[".len()..k.len() - 1];
                    let value =
                        String::from_utf8_lossy(&crate::percent::decode(value)).into_owned();
                    options.push(format!("-c {name}={value}"));
                }
                _ => params.push(pair.to_owned()),
            }
        }
        if !options.is_empty() {
            params.push(format!(
                "options={}",
                crate::percent::encode(&options.join(" "))
            ));
        }
        let mut out = format!("{scheme}://");
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            // Decoded and encoded again: a raw '@' or ':' in it is escaped.
            out.push_str(&crate::percent::encode(&String::from_utf8_lossy(
                &crate::percent::decode(user),
            )));
            out.push('@');
        }
        out.push_str(before_query);
        if !params.is_empty() {
            out.push('?');
            out.push_str(&params.join("&"));
        }
        if !fragment.is_empty() {
            out.push('#');
            out.push_str(fragment);
        }
        use std::os::unix::ffi::OsStringExt;
        Ok(Self {
            url: out,
            password: password.map(std::ffi::OsString::from_vec),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, Option<String>) {
        let c = PgDumpConnection::from_url(url).unwrap();
        (
            c.url,
            c.password
                .map(|p| p.into_string().expect("UTF-8 in these tests")),
        )
    }

    #[test]
    fn a_raw_at_sign_in_a_password_stays_in_the_password() {
        let c = PgDumpConnection::from_url("postgres://app:se@cret@db:5432/ev").unwrap();
        assert_eq!(c.url, "postgres://app@db:5432/ev");
        assert_eq!(c.password.as_deref(), Some(std::ffi::OsStr::new("se@cret")));
    }

    #[test]
    fn the_password_leaves_the_url_decoded_and_everything_else_stays() {
        assert_eq!(
            split("postgres://u:p%40ss@h/db"),
            ("postgres://u@h/db".into(), Some("p@ss".into()))
        );
        assert_eq!(
            split("postgres://u@h/db"),
            ("postgres://u@h/db".into(), None)
        );
        assert_eq!(split("postgres://h/db"), ("postgres://h/db".into(), None));
        assert_eq!(
            split("postgres://:pw@h/db"),
            ("postgres://h/db".into(), Some("pw".into()))
        );
        // TLS parameters, several hosts (IPv6 among them), and libpq
        // parameters sqlx does not know all reach pg_dump as written.
        let url = "postgresql://svc:s3cret@[::1]:5432,db2.example:5433/events?sslmode=verify-full&sslrootcert=/etc/ca.pem&target_session_attrs=read-write&application_name=backup&connect_timeout=5";
        assert_eq!(
            split(url),
            (
                "postgresql://svc@[::1]:5432,db2.example:5433/events?sslmode=verify-full&sslrootcert=/etc/ca.pem&target_session_attrs=read-write&application_name=backup&connect_timeout=5".into(),
                Some("s3cret".into())
            )
        );
        // A password as a parameter wins over the user information, as in
        // libpq, and leaves the URL too.
        assert_eq!(
            split("postgres://u:first@h/db?password=sec%26ond&sslmode=require"),
            (
                "postgres://u@h/db?sslmode=require".into(),
                Some("sec&ond".into())
            )
        );
        // No user information, no database, a query only.
        assert_eq!(
            split("postgres://?host=/run/postgresql&user=ev"),
            ("postgres://?host=/run/postgresql&user=ev".into(), None)
        );
    }

    #[test]
    fn sqlx_spellings_become_libpqs() {
        assert_eq!(
            split(
                "postgres://h/db?ssl-mode=require&ssl-root-cert=/ca.pem&ssl-cert=/c.pem&ssl-key=/k.pem&statement-cache-capacity=10&options=-c%20work_mem%3D4MB&options[search_path]=ev"
            )
            .0,
            "postgres://h/db?sslmode=require&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem&options=-c%20work_mem%3D4MB%20-c%20search_path%3Dev"
        );
    }

    #[test]
    fn a_key_passphrase_or_another_scheme_is_refused() {
        for url in [
            "postgres://h/db?sslkey=/k.pem&sslpassword=hunter2",
            "mysql://u:hunter2@h/db",
        ] {
            let e = PgDumpConnection::from_url(url).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.starts_with("cannot hand the database URL"), "{e}");
        }
    }
}

/// The password never stays in what pg_dump sees on its command line.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn no_password_reaches_the_command_line(
            password in "[ -~]{1,24}",
            hosts in proptest::collection::vec("[a-z]{1,8}(:[0-9]{1,5})?", 1..4),
            in_query in any::<bool>(),
        ) {
            let encoded = crate::percent::encode(&password);
            let hosts = hosts.join(",");
            let url = if in_query {
                format!("postgres://u@{hosts}/db?sslmode=require&password={encoded}")
            } else {
                format!("postgres://u:{encoded}@{hosts}/db?sslmode=require")
            };
            let c = PgDumpConnection::from_url(&url).unwrap();
            prop_assert_eq!(
                c.password.clone().map(|p| p.into_string().unwrap()),
                Some(password.clone())
            );
            prop_assert_eq!(c.url, format!("postgres://u@{hosts}/db?sslmode=require"));
        }
    }
}
