//! Handshakes in memory between the two site configurations, with certificates made
//! by `certs::site()` and the fabric profiles.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConnection, ServerConnection};

use crate::identity::PeerNameVerifier;

use super::*;
use crate::certs;

type R = Result<(), Box<dyn std::error::Error>>;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Result<Dir, std::io::Error> {
    let d = std::env::temp_dir().join(format!(
        "cl-site-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(Dir(d))
}

fn write(
    d: &Path,
    name: &str,
    ca: &str,
    issued: &certs::Issued,
) -> Result<CertPaths, std::io::Error> {
    let p = CertPaths {
        ca: d.join(format!("{name}-ca.pem")),
        cert: d.join(format!("{name}.pem")),
        key: d.join(format!("{name}.key")),
    };
    std::fs::write(&p.ca, ca)?;
    std::fs::write(&p.cert, &issued.chain)?;
    std::fs::write(&p.key, &issued.key)?;
    Ok(p)
}

/// Which end of a handshake refused it.
#[derive(Debug, PartialEq)]
enum Refused {
    ByClient(rustls::Error),
    ByServer(rustls::Error),
}

fn io(e: std::io::Error) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// Runs a handshake to completion or to the first error, telling which side failed.
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<(), Refused> {
    let name = controlplane_server_name()
        .map_err(|e| Refused::ByClient(rustls::Error::General(e.to_string())))?;
    let mut c = ClientConnection::new(client, name).map_err(Refused::ByClient)?;
    let mut s = ServerConnection::new(server).map_err(Refused::ByServer)?;
    for _ in 0..20 {
        // In TLS 1.3 the client is done before the server has read (and checked) its
        // certificate, so this goes on until both are.
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf)
                .map_err(|e| Refused::ByClient(io(e)))?;
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).map_err(|e| Refused::ByServer(io(e)))?;
        }
        s.process_new_packets().map_err(Refused::ByServer)?;
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf)
                .map_err(|e| Refused::ByServer(io(e)))?;
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).map_err(|e| Refused::ByClient(io(e)))?;
        }
        c.process_new_packets().map_err(Refused::ByClient)?;
    }
    Err(Refused::ByClient(rustls::Error::General(
        "handshake did not finish".into(),
    )))
}

/// A client presenting `presented` while trusting `trusted`'s CA: what an attacker
/// holding that certificate builds, without the data plane's own checks.
fn forged_client(trusted: &CertPaths, presented: &CertPaths) -> Result<Arc<ClientConfig>, Error> {
    let certs = identity::load_certs(&presented.cert)?;
    let key = identity::load_key(&presented.key)?;
    let servers = WebPkiServerVerifier::builder_with_provider(
        identity::roots(&identity::load_certs(&trusted.ca)?, &trusted.ca)?,
        provider(),
    )
    .build()
    .map_err(|e| Error::Config(e.to_string()))?;
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerNameVerifier { inner: servers }))
        .with_client_auth_cert(certs, key)
        .map_err(|e| Error::Config(e.to_string()))?;
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(c))
}

fn refused_by_server(r: Result<(), Refused>, what: &str) -> R {
    match r {
        Err(Refused::ByServer(rustls::Error::InvalidCertificate(_)))
        | Err(Refused::ByServer(rustls::Error::General(_))) => Ok(()),
        other => Err(format!(
            "{what}: expected the server to refuse the certificate, got {other:?}"
        )
        .into()),
    }
}

#[test]
fn the_planes_of_one_site_connect_and_check_each_other() -> R {
    let d = dir("ok")?;
    let site = certs::site()?;
    let cp = write(&d.0, "cp", &site.ca, &site.controlplane)?;
    let dp = write(&d.0, "dp", &site.ca, &site.dataplane)?;
    handshake(client_config(&dp)?, server_config(&cp)?).map_err(|e| format!("{e:?}"))?;
    Ok(())
}

#[test]
fn a_data_plane_of_another_site_ca_is_refused() -> R {
    let d = dir("foreign-dp")?;
    let site = certs::site()?;
    let other = certs::site()?;
    let cp = write(&d.0, "cp", &site.ca, &site.controlplane)?;
    // Another deployment's data plane certificate, trusting this site's CA (so the
    // client side has nothing to object to): the server refuses it.
    let foreign = write(&d.0, "dp", &other.ca, &other.dataplane)?;
    refused_by_server(
        handshake(forged_client(&cp, &foreign)?, server_config(&cp)?),
        "another site's cl-dataplane",
    )?;
    // As the data plane itself is configured (trusting its own CA), it refuses the
    // server first.
    assert!(matches!(
        handshake(client_config(&foreign)?, server_config(&cp)?),
        Err(Refused::ByClient(rustls::Error::InvalidCertificate(_)))
    ));
    Ok(())
}

#[test]
fn a_client_of_this_site_ca_with_another_name_is_refused() -> R {
    let d = dir("other-name")?;
    let (site, extra) = certs::site_and_client(Some("cl-other"))?;
    let extra = extra.ok_or("no extra certificate")?;
    let cp = write(&d.0, "cp", &site.ca, &site.controlplane)?;
    let other = write(&d.0, "other", &site.ca, &extra)?;
    let err = handshake(forged_client(&cp, &other)?, server_config(&cp)?)
        .err()
        .ok_or("a cl-other client certificate was accepted")?;
    match err {
        Refused::ByServer(rustls::Error::General(why)) => {
            assert!(
                why.contains("cl-other") && why.contains("cl-dataplane"),
                "{why}"
            );
        }
        other => return Err(format!("expected the server's name check, got {other:?}").into()),
    }
    // The control plane's own certificate (server authentication only) as a client.
    refused_by_server(
        handshake(forged_client(&cp, &cp)?, server_config(&cp)?),
        "the cl-controlplane certificate as a client",
    )?;
    // And this site's data plane certificate, the same way: served.
    let dp = write(&d.0, "dp", &site.ca, &site.dataplane)?;
    handshake(forged_client(&cp, &dp)?, server_config(&cp)?).map_err(|e| format!("{e:?}"))?;
    Ok(())
}

#[test]
fn a_control_plane_of_another_site_ca_is_refused() -> R {
    let d = dir("foreign-cp")?;
    let site = certs::site()?;
    let other = certs::site()?;
    let foreign = write(&d.0, "cp", &other.ca, &other.controlplane)?;
    let dp = write(&d.0, "dp", &site.ca, &site.dataplane)?;
    let err = handshake(client_config(&dp)?, server_config(&foreign)?)
        .err()
        .ok_or("a foreign control plane was trusted")?;
    assert!(
        matches!(err, Refused::ByClient(rustls::Error::InvalidCertificate(_))),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn a_fabric_peer_certificate_opens_nothing_here() -> R {
    let d = dir("fabric")?;
    let site = certs::site()?;
    let ca = certs::fabric_ca("f", certs::KeyType::EcdsaP256)?;
    // A peer that is even named like the data plane, but from the fabric CA.
    let peer = certs::peer(
        &ca.chain,
        &ca.key,
        "cl-dataplane",
        certs::KeyType::EcdsaP256,
    )?;
    let cp = write(&d.0, "cp", &site.ca, &site.controlplane)?;
    // The peer trusts the site CA, so only the server's check can refuse it.
    let imposter = write(&d.0, "peer", &site.ca, &peer)?;
    assert!(
        matches!(client_config(&imposter), Err(Error::Untrusted { .. })),
        "a data plane refuses to start with a certificate the site CA did not issue"
    );
    // Build the imposter's client by hand, as an attacker would.
    let paths = write(&d.0, "peer2", &ca.chain, &peer)?;
    refused_by_server(
        handshake(forged_client(&cp, &paths)?, server_config(&cp)?),
        "a fabric certificate named cl-dataplane",
    )?;
    Ok(())
}

#[test]
fn each_role_needs_its_own_certificate() -> R {
    let d = dir("roles")?;
    let site = certs::site()?;
    let cp = write(&d.0, "cp", &site.ca, &site.controlplane)?;
    let dp = write(&d.0, "dp", &site.ca, &site.dataplane)?;
    let err = server_config(&dp)
        .err()
        .ok_or("a data plane certificate served")?;
    assert!(
        matches!(
            err,
            Error::WrongName {
                expected: CONTROLPLANE_NAME,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("cl-dataplane"), "{err}");
    let err = client_config(&cp)
        .err()
        .ok_or("a control plane certificate dialled")?;
    assert!(
        matches!(
            err,
            Error::WrongName {
                expected: DATAPLANE_NAME,
                ..
            }
        ),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_site_ca_that_is_the_fabric_ca_is_refused() -> R {
    let d = dir("same-ca")?;
    let site = certs::site()?;
    let ca = certs::fabric_ca("f", certs::KeyType::EcdsaP256)?;
    let fabric_ca = d.0.join("fabric-ca.pem");
    std::fs::write(&fabric_ca, &ca.chain)?;
    let cp = write(&d.0, "cp", &site.ca, &site.controlplane)?;
    ensure_distinct(&cp.ca, &fabric_ca)?;
    let err = ensure_distinct(&fabric_ca, &fabric_ca)
        .err()
        .ok_or("the fabric CA was accepted as the site CA")?;
    assert!(matches!(err, Error::SameAsFabric { .. }), "{err}");
    Ok(())
}
