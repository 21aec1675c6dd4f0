//! Wires the gateway together and returns a `Running` handle with the real bound
//! addresses, so tests start the very same app in-process on port 0.
//! Lifecycle: certificates, then the configuration stream, the gateway port, the
//! import listeners and the admin port. Drain: readiness turns false, accepting stops,
//! h2 connections get GOAWAY, in-flight streams get the drain timeout, the rest are
//! force-closed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::copy::End;
use crate::cpclient::ControlPlane;
use crate::metrics::Metrics;
use crate::outbound::Imports;
use crate::snapshot::Store;
use crate::tls::{CertPaths, Material};
use crate::tunnel::Dialer;
use crate::workers::{self, Workers};
use crate::{admin, cpclient, inbound, tls};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error(transparent)]
    ControlPlane(#[from] cpclient::Error),
    #[error(transparent)]
    Workers(#[from] workers::Error),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// cl-dataplane's flags; each has a `CL_` environment fallback.
#[derive(Debug, Clone, clap::Parser, serde::Serialize)]
#[command(
    name = "cl-dataplane",
    version,
    about = "ClusterLink data plane: the mTLS gateway"
)]
pub struct Config {
    /// Peer-facing gateway address (mTLS).
    #[arg(long, env = "CL_GATEWAY_ADDR", default_value = "0.0.0.0:4443")]
    pub gateway_addr: SocketAddr,
    /// Admin address: /metrics, /ready, /live, /config_dump.
    #[arg(long, env = "CL_ADMIN_ADDR", default_value = "127.0.0.1:4445")]
    pub admin_addr: SocketAddr,
    /// Address the import listeners bind to.
    #[arg(long, env = "CL_IMPORT_BIND", default_value = "0.0.0.0")]
    pub import_bind: IpAddr,
    /// Control plane gRPC address: host:port, http://host:port, or unix:/path/to.sock.
    #[arg(long, env = "CL_CONTROLPLANE", default_value = "127.0.0.1:4444")]
    pub controlplane: String,
    /// Fabric CA certificate (PEM).
    #[arg(long, env = "CL_CA_FILE")]
    pub ca_file: PathBuf,
    /// This peer's certificate chain (PEM: peer certificate, then CA).
    #[arg(long, env = "CL_CERT_FILE")]
    pub cert_file: PathBuf,
    /// This peer's private key (PEM: PKCS#1, PKCS#8 or SEC1).
    #[arg(long, env = "CL_KEY_FILE")]
    pub key_file: PathBuf,
    /// Seconds in-flight streams get on SIGTERM before they are closed.
    #[arg(long, env = "CL_DRAIN_TIMEOUT", default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Milliseconds to connect to a remote gateway or an export target.
    #[arg(long, env = "CL_CONNECT_TIMEOUT_MS", default_value_t = 2000)]
    pub connect_timeout_ms: u64,
    /// Milliseconds a client gets to finish the TLS handshake, and then to send a
    /// complete request head, on the gateway port.
    #[arg(long, env = "CL_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// How often certificate files are checked for changes, in milliseconds.
    #[arg(long, env = "CL_CERT_RELOAD_MS", default_value_t = 1000)]
    pub cert_reload_ms: u64,
    /// Tunnel with HTTP/1.1 CONNECT to every peer, one TLS connection per tunnel
    /// (ClusterLink's own model; for compatibility checks and benchmarks).
    #[arg(long, env = "CL_FORCE_HTTP1")]
    pub force_http1: bool,
    /// Tunnel over HTTP/2 even to gateways that speak our own multiplexer
    /// (`clusterlink-mux/1`, preferred by default); for comparison and benchmarks.
    #[arg(long, env = "CL_NO_MUX")]
    pub no_mux: bool,
    /// Worker threads, each with its own single-threaded runtime; a connection stays
    /// on the worker that accepted it (default: one per core).
    #[arg(long, env = "CL_WORKERS")]
    pub workers: Option<usize>,
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, env = "CL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl Config {
    pub fn cert_paths(&self) -> CertPaths {
        CertPaths {
            ca: self.ca_file.clone(),
            cert: self.cert_file.clone(),
            key: self.key_file.clone(),
        }
    }
}

/// Counts in-flight tunnelled connections for the drain, and force-closes the ones
/// left when the drain times out.
pub struct Tracker {
    count: AtomicUsize,
    idle: Notify,
    force: watch::Sender<bool>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            count: AtomicUsize::new(0),
            idle: Notify::new(),
            force: watch::channel(false).0,
        }
    }
}

pub struct TrackGuard(Arc<Tracker>);

impl Tracker {
    pub fn track(self: &Arc<Self>) -> TrackGuard {
        self.count.fetch_add(1, Ordering::Relaxed);
        TrackGuard(self.clone())
    }

    /// Runs a relay until it ends or the drain force-closes it.
    pub async fn run(&self, relay: impl std::future::Future<Output = End>) -> End {
        let mut force = self.force.subscribe();
        tokio::select! {
            end = relay => end,
            _ = stopped(&mut force) => End::Drained,
        }
    }

    pub fn active(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What the connection handlers share.
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub cp: ControlPlane,
    pub tls: watch::Receiver<Arc<Material>>,
    pub tracker: Arc<Tracker>,
    pub imports: Imports,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub ready: AtomicBool,
    /// Last allowed egress answer per (import, client IP): reused while the snapshot it
    /// was given under is in force (single-source imports), and as last-known-good
    /// while the control plane is unreachable, until the answer's token expires.
    pub egress_cache: crate::outbound::EgressCache,
    /// The threads connections run on.
    pub workers: Arc<Workers>,
}

/// A started gateway.
pub struct Running {
    pub gateway_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    drain: watch::Sender<bool>,
    halt: watch::Sender<bool>,
}

impl Running {
    /// Bound address of an import listener ("namespace/name").
    pub fn import_addr(&self, key: &str) -> Option<SocketAddr> {
        self.shared.imports.addrs().get(key).copied()
    }

    /// Drains: readiness false, stop accepting, GOAWAY, wait up to `timeout` for
    /// in-flight streams, then stop everything (remaining streams are force-closed
    /// when the runtime or their tasks go away).
    pub async fn shutdown(self, timeout: Duration) {
        self.shared.ready.store(false, Ordering::Relaxed);
        self.shared.imports.close_all();
        let _ = self.drain.send(true);
        let active = self.shared.tracker.active();
        tracing::info!(active, "draining");
        if tokio::time::timeout(timeout, self.shared.tracker.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                active = self.shared.tracker.active(),
                "drain timeout; closing the remaining streams"
            );
        }
        self.shared.tracker.force.send_replace(true);
        let _ = self.halt.send(true);
        if !self
            .shared
            .workers
            .wait_exited(Duration::from_secs(2))
            .await
        {
            tracing::warn!("worker threads did not stop in time");
        }
    }
}

impl Drop for Running {
    /// A gateway dropped without `shutdown` stops at once (its worker threads would
    /// otherwise outlive it).
    fn drop(&mut self) {
        let _ = self.halt.send(true);
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

/// Starts the gateway. Returns once the ports are bound; readiness follows the first
/// snapshot.
pub async fn start(config: Config) -> Result<Running, Error> {
    let metrics = Arc::new(Metrics::new());
    let m = metrics.clone();
    let tls = tls::watch_files(
        config.cert_paths(),
        Duration::from_millis(config.cert_reload_ms.max(10)),
        Box::new(move |r| match r {
            Ok(material) => {
                if material.generation > 1 {
                    m.cert_reloads.with_label_values(&["ok"]).inc();
                }
                m.cert_not_after.set(material.not_after);
            }
            Err(_) => m.cert_reloads.with_label_values(&["error"]).inc(),
        }),
    )?;
    let cp = ControlPlane::new(&config.controlplane)?;
    let (halt, halt_rx) = watch::channel(false);
    let workers = Workers::start(
        config.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        halt_rx.clone(),
    )?;
    let gateway = bind("gateway port", config.gateway_addr).await?;
    crate::tunnel::tune_listener(&gateway);
    let admin = bind("admin port", config.admin_addr).await?;
    let gateway_addr = gateway.local_addr().unwrap_or(config.gateway_addr);
    let admin_addr = admin.local_addr().unwrap_or(config.admin_addr);
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
    let store = Arc::new(Store::new());
    let config_handshake_ms = config.handshake_timeout_ms;
    let (drain, drain_rx) = watch::channel(false);
    let gateway = gateway.into_std().map_err(|source| Error::Bind {
        what: "gateway port",
        addr: gateway_addr,
        source,
    })?;
    let shared = Arc::new(Shared {
        imports: Imports::new(config.import_bind),
        config: Arc::new(config),
        store: store.clone(),
        metrics: metrics.clone(),
        cp: cp.clone(),
        tls: tls.clone(),
        tracker: Arc::new(Tracker::default()),
        connect_timeout,
        handshake_timeout: Duration::from_millis(config_handshake_ms.max(1)),
        ready: AtomicBool::new(false),
        egress_cache: Default::default(),
        workers: workers.clone(),
    });
    let mut dialer = Dialer::new(
        tls,
        metrics.clone(),
        connect_timeout,
        shared.config.force_http1,
    );
    if shared.config.no_mux {
        dialer = dialer.without_mux();
    }
    let dialer = Arc::new(dialer);
    tracing::info!(config = ?shared.config, identity = %shared.tls.borrow().identity, "starting cl-dataplane");

    let id = format!("{}-{}", shared.tls.borrow().identity, std::process::id());
    tokio::spawn(cp.follow(id, store.clone(), metrics, halt_rx.clone()));
    // Each accepting worker has its own descriptor of the one listening socket.
    let copies = workers
        .listener_copies(&gateway)
        .map_err(|source| Error::Bind {
            what: "gateway port",
            addr: gateway_addr,
            source,
        })?;
    drop(gateway);
    for (index, listener) in copies.into_iter().enumerate() {
        workers.spawn_on(
            index,
            inbound::serve(listener, index, shared.clone(), drain_rx.clone()),
        );
    }
    tokio::spawn(admin::serve(admin, shared.clone(), halt_rx.clone()));
    // Import listeners follow the snapshot.
    {
        let shared = shared.clone();
        let mut changes = store.subscribe();
        let mut drain_rx = drain_rx.clone();
        tokio::spawn(async move {
            loop {
                if *changes.borrow_and_update() == 0 {
                    tokio::select! {
                        c = changes.changed() => if c.is_err() { return },
                        _ = stopped(&mut drain_rx) => return,
                    }
                }
                changes.borrow_and_update();
                let bound = shared.imports.reconcile(&shared, &dialer, &drain_rx).await;
                if *drain_rx.borrow() {
                    return;
                }
                shared.ready.store(bound, Ordering::Relaxed);
                tokio::select! {
                    c = changes.changed() => if c.is_err() { return },
                    _ = stopped(&mut drain_rx) => return,
                }
            }
        });
    }
    Ok(Running {
        gateway_addr,
        admin_addr,
        shared,
        drain,
        halt,
    })
}

/// Resolves once `rx` holds true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
