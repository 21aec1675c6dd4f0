//! `clusterlink deploy peer --platform k8s`: the peer's deployment for a Kubernetes
//! cluster, built by `operator::manifests` (the objects the operator reconciles).
//! With `--start none` it is rendered into `<path>/<fabric>/<peer>/k8s.yaml` (0600:
//! it holds private keys), for `kubectl apply --server-side -f`. A new site CA and
//! site certificates are made in memory on every run; the fabric CA's key is never
//! read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crds::{DataplaneType, IngressSpec, IngressType, InstanceSpec, LogLevel};
use operator::manifests;

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificates folder {0} not found: create it with `clusterlink create peer-cert`")]
    NoPeerDir(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--ingress-port {0}: a NodePort must be in 30000-32767")]
    NodePort(u16),
    #[error("--ingress-port 0: give a port (or leave the default, 443)")]
    ZeroPort,
    #[error("{flag} {value:?}: expected key=value")]
    KeyValue { flag: &'static str, value: String },
    #[error("--log-level {0:?}: expected trace, debug, info, warning, error or fatal")]
    LogLevel(String),
    #[error("--start {0}: the operator is not available yet; use --start none and apply k8s.yaml")]
    NoOperator(&'static str),
    #[error("site certificates: {0}")]
    Certs(#[from] fabric::certs::Error),
    #[error(transparent)]
    Render(#[from] manifests::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Start {
    All,
    Operator,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ingress {
    #[value(name = "LoadBalancer", alias = "loadbalancer")]
    LoadBalancer,
    #[value(name = "NodePort", alias = "nodeport")]
    NodePort,
    #[value(name = "none")]
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataplane {
    Envoy,
    Go,
}

/// The flags of `deploy peer --platform k8s` (ClusterLink's).
#[derive(Debug, Clone)]
pub struct Options {
    pub base: PathBuf,
    pub fabric: String,
    pub peer: String,
    pub namespace: String,
    pub start: Start,
    pub ingress: Ingress,
    pub ingress_port: u16,
    pub ingress_annotations: Vec<String>,
    pub dataplane: Dataplane,
    pub dataplane_replicas: u16,
    pub controlplane_replicas: u16,
    pub labels: Vec<String>,
    pub registry: String,
    pub tag: String,
    pub log_level: String,
}

fn key_values(flag: &'static str, items: &[String]) -> Result<BTreeMap<String, String>, Error> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(Error::KeyValue {
                flag,
                value: kv.clone(),
            }),
        })
        .collect()
}

fn log_level(s: &str) -> Result<LogLevel, Error> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "trace" => LogLevel::Trace,
        "debug" => LogLevel::Debug,
        "info" => LogLevel::Info,
        "warn" | "warning" => LogLevel::Warning,
        "error" => LogLevel::Error,
        "fatal" => LogLevel::Fatal,
        _ => return Err(Error::LogLevel(s.to_owned())),
    })
}

/// The Instance spec these flags describe (what `--start all` would create).
pub fn instance_spec(o: &Options) -> Result<InstanceSpec, Error> {
    let type_ = match o.ingress {
        Ingress::LoadBalancer => IngressType::LoadBalancer,
        Ingress::NodePort => IngressType::NodePort,
        Ingress::None => IngressType::None,
    };
    // ClusterLink's default port 443 means "the default" for both types; a NodePort
    // given explicitly must be in the node-port range (checked only for NodePort).
    let port = match (type_, o.ingress_port) {
        (_, 443) => 0,
        (_, 0) => return Err(Error::ZeroPort),
        (IngressType::NodePort, p) if !(30000..=32767).contains(&p) => {
            return Err(Error::NodePort(p))
        }
        (_, p) => i32::from(p),
    };
    Ok(InstanceSpec {
        dataplane: crds::DataplaneSpec {
            type_: match o.dataplane {
                Dataplane::Envoy => DataplaneType::Envoy,
                Dataplane::Go => DataplaneType::Go,
            },
            replicas: i32::from(o.dataplane_replicas.max(1)),
        },
        ingress: IngressSpec {
            type_,
            port,
            annotations: key_values("--ingress-annotations", &o.ingress_annotations)?,
        },
        log_level: log_level(&o.log_level)?,
        container_registry: o.registry.clone(),
        tag: o.tag.clone(),
        namespace: o.namespace.clone(),
        peer_labels: key_values("--label", &o.labels)?,
    })
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `data` to `path` with mode 0600, replacing what was there.
fn write_private(path: &Path, data: &str) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // An existing file keeps its mode through open(); it must not stay readable.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)
}

/// `deploy peer --platform k8s`. Returns the file written (`--start none`).
pub fn deploy(o: &Options) -> Result<PathBuf, Error> {
    let spec = instance_spec(o)?;
    let dir = layout::peer_dir(&o.base, &o.fabric, &o.peer);
    if !dir.is_dir() {
        return Err(Error::NoPeerDir(dir));
    }
    match o.start {
        Start::All => return Err(Error::NoOperator("all")),
        Start::Operator => return Err(Error::NoOperator("operator")),
        Start::None => {}
    }
    let certs = manifests::Certificates {
        fabric_ca: read(&layout::fabric_dir(&o.base, &o.fabric).join("cert.pem"))?,
        peer_chain: read(&dir.join("cert.pem"))?,
        peer_key: read(&dir.join("key.pem"))?,
        site: fabric::certs::site()?,
    };
    let opts = manifests::Options {
        controlplane_replicas: i32::from(o.controlplane_replicas.max(1)),
        managed_by: "clusterlink".into(),
        certificates_hash: Some(certs.hash()),
        labels: BTreeMap::new(),
    };
    let yaml = manifests::render(&spec, &opts, &certs)?;
    let out = dir.join("k8s.yaml");
    write_private(&out, &yaml)?;
    Ok(out)
}
