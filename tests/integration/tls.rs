//! HTTPS and client certificates: the service over TLS 1.3 and 1.2 only,
//! principals bound to client certificates (no token), refusals at the
//! handshake and as 401, and certificates re-read on SIGHUP without
//! dropping open connections. Every certificate comes from a CA made here
//! with rcgen: a real chain, verified as in production.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use uuid::Uuid;

use crate::both_backends;
use crate::common::{
    Backend, ServerProcess, TestApp, TestEnv, batch, capture_logs, deposit, remember_secret,
    run_ok, wait_for_log_lines,
};

both_backends!(
    https_is_served_over_tls_1_3_and_1_2_and_plain_http_gets_no_answer,
    a_bound_certificate_is_its_principal_without_a_token,
    a_certificate_of_another_ca_is_refused_at_the_handshake,
    an_unbound_certificate_without_a_token_is_refused_and_audited,
    a_token_and_a_certificate_of_different_principals_are_refused,
    a_required_client_certificate_refuses_a_handshake_without_one,
    a_removed_certificate_principals_subscription_ends,
    sighup_reloads_the_certificates_and_keeps_open_connections,
    a_peer_that_never_finishes_the_handshake_loses_its_slot,
);

const PATIENCE: Duration = Duration::from_secs(20);

/// A certificate authority of the test.
pub struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A certificate issued by a [`Pki`], with its key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn issue(&self, names: Vec<String>, cn: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let key_pem = key.serialize_pem();
        // A line of the private key: never to be logged.
        remember_secret(key_pem.lines().nth(1).unwrap());
        Issued {
            cert_pem: cert.pem(),
            key_pem,
            der: cert.der().to_vec(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Issued {
        self.issue(
            vec!["127.0.0.1".into(), "localhost".into()],
            "eventvault",
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate named `cn`.
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(vec![], cn, rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }
}

impl Issued {
    pub fn fingerprint(&self) -> String {
        eventvault::tls::fingerprint(&self.der)
    }

    /// Writes `<name>.pem` and `<name>.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    fn identity(&self) -> reqwest::Identity {
        reqwest::Identity::from_pem(format!("{}{}", self.cert_pem, self.key_pem).as_bytes())
            .unwrap()
    }
}

/// An HTTPS client trusting `pki`'s CA, presenting `identity` if given.
pub fn https_client(pki: &Pki, identity: Option<&Issued>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap());
    if let Some(i) = identity {
        builder = builder.identity(i.identity());
    }
    builder.build().unwrap()
}

/// Where a test's TLS files are.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Writes a server certificate of `pki` and the CA into `env`'s directory
/// and configures the next start with them (the CA as the client CA when
/// `client_ca`).
pub fn configure_tls(env: &TestEnv, pki: &Pki, client_ca: bool, require: bool) -> TlsFiles {
    let (cert, key) = pki.server().write(env.dir.path(), "server");
    let ca = env.dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let files = TlsFiles { cert, key, ca };
    env.configure(|c| {
        c.tls_cert = Some(files.cert.clone());
        c.tls_key = Some(files.key.clone());
        c.tls_client_ca = client_ca.then(|| files.ca.clone());
        c.require_client_cert = require;
    });
    files
}

/// Starts the service over TLS; its client trusts the CA and presents
/// `identity` (the admin token still works over it).
async fn start_tls(env: Arc<TestEnv>, pki: &Pki, identity: Option<&Issued>) -> TestApp {
    let mut app = TestApp::start(env).await;
    app.base = app.base.replace("http://", "https://");
    app.client = https_client(pki, identity);
    app
}

/// An event in `accounts-1`, so that its reads are 200.
async fn seed(app: &TestApp) {
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "1.00")]),
    )
    .await;
}

/// Binds a new principal `name` with `role` to `cert`, as an operator does.
async fn bind(env: &TestEnv, name: &str, role: &str, cert: &Issued) {
    let path = env.dir.path().join(format!("{name}-client.pem"));
    std::fs::write(&path, &cert.cert_pem).unwrap();
    let out = run_ok(
        env,
        &[
            "principal",
            "add",
            name,
            "--role",
            role,
            "--client-cert",
            path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.contains(&cert.fingerprint()), "{out}");
}

/// A TLS connection to `addr` (`https://host:port`) limited to `versions`,
/// trusting `pki`.
async fn connect(
    base: &str,
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<TlsStream<TcpStream>> {
    let addr = base.trim_start_matches("https://");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

/// The fingerprint of the certificate the server presented.
fn server_fingerprint(tls: &TlsStream<TcpStream>) -> String {
    eventvault::tls::fingerprint(&tls.get_ref().1.peer_certificates().unwrap()[0])
}

/// `GET path` on a kept-alive connection: the status (the body is read to
/// its `Content-Length`, so the connection can carry the next request).
async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
) -> std::io::Result<u16> {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|h| h.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(status)
}

async fn https_is_served_over_tls_1_3_and_1_2_and_plain_http_gets_no_answer(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let pki = Pki::new("test CA");
    configure_tls(&env, &pki, false, false);
    let app = start_tls(env, &pki, None).await;
    // Data over HTTPS, with the token as always.
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "1.00")]),
    )
    .await;
    let (status, body) = app.get("/streams/accounts-1/events", &app.token()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (version, expected) in [
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let mut tls = connect(&app.base, &pki, &[version]).await.unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        assert_eq!(get_on(&mut tls, "/healthz").await.unwrap(), 200);
    }
    // Plain HTTP on the TLS port: the handshake fails, no HTTP answer.
    let mut plain = TcpStream::connect(app.base.trim_start_matches("https://"))
        .await
        .unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let plain_http = reqwest::Client::new()
        .get(app.base.replace("https://", "http://") + "/healthz")
        .send()
        .await;
    assert!(plain_http.is_err(), "{plain_http:?}");
    app.stop().await;
}

async fn a_bound_certificate_is_its_principal_without_a_token(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let pki = Pki::new("test CA");
    configure_tls(&env, &pki, true, false);
    let teller = pki.client("teller-service");
    let app = start_tls(env, &pki, None).await;
    bind(&app.env, "teller", "service", &teller).await;
    let listed = run_ok(&app.env, &["principal", "list"]).await;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("teller\t") && l.contains(&teller.fingerprint())),
        "{listed}"
    );
    let client = https_client(&pki, Some(&teller));
    let r = client
        .post(format!("{}/streams/accounts-1/events", app.base))
        .json(&batch(vec![deposit(Uuid::new_v4(), "cust-1", "2.00")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .get(format!("{}/streams/accounts-1/events", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    let records = app.audit_records("principal=teller").await;
    let actions: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [("stream.append", "ok"), ("stream.read", "ok")],
        "{records:?}"
    );
    app.stop().await;
}

async fn a_certificate_of_another_ca_is_refused_at_the_handshake(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let pki = Pki::new("test CA");
    configure_tls(&env, &pki, true, false);
    let app = start_tls(env, &pki, None).await;
    let stranger = Pki::new("another CA").client("teller-service");
    // Bound or not, a certificate the CA did not sign never gets in.
    bind(&app.env, "teller", "service", &stranger).await;
    let refused = https_client(&pki, Some(&stranger))
        .get(format!("{}/streams/accounts-1/events", app.base))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    // No request reached the service.
    assert!(app.audit_records("principal=teller").await.is_empty());
    app.stop().await;
}

/// The records of `GET /streams/accounts-1/events` refused without a
/// principal.
async fn refused_reads(app: &TestApp) -> Vec<Value> {
    app.audit_records("action=stream.read&outcome=denied")
        .await
        .into_iter()
        .filter(|r| r["principal"].is_null())
        .collect()
}

async fn an_unbound_certificate_without_a_token_is_refused_and_audited(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let pki = Pki::new("test CA");
    configure_tls(&env, &pki, true, false);
    let app = start_tls(env, &pki, None).await;
    seed(&app).await;
    let nobody = pki.client("nobody");
    let client = https_client(&pki, Some(&nobody));
    let r = client
        .get(format!("{}/streams/accounts-1/events", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body = r.text().await.unwrap();
    assert!(body.contains("bound to no principal"), "{body}");
    assert_eq!(refused_reads(&app).await.len(), 1);
    // A valid token over the same unbound certificate is the token's
    // principal.
    let r = client
        .get(format!("{}/streams/accounts-1/events", app.base))
        .bearer_auth(app.token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
}

async fn a_token_and_a_certificate_of_different_principals_are_refused(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let pki = Pki::new("test CA");
    configure_tls(&env, &pki, true, false);
    let teller = pki.client("teller-service");
    let app = start_tls(env, &pki, None).await;
    seed(&app).await;
    bind(&app.env, "teller", "service", &teller).await;
    let client = https_client(&pki, Some(&teller));
    let read = |token: Option<String>| {
        let mut req = client.get(format!("{}/streams/accounts-1/events", app.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status() }
    };
    // The admin's token from the teller's machine: refused.
    assert_eq!(read(Some(app.token())).await, StatusCode::UNAUTHORIZED);
    assert_eq!(refused_reads(&app).await.len(), 1);
    assert_eq!(read(None).await, StatusCode::OK);
    app.stop().await;
}

async fn a_required_client_certificate_refuses_a_handshake_without_one(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let pki = Pki::new("test CA");
    configure_tls(&env, &pki, true, true);
    let teller = pki.client("teller-service");
    // The harness's own client (audit reads with the admin token) presents
    // a certificate bound to nobody.
    let app = start_tls(env, &pki, Some(&pki.client("operator"))).await;
    seed(&app).await;
    bind(&app.env, "teller", "service", &teller).await;
    let without = https_client(&pki, None)
        .get(format!("{}/healthz", app.base))
        .send()
        .await;
    assert!(without.is_err(), "{without:?}");
    let with = https_client(&pki, Some(&teller))
        .get(format!("{}/streams/accounts-1/events", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), StatusCode::OK);
    assert_eq!(app.audit_records("principal=teller").await.len(), 1);
    app.stop().await;
}

async fn a_removed_certificate_principals_subscription_ends(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    env.configure(|c| c.subscription_recheck = Duration::from_millis(500));
    let pki = Pki::new("test CA");
    configure_tls(&env, &pki, true, false);
    let teller = pki.client("teller-service");
    let app = start_tls(env, &pki, None).await;
    bind(&app.env, "teller", "service", &teller).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "3.00")]),
    )
    .await;
    let r = https_client(&pki, Some(&teller))
        .get(format!("{}/events/subscribe", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.bytes_stream();
    use futures::StreamExt;
    // The event arrives (after whatever the stream sends first).
    tokio::time::timeout(PATIENCE, async {
        let mut seen = String::new();
        while !seen.contains("data:") {
            let chunk = body.next().await.expect("the stream is open").unwrap();
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the first event");
    run_ok(&app.env, &["principal", "remove", "teller"]).await;
    // Within the authentication cache's lifetime and one re-check.
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the subscription ended");
    let closed =
        crate::subscribe::eventually_recorded(&app, "action=log.subscribe.close", |_| true).await;
    assert_eq!(closed["outcome"], "denied");
    assert_eq!(closed["principal"], "teller");
    app.stop().await;
}

async fn a_peer_that_never_finishes_the_handshake_loses_its_slot(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let pki = Pki::new("test CA");
    configure_tls(&env, &pki, false, false);
    env.configure(|c| {
        c.max_connections = 1;
        c.header_read_timeout = Duration::from_millis(500);
    });
    let app = start_tls(env, &pki, None).await;
    // Connects and sends nothing: it holds the only slot, for a while.
    let mut silent = TcpStream::connect(app.base.trim_start_matches("https://"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the server closed the silent connection");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    // Its slot is free again.
    let mut tls = connect(&app.base, &pki, &[&rustls::version::TLS13])
        .await
        .unwrap();
    assert_eq!(get_on(&mut tls, "/healthz").await.unwrap(), 200);
    app.stop().await;
}

/// `kill -HUP` to the test's own child, by its pid.
fn sighup(server: &ServerProcess) {
    let pid = server.child.id().expect("running");
    let sent = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(sent.success());
}

async fn sighup_reloads_the_certificates_and_keeps_open_connections(backend: Backend) {
    let env = TestEnv::new(&backend).await;
    let pki = Pki::new("test CA");
    let first = pki.server();
    let (cert, key) = first.write(env.dir.path(), "server");
    let server = ServerProcess::start_with(
        &env,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await
    .expect("the service starts over TLS");
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let versions = [&rustls::version::TLS13];
    let mut open = connect(&server.base, &pki, &versions).await.unwrap();
    assert_eq!(server_fingerprint(&open), first.fingerprint());
    assert_eq!(get_on(&mut open, "/healthz").await.unwrap(), 200);

    // A new certificate and key, then the signal.
    let second = pki.server();
    second.write(env.dir.path(), "server");
    sighup(&server);
    let cert_shown = cert.display().to_string();
    wait_for_log_lines(&["reloaded the TLS certificates", &cert_shown], 1, PATIENCE).await;
    let fresh = connect(&server.base, &pki, &versions).await.unwrap();
    assert_eq!(server_fingerprint(&fresh), second.fingerprint());
    // The connection opened before still serves.
    assert_eq!(get_on(&mut open, "/healthz").await.unwrap(), 200);

    // A broken key file at the next signal: the certificates in use stay.
    std::fs::write(&key, "not a key").unwrap();
    sighup(&server);
    let key_shown = key.display().to_string();
    wait_for_log_lines(&["could not be reloaded", &key_shown], 1, PATIENCE).await;
    let still = connect(&server.base, &pki, &versions).await.unwrap();
    assert_eq!(server_fingerprint(&still), second.fingerprint());
    drop((open, fresh, still));
    assert!(server.terminate().await.success());
}

/// What the flags name is checked at start: a clear error naming the
/// file, and never what a key file holds.
#[tokio::test]
async fn tls_files_that_cannot_be_served_stop_the_start() {
    capture_logs();
    let env = TestEnv::new(&Backend::Sqlite).await;
    let pki = Pki::new("test CA");
    let server = pki.server();
    let (cert, key) = server.write(env.dir.path(), "server");
    let (_, other_key) = pki.server().write(env.dir.path(), "other");
    let start = |change: &dyn Fn(&mut eventvault::app::Config)| {
        let mut cfg = env.config();
        change(&mut cfg);
        async move {
            match eventvault::app::Application::build(&cfg).await {
                Ok(_) => panic!("the start succeeds"),
                Err(e) => e.to_string(),
            }
        }
    };
    let e = start(&|c| c.tls_cert = Some(cert.clone())).await;
    assert!(e.contains("--tls-key"), "{e}");
    let missing = env.dir.path().join("missing.pem");
    let e = start(&|c| {
        c.tls_cert = Some(missing.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    assert!(e.contains(&missing.display().to_string()), "{e}");
    let e = start(&|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(other_key.clone());
    })
    .await;
    assert!(e.contains("does not match"), "{e}");
    assert!(e.contains(&other_key.display().to_string()), "{e}");
    let e = start(&|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(cert.clone());
    })
    .await;
    assert!(e.contains("no PEM private key"), "{e}");
    let e = start(&|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.require_client_cert = true;
    })
    .await;
    assert!(e.contains("--tls-client-ca"), "{e}");
    // The server key itself parses: it was the pairing that was wrong.
    assert!(PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).is_ok());
    crate::common::assert_logs_hold_no_secret();
}
