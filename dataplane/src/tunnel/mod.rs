//! Outbound tunnels to remote gateways. Over HTTP/2, each tunnelled connection is one
//! CONNECT stream on a pooled mTLS connection per gateway: no TLS handshake per new
//! connection in steady state. Each worker thread (`crate::workers`) keeps its own
//! pooled connection per gateway, so that a stream and the connection it rides on run
//! on one thread; a new one is opened when the worker has none, or its own are at
//! their stream limit, have received GOAWAY, or were made with certificates that have
//! since been rotated. Peers that do not tunnel over h2 (ClusterLink's Go data
//! plane offers h2 in ALPN but cannot CONNECT over it) get HTTP/1.1 CONNECT, one TLS
//! connection per tunnel, as ClusterLink's data planes expect.
//! Each worker has a pool of its own; a pool lock is held only to pick or insert a
//! connection, never across I/O.
//!
//! Layout: this module opens tunnels (gateway order, fallback to HTTP/1.1 CONNECT,
//! TLS dialing); `pool` keeps the pooled connections; `stream` opens a stream on one
//! of them (mux or h2); `h1` speaks HTTP/1.1 CONNECT on a connection of its own.

mod h1;
mod pool;
mod stream;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fabric::identity::Material;
use fabric::sync::lock;
use h2::{RecvStream, SendStream};
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::metrics::Metrics;
use crate::mux;
use crate::snapshot::{Peer, Protocol};
use crate::sockopt::tune;

use h1::connect_h1;
pub use h1::Rewind;
use pool::Pool;
pub use pool::StreamLease;

/// How long a remote gateway gets to answer a CONNECT, unless
/// `Dialer::with_response_timeout` says otherwise.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("peer {0:?} has no gateways")]
    NoGateways(String),
    #[error("gateway {gateway}: {reason}")]
    Gateway { gateway: String, reason: String },
    /// The tunnel failed after the client's first bytes went out with the request:
    /// not retried, so that they cannot reach the target twice.
    #[error("gateway {gateway}: {reason} (after the first bytes were sent; not retried)")]
    Interrupted { gateway: String, reason: String },
    #[error("gateway refused the tunnel: {status} {reason}")]
    Refused {
        status: StatusCode,
        reason: String,
        /// The refusal came from a gateway that tunnels over h2 (ours).
        authoritative: bool,
    },
}

/// An established tunnel to an export, ready to splice.
pub enum Tunnel {
    H2 {
        send: SendStream<Bytes>,
        recv: RecvStream,
        lease: StreamLease,
    },
    H1(Box<Rewind<TlsStream<TcpStream>>>),
    Mux {
        stream: mux::Stream,
        lease: StreamLease,
    },
}

/// Dials remote gateways and keeps the HTTP/2 pool.
pub struct Dialer {
    tls: watch::Receiver<Arc<Material>>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    response_timeout: Duration,
    gateway_backoff: Duration,
    /// One pool per worker thread, and a last one for callers on no worker thread
    /// (`with_workers`): a new stream takes only its own worker's pool lock, which no
    /// other thread takes but to look for a fallback.
    pools: Box<[Mutex<Pool>]>,
    /// The certificate generation up to which every pool has been swept of retired
    /// connections (`pool::Dialer::pick`).
    swept: AtomicU64,
    /// Serialises connection set-up per gateway so that a burst of new connections
    /// shares one handshake instead of racing many.
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    failed_until: Mutex<HashMap<String, Instant>>,
    /// Pools ("peer@gateway#worker") whose last attempt to add a connection failed
    /// while another one worked: until then, streams use the working one at once
    /// instead of each waiting for another dial.
    growth_failed_until: Mutex<HashMap<String, Instant>>,
    /// Peers learned to need HTTP/1.1 CONNECT.
    h1_peers: Mutex<HashSet<String>>,
    /// Force HTTP/1.1 CONNECT toward every peer (ClusterLink's model; benchmarks).
    force_h1: bool,
    /// Offer `clusterlink-mux/1` ahead of h2 when dialing a pooled connection.
    mux: bool,
}

impl Dialer {
    pub fn new(
        tls: watch::Receiver<Arc<Material>>,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
        force_h1: bool,
    ) -> Self {
        Dialer {
            tls,
            metrics,
            connect_timeout,
            response_timeout: RESPONSE_TIMEOUT,
            gateway_backoff: Duration::from_secs(5),
            pools: Box::new([Mutex::new(Pool::new())]),
            swept: AtomicU64::new(0),
            connecting: Mutex::new(HashMap::new()),
            failed_until: Mutex::new(HashMap::new()),
            growth_failed_until: Mutex::new(HashMap::new()),
            h1_peers: Mutex::new(HashSet::new()),
            force_h1,
            mux: true,
        }
    }

    /// A pool for each of `workers` worker threads (`crate::workers`), besides the one
    /// for callers on no worker thread.
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.pools = (0..=workers).map(|_| Mutex::new(Pool::new())).collect();
        self
    }

    /// Pooled connections speak h2 even to gateways that offer `clusterlink-mux/1`.
    pub fn without_mux(mut self) -> Self {
        self.mux = false;
        self
    }

    /// How long a remote gateway gets to answer a CONNECT (default `RESPONSE_TIMEOUT`).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    fn wants_h1(&self, peer: &Peer) -> bool {
        self.force_h1
            || peer.protocol == Protocol::Http1
            || (peer.protocol == Protocol::Auto && lock(&self.h1_peers).contains(&peer.name))
    }

    /// Gateways in order, those that failed recently last.
    fn ordered<'a>(&self, peer: &'a Peer) -> Vec<&'a String> {
        let now = Instant::now();
        let failed = lock(&self.failed_until);
        let (mut good, bad): (Vec<_>, Vec<_>) = peer
            .gateways
            .iter()
            .partition(|g| failed.get(*g).is_none_or(|t| *t <= now));
        // Skipped while backing off; tried only when every gateway is backing off.
        if good.is_empty() {
            good = bad;
        }
        good
    }

    fn mark_failed(&self, gateway: &str) {
        lock(&self.failed_until).insert(gateway.to_owned(), Instant::now() + self.gateway_backoff);
    }

    /// Opens a tunnel to `peer` carrying `token`, trying its gateways in order. `early`
    /// (possibly empty) is what the client sent before the tunnel existed: over h2 it
    /// goes out right behind the CONNECT request, not after its answer (the exporting
    /// gateway holds it in the stream until the target is connected), which saves a
    /// round trip between the gateways and a TLS record; over HTTP/1.1 it follows the
    /// 200.
    pub async fn open(&self, peer: &Peer, token: &str, early: &Bytes) -> Result<Tunnel, Error> {
        let gateways = self.ordered(peer);
        if gateways.is_empty() {
            return Err(Error::NoGateways(peer.name.clone()));
        }
        let mut last = None;
        for gw in gateways {
            match self.open_via(peer, gw, token, early).await {
                Ok(t) => {
                    lock(&self.failed_until).remove(gw.as_str());
                    return Ok(t);
                }
                Err(e @ Error::Refused { .. }) => return Err(e),
                Err(e @ Error::Interrupted { .. }) => {
                    self.mark_failed(gw);
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(peer = %peer.name, gateway = %gw, error = %e, "gateway failed");
                    self.mark_failed(gw);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::NoGateways(peer.name.clone())))
    }

    async fn open_via(
        &self,
        peer: &Peer,
        gw: &str,
        token: &str,
        early: &Bytes,
    ) -> Result<Tunnel, Error> {
        if self.wants_h1(peer) {
            let tls = self.dial_tls(peer, gw, false).await?;
            return connect_h1(tls, peer, gw, token, early, self.response_timeout).await;
        }
        match self.open_h2(peer, gw, token, early).await {
            Err(Error::Refused {
                status,
                authoritative: false,
                ..
            }) if peer.protocol == Protocol::Auto => {
                tracing::info!(peer = %peer.name, %status, "h2 CONNECT failed; using HTTP/1.1 CONNECT for this peer");
                lock(&self.h1_peers).insert(peer.name.clone());
                let tls = self.dial_tls(peer, gw, false).await?;
                connect_h1(tls, peer, gw, token, early, self.response_timeout).await
            }
            other => other,
        }
    }

    async fn dial_tls(
        &self,
        peer: &Peer,
        gw: &str,
        h2: bool,
    ) -> Result<TlsStream<TcpStream>, Error> {
        let material = self.tls.borrow().clone();
        self.dial_tls_with(material, peer, gw, h2).await
    }

    /// `dial_tls` with the given certificate material.
    async fn dial_tls_with(
        &self,
        material: Arc<Material>,
        peer: &Peer,
        gw: &str,
        h2: bool,
    ) -> Result<TlsStream<TcpStream>, Error> {
        let gerr = |reason: String| Error::Gateway {
            gateway: gw.to_owned(),
            reason,
        };
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(gw))
            .await
            .map_err(|_| gerr("connect timed out".into()))?
            .map_err(|e| gerr(format!("connect: {e}")))?;
        tune(&tcp);
        let config = if h2 && self.mux {
            material.client_mux.clone()
        } else if h2 {
            material.client_h2.clone()
        } else {
            material.client_h1.clone()
        };
        let name = rustls_pki_types::ServerName::try_from(peer.name.clone())
            .map_err(|e| gerr(format!("peer name: {e}")))?;
        let handshake = TlsConnector::from(config).connect(name, tcp);
        match tokio::time::timeout(self.connect_timeout * 5, handshake).await {
            Ok(Ok(tls)) => {
                self.metrics
                    .handshakes
                    .with_label_values(&["client", "ok"])
                    .inc();
                Ok(tls)
            }
            Ok(Err(e)) => {
                self.metrics
                    .handshakes
                    .with_label_values(&["client", "error"])
                    .inc();
                Err(gerr(format!("TLS: {e}")))
            }
            Err(_) => {
                self.metrics
                    .handshakes
                    .with_label_values(&["client", "error"])
                    .inc();
                Err(gerr("TLS handshake timed out".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests;
