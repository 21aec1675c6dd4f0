//! The data plane's side of the control plane API: the configuration stream (with
//! reconnect and back-off, keeping the last snapshot while the control plane is away)
//! and the authorization calls. Never blocks the data path on a reconnect: egress calls
//! fail fast while the control plane is unreachable.
//! Three transports: a Unix socket (the local platform), plain TCP (loopback), and TCP
//! with the site's mutual TLS (Kubernetes, `--controlplane-host`), where the server must
//! present `cl-controlplane` of the site CA whatever host name it is reached by.

use std::sync::Arc;
use std::time::Duration;

use controlplane_api::v1;
use controlplane_api::v1::authorization_client::AuthorizationClient;
use controlplane_api::v1::config_discovery_client::ConfigDiscoveryClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid control plane address {0:?}: {1}")]
    Address(String, String),
    #[error("control plane call failed: {0}")]
    Call(#[from] tonic::Status),
    #[error("control plane call timed out")]
    Timeout,
    #[error("a Unix socket control plane ({0}) takes no site TLS")]
    TlsOverUnix(String),
    #[error(transparent)]
    Site(#[from] fabric::site::Error),
}

/// Per-call deadline for authorization calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct ControlPlane {
    authz: AuthorizationClient<Channel>,
    channel: Channel,
}

impl ControlPlane {
    /// `addr` is "host:port", a URL or "unix:/path"; with `tls`, "host[:port]" (port
    /// 4444 by default) reached over the site's mutual TLS. The channel connects lazily
    /// and reconnects on its own.
    pub fn new(
        addr: &str,
        tls: Option<watch::Receiver<Arc<rustls::ClientConfig>>>,
    ) -> Result<Self, Error> {
        if let Some(path) = addr.strip_prefix("unix:") {
            if tls.is_some() {
                return Err(Error::TlsOverUnix(addr.to_owned()));
            }
            return Ok(Self::unix(std::path::PathBuf::from(path)));
        }
        if let Some(tls) = tls {
            return Self::tls(addr, tls);
        }
        let url = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(url)
            .map_err(|e| Error::Address(addr.to_owned(), e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_lazy();
        Ok(ControlPlane {
            authz: AuthorizationClient::new(channel.clone()),
            channel,
        })
    }

    /// A control plane on a Unix socket (the local platform's default: only the
    /// socket's owner can connect, so no other local process can read the snapshot).
    fn unix(path: std::path::PathBuf) -> Self {
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        let channel = Endpoint::from_static("http://controlplane.local")
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(connector);
        ControlPlane {
            authz: AuthorizationClient::new(channel.clone()),
            channel,
        }
    }

    /// A control plane reached over TCP with the site's mutual TLS. Each connection
    /// resolves the host anew (a Kubernetes Service name) and uses the newest loaded
    /// certificates.
    fn tls(addr: &str, tls: watch::Receiver<Arc<rustls::ClientConfig>>) -> Result<Self, Error> {
        let target = host_port(addr)?;
        let name = fabric::site::controlplane_server_name()?;
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let target = target.clone();
            let name = name.clone();
            let connector = tokio_rustls::TlsConnector::from(tls.borrow().clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(target.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                let stream = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        let channel = Endpoint::from_static("http://cl-controlplane")
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(connector);
        Ok(ControlPlane {
            authz: AuthorizationClient::new(channel.clone()),
            channel,
        })
    }

    pub async fn authorize_egress(
        &self,
        req: v1::EgressRequest,
    ) -> Result<v1::EgressResponse, Error> {
        let mut c = self.authz.clone();
        match tokio::time::timeout(CALL_TIMEOUT, c.authorize_egress(req)).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(Error::Timeout),
        }
    }

    pub async fn peer_request(
        &self,
        req: v1::PeerHttpRequest,
    ) -> Result<v1::PeerHttpResponse, Error> {
        let mut c = self.authz.clone();
        match tokio::time::timeout(CALL_TIMEOUT, c.peer_request(req)).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Follows the configuration stream forever: applies each snapshot to `store`,
    /// reconnects with back-off (100 ms x1.6 up to 2 s), and keeps the last snapshot in
    /// force while disconnected. Returns when `stop` turns true.
    pub async fn follow(
        self,
        id: String,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            metrics.cp_reconnects.inc();
            let mut client = ConfigDiscoveryClient::new(self.channel.clone());
            let run = async {
                let mut stream = client
                    .subscribe(v1::SubscribeRequest {
                        dataplane_id: id.clone(),
                    })
                    .await?
                    .into_inner();
                metrics.cp_connected.set(1);
                tracing::info!("configuration stream connected");
                while let Some(s) = stream.message().await? {
                    let snap = Snapshot::from_proto(s, &metrics);
                    metrics.snapshot_version.set(snap.version as i64);
                    store.swap(snap);
                    backoff = Duration::from_millis(100);
                }
                Ok::<_, tonic::Status>(())
            };
            let result = tokio::select! {
                r = run => r,
                _ = fabric::sync::stopped(&mut stop) => return,
            };
            metrics.cp_connected.set(0);
            match result {
                Ok(()) => tracing::warn!("configuration stream ended; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e.message(), code = ?e.code(), "configuration stream failed; serving the last snapshot")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = fabric::sync::stopped(&mut stop) => return,
            }
            backoff = (backoff.mul_f32(1.6)).min(Duration::from_secs(2));
        }
    }
}

/// "host[:port]" as `--controlplane-host` takes it (ClusterLink passes a bare Service
/// name), with the control plane's port 4444 when none is given; IPv6 in brackets.
fn host_port(addr: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::Address(addr.to_owned(), why.to_owned());
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(addr.to_owned());
    }
    let port = fabric::site::CONTROLPLANE_PORT;
    let bare = match addr.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .ok_or_else(|| bad("unbalanced brackets"))?,
        None => addr,
    };
    if let Ok(ip) = bare.parse::<std::net::Ipv6Addr>() {
        return Ok(format!("[{ip}]:{port}"));
    }
    let (host, with_port) = match addr.rsplit_once(':') {
        Some((host, p)) => {
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number up to 65535"))?;
            (host, addr.to_owned())
        }
        None => (addr, format!("{addr}:{port}")),
    };
    if host.is_empty() || host.contains(['/', ':', ' ', '[', ']']) {
        return Err(bad("expected host[:port]"));
    }
    Ok(with_port)
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn controlplane_host_takes_a_name_an_address_and_an_optional_port() {
        for (given, want) in [
            ("cl-controlplane", "cl-controlplane:4444"),
            (
                "cl-controlplane.clusterlink-system.svc:4000",
                "cl-controlplane.clusterlink-system.svc:4000",
            ),
            ("127.0.0.1", "127.0.0.1:4444"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("::1", "[::1]:4444"),
            ("[::1]", "[::1]:4444"),
            ("[::1]:5000", "[::1]:5000"),
        ] {
            assert_eq!(host_port(given).ok().as_deref(), Some(want), "{given}");
        }
        for bad in [
            "",
            ":4444",
            "host:http",
            "host:70000",
            "a/b",
            "http://x:1",
            "[::1",
            "[::1]x",
        ] {
            assert!(host_port(bad).is_err(), "{bad:?} accepted");
        }
    }
}
