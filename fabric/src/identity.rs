//! Fabric identity and TLS: loads the fabric CA and this peer's certificate chain and
//! key, builds the gateway's server config (client certificate required) and the
//! outbound client configs (SNI = peer name, remote SAN must equal that name), and
//! reloads the files when they change without touching live tunnels.
//! A peer's identity is the first DNS SAN of its certificate, in lower case (DNS
//! names compare without case, Kubernetes names are lower case); `same_peer` is the
//! one comparison of two names.
//! It never accepts a chain that does not lead to the fabric CA, and a bad new file
//! never replaces a good loaded one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::sync::watch;

use crate::wire::{ALPN_H2, ALPN_HTTP11, ALPN_MUX, ALPN_MUX2};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM {what} found")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: bad PEM: {source}")]
    Pem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: {source}")]
    Rustls {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("peer certificate: {0}")]
    Certificate(String),
    #[error("building TLS verifier: {0}")]
    Verifier(String),
}

/// Where the fabric CA, the peer chain and its key live.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One loaded, validated set of certificates with the TLS configs built from it.
pub struct Material {
    /// This peer's name: the first DNS SAN of its certificate.
    pub identity: String,
    pub not_after: i64,
    /// Bumped on every successful reload; pooled tunnels of older generations take no
    /// new streams.
    pub generation: u64,
    pub server: Arc<ServerConfig>,
    /// Outbound config offering h2 and http/1.1.
    pub client_h2: Arc<ClientConfig>,
    /// Offers `clusterlink-mux/1`, then h2 and HTTP/1.1.
    pub client_mux: Arc<ClientConfig>,
    /// Outbound config offering only http/1.1 (peers known not to tunnel over h2).
    pub client_h1: Arc<ClientConfig>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .field("generation", &self.generation)
            .finish()
    }
}

/// The crypto provider: ring, measured 1.85x faster than aws-lc-rs for AES-GCM on the
/// machines we run on (../shared/reference/perf-notes.md).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let data = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads a PKCS#1, PKCS#8 or SEC1 private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let data = read(path)?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => Error::Empty {
            path: path.to_owned(),
            what: "private key",
        },
        source => Error::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

/// Whether two peer names are the same peer: DNS names compare without ASCII case.
pub fn same_peer(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The identity of a certificate: its first DNS SAN, in lower case.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<String, Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::Certificate(format!("unparsable certificate: {e}")))?;
    first_dns_san(&parsed).ok_or_else(|| Error::Certificate("certificate has no DNS SAN".into()))
}

fn first_dns_san(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
        _ => None,
    })
}

pub(crate) fn roots(
    ca: &[CertificateDer<'static>],
    path: &Path,
) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for cert in ca {
        store.add(cert.clone()).map_err(|source| Error::Rustls {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(store))
}

impl Material {
    /// Loads and validates the three files: the key must match the certificate, and
    /// the chain must verify against the fabric CA for the certificate's own name.
    pub fn load(paths: &CertPaths, generation: u64) -> Result<Self, Error> {
        let provider = provider();
        let ca = load_certs(&paths.ca)?;
        let chain = load_certs(&paths.cert)?;
        let key = load_key(&paths.key)?;
        let roots = roots(&ca, &paths.ca)?;
        let leaf = chain[0].clone();
        let identity = identity_of(&leaf)?;
        let not_after = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .unwrap_or(0);

        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|source| Error::Rustls {
                path: paths.key.clone(),
                source,
            })?;
        let certified = CertifiedKey::new(chain.clone(), signer);
        certified.keys_match().map_err(|source| Error::Rustls {
            path: paths.key.clone(),
            source,
        })?;

        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| Error::Verifier(e.to_string()))?;
        // Our own chain must be one a remote peer would accept.
        let name = ServerName::try_from(identity.clone())
            .map_err(|e| Error::Certificate(format!("identity {identity:?}: {e}")))?;
        server_verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map_err(|e| {
                Error::Certificate(format!(
                    "{} does not verify against the fabric CA {}: {e}",
                    paths.cert.display(),
                    paths.ca.display()
                ))
            })?;

        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| Error::Verifier(e.to_string()))?;
        let certified = Arc::new(certified);
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Error::Verifier(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                certified.clone(),
            )));
        server.alpn_protocols = vec![
            ALPN_MUX2.to_vec(),
            ALPN_MUX.to_vec(),
            ALPN_H2.to_vec(),
            ALPN_HTTP11.to_vec(),
        ];
        // One resumption ticket per connection: pooled h2 tunnels rarely need it, but
        // peers that tunnel over HTTP/1.1 make a TLS connection per tunnel, and a
        // resumed handshake costs about half a full one (perf-notes). The session
        // cache belongs to this config, so rotated certificates start afresh.
        server.send_tls13_tickets = 1;

        let verifier = Arc::new(PeerNameVerifier {
            inner: server_verifier,
        });
        let client = |alpn: Vec<Vec<u8>>| -> Result<Arc<ClientConfig>, Error> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| Error::Verifier(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    certified.clone(),
                )));
            c.alpn_protocols = alpn;
            Ok(Arc::new(c))
        };
        Ok(Material {
            identity,
            not_after,
            generation,
            server: Arc::new(server),
            client_h2: client(vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()])?,
            client_mux: client(vec![
                ALPN_MUX2.to_vec(),
                ALPN_MUX.to_vec(),
                ALPN_H2.to_vec(),
                ALPN_HTTP11.to_vec(),
            ])?,
            client_h1: client(vec![ALPN_HTTP11.to_vec()])?,
        })
    }
}

/// Verifies the server chain against the fabric CA (webpki, which also checks that the
/// SNI name is among the SANs) and then that the server's identity, its first DNS SAN,
/// is exactly the peer we dialed.
#[derive(Debug)]
pub(crate) struct PeerNameVerifier {
    pub(crate) inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for PeerNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let expected = match server_name {
            ServerName::DnsName(name) => name.as_ref().to_owned(),
            _ => {
                return Err(rustls::Error::General(
                    "peer name must be a DNS name".into(),
                ))
            }
        };
        match identity_of(end_entity) {
            Ok(id) if same_peer(&id, &expected) => Ok(ServerCertVerified::assertion()),
            Ok(id) => Err(rustls::Error::General(format!(
                "remote identity {id:?} is not the peer {expected:?}"
            ))),
            Err(e) => Err(rustls::Error::General(e.to_string())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The identity a verified remote presented (first DNS SAN of its leaf).
pub fn remote_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| identity_of(c).ok())
}

pub(crate) fn stamp(paths: &CertPaths) -> Vec<Option<(SystemTime, u64)>> {
    [&paths.ca, &paths.cert, &paths.key]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// What a reload attempt reports: the new material, or why the files were refused.
pub type OnReload = Box<dyn Fn(Result<&Material, &Error>) + Send + Sync>;

/// Loads the certificates once and returns a watch channel that a background task
/// keeps up to date when the files change. Live tunnels keep the material they were
/// established with; only new handshakes see the new one. `on_reload` hears about
/// the first load and every reload attempt (for metrics).
pub fn watch_files(
    paths: CertPaths,
    interval: Duration,
    on_reload: OnReload,
) -> Result<watch::Receiver<Arc<Material>>, Error> {
    let first = Material::load(&paths, 1)?;
    on_reload(Ok(&first));
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut last = stamp(&paths);
        let mut generation = 1;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if tx.is_closed() {
                return;
            }
            let now = stamp(&paths);
            if now == last {
                continue;
            }
            last = now;
            match Material::load(&paths, generation + 1) {
                Ok(m) => {
                    generation += 1;
                    tracing::info!(identity = %m.identity, generation, "certificates reloaded");
                    on_reload(Ok(&m));
                    tx.send_replace(Arc::new(m));
                }
                Err(e) => {
                    tracing::error!(error = %e, "certificate reload failed; keeping the loaded certificates");
                    on_reload(Err(&e));
                }
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    //! Fixtures in tests/fixtures were made once with openssl (100-year validity), so
    //! that the key formats rcgen cannot write are covered: SEC1 (`EC PRIVATE KEY`)
    //! and PKCS#1 (`RSA PRIVATE KEY`). They protect nothing.
    use super::*;

    type R = Result<(), Box<dyn std::error::Error>>;

    const CA: &str = include_str!("../tests/fixtures/ca.pem");
    const EC: &str = include_str!("../tests/fixtures/ec.pem");
    const EC_SEC1: &str = include_str!("../tests/fixtures/ec-sec1.key");
    const EC_PKCS8: &str = include_str!("../tests/fixtures/ec-pkcs8.key");
    const RSA: &str = include_str!("../tests/fixtures/rsa.pem");
    const RSA_PKCS1: &str = include_str!("../tests/fixtures/rsa-pkcs1.key");

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn files(
        tag: &str,
        ca: &str,
        chain: &str,
        key: &str,
    ) -> Result<(Dir, CertPaths), std::io::Error> {
        let dir = std::env::temp_dir().join(format!("cl-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = CertPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&p.ca, ca)?;
        std::fs::write(&p.cert, chain)?;
        std::fs::write(&p.key, key)?;
        Ok((Dir(dir), p))
    }

    #[test]
    fn loads_sec1_pkcs8_and_pkcs1_keys() -> R {
        for (tag, cert, key, name) in [
            ("sec1", EC, EC_SEC1, "peer-ec"),
            ("pkcs8", EC, EC_PKCS8, "peer-ec"),
            ("pkcs1", RSA, RSA_PKCS1, "peer-rsa"),
        ] {
            let (_d, p) = files(tag, CA, &format!("{cert}{CA}"), key)?;
            let m = Material::load(&p, 1)?;
            // The identity is the first DNS SAN, even with more than one.
            assert_eq!(m.identity, name, "{tag}");
            assert!(m.not_after > 0);
        }
        Ok(())
    }

    #[test]
    fn refuses_a_key_that_is_not_the_certificates() -> R {
        let (_d, p) = files("mismatch", CA, EC, RSA_PKCS1)?;
        assert!(Material::load(&p, 1).is_err());
        Ok(())
    }

    #[test]
    fn refuses_a_chain_from_another_ca() -> R {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let other = params.self_signed(&rcgen::KeyPair::generate()?)?.pem();
        let (_d, p) = files("otherca", &other, EC, EC_SEC1)?;
        match Material::load(&p, 1) {
            Err(Error::Certificate(m)) => assert!(m.contains("does not verify"), "{m}"),
            other => panic!("expected a verification error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn garbage_files_are_errors_not_panics() -> R {
        for (tag, ca, cert, key) in [
            ("empty", "", "", ""),
            ("text", "hello", "world", "!"),
            ("nokey", CA, EC, ""),
            ("truncated", CA, &EC[..EC.len() / 2], EC_SEC1),
        ] {
            let (_d, p) = files(tag, ca, cert, key)?;
            assert!(Material::load(&p, 1).is_err(), "{tag}");
        }
        let missing = CertPaths {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        assert!(matches!(
            Material::load(&missing, 1),
            Err(Error::Read { .. })
        ));
        Ok(())
    }

    #[test]
    fn peer_names_compare_without_case() {
        assert!(same_peer("peer-a", "Peer-A"));
        assert!(!same_peer("peer-a", "peer-b"));
    }

    #[test]
    fn the_remote_must_be_the_peer_dialed() -> R {
        let roots = roots(&load_certs_from(CA)?, Path::new("ca"))?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider()).build()?;
        let v = PeerNameVerifier { inner };
        let leaf = load_certs_from(EC)?.remove(0);
        let now = UnixTime::now();
        assert!(v
            .verify_server_cert(&leaf, &[], &ServerName::try_from("peer-ec")?, &[], now)
            .is_ok());
        // The certificate also lists other.example, but its identity is peer-ec.
        assert!(v
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from("other.example")?,
                &[],
                now
            )
            .is_err());
        assert!(v
            .verify_server_cert(&leaf, &[], &ServerName::try_from("peer-x")?, &[], now)
            .is_err());
        Ok(())
    }

    fn load_certs_from(
        pem: &str,
    ) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
    }
}
