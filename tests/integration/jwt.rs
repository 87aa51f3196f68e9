//! Callers from the identity provider: bearer JWTs signed with real RSA
//! (made by the `openssl` CLI), P-256 and Ed25519 keys (made by ring),
//! their JWK set served by a real HTTP server on 127.0.0.1 (URL mode) or
//! from a file; accepted tokens, every kind of bad one refused the same
//! way and audited, the reload for an unknown kid and its bounds, and a
//! subscription that ends with its token.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use ring::signature::KeyPair as _;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::both_backends;
use crate::common::{Backend, TestApp, TestEnv, batch, command, deposit, remember_secret};
use crate::subscribe::{Subscriber, ended_and_recorded};
use eventvault::jwt::JwtConfig;

both_backends!(
    rsa_ec_and_ed25519_tokens_read_and_append_with_the_roles_they_name,
    every_bad_token_is_the_same_audited_401,
    an_unknown_kid_reloads_the_key_set_once_and_a_rotated_key_is_accepted,
    a_key_set_that_cannot_be_fetched_keeps_the_last_good_one,
    a_stalled_key_set_server_delays_only_the_unknown_kid,
    a_jwt_callers_subscription_ends_when_its_token_expires,
);

const ISSUER: &str = "https://idp.bank.example/realms/staff";
const AUDIENCE: &str = "eventvault";
/// How long a test waits for what it waits on.
const PATIENCE: Duration = Duration::from_secs(20);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// One signing key of the identity provider, and its public JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key as PEM (RSA only): the HMAC secret of the classic
    /// confusion attack.
    public_pem: Option<Vec<u8>>,
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl CLI runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Base64 of every line of a PEM body: none may be logged.
fn remember_pem(pem: &[u8]) {
    for line in String::from_utf8_lossy(pem).lines() {
        if !line.starts_with("-----") && line.len() > 16 {
            remember_secret(line);
        }
    }
}

impl SigningKey {
    /// A fresh 2048-bit RSA key (RS256, or PS256 when the JWK says so).
    fn rsa(dir: &Path, kid: &str, alg: Algorithm) -> Self {
        let path = dir.join(format!("{kid}.pem"));
        let path = path.to_str().unwrap();
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            path,
        ]);
        let private = std::fs::read(path).unwrap();
        remember_pem(&private);
        let modulus =
            String::from_utf8(openssl(&["rsa", "-in", path, "-noout", "-modulus"])).unwrap();
        let modulus = hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap();
        let public_pem = openssl(&["pkey", "-in", path, "-pubout"]);
        let mut jwk = json!({
            "kty": "RSA", "kid": kid, "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(&modulus), "e": "AQAB",
        });
        if alg == Algorithm::PS256 {
            jwk["alg"] = json!("PS256");
        }
        SigningKey {
            kid: kid.into(),
            alg,
            encoding: EncodingKey::from_rsa_pem(&private).unwrap(),
            jwk,
            public_pem: Some(public_pem),
        }
    }

    fn p256(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        remember_secret(&STANDARD.encode(pkcs8.as_ref()));
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        // The uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({
                "kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            }),
            public_pem: None,
        }
    }

    fn ed25519(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        remember_secret(&STANDARD.encode(pkcs8.as_ref()));
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk: json!({
                "kty": "OKP", "kid": kid, "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
            }),
            public_pem: None,
        }
    }

    /// A token over `claims` signed by this key, with its `kid` and alg.
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        remembered(jsonwebtoken::encode(&header, claims, &self.encoding).unwrap())
    }

    /// The same with another `kid` in the header.
    fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.into());
        remembered(jsonwebtoken::encode(&header, claims, &self.encoding).unwrap())
    }
}

/// A token, and its signature alone, may never be logged.
fn remembered(token: String) -> String {
    remember_secret(&token);
    if let Some((_, signature)) = token.rsplit_once('.')
        && signature.len() > 16
    {
        remember_secret(signature);
    }
    token
}

fn jwks(keys: &[&SigningKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

/// Valid claims for `sub` with `roles`, for a token issued now that
/// expires in ten minutes.
fn claims(sub: &str, roles: Value) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "roles": roles,
        "iat": now(), "nbf": now(), "exp": now() + 600,
    })
}

/// How the test's JWK set server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serve,
    /// Takes the request and never answers.
    Stall,
}

/// The identity provider's JWK set over real HTTP on 127.0.0.1: what it
/// serves can change, and it counts the fetches.
struct JwksServer {
    url: String,
    document: Arc<Mutex<Value>>,
    mode: Arc<Mutex<Mode>>,
    fetches: Arc<AtomicUsize>,
    /// Moves with every fetch, so that a test can wait for one.
    fetched: tokio::sync::watch::Receiver<usize>,
    /// The accept loop; it owns the connections, so aborting it closes
    /// them all (the server is gone).
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(document: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let document = Arc::new(Mutex::new(document));
        let mode = Arc::new(Mutex::new(Mode::Serve));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (tell, fetched) = tokio::sync::watch::channel(0);
        let tell = Arc::new(tell);
        let (d, m, f) = (document.clone(), mode.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (d, m, f, tell) = (d.clone(), m.clone(), f.clone(), tell.clone());
                let service = hyper::service::service_fn(move |_req| {
                    let (d, m, f, tell) = (d.clone(), m.clone(), f.clone(), tell.clone());
                    async move {
                        let n = f.fetch_add(1, Ordering::SeqCst) + 1;
                        tell.send_replace(n);
                        let mode = *m.lock().unwrap();
                        if mode == Mode::Stall {
                            std::future::pending::<()>().await;
                        }
                        let body = d.lock().unwrap().to_string();
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        JwksServer {
            url,
            document,
            mode,
            fetches,
            fetched,
            task,
        }
    }

    fn serve(&self, document: Value) {
        *self.document.lock().unwrap() = document;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Gone: no listener, no connection.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn jwt_config(url: Option<&str>, file: Option<&Path>) -> JwtConfig {
    JwtConfig {
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        jwks_url: url.map(String::from),
        jwks_file: file.map(PathBuf::from),
        roles_claim: "roles".into(),
    }
}

/// An application whose JWT callers' keys come from `server`.
async fn app_with_server(backend: &Backend, server: &JwksServer) -> TestApp {
    let env = TestEnv::new(backend).await;
    let config = jwt_config(Some(&server.url), None);
    env.configure(|c| c.jwt = Some(config));
    started(env).await
}

/// The application on `env`, with one event in `accounts-1` to read.
async fn started(env: Arc<TestEnv>) -> TestApp {
    let app = TestApp::start(env).await;
    app.append_ok(
        "accounts-1",
        &batch(vec![deposit(Uuid::new_v4(), "cust-1", "1.00")]),
    )
    .await;
    app
}

/// The problem+json detail of a response body.
fn detail(text: &str) -> String {
    let problem: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("{text}"));
    problem["detail"].as_str().unwrap().to_owned()
}

async fn rsa_ec_and_ed25519_tokens_read_and_append_with_the_roles_they_name(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let rs = SigningKey::rsa(dir.path(), "rs-1", Algorithm::RS256);
    let ps = SigningKey::rsa(dir.path(), "ps-1", Algorithm::PS256);
    let es = SigningKey::p256("es-1");
    let ed = SigningKey::ed25519("ed-1");
    let server = JwksServer::start(jwks(&[&rs, &ps, &es, &ed])).await;
    let app = app_with_server(&backend, &server).await;
    assert_eq!(server.fetches(), 1, "the set is fetched once at start");

    for (key, sub) in [(&rs, "alice"), (&ps, "bob"), (&es, "carol"), (&ed, "dave")] {
        let stream = format!("accounts-{sub}");
        // An array naming a role of roles.toml and one it does not define:
        // the unknown name grants nothing and is no refusal.
        let token = key.sign(&claims(sub, json!(["service", "no-such-role"])));
        let (status, text) = app
            .request(Method::POST, &format!("/streams/{stream}/events"))
            .token(&token)
            .json(&batch(vec![deposit(Uuid::new_v4(), "cust-1", "1.00")]))
            .send()
            .await;
        assert_eq!(status, StatusCode::CREATED, "{:?}: {text}", key.alg);
        let (status, text) = app.get(&format!("/streams/{stream}/events"), &token).await;
        assert_eq!(status, StatusCode::OK, "{:?}: {text}", key.alg);
        let page: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(page["events"].as_array().unwrap().len(), 1);
        // `service` does not grant the audit log.
        let (status, _) = app.get("/audit", &token).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let records = app.audit_records("action=stream.append").await;
        let appended = records
            .iter()
            .find(|r| r["resource"] == format!("stream:{stream}"))
            .expect("the append is audited");
        assert_eq!(appended["principal"], format!("jwt:{sub}"));
        assert_eq!(appended["outcome"], "ok");
    }
    // One string is one role.
    let token = es.sign(&claims("erin", json!("auditor")));
    let (status, text) = app.get("/audit?limit=1", &token).await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // Only role names the policies do not define: authenticated, and
    // granted nothing (403, audited under the caller's name).
    let token = ed.sign(&claims("mallory", json!(["superuser", "root"])));
    let (status, text) = app.get("/streams/accounts-alice/events", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    // No roles claim at all: the same.
    let mut no_roles = claims("oscar", Value::Null);
    no_roles.as_object_mut().unwrap().remove("roles");
    let (status, text) = app
        .get("/streams/accounts-alice/events", &rs.sign(&no_roles))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    let denied = app.audit_records("action=stream.read&outcome=denied").await;
    let principals: Vec<&Value> = denied.iter().map(|r| &r["principal"]).collect();
    assert_eq!(principals, [&json!("jwt:mallory"), &json!("jwt:oscar")]);
    assert_eq!(server.fetches(), 1, "known kids never fetch");
    app.stop().await;
    server.stop().await;
}

async fn every_bad_token_is_the_same_audited_401(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let rs = SigningKey::rsa(dir.path(), "rs-1", Algorithm::RS256);
    let es = SigningKey::p256("es-1");
    let ed = SigningKey::ed25519("ed-1");
    // Another key under a kid of the set: a wrong signature.
    let impostor = SigningKey::p256("es-1");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&rs, &es]).to_string()).unwrap();
    let env = TestEnv::new(&backend).await;
    let config = jwt_config(None, Some(&file));
    env.configure(|c| c.jwt = Some(config));
    let app = started(env).await;

    // A key added to the file is found by its kid: the file is read again.
    std::fs::write(&file, jwks(&[&rs, &es, &ed]).to_string()).unwrap();
    let good = claims("alice", json!(["service"]));
    let (status, text) = app.get("/streams/accounts-1/events", &ed.sign(&good)).await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // Expired, but within the leeway: accepted.
    let mut late = good.clone();
    late["exp"] = json!(now() - 30);
    let (status, text) = app.get("/streams/accounts-1/events", &rs.sign(&late)).await;
    assert_eq!(status, StatusCode::OK, "{text}");

    let with = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut c = good.clone();
        change(c.as_object_mut().unwrap());
        c
    };
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = |alg: &str| {
        remembered(format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "kid": "rs-1", "typ": "JWT"})),
            b64(&good)
        ))
    };
    // HS256 "signed" with the RSA public key's own bytes.
    let confused = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rs-1".into());
        let secret = EncodingKey::from_secret(rs.public_pem.as_ref().unwrap());
        remembered(jsonwebtoken::encode(&header, &good, &secret).unwrap())
    };
    // An ES256 key's kid with an RS256 signature: the alg is not the key's.
    let other_alg = rs.sign_as("es-1", &good);
    let bad: Vec<(&str, String)> = vec![
        ("alg none", unsigned("none")),
        ("alg None", unsigned("None")),
        ("HS256 with the public key", confused),
        ("alg is not the key's", other_alg),
        (
            "wrong issuer",
            es.sign(&with(&|c| {
                c.insert("iss".into(), json!("https://evil.example"));
            })),
        ),
        (
            "wrong audience",
            es.sign(&with(&|c| {
                c.insert("aud".into(), json!("another-service"));
            })),
        ),
        (
            "expired beyond the leeway",
            rs.sign(&with(&|c| {
                c.insert("exp".into(), json!(now() - 120));
            })),
        ),
        (
            "nbf beyond the leeway",
            rs.sign(&with(&|c| {
                c.insert("nbf".into(), json!(now() + 120));
            })),
        ),
        (
            "iat beyond the leeway",
            ed.sign(&with(&|c| {
                c.insert("iat".into(), json!(now() + 120));
            })),
        ),
        (
            "no exp",
            ed.sign(&with(&|c| {
                c.remove("exp");
            })),
        ),
        (
            "no sub",
            ed.sign(&with(&|c| {
                c.remove("sub");
            })),
        ),
        ("wrong signature", impostor.sign(&good)),
        ("unknown kid", ed.sign_as("ed-unknown", &good)),
        (
            "a tampered payload",
            ({
                let t = es.sign(&good);
                let mut parts: Vec<&str> = t.split('.').collect();
                let admin = b64(&with(&|c| {
                    c.insert("roles".into(), json!(["admin"]));
                }));
                parts[1] = &admin;
                remembered(parts.join("."))
            }),
        ),
        ("not a JWT", remembered("a.b.c".into())),
    ];
    // The detail of an unknown token of ours: the same for every JWT.
    let (status, text) = app.get("/streams/accounts-1/events", "evt_unknown").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let generic = detail(&text);
    for (what, token) in &bad {
        let (status, text) = app.get("/streams/accounts-1/events", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {text}");
        assert!(
            text.contains("urn:eventvault:problem:unauthorized"),
            "{what}: {text}"
        );
        assert_eq!(detail(&text), generic, "{what}");
    }
    // Each refusal is audited, without a principal.
    let denied: Vec<Value> = app
        .audit_records("action=stream.read&outcome=denied")
        .await
        .into_iter()
        .filter(|r| r["principal"].is_null())
        .collect();
    assert_eq!(denied.len(), bad.len() + 1, "{denied:?}");
    for r in &denied {
        assert_eq!(r["resource"], "stream:accounts-1");
    }
    // The reasons went to the debug log.
    crate::common::wait_for_log_lines(&["a bearer JWT was refused", "unknown kid"], 1, PATIENCE)
        .await;
    crate::common::wait_for_log_lines(&["a bearer JWT was refused", "expired"], 1, PATIENCE).await;
    app.stop().await;
}

async fn an_unknown_kid_reloads_the_key_set_once_and_a_rotated_key_is_accepted(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let old = SigningKey::rsa(dir.path(), "2025-11", Algorithm::RS256);
    let new = SigningKey::p256("2026-12");
    let server = JwksServer::start(jwks(&[&old])).await;
    let app = app_with_server(&backend, &server).await;
    assert_eq!(server.fetches(), 1);
    let read = |token: String| {
        let app = &app;
        async move { app.get("/streams/accounts-1/events", &token).await.0 }
    };
    // The identity provider rotates a new key in; the first token signed
    // with it makes the service fetch the set once, and is accepted.
    server.serve(jwks(&[&old, &new]));
    assert_eq!(
        read(new.sign(&claims("alice", json!(["service"])))).await,
        StatusCode::OK
    );
    assert_eq!(server.fetches(), 2);
    // Other unknown kids within 30 s, even many at once, fetch nothing.
    let unknown: Vec<_> = (0..8)
        .map(|i| read(new.sign_as(&format!("unknown-{i}"), &claims("bob", json!(["service"])))))
        .collect();
    for status in futures::future::join_all(unknown).await {
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(server.fetches(), 2, "no second fetch within 30 s");
    // Both keys serve.
    for key in [&old, &new] {
        assert_eq!(
            read(key.sign(&claims("carol", json!(["service"])))).await,
            StatusCode::OK
        );
    }
    let refused = app.audit_records("action=stream.read&outcome=denied").await;
    assert_eq!(refused.len(), 8, "every refusal is audited");
    app.stop().await;
    server.stop().await;
}

async fn a_key_set_that_cannot_be_fetched_keeps_the_last_good_one(backend: Backend) {
    let key = SigningKey::ed25519("ed-1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let app = app_with_server(&backend, &server).await;
    server.stop().await;
    // An unknown kid: the fetch fails, and the token is refused.
    let token = key.sign_as("ed-2", &claims("alice", json!(["service"])));
    let (status, _) = app.get("/streams/accounts-1/events", &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    crate::common::wait_for_log_lines(
        &["could not be loaded again; the last good one is kept"],
        1,
        PATIENCE,
    )
    .await;
    // The keys fetched before still serve.
    let token = key.sign(&claims("alice", json!(["service"])));
    let (status, text) = app.get("/streams/accounts-1/events", &token).await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // A service whose key set cannot be fetched at start does not start.
    let gone = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/jwks.json", listener.local_addr().unwrap())
    };
    let mut cfg = app.env.config();
    cfg.jwt = Some(jwt_config(Some(&gone), None));
    app.stop().await;
    let err = eventvault::app::Application::build(&cfg)
        .await
        .err()
        .expect("no start without the key set");
    let err = err.to_string();
    assert!(
        err.contains("the JWK set could not be loaded from http://127.0.0.1:"),
        "{err}"
    );
    // Nor one whose key file is not a JWK set.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, "{\"not\": \"keys\"}").unwrap();
    cfg.jwt = Some(jwt_config(None, Some(&file)));
    let err = eventvault::app::Application::build(&cfg)
        .await
        .err()
        .expect("no start without a JWK set")
        .to_string();
    assert!(err.contains("not a JWK set"), "{err}");
}

async fn a_stalled_key_set_server_delays_only_the_unknown_kid(backend: Backend) {
    let key = SigningKey::p256("es-1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let app = app_with_server(&backend, &server).await;
    *server.mode.lock().unwrap() = Mode::Stall;
    let mut fetched = server.fetched.clone();
    let unknown = key.sign_as("es-2", &claims("alice", json!(["service"])));
    let started = tokio::time::Instant::now();
    let stalled = {
        let (client, url) = (
            app.client.clone(),
            format!("{}/streams/accounts-1/events", app.base),
        );
        tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(unknown)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    // While the service waits on the stalled fetch, a token with a known
    // kid is answered at once.
    tokio::time::timeout(PATIENCE, fetched.wait_for(|n| *n >= 2))
        .await
        .expect("the unknown kid makes the service fetch")
        .unwrap();
    let known = key.sign(&claims("bob", json!(["service"])));
    let (status, text) = tokio::time::timeout(
        Duration::from_secs(3),
        app.get("/streams/accounts-1/events", &known),
    )
    .await
    .expect("a known kid does not wait for the fetch");
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(!stalled.is_finished());
    // The fetch gives up within its timeout, and the request is refused.
    let status = tokio::time::timeout(PATIENCE, stalled)
        .await
        .expect("the fetch has a timeout")
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(started.elapsed() < Duration::from_secs(10));
    app.stop().await;
    server.stop().await;
}

async fn a_jwt_callers_subscription_ends_when_its_token_expires(backend: Backend) {
    let key = SigningKey::ed25519("ed-1");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&key]).to_string()).unwrap();
    let env = TestEnv::new(&backend).await;
    let config = jwt_config(None, Some(&file));
    env.configure(|c| {
        c.jwt = Some(config);
        c.subscription_recheck = Duration::from_millis(500);
    });
    let app = started(env).await;
    // Expired 58 s ago: accepted for two more seconds of leeway.
    let mut short = claims("alice", json!(["service"]));
    short["exp"] = json!(now() - 58);
    let token = key.sign(&short);
    let mut sub = Subscriber::open(&app, "/events/subscribe", &token, &[]).await;
    assert_eq!(sub.next().await.0, 1);
    let closed = ended_and_recorded(&app, &mut sub).await;
    assert_eq!(closed["outcome"], "denied");
    assert_eq!(closed["principal"], "jwt:alice");
    app.stop().await;
}

/// Flags, variables, and what the error must say.
type StartCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

/// An operator who gives the flags (or their variables) without all that
/// goes with them gets a clear error and no service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_jwt_configuration_stops_the_binary() {
    let env = TestEnv::new(&Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&SigningKey::ed25519("ed-1")]).to_string()).unwrap();
    let file = file.to_str().unwrap();
    let cases: [StartCase; 4] = [
        (&["--jwt-issuer", ISSUER], &[], "--jwt-audience is missing"),
        (
            &[],
            &[
                ("EVENTVAULT_JWT_ISSUER", ISSUER),
                ("EVENTVAULT_JWT_AUDIENCE", AUDIENCE),
            ],
            "a key source (--jwt-jwks-url or --jwt-jwks-file) is missing",
        ),
        (
            &["--jwt-audience", AUDIENCE, "--jwt-jwks-file", file],
            &[],
            "--jwt-issuer is missing",
        ),
        (
            &[
                "--jwt-issuer",
                ISSUER,
                "--jwt-audience",
                AUDIENCE,
                "--jwt-jwks-file",
                file,
            ],
            &[("EVENTVAULT_JWT_JWKS_URL", "https://idp.example/certs")],
            "give one of --jwt-jwks-url and --jwt-jwks-file, not both",
        ),
    ];
    for (args, vars, expected) in cases {
        let mut cmd = command(&env, &["serve", "--listen", "127.0.0.1:0"]);
        cmd.args(args).envs(vars.iter().copied());
        let out = tokio::time::timeout(PATIENCE, cmd.output())
            .await
            .expect("the binary stops by itself")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {vars:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?} {vars:?}: {stderr}");
    }
}
