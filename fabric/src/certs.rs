//! Certificate profiles (spec 1.6), with ClusterLink's defects fixed: ECDSA P-256 by
//! default (RSA-4096 on request), random 128-bit serials, CAs that cannot sign
//! further CAs (pathlen 0), key usages on leaf certificates, authority key
//! identifiers, and a minute of clock-skew slack.
//! Two trust domains (spec 0.2): the fabric CA and its peer certificates, shared by
//! every peer of a fabric; and a site CA per deploy that signs the control plane and
//! data plane certificates the components of one peer use between themselves.
//! This module only makes certificates in memory; where they are written, and
//! never overwriting anything there, is the caller's business.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::names;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("peer name {name:?} is not valid: {reason}")]
    BadName { name: String, reason: names::Error },
    #[error("fabric CA key: {0}")]
    BadCaKey(String),
    #[error("fabric CA certificate: {0}")]
    BadCaCert(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("RSA key generation: {0}")]
    Rsa(String),
}

/// The key algorithm of a new certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    Rsa4096,
}

pub use crate::site::{CONTROLPLANE_NAME, DATAPLANE_NAME, SITE_CA_NAME};

const VALIDITY_DAYS: u64 = 3650;

/// A certificate as PEM: `chain` is the certificate followed by its issuer's (a CA's
/// own chain is just itself), `key` its private key (PKCS#8).
#[derive(Clone)]
pub struct Issued {
    pub chain: String,
    pub key: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

fn key(kind: KeyType) -> Result<KeyPair, Error> {
    match kind {
        KeyType::EcdsaP256 => Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?),
        KeyType::Rsa4096 => {
            use rsa::pkcs8::EncodePrivateKey;
            let k = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 4096)
                .map_err(|e| Error::Rsa(e.to_string()))?;
            let der = k.to_pkcs8_der().map_err(|e| Error::Rsa(e.to_string()))?;
            let der = rustls_pki_types::PrivateKeyDer::Pkcs8(
                rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec()),
            );
            Ok(KeyPair::from_der_and_sign_algo(
                &der,
                &rcgen::PKCS_RSA_SHA256,
            )?)
        }
    }
}

fn serial() -> rcgen::SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and of full length
    rcgen::SerialNumber::from_slice(&b)
}

fn validity(p: &mut CertificateParams) {
    let now = rcgen::date_time_ymd(1970, 1, 1) + crate::clock::since_epoch();
    p.not_before = now - std::time::Duration::from_secs(60);
    p.not_after = now + std::time::Duration::from_secs(VALIDITY_DAYS * 86_400);
}

fn ca_params(name: &str) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(serial());
    validity(&mut p);
    Ok(p)
}

fn leaf_params(
    name: &str,
    kind: KeyType,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(vec![name.to_owned()])?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = match kind {
        KeyType::EcdsaP256 => vec![KeyUsagePurpose::DigitalSignature],
        KeyType::Rsa4096 => vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
    };
    p.extended_key_usages = usages;
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(serial());
    validity(&mut p);
    Ok(p)
}

/// A new self-signed fabric CA named `fabric`.
pub fn fabric_ca(fabric: &str, kind: KeyType) -> Result<Issued, Error> {
    let key = key(kind)?;
    let cert = ca_params(fabric)?.self_signed(&key)?;
    Ok(Issued {
        chain: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A peer certificate signed by the fabric CA: the peer name as CN and only DNS SAN
/// (its identity), server and client authentication.
pub fn peer(ca_cert: &str, ca_key: &str, peer: &str, kind: KeyType) -> Result<Issued, Error> {
    names::peer_name(peer).map_err(|reason| Error::BadName {
        name: peer.to_owned(),
        reason,
    })?;
    let ca_key = KeyPair::from_pem(ca_key).map_err(|e| Error::BadCaKey(e.to_string()))?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_cert, &ca_key).map_err(|e| Error::BadCaCert(e.to_string()))?;
    let key = key(kind)?;
    let p = leaf_params(
        peer,
        kind,
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued {
        chain: format!("{}{}", cert.pem(), ca_cert),
        key: key.serialize_pem(),
    })
}

/// The certificates one peer's components use between themselves (spec 1.3 step 4):
/// made fresh on every deploy and kept in memory; only the site CA's certificate is
/// handed out, its key goes away with this value.
pub struct Site {
    pub ca: String,
    pub controlplane: Issued,
    pub dataplane: Issued,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// A new site CA `cl-ca`, the control plane certificate (`cl-controlplane`, server
/// authentication) and the data plane certificate (`cl-dataplane`, client
/// authentication) it signs.
pub fn site() -> Result<Site, Error> {
    Ok(site_and_client(None)?.0)
}

/// `site()`, and with `extra` a client certificate of that name from the same site
/// CA (for tests of the name checks).
pub(crate) fn site_and_client(extra: Option<&str>) -> Result<(Site, Option<Issued>), Error> {
    let ca_key = key(KeyType::EcdsaP256)?;
    let ca_params = ca_params(SITE_CA_NAME)?;
    let ca = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca.pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| -> Result<Issued, Error> {
        let key = key(KeyType::EcdsaP256)?;
        let cert = leaf_params(name, KeyType::EcdsaP256, vec![usage])?.signed_by(&key, &issuer)?;
        Ok(Issued {
            chain: format!("{}{}", cert.pem(), ca_pem),
            key: key.serialize_pem(),
        })
    };
    let extra = match extra {
        Some(name) => Some(leaf(name, ExtendedKeyUsagePurpose::ClientAuth)?),
        None => None,
    };
    let site = Site {
        controlplane: leaf(CONTROLPLANE_NAME, ExtendedKeyUsagePurpose::ServerAuth)?,
        dataplane: leaf(DATAPLANE_NAME, ExtendedKeyUsagePurpose::ClientAuth)?,
        ca: ca_pem,
    };
    Ok((site, extra))
}

#[cfg(test)]
mod tests;
