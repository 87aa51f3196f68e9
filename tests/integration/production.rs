//! The README's "Production security" example (`docs/production.sh`): the
//! README shows the script as it is, and it runs as written against the
//! real binary on SQLite and on PostgreSQL — the master key on a SoftHSM2
//! token, a JWT from a JWKS file, HTTPS with a private CA, a principal
//! bound to its client certificate, a browser origin — and what it did is
//! in the audit log under the right principals.

use std::path::PathBuf;
use std::time::Duration;

use crate::both_backends;
use crate::common::{Backend, TestEnv, append_to_log, binary, policies_dir, remember_secret};

both_backends!(the_production_example_runs_as_written);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The README holds the script byte for byte, in the ```sh block after
/// its `<!-- production: docs/production.sh -->` line.
#[test]
fn the_readme_shows_the_script_as_it_is() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let script = std::fs::read_to_string(repo().join("docs/production.sh")).unwrap();
    let marker = "<!-- production: docs/production.sh -->\n```sh\n";
    let at = readme
        .find(marker)
        .expect("README: the production example's marker")
        + marker.len();
    let end = readme[at..]
        .find("\n```\n")
        .expect("README: the block's end")
        + at
        + 1;
    assert_eq!(
        &readme[at..end],
        script,
        "README and docs/production.sh differ"
    );
}

async fn the_production_example_runs_as_written(backend: Backend) {
    if !crate::hsm::softhsm_available() {
        return;
    }
    let env = TestEnv::new(&backend).await;
    // The script's own PIN: what its server logs must never hold.
    remember_secret("pin-Hx74r");
    let mut child = tokio::process::Command::new("bash")
        .arg(repo().join("docs/production.sh"))
        .current_dir(repo())
        .env("EVENTVAULT", binary())
        .env("EVENTVAULT_POLICIES_DIR", policies_dir())
        .env("PKCS11_MODULE", crate::hsm::softhsm_module())
        .env("EVENTVAULT_DATABASE_URL", &env.database_url)
        .env("EVENTVAULT_KEYSTORE_URL", &env.keystore_url)
        .env_remove("EVENTVAULT_MASTER_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    let pid = child.id().expect("running");
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        tokio::spawn(async move {
            let mut s = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut r, &mut s)
                .await
                .unwrap();
            s
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => {
            // SIGTERM: the script's trap stops its server by its pid.
            std::process::Command::new("kill")
                .arg(pid.to_string())
                .status()
                .unwrap();
            child.wait().await.unwrap();
            panic!("docs/production.sh did not finish in 120 s");
        }
    };
    let (out, err) = (out.await.unwrap(), err.await.unwrap());
    append_to_log(&out);
    append_to_log(&err);
    assert!(status.success(), "docs/production.sh failed:\n{out}\n{err}");
    // The payments service's append, the officer's decrypted read, the
    // browser's preflight, the key on the token.
    assert!(out.contains("\"first_version\":1"), "{out}");
    assert!(
        out.contains(
            r#"{"type":"MoneyDeposited","personal_data":"decrypted","payer_name":"Ada Lovelace"}"#
        ),
        "{out}"
    );
    assert!(
        out.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://support.bank.example"),
        "{out}"
    );
    assert!(
        out.contains("\tpkcs11:token=bank-hsm;object=eventvault-kek\t1 data keys (configured)"),
        "{out}"
    );
    // Who did what, as the audit log says: the certificate's principal
    // appended, the identity provider's user read personal data, the
    // forged token was refused.
    let db = crate::at_rest::events_db(&env).await;
    let q = "select coalesce(principal, ''), action, outcome, personal_data from audit_log order by seq";
    let rows: Vec<(String, String, String, bool)> = match &db {
        eventvault::store::Db::Sqlite(p) => sqlx::query_as(q).fetch_all(p).await,
        eventvault::store::Db::Postgres(p) => sqlx::query_as(q).fetch_all(p).await,
    }
    .unwrap();
    let has = |principal: &str, outcome: &str, personal: bool| {
        rows.iter()
            .any(|(p, _, o, d)| p == principal && o == outcome && *d == personal)
    };
    assert!(has("payments", "ok", false), "{rows:?}");
    assert!(has("jwt:alice", "ok", true), "{rows:?}");
    assert!(rows.iter().any(|(_, _, o, _)| o == "denied"), "{rows:?}");
    db.close().await;
}
