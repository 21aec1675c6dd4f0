//! Outbound tunnels to remote gateways. Over HTTP/2, each tunnelled connection is one
//! CONNECT stream on a pooled mTLS connection per gateway: no TLS handshake per new
//! connection in steady state. Each worker thread (`crate::workers`) keeps its own
//! pooled connection per gateway, so that a stream and the connection it rides on run
//! on one thread; a new one is opened when the worker has none, or its own are at
//! their stream limit, have received GOAWAY, or were made with certificates that have
//! since been rotated. Peers that do not tunnel over h2 (ClusterLink's Go data
//! plane offers h2 in ALPN but cannot CONNECT over it) get HTTP/1.1 CONNECT, one TLS
//! connection per tunnel, as ClusterLink's data planes expect.
//! The pool lock is held only to pick or insert a connection, never across I/O.

use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::metrics::Metrics;
use crate::mux;
use crate::snapshot::{Peer, Protocol};
use crate::tls::{Material, ALPN_H2, ALPN_MUX};

/// Header every response of our gateway carries, so that a dialer can tell our
/// refusals (authoritative) from a peer that cannot tunnel over h2.
pub const PROTOCOLS_HEADER: &str = "clusterlink-tunnel-protocols";
pub const PROTOCOLS_VALUE: &str = "h2, http/1.1";

/// Most pooled connections one worker makes to one gateway because its others are
/// congested (mux): each new one takes streams that may stall as well, so this bounds
/// the dialing while a congestion lasts (idle extra ones close afterwards, see
/// `pick`). Growth for other reasons, such as every connection at its stream limit,
/// is not held back by it.
const MAX_POOLED_PER_WORKER: usize = 4;

/// HTTP/2 flow-control windows: large enough that flow control never stalls a bulk
/// transfer on loopback (ztunnel uses the same 4 MiB / 16 MiB).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONN_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 256 * 1024;
/// Most DATA bytes h2 buffers per stream before the stream must wait for the socket.
/// 1 MiB before: with 8 streams that kept up to 8 MiB of read data in flight per
/// gateway, far beyond the caches (benches/README.md: 8 streams 5.64 -> 6.09 Gbit/s,
/// medians of 6 alternating runs, within the noise; 1 stream unchanged). It also
/// bounds what a stream holds for a slow remote.
pub const SEND_BUFFER: usize = 256 * 1024;
/// Longest response head accepted from a remote gateway.
const MAX_HEAD: usize = 16 * 1024;
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

/// What a pooled connection speaks.
enum Link {
    H2(h2::client::SendRequest<Bytes>),
    Mux(mux::Client),
}

/// Held by a pooled connection's driver task: when the task ends, or is dropped
/// unfinished at a runtime's shutdown, the connection is marked dead and no longer
/// counted as open.
struct Driving {
    dead: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Driving {
    /// Counts the connection as open until the guard is dropped.
    fn new(dead: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Self {
        metrics.tunnels_open.inc();
        Driving { dead, metrics }
    }
}

impl Drop for Driving {
    fn drop(&mut self) {
        self.dead.store(true, Ordering::Relaxed);
        self.metrics.tunnels_open.dec();
    }
}

/// Counts a stream against its pooled connection until dropped.
pub struct StreamLease(Arc<AtomicUsize>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Pooled {
    link: Link,
    active: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
    generation: u64,
    /// The worker whose runtime drives the connection (see `crate::workers`).
    worker: Option<usize>,
}

impl Pooled {
    /// Never again usable: made with an older certificate (generations only grow; a
    /// task that read the generation before a reload must not retire newer ones), or
    /// going away.
    fn retired(&self, generation: u64) -> bool {
        self.generation < generation
            || match &self.link {
                Link::H2(_) => false,
                Link::Mux(client) => client.is_dead(),
            }
    }

    /// Streams stalled at the remote hold all of its credit (mux), so that a new
    /// stream's data would wait behind them: used only when no other connection is
    /// there or can be made. A stream that then has first bytes to send waits for
    /// credit up to the response timeout, and is retried on a new connection after.
    fn congested(&self) -> bool {
        match &self.link {
            Link::H2(_) => false,
            Link::Mux(client) => client.congested(),
        }
    }

    fn usable(&self, generation: u64) -> bool {
        let max = match &self.link {
            Link::H2(send) => send.current_max_send_streams(),
            Link::Mux(client) => {
                if client.is_dead() {
                    return false;
                }
                mux::MAX_STREAMS
            }
        };
        !self.dead.load(Ordering::Relaxed)
            && self.generation == generation
            && self.active.load(Ordering::Relaxed) < max
    }
}

/// Dials remote gateways and keeps the HTTP/2 pool.
pub struct Dialer {
    tls: watch::Receiver<Arc<Material>>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    response_timeout: Duration,
    gateway_backoff: Duration,
    pool: Mutex<HashMap<String, Vec<Arc<Pooled>>>>,
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these short critical sections cannot leave them
    // inconsistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
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
            pool: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            failed_until: Mutex::new(HashMap::new()),
            growth_failed_until: Mutex::new(HashMap::new()),
            h1_peers: Mutex::new(HashSet::new()),
            force_h1,
            mux: true,
        }
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

    /// A pooled connection to `gw` with a free stream slot, made if needed.
    async fn pooled(
        &self,
        peer: &Peer,
        gw: &str,
    ) -> Result<Result<Arc<Pooled>, TlsStream<TcpStream>>, Error> {
        let key = format!("{}@{gw}", peer.name);
        let generation = self.tls.borrow().generation;
        // Connections are kept per worker (None: not on a worker thread).
        let worker = crate::workers::current();
        // (connection to use, whether another one should be made instead): the
        // worker's own least busy usable connection, uncongested ones first. If that
        // one is congested: another worker's uncongested one, else make one (up to
        // `MAX_POOLED_PER_WORKER`), falling back to it. If the worker has none: make
        // one, falling back to another worker's. `may_grow` is false while this
        // worker's last attempt failed (see `growth_failed_until`).
        let pick = |pool: &mut HashMap<String, Vec<Arc<Pooled>>>, may_grow: bool, generation| {
            let conns = pool.entry(key.clone()).or_default();
            // Dropped from the pool: dead ones, and those no new stream may use (an
            // older certificate, a mux connection after GOAWAY); a dropped connection
            // carries its streams to their end and then closes (h2 and mux alike),
            // instead of staying open until the remote closes it.
            conns.retain(|c| !c.dead.load(Ordering::Relaxed) && !c.retired(generation));
            // A worker keeps one idle connection to a gateway: extra ones (made for a
            // burst, for congestion or at the stream limit) leave the pool once idle
            // while another of its connections can take new streams, and close.
            let idle = |c: &Pooled| c.active.load(Ordering::Relaxed) == 0;
            let takes_streams = conns
                .iter()
                .any(|c| c.worker == worker && !idle(c) && c.usable(generation) && !c.congested());
            let mut idle_kept = false;
            conns.retain(|c| {
                if c.worker != worker || !idle(c) || !c.usable(generation) {
                    return true;
                }
                let keep = !takes_streams && !idle_kept;
                idle_kept |= keep;
                keep
            });
            let usable: Vec<_> = conns.iter().filter(|c| c.usable(generation)).collect();
            let least_busy = |own: bool| {
                usable
                    .iter()
                    .filter(|c| !own || c.worker == worker)
                    .min_by_key(|c| (c.congested(), c.active.load(Ordering::Relaxed)))
                    .map(|c| Arc::clone(c))
            };
            let own_count = conns.iter().filter(|c| c.worker == worker).count();
            match least_busy(true) {
                // Another worker's uncongested connection beats making one; else
                // make one (up to the cap), falling back to this.
                Some(own) if own.congested() => match least_busy(false) {
                    Some(other) if !other.congested() => (Some(other), false),
                    _ => (Some(own), may_grow && own_count < MAX_POOLED_PER_WORKER),
                },
                Some(own) => (Some(own), false),
                None => {
                    let other = least_busy(false);
                    let grow = may_grow || other.is_none();
                    (other, grow)
                }
            }
        };
        // Fast path: a connection to use and no reason to make one.
        if let (Some(c), false) = pick(&mut lock(&self.pool), true, generation) {
            return Ok(Ok(c));
        }
        let gate_key = format!("{key}#{}", worker.map_or(usize::MAX, |w| w));
        // Per worker, so that workers make their own connections side by side.
        let gate = lock(&self.connecting)
            .entry(gate_key.clone())
            .or_default()
            .clone();
        let _gate = gate.lock().await;
        // Read behind the gate: a task that waited there sees the failure of the one
        // before it, and does not dial again.
        let may_grow = lock(&self.growth_failed_until)
            .get(&gate_key)
            .is_none_or(|t| *t <= Instant::now());
        // A reload while this task waited at the gate: pick with the newest.
        let generation = self.tls.borrow().generation;
        let fallback = match pick(&mut lock(&self.pool), may_grow, generation) {
            (Some(c), false) => return Ok(Ok(c)),
            (best, true) => best,
            (None, false) => None,
        };
        // Growing the pool is an optimisation: if it fails, a busy connection that
        // works still carries the stream, and the gateway is not marked failed.
        let grown = self.dial_h2(peer, gw, &key).await;
        match (grown, fallback) {
            (Err(e), Some(c)) => {
                tracing::debug!(gateway = %gw, error = %e, "extra pooled connection failed; using a busy one");
                lock(&self.growth_failed_until)
                    .insert(gate_key, Instant::now() + self.gateway_backoff);
                Ok(Ok(c))
            }
            (grown, _) => grown,
        }
    }

    /// Dials and handshakes a new pooled h2 connection and adds it to the pool (or
    /// returns the TLS connection for HTTP/1.1 if the peer does not speak h2). It is
    /// tagged with the generation of the certificate it was made with.
    async fn dial_h2(
        &self,
        peer: &Peer,
        gw: &str,
        key: &str,
    ) -> Result<Result<Arc<Pooled>, TlsStream<TcpStream>>, Error> {
        let material = self.tls.borrow().clone();
        let generation = material.generation;
        let tls = self.dial_tls_with(material, peer, gw, true).await?;
        let dead = Arc::new(AtomicBool::new(false));
        let alpn = tls.get_ref().1.alpn_protocol();
        let (is_mux, is_h2) = (alpn == Some(ALPN_MUX), alpn == Some(ALPN_H2));
        if is_mux || is_h2 {
            set_user_timeout(tls.get_ref().0);
        }
        if is_mux {
            let (client, driver) = mux::Client::new(tls);
            self.spawn_driver(&dead, gw, driver);
            return Ok(Ok(self.add_pooled(
                key,
                Link::Mux(client),
                dead,
                generation,
            )));
        }
        if !is_h2 {
            // The peer does not speak h2: use this connection for HTTP/1.1 CONNECT.
            lock(&self.h1_peers).insert(peer.name.clone());
            return Ok(Err(tls));
        }
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| Error::Gateway {
                gateway: gw.to_owned(),
                reason: format!("h2 handshake: {e}"),
            })?;
        self.spawn_driver(&dead, gw, conn);
        Ok(Ok(self.add_pooled(key, Link::H2(send), dead, generation)))
    }

    /// Drives a pooled connection (`driver`) on a task of its own, counted as open
    /// and `dead` once it ends.
    fn spawn_driver<E: std::fmt::Display>(
        &self,
        dead: &Arc<AtomicBool>,
        gw: &str,
        driver: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let driving = Driving::new(dead.clone(), self.metrics.clone());
        let gw = gw.to_owned();
        tokio::spawn(async move {
            let _driving = driving;
            if let Err(e) = driver.await {
                tracing::debug!(gateway = %gw, error = %e, "pooled tunnel ended");
            }
        });
    }

    fn add_pooled(
        &self,
        key: &str,
        link: Link,
        dead: Arc<AtomicBool>,
        generation: u64,
    ) -> Arc<Pooled> {
        let pooled = Arc::new(Pooled {
            link,
            active: Arc::new(AtomicUsize::new(0)),
            dead,
            generation,
            worker: crate::workers::current(),
        });
        lock(&self.pool)
            .entry(key.to_owned())
            .or_default()
            .push(pooled.clone());
        pooled
    }

    /// A stream on a pooled `clusterlink-mux/1` connection; `Ok(None)`: that
    /// connection went away before processing it, try another.
    async fn open_mux(
        &self,
        pooled: &Pooled,
        client: &mux::Client,
        gw: &str,
        token: &str,
        early: &Bytes,
        last_attempt: bool,
    ) -> Result<Option<Tunnel>, Error> {
        pooled.active.fetch_add(1, Ordering::Relaxed);
        let lease = StreamLease(pooled.active.clone());
        let auth = format!("Bearer {token}");
        let gateway = || gw.to_owned();
        match client.open(&auth, early, self.response_timeout).await {
            Ok(stream) => Ok(Some(Tunnel::Mux { stream, lease })),
            Err(mux::OpenError::Refused { status, reason }) => Err(Error::Refused {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                reason,
                authoritative: true,
            }),
            Err(mux::OpenError::Unprocessed(why)) => {
                pooled.dead.store(true, Ordering::Relaxed);
                if last_attempt {
                    return Err(Error::Gateway {
                        gateway: gateway(),
                        reason: format!("stream not processed: {why}"),
                    });
                }
                Ok(None)
            }
            Err(e @ mux::OpenError::Lost) => {
                pooled.dead.store(true, Ordering::Relaxed);
                if !early.is_empty() {
                    return Err(Error::Interrupted {
                        gateway: gateway(),
                        reason: e.to_string(),
                    });
                }
                if last_attempt {
                    return Err(Error::Gateway {
                        gateway: gateway(),
                        reason: e.to_string(),
                    });
                }
                Ok(None)
            }
            Err(mux::OpenError::Timeout) => {
                // The remote may be slowly connecting to the target with the client's
                // first bytes: do not try them on another gateway.
                let (gateway, reason) = (gateway(), "no answer to OPEN".into());
                Err(if early.is_empty() {
                    Error::Gateway { gateway, reason }
                } else {
                    Error::Interrupted { gateway, reason }
                })
            }
        }
    }

    async fn open_h2(
        &self,
        peer: &Peer,
        gw: &str,
        token: &str,
        early: &Bytes,
    ) -> Result<Tunnel, Error> {
        // One retry covers a pooled connection that went away (GOAWAY) under us.
        for attempt in 0..2 {
            let pooled = match self.pooled(peer, gw).await? {
                Ok(p) => p,
                Err(tls) => {
                    return connect_h1(tls, peer, gw, token, early, self.response_timeout).await
                }
            };
            let send = match &pooled.link {
                Link::H2(send) => send.clone(),
                Link::Mux(client) => {
                    match self
                        .open_mux(&pooled, client, gw, token, early, attempt == 1)
                        .await?
                    {
                        Some(t) => return Ok(t),
                        None => continue,
                    }
                }
            };
            pooled.active.fetch_add(1, Ordering::Relaxed);
            let lease = StreamLease(pooled.active.clone());
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{}:443", peer.name))
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .body(())
                .map_err(|e| Error::Gateway {
                    gateway: gw.to_owned(),
                    reason: format!("request: {e}"),
                })?;
            let sent = match send.ready().await {
                Ok(mut s) => s
                    .send_request(req, false)
                    .and_then(|(response, mut stream)| {
                        // Queued behind the request and sent as soon as the connection
                        // window allows (usually in the same write). h2 buffers it and
                        // asks for the capacity itself; `early` is at most
                        // copy::EARLY_MAX bytes.
                        if !early.is_empty() {
                            stream.send_data(early.clone(), false)?;
                        }
                        Ok((response, stream))
                    }),
                Err(e) => Err(e),
            };
            let (response, stream) = match sent {
                Ok(x) => x,
                Err(e) => {
                    pooled.dead.store(true, Ordering::Relaxed);
                    if attempt == 0 {
                        continue;
                    }
                    return Err(Error::Gateway {
                        gateway: gw.to_owned(),
                        reason: format!("h2 stream: {e}"),
                    });
                }
            };
            let response = match tokio::time::timeout(self.response_timeout, response).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if e.is_go_away() || e.is_io() => {
                    pooled.dead.store(true, Ordering::Relaxed);
                    // With the client's bytes on their way, retry only a stream the
                    // remote says it did not process (GOAWAY, graceful, naming an
                    // earlier last stream); it may have reached the target otherwise.
                    let unprocessed =
                        e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR);
                    if !early.is_empty() && !unprocessed {
                        return Err(Error::Interrupted {
                            gateway: gw.to_owned(),
                            reason: format!("h2 CONNECT: {e}"),
                        });
                    }
                    if attempt == 0 {
                        continue;
                    }
                    return Err(Error::Gateway {
                        gateway: gw.to_owned(),
                        reason: format!("h2 CONNECT: {e}"),
                    });
                }
                Ok(Err(e)) => {
                    return Err(Error::Refused {
                        status: StatusCode::BAD_GATEWAY,
                        reason: format!("h2 CONNECT: {e}"),
                        authoritative: false,
                    })
                }
                Err(_) => {
                    let (gateway, reason) = (gw.to_owned(), "no answer to CONNECT".into());
                    // The remote may be slowly connecting to the target with the
                    // client's first bytes: do not try them on another gateway.
                    return Err(if early.is_empty() {
                        Error::Gateway { gateway, reason }
                    } else {
                        Error::Interrupted { gateway, reason }
                    });
                }
            };
            let status = response.status();
            let authoritative = response.headers().contains_key(PROTOCOLS_HEADER);
            let mut recv = response.into_body();
            if status == StatusCode::OK {
                return Ok(Tunnel::H2 {
                    send: stream,
                    recv,
                    lease,
                });
            }
            let reason = read_reason(&mut recv).await;
            return Err(Error::Refused {
                status,
                reason,
                authoritative,
            });
        }
        Err(Error::Gateway {
            gateway: gw.to_owned(),
            reason: "pooled connection lost twice".into(),
        })
    }
}

/// Reads up to 1 KiB of a refusal's body, for the log.
async fn read_reason(recv: &mut RecvStream) -> String {
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(d)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(d.len());
            out.extend_from_slice(&d[..d.len().min(1024 - out.len().min(1024))]);
            if out.len() >= 1024 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// On a pooled (mux or h2) tunnel connection, data sent and not acknowledged for this
/// long, or keepalive probes unanswered for this long after the last data received,
/// end the connection (TCP_USER_TIMEOUT). Without it, a peer that vanished without a
/// reset (a dead VM, a load balancer that dropped its state) kept a pooled connection,
/// and the streams on it, for the kernel's retransmission limit, about 15 minutes; with
/// keepalive alone, 2 minutes when idle. Only there: Linux also ends a connection whose
/// receive window stays closed this long, even while the peer answers the probes, and
/// only the multiplexer's and h2's readers never stop reading. A local client or
/// target, or an HTTP/1.1 tunnel (a plain relay), may rightly stop reading for longer.
pub const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets `USER_TIMEOUT` on a pooled tunnel connection (once its ALPN says mux or h2).
pub fn set_user_timeout(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// TCP_NODELAY and keepalive on a tunnel or client socket.
pub fn tune(tcp: &TcpStream) {
    tune_socket(socket2::SockRef::from(tcp));
}

fn tune_socket(sock: socket2::SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&ka);
}

/// The options of `tune` on a listening socket. On Linux every accepted socket inherits
/// them (TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL), which saves four
/// setsockopt calls per accepted connection; see `tune_accepted`.
pub fn tune_listener(listener: &TcpListener) {
    tune_socket(socket2::SockRef::from(listener));
}

/// `tune` for a socket accepted from a listener that went through `tune_listener`:
/// nothing to do on Linux, where the options were inherited.
pub fn tune_accepted(tcp: &TcpStream) {
    if !cfg!(target_os = "linux") {
        tune(tcp);
    }
}

/// HTTP/1.1 CONNECT on a dedicated TLS connection, as ClusterLink's data planes speak it.
async fn connect_h1(
    mut tls: TlsStream<TcpStream>,
    peer: &Peer,
    gw: &str,
    token: &str,
    early: &Bytes,
    response_timeout: Duration,
) -> Result<Tunnel, Error> {
    let gerr = |reason: String| Error::Gateway {
        gateway: gw.to_owned(),
        reason,
    };
    let head = format!(
        "CONNECT {p}:443 HTTP/1.1\r\nHost: {p}:443\r\nAuthorization: Bearer {token}\r\n\r\n",
        p = peer.name
    );
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| gerr(format!("write CONNECT: {e}")))?;
    tls.flush()
        .await
        .map_err(|e| gerr(format!("write CONNECT: {e}")))?;
    let mut buf = BytesMut::with_capacity(4096);
    let read_head = async {
        loop {
            if buf.len() >= MAX_HEAD {
                return Err(gerr("response head too large".into()));
            }
            let n = tls
                .read_buf(&mut buf)
                .await
                .map_err(|e| gerr(format!("read CONNECT response: {e}")))?;
            if n == 0 {
                return Err(gerr("connection closed before the CONNECT response".into()));
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    return Ok((len, resp.code.unwrap_or(0)));
                }
                Ok(httparse::Status::Partial) => continue,
                Err(e) => return Err(gerr(format!("bad CONNECT response: {e}"))),
            }
        }
    };
    let (len, status) = tokio::time::timeout(response_timeout, read_head)
        .await
        .map_err(|_| gerr("no answer to CONNECT".into()))??;
    if status == 200 {
        if !early.is_empty() {
            let sent = async {
                tls.write_all(early).await?;
                tls.flush().await
            };
            sent.await.map_err(|e| Error::Interrupted {
                gateway: gw.to_owned(),
                reason: format!("write: {e}"),
            })?;
        }
        buf.advance(len);
        return Ok(Tunnel::H1(Box::new(Rewind {
            pre: buf.freeze(),
            inner: tls,
        })));
    }
    let body = String::from_utf8_lossy(&buf[len..buf.len().min(len + 1024)]).into_owned();
    Err(Error::Refused {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        reason: body,
        // There is nothing to fall back to from HTTP/1.1.
        authoritative: true,
    })
}

/// A stream that first yields bytes already read past a response head.
pub struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_carry_the_listener_options() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        tune_listener(&listener);
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        tune_accepted(&accepted);
        let sock = socket2::SockRef::from(&accepted);
        anyhow::ensure!(accepted.nodelay()?, "TCP_NODELAY not set");
        anyhow::ensure!(sock.keepalive()?, "SO_KEEPALIVE not set");
        anyhow::ensure!(sock.tcp_keepalive_time()? == Duration::from_secs(30));
        anyhow::ensure!(sock.tcp_keepalive_interval()? == Duration::from_secs(10));
        anyhow::ensure!(
            sock.tcp_user_timeout()?.is_none(),
            "TCP_USER_TIMEOUT on a socket that may rightly stall"
        );
        drop(client);
        Ok(())
    }

    #[test]
    fn a_driver_dropped_at_shutdown_is_no_longer_counted() -> anyhow::Result<()> {
        let metrics = Arc::new(Metrics::new());
        let dead = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let driving = Driving::new(dead.clone(), metrics.clone());
        // A driver that never finishes on its own, like one whose connection is idle.
        rt.spawn(async move {
            let _driving = driving;
            std::future::pending::<()>().await;
        });
        rt.block_on(tokio::task::yield_now());
        anyhow::ensure!(metrics.tunnels_open.get() == 1);
        drop(rt);
        anyhow::ensure!(metrics.tunnels_open.get() == 0, "still counted");
        anyhow::ensure!(dead.load(Ordering::Relaxed), "not marked dead");
        Ok(())
    }
}
