//! TLS: the server's certificate and key and the CA client certificates
//! must chain to, read from PEM files at start and again on SIGHUP
//! ([`Certificates::reload`]), as the rustls configuration the accept loop
//! (`http::conn`) hands every new connection; and the fingerprint that binds
//! a client certificate to a principal ([`fingerprint`]).
//!
//! Only TLS 1.2 and 1.3 are spoken (rustls with ring). With a client CA,
//! client certificates are verified against it (`WebPkiClientVerifier`):
//! optional unless `require_client_cert`, when a handshake without one is
//! refused. Error messages name files, never what a key file holds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Where the PEM files are, and whether a client certificate is required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The server certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA(s) client certificates are verified against; `None`: no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// Refuse a handshake without a client certificate (needs `client_ca`).
    pub require_client_cert: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert and --tls-key go together: {given} is given without {missing}")]
    Incomplete {
        given: &'static str,
        missing: &'static str,
    },
    #[error("{flag} needs --tls-cert and --tls-key")]
    WithoutTls { flag: &'static str },
    #[error(
        "--require-client-cert needs --tls-client-ca (the CA client certificates are verified against)"
    )]
    RequireWithoutCa,
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("the private key in {key} is not usable: {reason}")]
    BadKey { key: String, reason: String },
    #[error("the private key in {key} does not match the certificate in {cert}")]
    Mismatch { key: String, cert: String },
    #[error("the client CA in {path} is not usable: {reason}")]
    BadClientCa { path: String, reason: String },
}

impl TlsFiles {
    /// The settings from the flags: `None` without TLS; an error for a
    /// combination that cannot be served.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
        require_client_cert: bool,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => {
                if require_client_cert && client_ca.is_none() {
                    return Err(TlsError::RequireWithoutCa);
                }
                Ok(Some(TlsFiles {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                    client_ca: client_ca.map(Path::to_owned),
                    require_client_cert,
                }))
            }
            (Some(_), None) => Err(TlsError::Incomplete {
                given: "--tls-cert",
                missing: "--tls-key",
            }),
            (None, Some(_)) => Err(TlsError::Incomplete {
                given: "--tls-key",
                missing: "--tls-cert",
            }),
            (None, None) if client_ca.is_some() => Err(TlsError::WithoutTls {
                flag: "--tls-client-ca",
            }),
            (None, None) if require_client_cert => Err(TlsError::WithoutTls {
                flag: "--require-client-cert",
            }),
            (None, None) => Ok(None),
        }
    }

    /// Reads the files and builds the server's configuration.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let show = |p: &Path| p.display().to_string();
        let chain = read_certificates(&self.cert)?;
        let key_bytes = read(&self.key)?;
        // The parser's error could quote what it read: not shown.
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| TlsError::NoKey {
            path: show(&self.key),
        })?;
        drop(key_bytes);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| TlsError::BadKey {
                    key: show(&self.key),
                    reason: e.to_string(),
                })?;
        let certified = rustls::sign::CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(|_| TlsError::Mismatch {
            key: show(&self.key),
            cert: show(&self.cert),
        })?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3");
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certificates(ca)? {
                    roots.add(c).map_err(|e| TlsError::BadClientCa {
                        path: show(ca),
                        reason: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if self.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| {
                    TlsError::BadClientCa {
                        path: show(ca),
                        reason: e.to_string(),
                    }
                })?)
            }
        };
        let mut config =
            builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Unreadable {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let no_certificate = || TlsError::NoCertificate {
        path: path.display().to_string(),
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| no_certificate())?;
    if certs.is_empty() {
        return Err(no_certificate());
    }
    Ok(certs)
}

/// The server's TLS configuration as it is now: every new handshake takes
/// the current one, so a reload changes what new connections see and
/// leaves the open ones as they are.
#[derive(Debug)]
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl Certificates {
    /// Reads the files once: an error stops the start.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let current = RwLock::new(files.load()?);
        Ok(Self { files, current })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").clone()
    }

    /// Whether a client certificate is asked for at all.
    pub fn asks_for_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again. On an error the configuration in use is
    /// kept (and the error returned, for the log): a half-written file at
    /// a rotation must not take the service down.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = self.files.load()?;
        *self.current.write().expect("tls lock") = fresh;
        Ok(())
    }

    /// Reloads on every SIGHUP for as long as the process runs, logging
    /// the outcome. The handler is installed now, so a SIGHUP right after
    /// the service says it listens is not lost (nor does it kill the
    /// process, SIGHUP's default).
    pub fn reload_on_sighup(self: Arc<Self>) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match self.reload() {
                    Ok(()) => tracing::info!(
                        cert = %self.files.cert.display(),
                        "SIGHUP: reloaded the TLS certificates; new connections use them"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP: the TLS certificates could not be reloaded; keeping the ones in use"
                    ),
                }
            }
        });
        Ok(())
    }
}

/// The verified client certificate of a connection, handed to every
/// request on it as an extension (`http::conn`) and read by the `Caller`
/// extractor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// [`fingerprint`] of the certificate.
    pub fingerprint: String,
}

/// The SHA-256 of a certificate's DER, in lower-case hex: what a principal
/// is bound to (`principal add --client-cert`).
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The fingerprint of the first certificate in a PEM file.
pub fn fingerprint_of_file(path: &Path) -> Result<String, TlsError> {
    let certs = read_certificates(path)?;
    Ok(fingerprint(&certs[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_that_cannot_be_served_are_refused() {
        let p = Path::new("x.pem");
        assert!(matches!(
            TlsFiles::from_flags(Some(p), None, None, false),
            Err(TlsError::Incomplete { .. })
        ));
        assert!(matches!(
            TlsFiles::from_flags(None, Some(p), None, false),
            Err(TlsError::Incomplete { .. })
        ));
        assert!(matches!(
            TlsFiles::from_flags(None, None, Some(p), false),
            Err(TlsError::WithoutTls { .. })
        ));
        assert!(matches!(
            TlsFiles::from_flags(Some(p), Some(p), None, true),
            Err(TlsError::RequireWithoutCa)
        ));
        assert!(matches!(
            TlsFiles::from_flags(None, None, None, false),
            Ok(None)
        ));
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let files = TlsFiles::from_flags(
            Some(Path::new("/nonexistent/cert.pem")),
            Some(Path::new("/nonexistent/key.pem")),
            None,
            false,
        )
        .unwrap()
        .unwrap();
        let e = files.load().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
    }
}
