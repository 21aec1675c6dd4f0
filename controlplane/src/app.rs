//! Wires the control plane: certificates (watched), the resource source, the state
//! core, heartbeat monitors, the gRPC API and the admin port. Returns a `Running`
//! handle with the real bound addresses so tests start the same app on port 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::authz::Authz;
use crate::core::Core;
use crate::heartbeat::Monitors;
use crate::peerclient::PeerClient;
use crate::server::{self, Metrics, Services};
use crate::store::{DirSource, Source};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] fabric::identity::Error),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--peer-label {0:?}: expected key=value")]
    Label(String),
    #[error("--resources-dir is required with --platform local")]
    NoResourcesDir,
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::Error),
    #[error("site TLS for the gRPC API: {0}")]
    Site(#[from] fabric::site::Error),
    #[error("--site-* files apply to the TCP gRPC port, not to --grpc-socket")]
    SiteWithSocket,
}

/// Where the resources come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// A directory of YAML files (--resources-dir).
    Local,
    /// The Kubernetes API (KUBECONFIG, ~/.kube/config or in-cluster).
    K8s,
}

/// cl-controlplane's flags; each has a `CL_` environment fallback.
#[derive(Debug, Clone, clap::Parser, serde::Serialize)]
#[command(name = "cl-controlplane", version, about = "ClusterLink control plane")]
pub struct Config {
    /// gRPC address the data planes connect to (TCP: mutual TLS with the site
    /// certificates when they are configured, else plain, so keep it on loopback).
    #[arg(long, env = "CL_GRPC_ADDR", default_value = "127.0.0.1:4444")]
    pub grpc_addr: SocketAddr,
    /// Serve the data-plane API on this Unix socket (mode 0600) instead of
    /// --grpc-addr, so that only this user's processes can connect.
    #[arg(long, env = "CL_GRPC_SOCKET")]
    pub grpc_socket: Option<PathBuf>,
    /// Admin address: /metrics, /ready, /api/... (resources with status).
    #[arg(long, env = "CL_CP_ADMIN_ADDR", default_value = "127.0.0.1:4446")]
    pub admin_addr: SocketAddr,
    /// Where the resources come from.
    #[arg(long, env = "CL_PLATFORM", value_enum, default_value = "local")]
    pub platform: Platform,
    /// Directory of resource YAML files (the local platform's resource store).
    #[arg(long, env = "CL_RESOURCES_DIR")]
    pub resources_dir: Option<PathBuf>,
    /// The ClusterLink namespace on Kubernetes: Peers, the jwk Secret, the Lease and
    /// the import system Services live there.
    #[arg(long, env = "CL_NAMESPACE", default_value = "clusterlink-system")]
    pub namespace: String,
    /// This replica's name on Kubernetes (Lease holder, Event reporter); defaults to
    /// the host name and a random suffix.
    #[arg(long, env = "CL_POD_NAME")]
    pub identity: Option<String>,
    /// Leader lease duration on Kubernetes, in seconds: a replica that stops renewing
    /// is replaced within it.
    #[arg(long, env = "CL_LEASE_DURATION_SECS", default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// Site CA certificate (PEM): with it, the gRPC port serves mutual TLS, only to
    /// data planes holding this CA's `cl-dataplane` certificate. Always on with
    /// --platform k8s, where the default is ClusterLink's /etc/ssl/certs/clink_ca.pem.
    #[arg(long, env = "CL_SITE_CA_FILE")]
    pub site_ca_file: Option<PathBuf>,
    /// This control plane's `cl-controlplane` certificate chain of the site CA (PEM;
    /// default on Kubernetes /etc/ssl/certs/clink-controlplane.pem).
    #[arg(long, env = "CL_SITE_CERT_FILE")]
    pub site_cert_file: Option<PathBuf>,
    /// Its private key (PEM; default on Kubernetes /etc/ssl/key/clink-controlplane.pem).
    #[arg(long, env = "CL_SITE_KEY_FILE")]
    pub site_key_file: Option<PathBuf>,
    /// Fabric CA certificate (PEM).
    #[arg(long, env = "CL_CA_FILE")]
    pub ca_file: PathBuf,
    /// This peer's certificate chain (PEM).
    #[arg(long, env = "CL_CERT_FILE")]
    pub cert_file: PathBuf,
    /// This peer's private key (PEM).
    #[arg(long, env = "CL_KEY_FILE")]
    pub key_file: PathBuf,
    /// File holding the access-token key (base64 of 32 bytes); created when missing,
    /// regenerated when unreadable. Without it, a new key is made at every start.
    #[arg(long, env = "CL_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// Local peer label `key=value` (repeatable, or comma separated).
    #[arg(long = "peer-label", env = "CL_PEER_LABELS", value_delimiter = ',')]
    pub peer_labels: Vec<String>,
    /// How often the resources directory is checked, in milliseconds.
    #[arg(long, env = "CL_SCAN_INTERVAL_MS", default_value_t = 250)]
    pub scan_interval_ms: u64,
    /// Deadline of each call to a remote peer, in milliseconds.
    #[arg(long, env = "CL_PEER_TIMEOUT_MS", default_value_t = 3000)]
    pub peer_timeout_ms: u64,
    /// Log level or filter.
    #[arg(long, env = "CL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl Config {
    /// The site files the gRPC port serves TLS with: those given, ClusterLink's mount
    /// paths for the rest; always on Kubernetes, where data planes are other pods.
    pub fn site_paths(&self) -> Option<fabric::identity::CertPaths> {
        fabric::site::paths(
            self.site_ca_file.as_deref(),
            self.site_cert_file.as_deref(),
            self.site_key_file.as_deref(),
            fabric::site::Role::ControlPlane,
            self.platform == Platform::K8s,
        )
    }
}

pub struct Running {
    /// Where data planes connect: "host:port" or "unix:/path" (cl-dataplane's
    /// --controlplane).
    pub grpc_endpoint: String,
    pub admin_addr: SocketAddr,
    pub services: Arc<Services>,
    stop: watch::Sender<bool>,
}

impl Running {
    pub fn shutdown(&self) {
        self.services.ready.store(false, Ordering::Relaxed);
        let _ = self.stop.send(true);
    }
}

fn parse_labels(raw: &[String]) -> Result<BTreeMap<String, String>, Error> {
    raw.iter()
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Error::Label(l.clone()))
        })
        .collect()
}

/// The token key: read, or created (0600) when missing or unreadable.
fn token_key(path: Option<&Path>) -> Result<Vec<u8>, Error> {
    let fresh = || -> Vec<u8> { (0..32).map(|_| rand::random::<u8>()).collect() };
    let Some(path) = path else {
        return Ok(fresh());
    };
    if let Ok(text) = std::fs::read_to_string(path) {
        match B64.decode(text.trim()) {
            Ok(k) if k.len() == 32 => return Ok(k),
            _ => tracing::warn!(file = %path.display(), "token key unreadable; making a new one"),
        }
    }
    let key = fresh();
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(B64.encode(&key).as_bytes()).map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(key)
}

/// The epoch a previous run recorded in `path` (0 when none or unreadable).
fn read_epoch(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(file = %path.display(), "policy epoch unreadable; starting from 1");
            0
        }),
        Err(_) => 0,
    }
}

/// Records every epoch the control plane reaches in `path` (written aside, then
/// renamed), so that the next run starts above it.
async fn keep_epoch(path: PathBuf, mut epochs: watch::Receiver<u64>) {
    loop {
        let epoch = *epochs.borrow_and_update();
        let tmp = path.with_extension("epoch.tmp");
        let written =
            std::fs::write(&tmp, format!("{epoch}\n")).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::error!(file = %path.display(), epoch, error = %e, "cannot record the policy epoch; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if epochs.changed().await.is_err() {
            return;
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

pub async fn start(config: Config) -> Result<Running, Error> {
    let labels = parse_labels(&config.peer_labels)?;
    if config.platform == Platform::Local {
        let dir = config.resources_dir.as_ref().ok_or(Error::NoResourcesDir)?;
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
    }
    let tls = fabric::identity::watch_files(
        fabric::identity::CertPaths {
            ca: config.ca_file.clone(),
            cert: config.cert_file.clone(),
            key: config.key_file.clone(),
        },
        Duration::from_secs(1),
        Box::new(|r| {
            if let Err(e) = r {
                tracing::error!(error = %e, "peer certificates refused; keeping the loaded ones");
            }
        }),
    )?;
    let kube = match config.platform {
        Platform::Local => None,
        Platform::K8s => {
            let identity = config.identity.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "cl-controlplane".into());
                format!("{host}-{:08x}", rand::random::<u32>())
            });
            let kube = crate::k8s::Kube::connect(config.namespace.clone(), identity).await?;
            let (leader, _task) =
                crate::k8s::leader::elect(kube.clone(), config.lease_duration_secs).await?;
            Some((kube, leader))
        }
    };
    let core = match &kube {
        None => {
            let key = token_key(config.token_key_file.as_deref())?;
            let epoch_file = config
                .token_key_file
                .as_ref()
                .map(|p| p.with_extension("epoch"));
            // One more than the last run recorded (the first snapshot advances it once
            // more): a bump the last run made but could not record is covered too.
            let last = epoch_file.as_deref().map(read_epoch).unwrap_or(0);
            let core = Core::new(key, labels, last + 1, true);
            if let Some(path) = epoch_file {
                tokio::spawn(keep_epoch(path, core.subscribe_epoch()));
            }
            core
        }
        Some((kube, _)) => {
            let (key, epoch) = crate::k8s::jwk::ensure(kube).await?;
            Core::new(key, labels, epoch, false)
        }
    };
    let client = PeerClient::new(
        tls.clone(),
        Duration::from_millis(config.peer_timeout_ms.max(1)),
    );
    let authz = Arc::new(Authz::new(core.clone(), client.clone()));
    let site = config.site_paths();
    if let Some(paths) = &site {
        fabric::site::ensure_distinct(&paths.ca, &config.ca_file)?;
    }
    let site_given = config.site_ca_file.is_some()
        || config.site_cert_file.is_some()
        || config.site_key_file.is_some();
    let grpc = match (&config.grpc_socket, site) {
        (Some(_), Some(_)) if site_given => return Err(Error::SiteWithSocket),
        // A socket only this user can open (a data plane beside it): no TLS needed.
        (Some(path), _) => server::GrpcListener::unix(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?,
        (None, Some(paths)) => {
            let tls =
                fabric::site::watch(paths, Duration::from_secs(1), fabric::site::server_config)?;
            server::GrpcListener::Tls(bind("gRPC port", config.grpc_addr).await?, tls)
        }
        (None, None) => server::GrpcListener::Tcp(bind("gRPC port", config.grpc_addr).await?),
    };
    let admin = bind("admin port", config.admin_addr).await?;
    let grpc_endpoint = grpc.endpoint();
    let admin_addr = admin.local_addr().unwrap_or(config.admin_addr);
    tracing::info!(config = ?config, identity = %tls.borrow().identity, "starting cl-controlplane");

    let services = Arc::new(Services {
        core: core.clone(),
        authz,
        tls,
        ready: AtomicBool::new(false),
        metrics: Metrics::new(),
    });
    services
        .metrics
        .register(Box::new(services.authz.remote_calls.clone()));
    services
        .metrics
        .register(Box::new(services.authz.cache_hits.clone()));
    let (stop, stop_rx) = watch::channel(false);

    let source: Box<dyn Source> = match (&kube, &config.resources_dir) {
        (Some((kube, leader)), _) => {
            let source =
                crate::k8s::source::K8sSource::start(kube.clone(), core.clone(), leader.clone())
                    .await?;
            tokio::spawn(crate::k8s::jwk::follow(
                kube.clone(),
                core.clone(),
                leader.clone(),
            ));
            tokio::spawn(crate::k8s::jwk::keep_epoch(
                kube.clone(),
                core.clone(),
                leader.clone(),
            ));
            tokio::spawn(crate::k8s::status::run(
                kube.clone(),
                core.clone(),
                source.stores.clone(),
                source.subscribe(),
                leader.clone(),
            ));
            Box::new(source)
        }
        (None, Some(dir)) => Box::new(DirSource::start(
            dir.clone(),
            Duration::from_millis(config.scan_interval_ms.max(10)),
        )),
        (None, None) => return Err(Error::NoResourcesDir),
    };
    let mut desired = source.subscribe();
    core.apply(desired.borrow_and_update().clone());
    let mut monitors = Monitors::new(core.clone(), client);
    monitors.reconcile();
    {
        let core = core.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let _source = source;
            loop {
                tokio::select! {
                    c = desired.changed() => if c.is_err() { return },
                    _ = fabric::sync::stopped(&mut stop_rx) => return,
                }
                let d = desired.borrow_and_update().clone();
                core.apply(d);
                monitors.reconcile();
            }
        });
    }
    {
        let services = services.clone();
        let stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = server::serve_grpc(grpc, services, stop_rx).await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
    }
    tokio::spawn(server::serve_admin(admin, services.clone(), stop_rx));
    services.ready.store(true, Ordering::Relaxed);
    Ok(Running {
        grpc_endpoint,
        admin_addr,
        services,
        stop,
    })
}
