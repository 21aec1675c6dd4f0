//! The pools of tunnel connections to remote gateways (mux or h2), one per worker:
//! which connection a new stream rides on, when another is made, and when one leaves
//! the pool. A pool lock is held only to pick or insert a connection, never across
//! I/O, and never together with another pool's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fabric::sync::lock;
use fabric::wire::{ALPN_H2, ALPN_MUX, ALPN_MUX2};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Dialer, Error};
use crate::metrics::Metrics;
use crate::snapshot::Peer;
use crate::{h2conf, mux, sockopt};

/// Most pooled connections one worker makes to one gateway because its others are
/// congested (mux): each new one takes streams that may stall as well, so this bounds
/// the dialing while a congestion lasts (idle extra ones close afterwards, see
/// `pick`). Growth for other reasons, such as every connection at its stream limit,
/// is not held back by it.
const MAX_POOLED_PER_WORKER: usize = 4;

/// What a pooled connection speaks.
pub(super) enum Link {
    H2(h2::client::SendRequest<Bytes>),
    Mux(mux::Client),
}

/// Held by a pooled connection's driver task: when the task ends, or is dropped
/// unfinished at a runtime's shutdown, the connection is marked dead and no longer
/// counted as open.
pub(super) struct Driving {
    dead: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Driving {
    /// Counts the connection as open until the guard is dropped.
    pub(super) fn new(dead: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Self {
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
pub struct StreamLease(pub(super) Arc<AtomicUsize>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) struct Pooled {
    pub(super) link: Link,
    pub(super) active: Arc<AtomicUsize>,
    pub(super) dead: Arc<AtomicBool>,
    pub(super) generation: u64,
    /// The worker whose runtime drives the connection (see `crate::workers`).
    pub(super) worker: Option<usize>,
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

/// One worker's pooled connections, by "peer@gateway".
pub(super) type Pool = HashMap<String, Vec<Arc<Pooled>>>;

/// The least busy of `conns`, uncongested ones first.
fn least_busy<'a>(conns: impl Iterator<Item = &'a Arc<Pooled>>) -> Option<Arc<Pooled>> {
    conns
        .min_by_key(|c| (c.congested(), c.active.load(Ordering::Relaxed)))
        .cloned()
}

impl Dialer {
    /// The pool of a caller on `worker`: its own, or the last one, shared by callers
    /// on no worker thread (or on one this dialer was not sized for).
    fn slot(&self, worker: Option<usize>) -> usize {
        let shared = self.pools.len() - 1;
        worker.filter(|w| *w < shared).unwrap_or(shared)
    }

    /// (connection to use, whether another one should be made instead): the worker's
    /// own least busy usable connection, uncongested ones first. If that one is
    /// congested: another worker's uncongested one, else make one (up to
    /// `MAX_POOLED_PER_WORKER`), falling back to it. If the worker has none: make one,
    /// falling back to another worker's. `may_grow` is false while this worker's last
    /// attempt failed (see `growth_failed_until`).
    /// Only the worker's own pool is locked unless it has no uncongested connection;
    /// then the other pools are looked at one after the other, never two at once.
    fn pick(
        &self,
        key: &str,
        worker: Option<usize>,
        may_grow: bool,
        generation: u64,
    ) -> (Option<Arc<Pooled>>, bool) {
        // Dropped from the pool: dead ones, and those no new stream may use (an older
        // certificate, a mux connection after GOAWAY); a dropped connection carries its
        // streams to their end and then closes (h2 and mux alike), instead of staying
        // open until the remote closes it.
        let live = |c: &Arc<Pooled>| !c.dead.load(Ordering::Relaxed) && !c.retired(generation);
        // After a rotation, the first pick drops every worker's retired connections,
        // also those of workers that may never pick this gateway again.
        if self.swept.fetch_max(generation, Ordering::Relaxed) < generation {
            for pool in self.pools.iter() {
                for conns in lock(pool).values_mut() {
                    conns.retain(live);
                }
            }
        }
        let own_slot = self.slot(worker);
        let (own, own_count) = 'own: {
            let mut pool = lock(&self.pools[own_slot]);
            // No entry is made here (a key per new stream): `add_pooled` makes it.
            let Some(conns) = pool.get_mut(key) else {
                break 'own (None, 0);
            };
            conns.retain(live);
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
            let own = least_busy(
                conns
                    .iter()
                    .filter(|c| c.worker == worker && c.usable(generation)),
            );
            (own, conns.iter().filter(|c| c.worker == worker).count())
        };
        if let Some(own) = own.as_ref().filter(|c| !c.congested()) {
            return (Some(own.clone()), false);
        }
        // Other workers' connections (in their pools, and in the shared one).
        let mut other: Option<Arc<Pooled>> = None;
        for (i, pool) in self.pools.iter().enumerate() {
            let mut pool = lock(pool);
            let Some(conns) = pool.get_mut(key) else {
                continue;
            };
            if i != own_slot {
                conns.retain(live);
            }
            let best = least_busy(
                conns
                    .iter()
                    .filter(|c| c.worker != worker && c.usable(generation)),
            );
            other = least_busy(other.iter().chain(best.iter()));
        }
        match own {
            // Another worker's uncongested connection beats making one; else make one
            // (up to the cap), falling back to this.
            Some(own) => match other {
                Some(other) if !other.congested() => (Some(other), false),
                _ => (Some(own), may_grow && own_count < MAX_POOLED_PER_WORKER),
            },
            None => {
                let grow = may_grow || other.is_none();
                (other, grow)
            }
        }
    }

    /// A pooled connection to `gw` with a free stream slot, made if needed.
    pub(super) async fn pooled(
        &self,
        peer: &Peer,
        gw: &str,
    ) -> Result<Result<Arc<Pooled>, TlsStream<TcpStream>>, Error> {
        let key = format!("{}@{gw}", peer.name);
        let generation = self.tls.borrow().generation;
        // Connections are kept per worker (None: not on a worker thread).
        let worker = crate::workers::current();
        // Fast path: a connection to use and no reason to make one.
        if let (Some(c), false) = self.pick(&key, worker, true, generation) {
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
        let fallback = match self.pick(&key, worker, may_grow, generation) {
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
        let ping = alpn == Some(ALPN_MUX2);
        let (is_mux, is_h2) = (ping || alpn == Some(ALPN_MUX), alpn == Some(ALPN_H2));
        if is_mux || is_h2 {
            sockopt::set_user_timeout(tls.get_ref().0);
        }
        if is_mux {
            let (client, driver) = mux::Client::negotiated(tls, ping);
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
        let (send, conn) = h2conf::client()
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
        let worker = crate::workers::current();
        let pooled = Arc::new(Pooled {
            link,
            active: Arc::new(AtomicUsize::new(0)),
            dead,
            generation,
            worker,
        });
        lock(&self.pools[self.slot(worker)])
            .entry(key.to_owned())
            .or_default()
            .push(pooled.clone());
        pooled
    }
}
