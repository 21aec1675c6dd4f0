//! Admission on the gateway port: who may use it and how much, so that one peer
//! cannot starve the others. A fabric certificate proves membership of the fabric,
//! not that this peer knows its holder: tunnels and peer requests are for identities
//! that match a Peer of the snapshot in force ("known"); any other identity may ask
//! for `GET /healthz` only (the heartbeat of a peer that has not been configured here
//! yet), from a small pool shared by all of them. Each known identity has its own
//! bounds on connections, concurrent streams and peer requests per second.
//!
//! A permit counts against its identity until dropped. Usage is kept per known
//! identity (bounded by the Peers ever configured); an entry with nothing in use and
//! a full request bucket carries no information and is removed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric::sync::lock;
use http::StatusCode;

/// Connections all unknown identities together may hold.
pub const UNKNOWN_CONNECTIONS: usize = 64;
/// Peer requests (`/healthz`) per second all unknown identities together may send.
pub const UNKNOWN_REQUESTS_PER_SEC: u32 = 10;

/// Per known identity.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub streams: usize,
    /// Sustained; bursts of twice as many are taken.
    pub requests_per_sec: u32,
}

/// Why the gateway refused a connection, a stream or a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The identity matches no Peer, and asked for more than `/healthz`.
    UnknownPeer,
    Connections,
    Streams,
    Rate,
}

impl Refusal {
    /// The `clusterlink_gateway_rejected_total` reason.
    pub fn metric(self) -> &'static str {
        match self {
            Refusal::UnknownPeer => "unknown_peer",
            Refusal::Connections => "connection_limit",
            Refusal::Streams => "stream_limit",
            Refusal::Rate => "rate_limited",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Refusal::UnknownPeer => StatusCode::FORBIDDEN,
            Refusal::Connections | Refusal::Streams => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Rate => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// What the remote is told.
    pub fn public(self) -> &'static str {
        match self {
            Refusal::UnknownPeer => "peer not known here",
            Refusal::Connections => "too many connections from this peer",
            Refusal::Streams => "too many streams from this peer",
            Refusal::Rate => "too many requests from this peer",
        }
    }
}

/// A token bucket: `rate` per second, up to `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let gained = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + gained).min(burst);
        self.last = now;
    }

    fn take(&mut self, rate: f64, burst: f64) -> bool {
        self.refill(rate, burst, Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Usage {
    connections: usize,
    streams: usize,
    requests: Bucket,
}

impl Usage {
    fn new(burst: f64) -> Usage {
        Usage {
            connections: 0,
            streams: 0,
            requests: Bucket::full(burst),
        }
    }
}

fn rate_burst(per_sec: u32) -> (f64, f64) {
    let rate = f64::from(per_sec.max(1));
    (rate, 2.0 * rate)
}

pub struct Admission {
    limits: Limits,
    known: Mutex<HashMap<Arc<str>, Usage>>,
    unknown: Mutex<Usage>,
}

#[derive(Debug, Clone, Copy)]
enum What {
    Connection,
    Stream,
}

/// Held while a connection or stream is open; counts against its identity.
pub struct Permit {
    admission: Arc<Admission>,
    /// `None`: the unknown identities' pool.
    identity: Option<Arc<str>>,
    what: What,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.identity.as_ref(), self.what);
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        let (_, burst) = rate_burst(UNKNOWN_REQUESTS_PER_SEC);
        Arc::new(Admission {
            limits,
            known: Mutex::new(HashMap::new()),
            unknown: Mutex::new(Usage::new(burst)),
        })
    }

    /// A new connection from `identity` (`known`: it matches a Peer).
    pub fn connection(
        self: &Arc<Self>,
        identity: &Arc<str>,
        known: bool,
    ) -> Result<Permit, Refusal> {
        if !known {
            let mut u = lock(&self.unknown);
            if u.connections >= UNKNOWN_CONNECTIONS {
                return Err(Refusal::Connections);
            }
            u.connections += 1;
            return Ok(self.permit(None, What::Connection));
        }
        let (_, burst) = rate_burst(self.limits.requests_per_sec);
        let mut m = lock(&self.known);
        let u = m
            .entry(identity.clone())
            .or_insert_with(|| Usage::new(burst));
        if u.connections >= self.limits.connections {
            return Err(Refusal::Connections);
        }
        u.connections += 1;
        drop(m);
        Ok(self.permit(Some(identity.clone()), What::Connection))
    }

    /// A new tunnel (stream) from `identity`: known identities only.
    pub fn stream(self: &Arc<Self>, identity: &Arc<str>, known: bool) -> Result<Permit, Refusal> {
        if !known {
            return Err(Refusal::UnknownPeer);
        }
        let (_, burst) = rate_burst(self.limits.requests_per_sec);
        let mut m = lock(&self.known);
        let u = m
            .entry(identity.clone())
            .or_insert_with(|| Usage::new(burst));
        if u.streams >= self.limits.streams {
            return Err(Refusal::Streams);
        }
        u.streams += 1;
        drop(m);
        Ok(self.permit(Some(identity.clone()), What::Stream))
    }

    /// A peer request from `identity`; `healthz`: it is `GET /healthz`, the only one
    /// an unknown identity may send.
    pub fn request(&self, identity: &Arc<str>, known: bool, healthz: bool) -> Result<(), Refusal> {
        if !known {
            if !healthz {
                return Err(Refusal::UnknownPeer);
            }
            let (rate, burst) = rate_burst(UNKNOWN_REQUESTS_PER_SEC);
            return if lock(&self.unknown).requests.take(rate, burst) {
                Ok(())
            } else {
                Err(Refusal::Rate)
            };
        }
        let (rate, burst) = rate_burst(self.limits.requests_per_sec);
        let mut m = lock(&self.known);
        let u = m
            .entry(identity.clone())
            .or_insert_with(|| Usage::new(burst));
        if u.requests.take(rate, burst) {
            Ok(())
        } else {
            Err(Refusal::Rate)
        }
    }

    fn permit(self: &Arc<Self>, identity: Option<Arc<str>>, what: What) -> Permit {
        Permit {
            admission: self.clone(),
            identity,
            what,
        }
    }

    fn release(&self, identity: Option<&Arc<str>>, what: What) {
        let dec = |u: &mut Usage| match what {
            What::Connection => u.connections = u.connections.saturating_sub(1),
            What::Stream => u.streams = u.streams.saturating_sub(1),
        };
        let Some(identity) = identity else {
            dec(&mut lock(&self.unknown));
            return;
        };
        let (rate, burst) = rate_burst(self.limits.requests_per_sec);
        let mut m = lock(&self.known);
        if let Some(u) = m.get_mut(identity) {
            dec(u);
            u.requests.refill(rate, burst, Instant::now());
            if u.connections == 0 && u.streams == 0 && u.requests.tokens >= burst {
                m.remove(identity);
            }
        }
    }

    /// Identities with usage on record (for tests and /config_dump).
    pub fn tracked(&self) -> usize {
        lock(&self.known).len()
    }
}

/// When a connection last had no stream, for the idle timeout: streams enter and
/// leave; `idle_for` says how long there has been none.
#[derive(Debug)]
pub struct Activity {
    inner: Mutex<(usize, Instant)>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            inner: Mutex::new((0, Instant::now())),
        }
    }
}

impl Activity {
    pub fn enter(self: &Arc<Self>) -> ActivityGuard {
        lock(&self.inner).0 += 1;
        ActivityGuard(self.clone())
    }

    /// How long the connection has had no stream; `None` while it has one.
    pub fn idle_for(&self) -> Option<Duration> {
        let g = lock(&self.inner);
        (g.0 == 0).then(|| g.1.elapsed())
    }
}

/// A stream (or request) in progress on a connection.
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let mut g = lock(&self.0.inner);
        g.0 = g.0.saturating_sub(1);
        if g.0 == 0 {
            g.1 = Instant::now();
        }
    }
}

/// Returns once `activity` has had no stream for `timeout` (checked at a quarter of
/// it, so the close comes within 1.25 × `timeout`); never without a timeout.
pub async fn idle(activity: &Activity, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let tick = (timeout / 4).max(Duration::from_millis(10));
    loop {
        match activity.idle_for() {
            Some(d) if d >= timeout => return,
            Some(d) => tokio::time::sleep((timeout - d).min(tick).max(tick / 4)).await,
            None => tokio::time::sleep(tick).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            connections: 2,
            streams: 3,
            requests_per_sec: 2,
        }
    }

    #[test]
    fn known_identities_have_their_own_bounds() {
        let a = Admission::new(limits());
        let (p, q): (Arc<str>, Arc<str>) = ("peer-a".into(), "peer-b".into());
        let c1 = a.connection(&p, true).ok();
        let _c2 = a.connection(&p, true).ok();
        assert_eq!(a.connection(&p, true).err(), Some(Refusal::Connections));
        // Another peer is not affected.
        assert!(a.connection(&q, true).is_ok());
        drop(c1);
        assert!(a.connection(&p, true).is_ok());
        let s: Vec<_> = (0..3).filter_map(|_| a.stream(&p, true).ok()).collect();
        assert_eq!(s.len(), 3);
        assert_eq!(a.stream(&p, true).err(), Some(Refusal::Streams));
        assert!(a.stream(&q, true).is_ok());
        // Burst of twice the rate, then refused.
        for _ in 0..4 {
            assert!(a.request(&p, true, false).is_ok());
        }
        assert_eq!(a.request(&p, true, true), Err(Refusal::Rate));
        assert!(a.request(&q, true, false).is_ok());
    }

    #[test]
    fn unknown_identities_get_healthz_only_from_a_shared_pool() {
        let a = Admission::new(limits());
        let x: Arc<str> = "stranger".into();
        assert_eq!(a.stream(&x, false).err(), Some(Refusal::UnknownPeer));
        assert_eq!(a.request(&x, false, false), Err(Refusal::UnknownPeer));
        let burst = 2 * UNKNOWN_REQUESTS_PER_SEC as usize;
        let ok = (0..burst + 5)
            .filter(|_| a.request(&x, false, true).is_ok())
            .count();
        assert_eq!(ok, burst);
        let held: Vec<_> = (0..UNKNOWN_CONNECTIONS + 3)
            .filter_map(|i| a.connection(&format!("x{i}").into(), false).ok())
            .collect();
        assert_eq!(held.len(), UNKNOWN_CONNECTIONS);
        // Nothing is kept per unknown identity.
        assert_eq!(a.tracked(), 0);
        drop(held);
        assert!(a.connection(&x, false).is_ok());
    }

    #[test]
    fn unused_entries_are_removed() {
        let a = Admission::new(limits());
        let p: Arc<str> = "peer-a".into();
        let c = a.connection(&p, true).ok();
        assert_eq!(a.tracked(), 1);
        drop(c);
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn activity_is_idle_only_without_streams() {
        let act = Arc::new(Activity::default());
        let g = act.enter();
        assert!(act.idle_for().is_none());
        drop(g);
        assert!(act.idle_for().is_some());
    }
}
