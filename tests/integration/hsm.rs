//! The master key on a hardware token (PKCS#11), against SoftHSM2: a token
//! of each test's own, initialised with `softhsm2-util` under a
//! `SOFTHSM2_CONF` of its own, and the real binary as a child process (a
//! PKCS#11 module is initialised once per process, with the configuration
//! of that process's environment).
//!
//! Without SoftHSM2 the tests say so and pass, unless
//! `EVENTVAULT_REQUIRE_SOFTHSM=1` (as CI sets, installing it).

use std::path::PathBuf;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::at_rest::keystore_db;
use crate::both_backends;
use crate::common::{
    Backend, ServerProcess, TestApp, TestEnv, batch, command, deposit, remember_secret,
};

both_backends!(
    a_master_key_on_a_token_wraps_every_data_key_and_never_leaves_it,
    a_start_that_cannot_use_the_token_names_the_problem_and_never_the_pin,
    rotation_moves_the_keys_from_a_file_to_a_token_and_between_keys_on_tokens,
    a_wrapped_key_altered_in_the_keystore_is_an_integrity_failure_not_an_outage,
);

/// A PIN no log line could hold by chance.
const PIN: &str = "pin-Qv7xR2mZ";

/// A SoftHSM2 installation of one test: its configuration, its token
/// directory and one initialised token.
struct SoftHsm {
    dir: tempfile::TempDir,
    module: PathBuf,
}

const TOKEN: &str = "eventvault-test";

/// Whether SoftHSM2 is here; without it a test says so and passes, unless
/// `EVENTVAULT_REQUIRE_SOFTHSM=1`.
pub fn softhsm_available() -> bool {
    let module = softhsm_module();
    let util = std::process::Command::new("softhsm2-util")
        .arg("--version")
        .output();
    if module.exists() && util.is_ok() {
        return true;
    }
    assert!(
        std::env::var("EVENTVAULT_REQUIRE_SOFTHSM").as_deref() != Ok("1"),
        "SoftHSM2 is required (EVENTVAULT_REQUIRE_SOFTHSM=1) but {} or softhsm2-util is missing",
        module.display()
    );
    eprintln!("SKIPPED: SoftHSM2 is not installed (apt-get install softhsm2)");
    false
}

/// SoftHSM2's PKCS#11 module: `EVENTVAULT_TEST_PKCS11_MODULE`, or Debian's.
pub fn softhsm_module() -> PathBuf {
    PathBuf::from(
        std::env::var("EVENTVAULT_TEST_PKCS11_MODULE")
            .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into()),
    )
}

impl SoftHsm {
    /// A token labelled [`TOKEN`] with user PIN [`PIN`], or `None` (the
    /// test passes, saying why) without SoftHSM2.
    fn new() -> Option<SoftHsm> {
        if !softhsm_available() {
            return None;
        }
        let module = softhsm_module();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        let hsm = SoftHsm { dir, module };
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", hsm.conf())
            .args(["--init-token", "--free", "--label", TOKEN, "--so-pin"])
            .arg("so-Lw4pT9")
            .args(["--pin", PIN])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        remember_secret(PIN);
        Some(hsm)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// `cmd` with this token's configuration, module and PIN.
    fn apply<'a>(
        &self,
        cmd: &'a mut tokio::process::Command,
        pin: &str,
    ) -> &'a mut tokio::process::Command {
        cmd.env("SOFTHSM2_CONF", self.conf())
            .env("EVENTVAULT_PKCS11_MODULE", &self.module)
            .env("EVENTVAULT_PKCS11_PIN", pin)
    }

    /// The binary on `env` with `args` (global flags first, then the
    /// command's), the master key at `uri`.
    fn command(&self, env: &TestEnv, uri: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = command(env, args);
        cmd.args(["--master-key-uri", uri]);
        self.apply(&mut cmd, PIN);
        cmd
    }

    async fn run(&self, env: &TestEnv, uri: &str, args: &[&str]) -> (bool, String, String) {
        output(self.command(env, uri, args)).await
    }

    async fn serve(&self, env: &TestEnv, uri: &str) -> ServerProcess {
        ServerProcess::start_command(
            env,
            self.command(env, uri, &["serve", "--listen", "127.0.0.1:0"]),
        )
        .await
        .expect("eventvault starts with its master key on the token")
    }

    /// What `pkcs11-tool` (OpenSC), a program apart from the service, says
    /// of the token's secret keys; `None` when it is not installed.
    fn secret_keys(&self) -> Option<String> {
        let out = std::process::Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", self.conf())
            .arg("--module")
            .arg(&self.module)
            .args(["--token-label", TOKEN, "--login", "--pin", PIN])
            .args(["--list-objects", "--type", "secrkey"])
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

async fn output(mut cmd: tokio::process::Command) -> (bool, String, String) {
    let out = cmd.output().await.expect("run eventvault");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn uri(object: &str) -> String {
    format!("pkcs11:token={TOKEN};object={object}")
}

/// Appends one deposit for each subject through `server`.
async fn deposits(env: &Arc<TestEnv>, server: &ServerProcess, subjects: &[String]) {
    let app = TestApp::client_for(env.clone(), server.base.clone());
    for s in subjects {
        app.append_ok(
            &format!("accounts-{s}"),
            &batch(vec![deposit(Uuid::new_v4(), s, "12.50")]),
        )
        .await;
    }
}

/// Every event of the global log, read through `server`, opened: their
/// personal data decrypted.
async fn all_decrypted(env: &Arc<TestEnv>, server: &ServerProcess, expected: usize) {
    let app = TestApp::client_for(env.clone(), server.base.clone());
    let events = app.whole_log().await;
    assert_eq!(events.len(), expected);
    for e in &events {
        assert_eq!(e["personal_data"], "decrypted", "{e}");
    }
}

fn subjects(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("cust-{i}")).collect()
}

async fn a_master_key_on_a_token_wraps_every_data_key_and_never_leaves_it(backend: Backend) {
    let Some(hsm) = SoftHsm::new() else { return };
    let env = TestEnv::new(&backend).await;
    let kek = uri("kek-1");
    let server = hsm.serve(&env, &kek).await;
    let people = subjects(4);
    deposits(&env, &server, &people).await;
    all_decrypted(&env, &server, people.len()).await;
    server.terminate().await;
    // No master key file: the key is on the token, created there by the
    // first start, sensitive and never extractable.
    assert!(!env.master_key_file().exists());
    assert!(!env.dir.path().join("keys/master.key").exists());
    if let Some(keys) = hsm.secret_keys() {
        assert!(
            keys.contains("kek-1") && keys.contains("AES length 32"),
            "{keys}"
        );
        assert!(keys.contains("never extractable"), "{keys}");
        assert!(keys.contains("sensitive"), "{keys}");
    }
    // `keys status` names the key by its URI, as configured.
    let (ok, status, err) = hsm.run(&env, &kek, &["keys", "status"]).await;
    assert!(ok, "{err}");
    assert!(
        status.contains(&format!("\t{kek}\t4 data keys (configured)")),
        "{status}"
    );
    assert!(!status.contains(PIN) && !err.contains(PIN));
    // A second start finds the key (no second one is made) and opens every
    // data key with it, on a cold cache.
    let server = hsm.serve(&env, &kek).await;
    all_decrypted(&env, &server, people.len()).await;
    server.terminate().await;
    if let Some(keys) = hsm.secret_keys() {
        assert_eq!(keys.matches("Secret Key Object").count(), 1, "{keys}");
    }
}

async fn a_start_that_cannot_use_the_token_names_the_problem_and_never_the_pin(backend: Backend) {
    let Some(hsm) = SoftHsm::new() else { return };
    let env = TestEnv::new(&backend).await;
    let kek = uri("kek-1");
    let serve = ["serve", "--listen", "127.0.0.1:0"];
    let refused = |(ok, out, err): (bool, String, String), says: &str| {
        assert!(!ok, "the start must fail: {out}");
        assert!(
            err.contains(says),
            "stderr names the problem ({says}): {err}"
        );
        assert!(!err.contains(PIN) && !out.contains(PIN), "the PIN is shown");
    };
    // A wrong PIN (itself never printed either).
    let mut cmd = hsm.command(&env, &kek, &serve);
    hsm.apply(&mut cmd, "wrong-Zp81");
    let (ok, out, err) = output(cmd).await;
    assert!(!err.contains("wrong-Zp81"));
    refused((ok, out, err), "PIN of token \"eventvault-test\" is wrong");
    // No PIN at all.
    let mut cmd = hsm.command(&env, &kek, &serve);
    cmd.env_remove("EVENTVAULT_PKCS11_PIN");
    refused(
        output(cmd).await,
        "set its user PIN in EVENTVAULT_PKCS11_PIN",
    );
    // A module that is not there.
    let mut cmd = hsm.command(&env, &kek, &serve);
    cmd.env("EVENTVAULT_PKCS11_MODULE", "/nonexistent/libpkcs11.so");
    refused(
        output(cmd).await,
        "cannot load the PKCS#11 module /nonexistent/libpkcs11.so",
    );
    // No module named.
    let mut cmd = hsm.command(&env, &kek, &serve);
    cmd.env_remove("EVENTVAULT_PKCS11_MODULE");
    refused(output(cmd).await, "--pkcs11-module");
    // A token that is not there.
    refused(
        hsm.run(&env, "pkcs11:token=no-such-token;object=kek-1", &serve)
            .await,
        "no token labelled \"no-such-token\" is present",
    );
    // A PIN in the URI is refused before anything is tried.
    refused(
        hsm.run(&env, &format!("{kek}?pin-value={PIN}"), &serve)
            .await,
        "the PIN is never part of the URI",
    );
    // The environment's master key and a token at once: ambiguous.
    let mut cmd = hsm.command(&env, &kek, &serve);
    cmd.env(
        "EVENTVAULT_MASTER_KEY",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    );
    refused(output(cmd).await, "unset one of them");
    // None of these created a key, a file, or a store the next start trips on.
    assert!(!env.master_key_file().exists());
    let server = hsm.serve(&env, &kek).await;
    server.terminate().await;
}

async fn rotation_moves_the_keys_from_a_file_to_a_token_and_between_keys_on_tokens(
    backend: Backend,
) {
    let Some(hsm) = SoftHsm::new() else { return };
    let env = TestEnv::new(&backend).await;
    let people = subjects(6);
    // A store whose master key is a file.
    let server = ServerProcess::start(&env).await.unwrap();
    deposits(&env, &server, &people).await;
    server.terminate().await;
    let file = format!("file:{}", env.master_key_file().display());

    // File → token, in batches of 2, with progress.
    let first = uri("kek-2026");
    let mut cmd = command(
        &env,
        &["keys", "rotate-kek", "--batch-size", "2", "--to", &first],
    );
    hsm.apply(&mut cmd, PIN);
    let (ok, out, err) = output(cmd).await;
    assert!(ok, "{err}");
    assert!(err.contains("re-wrapping data keys: 2/6"), "{err}");
    assert!(err.contains("re-wrapping data keys: 6/6"), "{err}");
    assert!(out.contains("6 data keys re-wrapped"), "{out}");
    assert!(out.contains(&format!("--master-key-uri {first}")), "{out}");
    // The file's key no longer opens the keystore; the token's does.
    let (ok, _, err) = output(command(&env, &["serve", "--listen", "127.0.0.1:0"])).await;
    assert!(!ok && err.contains("does not open this keystore"), "{err}");
    let server = hsm.serve(&env, &first).await;
    all_decrypted(&env, &server, people.len()).await;
    server.terminate().await;
    let (_, status, _) = hsm.run(&env, &first, &["keys", "status"]).await;
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(
        status.contains(&format!("\t{first}\t6 data keys (configured)")),
        "{status}"
    );
    assert!(!status.contains(&file), "{status}");

    // Token key → another token key, killed after its first batch.
    let second = uri("kek-2027");
    let mut child = hsm
        .command(
            &env,
            &first,
            &["keys", "rotate-kek", "--batch-size", "1", "--to", &second],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut progress = child.stderr.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("re-wrapping data keys: 1/6") {
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), progress.read(&mut buf))
            .await
            .expect("the rotation makes progress")
            .unwrap();
        assert!(n > 0, "the rotation ended before its first batch: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // Half-way, neither key starts the service: the message says how to
    // finish.
    for configured in [&first, &second] {
        let (ok, _, err) = hsm
            .run(&env, configured, &["serve", "--listen", "127.0.0.1:0"])
            .await;
        assert!(!ok, "a start half-way through a rotation");
        assert!(
            err.contains("a rotation between them is unfinished"),
            "{err}"
        );
    }
    // Run again, it finishes what is left.
    let (ok, out, err) = hsm
        .run(&env, &first, &["keys", "rotate-kek", "--to", &second])
        .await;
    assert!(ok, "{err}");
    let rewrapped: u64 = out
        .split(" data keys re-wrapped")
        .next()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!((1..=5).contains(&rewrapped), "the rest only: {out}");
    let server = hsm.serve(&env, &second).await;
    all_decrypted(&env, &server, people.len()).await;
    server.terminate().await;
    let (_, status, _) = hsm.run(&env, &second, &["keys", "status"]).await;
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(
        status.contains(&format!("\t{second}\t6 data keys (configured)")),
        "{status}"
    );
    if let Some(keys) = hsm.secret_keys() {
        // Both keys stay on the token: the old one is the operator's to
        // destroy once no backup it opens is kept.
        assert!(
            keys.contains("kek-2026") && keys.contains("kek-2027"),
            "{keys}"
        );
    }
}

async fn a_wrapped_key_altered_in_the_keystore_is_an_integrity_failure_not_an_outage(
    backend: Backend,
) {
    let Some(hsm) = SoftHsm::new() else { return };
    let env = TestEnv::new(&backend).await;
    let kek = uri("kek-1");
    let server = hsm.serve(&env, &kek).await;
    deposits(&env, &server, &subjects(1)).await;
    server.terminate().await;
    // The tag of the wrapped key is zeroed behind the service's back.
    let ks = keystore_db(&env).await;
    let select = "select key_id, wrapped from deks";
    let (id, mut wrapped): (String, Vec<u8>) = match &ks {
        eventvault::store::Db::Sqlite(p) => sqlx::query_as(select).fetch_one(p).await,
        eventvault::store::Db::Postgres(p) => sqlx::query_as(select).fetch_one(p).await,
    }
    .unwrap();
    let n = wrapped.len();
    wrapped[n - 16..].fill(0);
    let update = "update deks set wrapped = $1 where key_id = $2";
    let altered = match &ks {
        eventvault::store::Db::Sqlite(p) => sqlx::query(update)
            .bind(wrapped)
            .bind(id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()),
        eventvault::store::Db::Postgres(p) => sqlx::query(update)
            .bind(wrapped)
            .bind(id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()),
    };
    assert_eq!(altered.unwrap(), 1);
    ks.close().await;
    let server = hsm.serve(&env, &kek).await;
    let app = TestApp::client_for(env.clone(), server.base.clone());
    let (status, body) = app
        .request(reqwest::Method::GET, "/streams/accounts-cust-0/events")
        .token(&app.token())
        .send()
        .await;
    // The token said the blob does not open: a 500 that discloses nothing,
    // not a 503 that would have clients retry forever.
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert!(!body.contains("cust-0"), "{problem}");
    server.terminate().await;
}
