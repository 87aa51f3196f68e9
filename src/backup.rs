//! Backups: a consistent copy of the event store and, taken apart, of the
//! keystore (their backups are kept and expired apart: see
//! docs/OPERATIONS.md for what a restore means for forgotten subjects).
//!
//! SQLite: `VACUUM INTO`, a transactionally consistent copy holding only
//! live rows (a deleted key's bytes are not carried into it). PostgreSQL:
//! `pg_dump --format=custom`, one repeatable-read snapshot; the password of
//! the URL is handed over in `PGPASSWORD`, never on a command line.

use std::path::Path;
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

use crate::store::{Db, StoreError, create_private_dir, redact_url};

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
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        pg_dump(url, to).await?;
    } else {
        let db = Db::open_existing(url).await?;
        let Db::Sqlite(pool) = &db else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)).into());
        };
        let target = to.to_str().ok_or_else(|| BackupError::Io {
            path: shown.clone(),
            source: std::io::Error::other("the path is not UTF-8"),
        })?;
        let copied = sqlx::query("vacuum into $1")
            .bind(target)
            .execute(pool)
            .await;
        db.close().await;
        copied.map_err(StoreError::from)?;
    }
    use std::os::unix::fs::PermissionsExt;
    let io = |source| BackupError::Io {
        path: shown.clone(),
        source,
    };
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(std::fs::metadata(to).map_err(io)?.len())
}

async fn pg_dump(url: &str, to: &Path) -> Result<(), BackupError> {
    let opts = PgConnectOptions::from_str(url).map_err(StoreError::from)?;
    let mut cmd = tokio::process::Command::new("pg_dump");
    cmd.arg("--format=custom")
        .arg("--no-owner")
        .arg("--file")
        .arg(to)
        .arg("--host")
        .arg(opts.get_host())
        .arg("--port")
        .arg(opts.get_port().to_string())
        .arg("--username")
        .arg(opts.get_username());
    if let Some(db) = opts.get_database() {
        cmd.arg("--dbname").arg(db);
    }
    // The password, if the URL has one, goes through the environment.
    if let Some(password) = password_of(url) {
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

/// The password in a `postgres://user:password@host/db` URL, percent-decoded.
fn password_of(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let userinfo = &rest[..rest.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    let mut out = Vec::new();
    let bytes = password.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = password
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_come_out_of_urls_decoded() {
        assert_eq!(
            password_of("postgres://u:p%40ss@h/db").as_deref(),
            Some("p@ss")
        );
        assert_eq!(password_of("postgres://u@h/db"), None);
        assert_eq!(password_of("postgres://h/db"), None);
    }
}
