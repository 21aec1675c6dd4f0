//! Fabric CA and peer certificates (spec 1.1, 1.2, 1.6), with ClusterLink's defects
//! fixed: ECDSA P-256 by default (RSA-4096 on request), random 128-bit serials, a CA
//! that cannot sign further CAs (pathlen 0), key usages on peer certificates,
//! authority key identifiers, a minute of clock-skew slack, and the existing-directory
//! check made where the files would actually go. Nothing is ever overwritten.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("peer name is not a valid DNS name: {0:?}")]
    BadName(String),
    #[error("fabric name {0:?} must be a plain directory name (no '/', not '.' or '..')")]
    BadFabric(String),
    #[error("fabric {fabric:?}: cannot read {path}: {source} (expected the fabric CA as cert.pem and key.pem in {dir}; create it with `clusterlink create fabric --name {fabric}`)")]
    MissingCa {
        fabric: String,
        path: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadCa { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("RSA key generation: {0}")]
    Rsa(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    #[value(name = "rsa-4096")]
    Rsa4096,
}

const VALIDITY_DAYS: i64 = 3650;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
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
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
    p.not_before = now - std::time::Duration::from_secs(60);
    p.not_after = now + std::time::Duration::from_secs(VALIDITY_DAYS as u64 * 86_400);
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

/// Creates a directory that must not exist yet (0755), its parent included.
fn create_new_dir(dir: &Path) -> Result<(), Error> {
    if dir.exists() {
        return Err(Error::Exists(dir.to_owned()));
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::create_dir(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Exists(dir.to_owned())
        } else {
            Error::Io {
                path: dir.to_owned(),
                source: e,
            }
        }
    })
}

/// Writes a new file with mode 0600; never replaces one.
pub fn write_private(path: &Path, data: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists(path.to_owned())
            } else {
                Error::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
    f.write_all(data.as_bytes()).map_err(io(path))
}

/// `clusterlink create fabric`: `<base>/<fabric>/cert.pem` and `key.pem`.
pub fn create_fabric(base: &Path, fabric: &str, kind: KeyType) -> Result<PathBuf, Error> {
    if fabric.is_empty() || fabric == "." || fabric == ".." || fabric.contains(['/', '\0']) {
        return Err(Error::BadFabric(fabric.to_owned()));
    }
    let dir = layout::fabric_dir(base, fabric);
    if dir.exists() {
        return Err(Error::Exists(dir));
    }
    let key = key(kind)?;
    let cert = ca_params(fabric)?.self_signed(&key)?;
    create_new_dir(&dir)?;
    write_private(&dir.join("cert.pem"), &cert.pem())?;
    write_private(&dir.join("key.pem"), &key.serialize_pem())?;
    Ok(dir)
}

/// RFC 1123 host name (letters, digits, hyphens; dot-separated labels), as a peer
/// name must be to be the DNS SAN and the TLS server name.
pub fn valid_peer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// `clusterlink create peer-cert`: the peer's chain (peer, then CA) and key in `out`
/// (default `<base>/<fabric>/<peer>/`).
pub fn create_peer_cert(
    base: &Path,
    fabric: &str,
    peer: &str,
    out: Option<&Path>,
    kind: KeyType,
) -> Result<PathBuf, Error> {
    if !valid_peer_name(peer) {
        return Err(Error::BadName(peer.to_owned()));
    }
    let out = out
        .map(Path::to_owned)
        .unwrap_or_else(|| layout::peer_dir(base, fabric, peer));
    // Checked where the files go (ClusterLink checked the working directory).
    if out.exists() {
        return Err(Error::Exists(out));
    }
    let fdir = layout::fabric_dir(base, fabric);
    let read = |name: &str| -> Result<String, Error> {
        let path = fdir.join(name);
        std::fs::read_to_string(&path).map_err(|source| Error::MissingCa {
            fabric: fabric.to_owned(),
            path: path.clone(),
            dir: fdir.clone(),
            source,
        })
    };
    let ca_pem = read("cert.pem")?;
    let ca_key_pem = read("key.pem")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| Error::BadCa {
        path: fdir.join("key.pem"),
        message: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(|e| Error::BadCa {
        path: fdir.join("cert.pem"),
        message: e.to_string(),
    })?;

    let key = key(kind)?;
    let mut p = CertificateParams::new(vec![peer.to_owned()])?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, peer);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = match kind {
        KeyType::EcdsaP256 => vec![KeyUsagePurpose::DigitalSignature],
        KeyType::Rsa4096 => vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
    };
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(serial());
    validity(&mut p);
    let cert = p.signed_by(&key, &issuer)?;
    create_new_dir(&out)?;
    write_private(&out.join("cert.pem"), &format!("{}{}", cert.pem(), ca_pem))?;
    write_private(&out.join("key.pem"), &key.serialize_pem())?;
    Ok(out)
}
