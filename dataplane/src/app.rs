//! Wires the gateway together and returns a `Running` handle with the real bound
//! addresses, so tests start the very same app in-process on port 0.
//! Lifecycle: certificates, then the configuration stream, the gateway port, the
//! import listeners and the admin port. Drain: readiness turns false, accepting stops,
//! h2 connections get GOAWAY, in-flight streams get the drain timeout, the rest are
//! force-closed.
//! It only wires: each part gets the narrow context it needs (`inbound::Context`,
//! `outbound::Context`, `admin::State`), and no part reaches back up here.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fabric::identity::{self, CertPaths};
use fabric::sync::stopped;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::{self, Admission};
use crate::cpclient::ControlPlane;
use crate::drain::Tracker;
use crate::metrics::Metrics;
use crate::outbound::Imports;
use crate::snapshot::Store;
use crate::tunnel::Dialer;
use crate::workers::{self, Workers};
use crate::{admin, cpclient, inbound, outbound, sockopt};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] identity::Error),
    #[error(transparent)]
    ControlPlane(#[from] cpclient::Error),
    #[error(transparent)]
    Workers(#[from] workers::Error),
    #[error("site TLS to the control plane: {0}")]
    Site(#[from] fabric::site::Error),
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
    /// Control plane gRPC address: host:port, http://host:port, or unix:/path/to.sock
    /// (plain; with --site-* files, host:port over mutual TLS).
    #[arg(long, env = "CL_CONTROLPLANE", default_value = "127.0.0.1:4444")]
    pub controlplane: String,
    /// The control plane as `host[:port]` (port 4444 by default) over the site's mutual
    /// TLS, as on Kubernetes (ClusterLink's flag); overrides --controlplane. The site
    /// files default to ClusterLink's mount paths.
    #[arg(long, env = "CL_CONTROLPLANE_HOST")]
    pub controlplane_host: Option<String>,
    /// Site CA certificate (PEM; default with --controlplane-host
    /// /etc/ssl/certs/clink_ca.pem): the control plane must present its
    /// `cl-controlplane` certificate.
    #[arg(long, env = "CL_SITE_CA_FILE")]
    pub site_ca_file: Option<PathBuf>,
    /// This data plane's `cl-dataplane` certificate chain of the site CA (PEM; default
    /// /etc/ssl/certs/clink-dataplane.pem).
    #[arg(long, env = "CL_SITE_CERT_FILE")]
    pub site_cert_file: Option<PathBuf>,
    /// Its private key (PEM; default /etc/ssl/key/clink-dataplane.pem).
    #[arg(long, env = "CL_SITE_KEY_FILE")]
    pub site_key_file: Option<PathBuf>,
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
    #[arg(long, env = "CL_DRAIN_TIMEOUT", default_value_t = 10.0, value_parser = fabric::clock::parse_flag_secs)]
    pub drain_timeout: f64,
    /// Milliseconds to connect (TCP) to a remote gateway or an export target: what a
    /// black-holed gateway costs before the next gateway, or the next source of the
    /// import, is tried (the TLS handshake gets five times as long).
    #[arg(long, env = "CL_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    pub connect_timeout_ms: u64,
    /// Milliseconds a client gets to finish the TLS handshake, then to send a complete
    /// request head, and then a peer request's whole body, on the gateway port.
    #[arg(long, env = "CL_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Connections one peer may hold on the gateway port at once (HTTP/1.1 CONNECT
    /// takes one per tunnel).
    #[arg(long, env = "CL_MAX_CONNECTIONS_PER_PEER", default_value_t = 16_384)]
    pub max_connections_per_peer: usize,
    /// Tunnels (streams) one peer may have open through the gateway port at once.
    #[arg(long, env = "CL_MAX_STREAMS_PER_PEER", default_value_t = 65_536)]
    pub max_streams_per_peer: usize,
    /// Peer requests (/healthz, /authz) per second one peer may send; bursts of twice
    /// as many are taken. Beyond: 429.
    #[arg(long, env = "CL_PEER_REQUESTS_PER_SEC", default_value_t = 1000)]
    pub peer_requests_per_sec: u32,
    /// Seconds a gateway connection (mux or h2) with no stream stays open before the
    /// gateway sends GOAWAY and closes it; 0: never.
    #[arg(long, env = "CL_IDLE_TIMEOUT", default_value_t = 300.0, value_parser = fabric::clock::parse_flag_secs)]
    pub idle_timeout: f64,
    /// Keep established tunnels whose peer or export a new configuration removed (by
    /// default they are closed, reset at both ends, within a second of the snapshot).
    #[arg(long, env = "CL_KEEP_REVOKED_STREAMS")]
    pub keep_revoked_streams: bool,
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
    /// The site files the control plane connection uses: those given, ClusterLink's
    /// mount paths for the rest; none (plain or Unix socket) unless some are given or
    /// --controlplane-host is.
    pub fn site_paths(&self) -> Option<CertPaths> {
        fabric::site::paths(
            self.site_ca_file.as_deref(),
            self.site_cert_file.as_deref(),
            self.site_key_file.as_deref(),
            fabric::site::Role::DataPlane,
            self.controlplane_host.is_some(),
        )
    }
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

/// A started gateway.
pub struct Running {
    pub gateway_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    state: Arc<admin::State>,
    tracker: Arc<Tracker>,
    workers: Arc<Workers>,
    drain: watch::Sender<bool>,
    halt: watch::Sender<bool>,
}

impl Running {
    /// Bound address of an import listener ("namespace/name").
    pub fn import_addr(&self, key: &str) -> Option<SocketAddr> {
        self.state.imports.addrs().get(key).copied()
    }

    /// Drains: readiness false, stop accepting, GOAWAY, wait up to `timeout` for
    /// in-flight streams, then stop everything (remaining streams are force-closed
    /// when the runtime or their tasks go away).
    pub async fn shutdown(self, timeout: Duration) {
        self.state.ready.store(false, Ordering::Relaxed);
        self.state.imports.close_all();
        let _ = self.drain.send(true);
        let active = self.tracker.active();
        tracing::info!(active, "draining");
        if tokio::time::timeout(timeout, self.tracker.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                active = self.tracker.active(),
                "drain timeout; closing the remaining streams"
            );
        }
        self.tracker.force_close();
        let _ = self.halt.send(true);
        if !self.workers.wait_exited(Duration::from_secs(2)).await {
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

/// Backoff of the retries of import listeners that could not be bound.
const BIND_RETRY_FIRST: Duration = Duration::from_millis(500);
const BIND_RETRY_MAX: Duration = Duration::from_secs(10);

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
    let tls = identity::watch_files(
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
    let site = match config.site_paths() {
        Some(paths) => Some({
            fabric::site::ensure_distinct(&paths.ca, &config.ca_file)?;
            fabric::site::watch(
                paths,
                Duration::from_millis(config.cert_reload_ms.max(10)),
                fabric::site::client_config,
            )?
        }),
        None => None,
    };
    let cp = ControlPlane::new(
        config
            .controlplane_host
            .as_deref()
            .unwrap_or(&config.controlplane),
        site,
    )?;
    let (halt, halt_rx) = watch::channel(false);
    let workers = Workers::start(
        config.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        halt_rx.clone(),
    )?;
    let gateway = bind("gateway port", config.gateway_addr).await?;
    sockopt::tune_listener(&gateway);
    let admin = bind("admin port", config.admin_addr).await?;
    let gateway_addr = gateway.local_addr().unwrap_or(config.gateway_addr);
    let admin_addr = admin.local_addr().unwrap_or(config.admin_addr);
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
    let store = Arc::new(Store::new());
    let (drain, drain_rx) = watch::channel(false);
    let gateway = gateway.into_std().map_err(|source| Error::Bind {
        what: "gateway port",
        addr: gateway_addr,
        source,
    })?;
    let tracker = Arc::new(Tracker::default());
    let identity = tls.borrow().identity.clone();
    tracing::info!(config = ?config, %identity, "starting cl-dataplane");

    let mut dialer = Dialer::new(
        tls.clone(),
        metrics.clone(),
        connect_timeout,
        config.force_http1,
    )
    .with_workers(workers.len());
    if config.no_mux {
        dialer = dialer.without_mux();
    }
    let dialer = Arc::new(dialer);
    let inbound = Arc::new(inbound::Context {
        tls: tls.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        cp: cp.clone(),
        tracker: tracker.clone(),
        workers: workers.clone(),
        handshake_timeout: Duration::from_millis(config.handshake_timeout_ms.max(1)),
        connect_timeout,
        admission: Admission::new(admission::Limits {
            connections: config.max_connections_per_peer.max(1),
            streams: config.max_streams_per_peer.max(1),
            requests_per_sec: config.peer_requests_per_sec.max(1),
        }),
        idle_timeout: (config.idle_timeout > 0.0)
            .then(|| Duration::from_secs_f64(config.idle_timeout)),
        revoke: !config.keep_revoked_streams,
    });
    let outbound = Arc::new(outbound::Context {
        store: store.clone(),
        metrics: metrics.clone(),
        cp: cp.clone(),
        tracker: tracker.clone(),
        workers: workers.clone(),
        egress_cache: Default::default(),
    });
    let state = Arc::new(admin::State {
        config: serde_json::to_value(&config).unwrap_or_default(),
        metrics: metrics.clone(),
        store: store.clone(),
        tls,
        imports: Arc::new(Imports::new(config.import_bind)),
        ready: AtomicBool::new(false),
    });

    let id = format!("{identity}-{}", std::process::id());
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
            inbound::serve(listener, index, inbound.clone(), drain_rx.clone()),
        );
    }
    tokio::spawn(admin::serve(admin, state.clone(), halt_rx.clone()));
    // Import listeners follow the snapshot.
    {
        let state = state.clone();
        let mut changes = store.subscribe();
        let mut drain_rx = drain_rx.clone();
        tokio::spawn(async move {
            // A listener that could not be bound (its port held by another process)
            // is tried again after a backoff, not only at the next snapshot, which
            // may never come.
            let mut retry = BIND_RETRY_FIRST;
            loop {
                if *changes.borrow_and_update() == 0 {
                    tokio::select! {
                        c = changes.changed() => if c.is_err() { return },
                        _ = stopped(&mut drain_rx) => return,
                    }
                }
                changes.borrow_and_update();
                let bound = state.imports.reconcile(&outbound, &dialer, &drain_rx).await;
                if *drain_rx.borrow() {
                    return;
                }
                state.ready.store(bound, Ordering::Relaxed);
                let wait = if bound {
                    retry = BIND_RETRY_FIRST;
                    None
                } else {
                    let w = retry;
                    retry = (retry * 2).min(BIND_RETRY_MAX);
                    Some(w)
                };
                tokio::select! {
                    c = changes.changed() => if c.is_err() { return },
                    _ = stopped(&mut drain_rx) => return,
                    _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
                }
            }
        });
    }
    Ok(Running {
        gateway_addr,
        admin_addr,
        state,
        tracker,
        workers,
        drain,
        halt,
    })
}
