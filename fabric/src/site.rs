//! TLS between the components of one peer (spec 0.2, 1.7). The control plane's gRPC
//! API hands out the token key and every snapshot, so on Kubernetes, where the two
//! planes are separate pods, it is served only to clients holding a `cl-dataplane`
//! certificate of this deployment's site CA, and a data plane talks only to a server
//! holding `cl-controlplane` from the same CA. The fabric CA plays no part: a peer
//! certificate, however valid in the fabric, opens nothing here, and a site
//! certificate opens nothing on the gateway port. Both ends speak TLS 1.3 only (they
//! are always ours) with ALPN `h2`.
//! Files are reloaded when they change (a redeploy issues a new site CA); connections
//! already made keep the configuration they were made with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;

use crate::identity::{self, identity_of, provider, CertPaths, PeerNameVerifier};
use crate::wire::ALPN_H2;

/// Subject and DNS SAN of the site certificates (spec 1.6): the name the data plane
/// dials the control plane by, and what each side checks of the other.
pub const SITE_CA_NAME: &str = "cl-ca";
pub const CONTROLPLANE_NAME: &str = "cl-controlplane";
pub const DATAPLANE_NAME: &str = "cl-dataplane";

/// The gRPC port of the control plane (spec table 0.3).
pub const CONTROLPLANE_PORT: u16 = 4444;

/// Where ClusterLink's pods mount the site files (spec 6.3): the defaults on Kubernetes.
pub const CA_PATH: &str = "/etc/ssl/certs/clink_ca.pem";
pub const CONTROLPLANE_CERT_PATH: &str = "/etc/ssl/certs/clink-controlplane.pem";
pub const CONTROLPLANE_KEY_PATH: &str = "/etc/ssl/key/clink-controlplane.pem";
pub const DATAPLANE_CERT_PATH: &str = "/etc/ssl/certs/clink-dataplane.pem";
pub const DATAPLANE_KEY_PATH: &str = "/etc/ssl/key/clink-dataplane.pem";

/// Which end of the gRPC API a component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    ControlPlane,
    DataPlane,
}

/// The site files from a component's three optional flags: those given, and
/// ClusterLink's mount paths for `role` for the rest; `None` (no site TLS) when none
/// is given, unless `always`.
pub fn paths(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    role: Role,
    always: bool,
) -> Option<CertPaths> {
    if ca.is_none() && cert.is_none() && key.is_none() && !always {
        return None;
    }
    let (cert_default, key_default) = match role {
        Role::ControlPlane => (CONTROLPLANE_CERT_PATH, CONTROLPLANE_KEY_PATH),
        Role::DataPlane => (DATAPLANE_CERT_PATH, DATAPLANE_KEY_PATH),
    };
    let or = |p: Option<&Path>, d: &str| p.map_or_else(|| PathBuf::from(d), Path::to_path_buf);
    Some(CertPaths {
        ca: or(ca, CA_PATH),
        cert: or(cert, cert_default),
        key: or(key, key_default),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] identity::Error),
    #[error("{path}: the certificate is for {found:?}, a {role} needs {expected:?}")]
    WrongName {
        path: PathBuf,
        role: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{cert} does not verify against the site CA {ca}: {reason}")]
    Untrusted {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("building the site TLS configuration: {0}")]
    Config(String),
    #[error("the site CA {site} holds the fabric CA {fabric}: the planes need a CA of their own (a new one per deploy)")]
    SameAsFabric { site: PathBuf, fabric: PathBuf },
}

/// Refuses a site CA that shares a certificate with the fabric CA: with it, any
/// fabric peer certificate named like a component would open the gRPC API, which
/// carries the token key.
pub fn ensure_distinct(site_ca: &Path, fabric_ca: &Path) -> Result<(), Error> {
    let site = identity::load_certs(site_ca)?;
    let fabric = identity::load_certs(fabric_ca)?;
    if site.iter().any(|c| fabric.contains(c)) {
        return Err(Error::SameAsFabric {
            site: site_ca.to_owned(),
            fabric: fabric_ca.to_owned(),
        });
    }
    Ok(())
}

/// The pieces both ends need: the site roots, our own certified key (checked to be the
/// given role's certificate, issued by the site CA), and the crypto provider.
struct Loaded {
    roots: Arc<rustls::RootCertStore>,
    certified: Arc<CertifiedKey>,
}

fn load(paths: &CertPaths, role: &'static str, name: &'static str) -> Result<Loaded, Error> {
    let ca = identity::load_certs(&paths.ca)?;
    let chain = identity::load_certs(&paths.cert)?;
    let key = identity::load_key(&paths.key)?;
    let roots = identity::roots(&ca, &paths.ca)?;
    let found = identity_of(&chain[0])?;
    if found != name {
        return Err(Error::WrongName {
            path: paths.cert.clone(),
            role,
            found,
            expected: name,
        });
    }
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| identity::Error::Rustls {
            path: paths.key.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|source| identity::Error::Rustls {
            path: paths.key.clone(),
            source,
        })?;
    Ok(Loaded {
        roots,
        certified: Arc::new(certified),
    })
}

fn untrusted(paths: &CertPaths, e: rustls::Error) -> Error {
    Error::Untrusted {
        cert: paths.cert.clone(),
        ca: paths.ca.clone(),
        reason: e.to_string(),
    }
}

/// The control plane's gRPC server configuration: our `cl-controlplane` certificate,
/// and a client certificate required, from the site CA, naming `cl-dataplane`.
pub fn server_config(paths: &CertPaths) -> Result<Arc<ServerConfig>, Error> {
    let own = load(paths, "control plane", CONTROLPLANE_NAME)?;
    let provider = provider();
    let server_check =
        WebPkiServerVerifier::builder_with_provider(own.roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
    let name = ServerName::try_from(CONTROLPLANE_NAME).map_err(|e| Error::Config(e.to_string()))?;
    server_check
        .verify_server_cert(
            &own.certified.cert[0],
            &own.certified.cert[1..],
            &name,
            &[],
            UnixTime::now(),
        )
        .map_err(|e| untrusted(paths, e))?;
    let clients = WebPkiClientVerifier::builder_with_provider(own.roots, provider.clone())
        .build()
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(NamedClientVerifier {
            inner: clients,
            name: DATAPLANE_NAME,
        }))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            own.certified,
        )));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The data plane's client configuration: our `cl-dataplane` certificate, and a server
/// that must present `cl-controlplane` from the site CA (dial with that server name).
pub fn client_config(paths: &CertPaths) -> Result<Arc<ClientConfig>, Error> {
    let own = load(paths, "data plane", DATAPLANE_NAME)?;
    let provider = provider();
    let clients = WebPkiClientVerifier::builder_with_provider(own.roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::Config(e.to_string()))?;
    clients
        .verify_client_cert(
            &own.certified.cert[0],
            &own.certified.cert[1..],
            UnixTime::now(),
        )
        .map_err(|e| untrusted(paths, e))?;
    let servers = WebPkiServerVerifier::builder_with_provider(own.roots, provider.clone())
        .build()
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerNameVerifier { inner: servers }))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            own.certified,
        )));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The server name a data plane dials the control plane by, whatever host it connects to.
pub fn controlplane_server_name() -> Result<ServerName<'static>, Error> {
    ServerName::try_from(CONTROLPLANE_NAME).map_err(|e| Error::Config(e.to_string()))
}

/// Loads a configuration once and returns a channel that a background task keeps up to
/// date when the files change; a bad new set of files is logged and never replaces
/// the loaded one.
pub fn watch<T: Send + Sync + 'static>(
    paths: CertPaths,
    interval: Duration,
    load: fn(&CertPaths) -> Result<T, Error>,
) -> Result<watch::Receiver<T>, Error> {
    let first = load(&paths)?;
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut last = identity::stamp(&paths);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if tx.is_closed() {
                return;
            }
            let now = identity::stamp(&paths);
            if now == last {
                continue;
            }
            last = now;
            match load(&paths) {
                Ok(config) => {
                    tracing::info!(cert = %paths.cert.display(), "site certificates reloaded");
                    tx.send_replace(config);
                }
                Err(e) => {
                    tracing::error!(error = %e, "site certificate reload failed; keeping the loaded certificates");
                }
            }
        }
    });
    Ok(rx)
}

/// WebPKI client verification (chain to the site CA, client-auth usage) and then that
/// the client's identity is exactly the expected component.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: &'static str,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match identity_of(end_entity) {
            Ok(id) if id == self.name => Ok(ClientCertVerified::assertion()),
            Ok(id) => Err(rustls::Error::General(format!(
                "client identity {id:?} is not {:?}",
                self.name
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

#[cfg(all(test, feature = "certs"))]
mod tests;
