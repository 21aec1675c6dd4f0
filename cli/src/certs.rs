//! `clusterlink create fabric`, `create peer-cert` and `create site-certs`: the certificates of
//! `fabric::certs` written where ClusterLink's layout puts them (spec 1.5), files 0600,
//! with the existing-directory check made where the files would actually go. Nothing
//! is ever overwritten.

use std::path::{Path, PathBuf};

use fabric::certs;

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("peer name is not a valid DNS name: {name:?} ({reason})")]
    BadName {
        name: String,
        reason: fabric::names::Error,
    },
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
    #[error(transparent)]
    Certs(certs::Error),
}

/// The `--key-type` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    #[value(name = "rsa-4096")]
    Rsa4096,
}

impl From<KeyType> for certs::KeyType {
    fn from(k: KeyType) -> Self {
        match k {
            KeyType::EcdsaP256 => certs::KeyType::EcdsaP256,
            KeyType::Rsa4096 => certs::KeyType::Rsa4096,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
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

/// Writes a certificate's `cert.pem` and `key.pem` into the new directory `dir`.
fn write_new(dir: &Path, issued: &certs::Issued) -> Result<(), Error> {
    create_new_dir(dir)?;
    write_private(&dir.join("cert.pem"), &issued.chain)?;
    write_private(&dir.join("key.pem"), &issued.key)
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
    let issued = certs::fabric_ca(fabric, kind.into()).map_err(Error::Certs)?;
    write_new(&dir, &issued)?;
    Ok(dir)
}

/// Where a peer's new files go: `out`, else `default()`, after checking the peer's
/// name and that nothing is there yet (checked where the files go; ClusterLink
/// checked the working directory).
fn new_peer_dir(
    peer: &str,
    out: Option<&Path>,
    default: impl FnOnce() -> PathBuf,
) -> Result<PathBuf, Error> {
    fabric::names::peer_name(peer).map_err(|reason| Error::BadName {
        name: peer.to_owned(),
        reason,
    })?;
    let out = out.map(Path::to_owned).unwrap_or_else(default);
    if out.exists() {
        return Err(Error::Exists(out));
    }
    Ok(out)
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
    let out = new_peer_dir(peer, out, || layout::peer_dir(base, fabric, peer))?;
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
    let issued = certs::peer(&ca_pem, &ca_key_pem, peer, kind.into()).map_err(|e| match e {
        certs::Error::BadCaKey(message) => Error::BadCa {
            path: fdir.join("key.pem"),
            message,
        },
        certs::Error::BadCaCert(message) => Error::BadCa {
            path: fdir.join("cert.pem"),
            message,
        },
        e => Error::Certs(e),
    })?;
    write_new(&out, &issued)?;
    Ok(out)
}

/// The files `create site-certs` writes into its directory.
pub const SITE_FILES: [&str; 5] = [
    "ca.pem",
    "controlplane-cert.pem",
    "controlplane-key.pem",
    "dataplane-cert.pem",
    "dataplane-key.pem",
];

/// `clusterlink create site-certs`: a new site CA and the `cl-controlplane` /
/// `cl-dataplane` certificates it signs, for running a peer's two planes on separate
/// hosts or containers (the gRPC link between them is mutual TLS with these; on
/// Kubernetes, `deploy peer` makes them in memory and puts them into Secrets). The
/// site CA's key is not kept: a new set is made by removing the directory and running
/// this again. Written into `out` (default `<base>/<fabric>/<peer>/site/`), which must
/// not exist.
pub fn create_site_certs(
    base: &Path,
    fabric: &str,
    peer: &str,
    out: Option<&Path>,
) -> Result<PathBuf, Error> {
    let out = new_peer_dir(peer, out, || {
        layout::peer_dir(base, fabric, peer).join("site")
    })?;
    let site = certs::site().map_err(Error::Certs)?;
    create_new_dir(&out)?;
    let [ca, cp_cert, cp_key, dp_cert, dp_key] = SITE_FILES;
    for (name, data) in [
        (ca, &site.ca),
        (cp_cert, &site.controlplane.chain),
        (cp_key, &site.controlplane.key),
        (dp_cert, &site.dataplane.chain),
        (dp_key, &site.dataplane.key),
    ] {
        write_private(&out.join(name), data)?;
    }
    Ok(out)
}
