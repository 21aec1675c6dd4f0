use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::ParsedExtension;

use super::*;

type R = Result<(), Box<dyn std::error::Error>>;

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
}

fn roots(ca: &str) -> Result<Arc<RootCertStore>, Box<dyn std::error::Error>> {
    let mut store = RootCertStore::empty();
    for c in certs(ca)? {
        store.add(c)?;
    }
    Ok(Arc::new(store))
}

/// (is a CA with pathlen 0, extended key usages as (server, client)).
fn profile(der: &CertificateDer<'_>) -> Result<(bool, (bool, bool)), Box<dyn std::error::Error>> {
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref())?;
    let mut ca = false;
    let mut eku = (false, false);
    for ext in c.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                ca = bc.ca && bc.path_len_constraint == Some(0);
            }
            ParsedExtension::ExtendedKeyUsage(e) => eku = (e.server_auth, e.client_auth),
            _ => {}
        }
    }
    Ok((ca, eku))
}

#[test]
fn a_peer_certificate_chains_to_its_fabric_and_names_the_peer() -> R {
    for kind in [KeyType::EcdsaP256, KeyType::Rsa4096] {
        let ca = fabric_ca("myfabric", kind)?;
        let peer = peer(&ca.chain, &ca.key, "peer-a", kind)?;
        let chain = certs(&peer.chain)?;
        assert_eq!(chain.len(), 2, "peer, then the CA");
        assert_eq!(crate::identity::identity_of(&chain[0])?, "peer-a");
        assert_eq!(profile(&certs(&ca.chain)?[0])?, (true, (false, false)));
        assert_eq!(profile(&chain[0])?, (false, (true, true)));
        let verifier = WebPkiServerVerifier::builder_with_provider(
            roots(&ca.chain)?,
            crate::identity::provider(),
        )
        .build()?;
        let name = ServerName::try_from("peer-a")?;
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())?;
        // Another fabric's CA does not accept it.
        let other = fabric_ca("other", KeyType::EcdsaP256)?;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            roots(&other.chain)?,
            crate::identity::provider(),
        )
        .build()?;
        assert!(verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .is_err());
    }
    Ok(())
}

#[test]
fn bad_names_and_bad_cas_are_errors() -> R {
    let ca = fabric_ca("f", KeyType::EcdsaP256)?;
    for bad in ["", "Peer-A", "a..b", "-a", &"a".repeat(64)] {
        assert!(
            matches!(
                peer(&ca.chain, &ca.key, bad, KeyType::EcdsaP256),
                Err(Error::BadName { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        peer(&ca.chain, "garbage", "peer-a", KeyType::EcdsaP256),
        Err(Error::BadCaKey(_))
    ));
    assert!(matches!(
        peer("garbage", &ca.key, "peer-a", KeyType::EcdsaP256),
        Err(Error::BadCaCert(_))
    ));
    Ok(())
}

#[test]
fn site_certificates_serve_and_client_only_as_their_profiles_say() -> R {
    let site = site()?;
    let ca = certs(&site.ca)?;
    assert_eq!(ca.len(), 1, "the site CA's certificate alone, no key");
    assert_eq!(profile(&ca[0])?, (true, (false, false)));
    let cp = certs(&site.controlplane.chain)?;
    let dp = certs(&site.dataplane.chain)?;
    assert_eq!(crate::identity::identity_of(&cp[0])?, CONTROLPLANE_NAME);
    assert_eq!(crate::identity::identity_of(&dp[0])?, DATAPLANE_NAME);
    assert_eq!(profile(&cp[0])?, (false, (true, false)));
    assert_eq!(profile(&dp[0])?, (false, (false, true)));
    let now = UnixTime::now();
    let server =
        WebPkiServerVerifier::builder_with_provider(roots(&site.ca)?, crate::identity::provider())
            .build()?;
    let cp_name = ServerName::try_from(CONTROLPLANE_NAME)?;
    server.verify_server_cert(&cp[0], &cp[1..], &cp_name, &[], now)?;
    // The data plane's certificate is for client authentication only.
    let dp_name = ServerName::try_from(DATAPLANE_NAME)?;
    assert!(server
        .verify_server_cert(&dp[0], &dp[1..], &dp_name, &[], now)
        .is_err());
    let client =
        WebPkiClientVerifier::builder_with_provider(roots(&site.ca)?, crate::identity::provider())
            .build()?;
    client.verify_client_cert(&dp[0], &dp[1..], now)?;
    assert!(client.verify_client_cert(&cp[0], &cp[1..], now).is_err());
    // A new deploy's site does not trust the last one's certificates.
    let next = site_fresh_roots()?;
    let client =
        WebPkiClientVerifier::builder_with_provider(next, crate::identity::provider()).build()?;
    assert!(client.verify_client_cert(&dp[0], &dp[1..], now).is_err());
    Ok(())
}

fn site_fresh_roots() -> Result<Arc<RootCertStore>, Box<dyn std::error::Error>> {
    roots(&site()?.ca)
}
