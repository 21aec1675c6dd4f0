//! The control plane's two listeners: the gRPC API for the data planes (the
//! configuration stream, egress authorization and peer requests) and the admin HTTP
//! port (`/metrics`, `/ready`, and resources with status as JSON in the Kubernetes
//! object shape: `/api/<kind plural>` and `/api/<kind plural>/<namespace>/<name>`,
//! or `/api/<kind plural>/<name>` for Peers and PrivilegedAccessPolicies, plus
//! `/api/errors` for refused resources).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use controlplane_api::v1;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::Stream;

use crate::authz::Authz;
use crate::core::Core;
use crate::resources::{Key, Kind, DEFAULT_NAMESPACE};
use fabric::admin::reply;

/// What the gRPC services and the admin port share.
pub struct Services {
    pub core: Arc<Core>,
    pub authz: Arc<Authz>,
    pub tls: watch::Receiver<Arc<fabric::identity::Material>>,
    pub ready: AtomicBool,
    pub metrics: Metrics,
}

impl Services {
    fn local(&self) -> String {
        self.tls.borrow().identity.clone()
    }
}

pub struct Metrics {
    registry: Registry,
    peer_reachable: IntGaugeVec,
    resource_errors: IntGauge,
    subscribers: IntGauge,
    grpc_tls_refused: IntCounter,
    policy_epoch: IntGauge,
}

impl Metrics {
    /// Adds collectors owned elsewhere (e.g. the authorizer's counters).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::error!(error = %e, "metric registration failed");
        }
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let peer_reachable = IntGaugeVec::new(
            Opts::new(
                "clusterlink_peer_reachable",
                "1 if the remote peer answers heartbeats, else 0",
            ),
            &["peer"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let resource_errors = IntGauge::new(
            "clusterlink_resource_errors",
            "Resources refused by validation in the last scan",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let subscribers = IntGauge::new(
            "clusterlink_dataplane_subscribers",
            "Data planes following the configuration stream",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let grpc_tls_refused = IntCounter::new(
            "clusterlink_grpc_tls_refused_total",
            "Connections to the gRPC API refused in the site TLS handshake (wrong CA or name, no certificate or no TLS, as from TCP probes, timeout, too many at once)",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let policy_epoch = IntGauge::new(
            "clusterlink_policy_epoch",
            "The policy epoch: access tokens minted under an older one are refused (it never goes backwards, also across restarts)",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        for c in [
            Box::new(peer_reachable.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(policy_epoch.clone()),
            Box::new(resource_errors.clone()),
            Box::new(subscribers.clone()),
            Box::new(grpc_tls_refused.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::error!(error = %e, "metric registration failed");
            }
        }
        Metrics {
            registry,
            peer_reachable,
            resource_errors,
            subscribers,
            grpc_tls_refused,
            policy_epoch,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

struct SubscriberGuard(IntGauge);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone)]
pub struct Grpc(pub Arc<Services>);

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<v1::Snapshot, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl v1::config_discovery_server::ConfigDiscovery for Grpc {
    type SubscribeStream = SnapshotStream;

    async fn subscribe(
        &self,
        req: tonic::Request<v1::SubscribeRequest>,
    ) -> Result<tonic::Response<SnapshotStream>, tonic::Status> {
        use tokio_stream::StreamExt;
        tracing::info!(dataplane = %req.get_ref().dataplane_id, "data plane subscribed");
        self.0.metrics.subscribers.inc();
        let guard = SubscriberGuard(self.0.metrics.subscribers.clone());
        let rx = self.0.core.subscribe_snapshots();
        let s = tokio_stream::wrappers::WatchStream::new(rx).map(move |s| {
            let _keep = &guard;
            Ok(s)
        });
        Ok(tonic::Response::new(Box::pin(s)))
    }
}

#[tonic::async_trait]
impl v1::authorization_server::Authorization for Grpc {
    async fn authorize_egress(
        &self,
        req: tonic::Request<v1::EgressRequest>,
    ) -> Result<tonic::Response<v1::EgressResponse>, tonic::Status> {
        let local = self.0.local();
        Ok(tonic::Response::new(
            self.0.authz.egress(&local, req.into_inner()).await,
        ))
    }

    async fn peer_request(
        &self,
        req: tonic::Request<v1::PeerHttpRequest>,
    ) -> Result<tonic::Response<v1::PeerHttpResponse>, tonic::Status> {
        let local = self.0.local();
        Ok(tonic::Response::new(
            self.0.authz.peer_request(&local, req.into_inner()),
        ))
    }
}

/// Where the gRPC API listens: TCP with the site's mutual TLS (the Kubernetes platform,
/// where data planes are other pods), a Unix socket only its owner may use (the local
/// platform's default), or plain TCP (local only, for tests and loopback use).
pub enum GrpcListener {
    Tls(TcpListener, watch::Receiver<Arc<rustls::ServerConfig>>),
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl GrpcListener {
    /// Binds a Unix socket with mode 0600, inside a directory only its owner can
    /// enter (created 0700 if missing), replacing a stale socket file.
    pub fn unix(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let l = tokio::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(GrpcListener::Unix(l, path.to_owned()))
    }

    /// What a data plane passes as --controlplane to reach it.
    pub fn endpoint(&self) -> String {
        match self {
            GrpcListener::Tcp(l) | GrpcListener::Tls(l, _) => {
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            }
            GrpcListener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Serves the gRPC API until `stop` turns true.
pub async fn serve_grpc(
    listener: GrpcListener,
    services: Arc<Services>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let metrics_of = services.clone();
    let grpc = Grpc(services);
    let router = tonic::transport::Server::builder()
        .add_service(v1::config_discovery_server::ConfigDiscoveryServer::new(
            grpc.clone(),
        ))
        .add_service(v1::authorization_server::AuthorizationServer::new(grpc));
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    match listener {
        GrpcListener::Tls(l, config) => {
            let incoming = tls_incoming(l, config, metrics_of.metrics.grpc_tls_refused.clone());
            router.serve_with_incoming_shutdown(incoming, stopped).await
        }
        GrpcListener::Tcp(l) => {
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    stopped,
                )
                .await
        }
        GrpcListener::Unix(l, path) => {
            let r = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    stopped,
                )
                .await;
            let _ = std::fs::remove_file(path);
            r
        }
    }
}

/// How long a client has to finish the TLS handshake on the gRPC port (a data plane
/// gives up on its side after 2 s).
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Handshakes in progress at once; past it new connections are closed at once, so
/// that silent connections cannot use up the process's file descriptors.
const TLS_HANDSHAKES_MAX: usize = 256;

/// Accepts TCP connections and hands on those that complete the site TLS handshake;
/// each handshake runs in its own task, so a slow or silent client holds up no one,
/// and at most `TLS_HANDSHAKES_MAX` run at once. A refused handshake closes that
/// connection only (counted and logged at debug: anyone who can reach the port can
/// cause it).
fn tls_incoming(
    listener: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
    refused: IntCounter,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsIo, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(TLS_HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                refused.inc();
                tracing::debug!("too many gRPC TLS handshakes in progress; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsIo(tls))).await;
                    }
                    Ok(Err(e)) => {
                        refused.inc();
                        tracing::debug!(error = %e, "gRPC client refused in the TLS handshake");
                    }
                    Err(_) => {
                        refused.inc();
                        tracing::debug!("gRPC client timed out in the TLS handshake");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A data plane's verified TLS connection, as tonic serves it.
pub struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Serves the admin port until `stop` turns true.
pub async fn serve_admin(
    listener: TcpListener,
    services: Arc<Services>,
    stop: watch::Receiver<bool>,
) {
    fabric::admin::serve_http(listener, stop, move |req| admin(req, services.clone())).await
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(
        status,
        "application/json",
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )
}

async fn admin(
    req: Request<Incoming>,
    s: Arc<Services>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    Ok(match parts.as_slice() {
        ["metrics"] => {
            let peers = s.core.list(Kind::Peer);
            s.metrics.peer_reachable.reset();
            for p in peers {
                let name = p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let up = s.core.health(&name).reachable == Some(true);
                s.metrics
                    .peer_reachable
                    .with_label_values(&[&name])
                    .set(i64::from(up));
            }
            s.metrics
                .resource_errors
                .set(s.core.source_errors().len() as i64);
            s.metrics
                .policy_epoch
                .set(i64::try_from(s.core.epoch()).unwrap_or(i64::MAX));
            let mut out = String::new();
            let _ =
                prometheus::TextEncoder::new().encode_utf8(&s.metrics.registry.gather(), &mut out);
            reply(StatusCode::OK, "text/plain; version=0.0.4", out)
        }
        ["ready"] => {
            if s.ready.load(Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        ["live"] => reply(StatusCode::OK, "text/plain", "live\n"),
        ["api", "errors"] => json(
            StatusCode::OK,
            &serde_json::json!({ "errors": s.core.source_errors() }),
        ),
        ["api", kind] => match Kind::from_user(kind) {
            Some(kind) => json(
                StatusCode::OK,
                &serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": s.core.list(kind) }),
            ),
            None => not_found(&format!("unknown kind {kind:?}")),
        },
        ["api", kind, rest @ ..] if !rest.is_empty() && rest.len() <= 2 => {
            let Some(kind) = Kind::from_user(kind) else {
                return Ok(not_found(&format!("unknown kind {kind:?}")));
            };
            let (namespace, name) = match (kind.namespaced(), rest) {
                (true, [ns, name]) => (ns.to_string(), name.to_string()),
                (true, [name]) => (DEFAULT_NAMESPACE.to_owned(), name.to_string()),
                (false, [name]) => (String::new(), name.to_string()),
                _ => return Ok(not_found("bad resource path")),
            };
            let key = Key {
                kind,
                namespace,
                name,
            };
            match s.core.object(&key) {
                Some(v) => json(StatusCode::OK, &v),
                None => not_found(&format!("{key} not found")),
            }
        }
        _ => not_found("not found"),
    })
}

fn not_found(msg: &str) -> Response<Full<Bytes>> {
    json(StatusCode::NOT_FOUND, &serde_json::json!({ "error": msg }))
}
