//! Imports: one TCP listener per import of the snapshot in force, reconciled on every
//! snapshot. Each accepted connection needs an egress authorization: the local control
//! plane's answer, reused from the cache below when the import has a single source and
//! nothing changed since (so there is no control-plane round trip per connection in
//! steady state), or asked for (so load balancing acts on every connection of a
//! multi-source import). It then opens a tunnel to the chosen peer and splices. A
//! connection that cannot be authorized or routed is reset at once, never left hanging.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use controlplane_api::v1;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::copy::{self, Counters};
use crate::cpclient::ControlPlane;
use crate::drain::Tracker;
use crate::metrics::{ConnGuard, Metrics};
use crate::snapshot::{Import, Store};
use crate::sockopt;
use crate::tunnel::{self, Dialer, Tunnel};
use crate::workers::{Port, Workers};
use fabric::sync::lock;

/// What the import listeners' connections use, and nothing else.
pub struct Context {
    /// The snapshot in force: imports, and its generation for the egress cache.
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Asked for egress decisions.
    pub cp: ControlPlane,
    pub tracker: Arc<Tracker>,
    pub workers: Arc<Workers>,
    pub egress_cache: EgressCache,
}

/// Bound on the egress cache; past it the cache starts over.
const EGRESS_CACHE_MAX: usize = 4096;
/// A cached answer is reused while its token has at least this long to live, so that
/// the exporting peer never sees a token expire in the middle of a setup.
const REUSE_MARGIN_MS: i64 = 5_000;
/// The last-known-good answer is used while its token has at least this long to live.
const LAST_GOOD_MARGIN_MS: i64 = 500;

/// Last allowed egress answers, by "import|client IP", with the generation of the
/// snapshot in force when they were asked for.
/// - While that snapshot is still in force, the import has one source and the control
///   plane marked the answer reusable (not on Kubernetes, where the client's pod can
///   change under it), the answer is reused for new connections: the control plane
///   publishes a new snapshot on every policy, peer or reachability change, which
///   ends the reuse, and a token the exporting peer refuses is forgotten at once.
/// - When the control plane is unreachable, the answer is reused whatever the snapshot
///   (last-known-good) until its token expires; the exporting peer checks it anyway.
#[derive(Default)]
pub struct EgressCache(Mutex<HashMap<String, (u64, v1::EgressResponse)>>);

impl EgressCache {
    fn remember(&self, key: String, generation: u64, answer: &v1::EgressResponse) {
        let mut m = lock(&self.0);
        if m.len() >= EGRESS_CACHE_MAX && !m.contains_key(&key) {
            m.clear();
        }
        m.insert(key, (generation, answer.clone()));
    }

    /// The answer asked for under snapshot `generation`, if its token lives long enough.
    fn fresh(&self, key: &str, generation: u64) -> Option<v1::EgressResponse> {
        let now = fabric::clock::unix_millis();
        let m = lock(&self.0);
        m.get(key)
            .filter(|(g, a)| {
                a.reusable && *g == generation && a.expires_unix_ms > now + REUSE_MARGIN_MS
            })
            .map(|(_, a)| a.clone())
    }

    /// The last answer under any snapshot, if its token is still valid.
    fn last_good(&self, key: &str) -> Option<v1::EgressResponse> {
        let now = fabric::clock::unix_millis();
        let m = lock(&self.0);
        m.get(key)
            .filter(|(_, a)| a.expires_unix_ms > now + LAST_GOOD_MARGIN_MS)
            .map(|(_, a)| a.clone())
    }

    fn forget(&self, key: &str) {
        lock(&self.0).remove(key);
    }
}

struct Bound {
    import: Import,
    addr: SocketAddr,
    /// One accept loop per accepting worker.
    tasks: Vec<JoinHandle<()>>,
}

impl Bound {
    fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Waits (briefly) until aborted accept loops have dropped their copies of the
/// listening socket, which their workers do on their next turn: until then the port
/// is still bound, and a new listener on it would fail.
async fn closed(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), t).await;
    }
}

/// The import listeners.
pub struct Imports {
    bind: IpAddr,
    listeners: Mutex<HashMap<String, Bound>>,
}

impl Imports {
    pub fn new(bind: IpAddr) -> Self {
        Imports {
            bind,
            listeners: Mutex::new(HashMap::new()),
        }
    }

    /// Bound address of each import listener, by "namespace/name".
    pub fn addrs(&self) -> HashMap<String, SocketAddr> {
        let l = lock(&self.listeners);
        l.iter().map(|(k, b)| (k.clone(), b.addr)).collect()
    }

    /// Brings the listeners in line with the snapshot in force: binds new imports,
    /// rebinds changed ones, closes removed ones. Connections already accepted are
    /// not touched. Returns false if some listener could not be bound.
    pub async fn reconcile(
        &self,
        ctx: &Arc<Context>,
        dialer: &Arc<Dialer>,
        stop: &watch::Receiver<bool>,
    ) -> bool {
        let snap = ctx.store.load();
        let mut ok = true;
        let mut to_bind = Vec::new();
        let mut closing = Vec::new();
        {
            let mut l = lock(&self.listeners);
            l.retain(|k, b| {
                // Only the port needs a new listener; the rest is read per connection.
                let keep = snap.imports.get(k).map(|i| i.port) == Some(b.import.port);
                if !keep {
                    tracing::info!(import = %k, "import listener closed");
                    b.close();
                    closing.append(&mut b.tasks);
                }
                keep
            });
            for (k, i) in &snap.imports {
                if !l.contains_key(k) {
                    to_bind.push((k.clone(), i.clone()));
                }
            }
        }
        // A new import may take the port of one closed just now.
        closed(closing).await;
        for (k, import) in to_bind {
            // Each accepting worker has its own descriptor of the one socket.
            let bound = TcpListener::bind((self.bind, import.port))
                .await
                .and_then(|listener| {
                    sockopt::tune_listener(&listener);
                    let addr = listener.local_addr()?;
                    let copies = ctx.workers.listener_copies(&listener.into_std()?)?;
                    Ok((addr, copies))
                });
            match bound {
                Ok((addr, copies)) => {
                    tracing::info!(import = %k, %addr, "import listener bound");
                    let tasks = copies
                        .into_iter()
                        .enumerate()
                        .map(|(i, listener)| {
                            ctx.workers.spawn_on(
                                i,
                                accept_loop(
                                    listener,
                                    i,
                                    k.clone(),
                                    ctx.clone(),
                                    dialer.clone(),
                                    stop.clone(),
                                ),
                            )
                        })
                        .collect();
                    let mut l = lock(&self.listeners);
                    l.insert(
                        k,
                        Bound {
                            import,
                            addr,
                            tasks,
                        },
                    );
                }
                Err(e) => {
                    ok = false;
                    tracing::error!(import = %k, port = import.port, error = %e, "cannot bind import listener");
                }
            }
        }
        ok
    }

    /// Closes every listener (drain).
    pub fn close_all(&self) {
        let mut l = lock(&self.listeners);
        for (_, b) in l.drain() {
            b.close();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    index: usize,
    service: String,
    ctx: Arc<Context>,
    dialer: Arc<Dialer>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(import = %service, error = %e, "cannot accept on the import listener");
            return;
        }
    };
    let service: Arc<str> = service.into();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = fabric::sync::stopped(&mut stop) => return,
        };
        match accepted {
            Ok((tcp, peer_addr)) => {
                let (ctx, dialer, service) = (ctx.clone(), dialer.clone(), service.clone());
                let workers = ctx.workers.clone();
                workers.dispatch(Port::Import, index, tcp, move |tcp, load| async move {
                    connection(tcp, peer_addr, &service, &ctx, &dialer).await;
                    drop(load);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "import accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    client: TcpStream,
    client_addr: SocketAddr,
    service: &str,
    ctx: &Context,
    dialer: &Dialer,
) {
    let start = Instant::now();
    let _track = ctx.tracker.track();
    sockopt::tune_accepted(&client);
    let mut guard = ConnGuard::new(&ctx.metrics, "outbound", service);
    let (namespace, name) = service.split_once('/').unwrap_or(("", service));
    let mut request = v1::EgressRequest {
        import_namespace: namespace.to_owned(),
        import_name: name.to_owned(),
        client_ip: client_addr.ip().to_string(),
        rejected_token: String::new(),
        failed_peer: String::new(),
    };
    let deny = |guard: &mut ConnGuard, reason: &'static str| {
        ctx.metrics
            .denials
            .with_label_values(&["outbound", reason])
            .inc();
        guard.set_reason("denied");
        copy::reset_on_drop(&client);
    };
    // What the client sent before its tunnel exists, read once, just before the first
    // attempt (after the authorization decision: on a cache hit that is moments after
    // the accept, and often finds nothing yet).
    let mut early: Option<Bytes> = None;
    // Before the client has seen a byte, a failed attempt is tried again:
    // - once, a token refused by the remote peer (403, or 404: its export is gone): it is
    //   reported and a fresh answer asked for (the control plane then fails over);
    // - on another source of a multi-source import, a peer whose gateways could not be
    //   reached or that refused before processing (5xx): it is reported, and the control
    //   plane puts it last at once and picks another (by the import's scheme).
    let cache_key = format!("{service}|{}", request.client_ip);
    let sources = ctx
        .store
        .load()
        .imports
        .get(service)
        .map_or(1, |i| i.sources);
    let mut token_retried = false;
    let mut failovers = 0;
    for attempt in 0..MAX_ATTEMPTS {
        let snap = ctx.store.load();
        let reusable = attempt == 0 && sources == 1;
        let cached = if reusable {
            ctx.egress_cache.fresh(&cache_key, snap.generation)
        } else {
            None
        };
        let answer = if let Some(a) = cached {
            ctx.metrics
                .egress_decisions
                .with_label_values(&["cache"])
                .inc();
            a
        } else {
            let t = Instant::now();
            let answer = ctx.cp.authorize_egress(request.clone()).await;
            ctx.metrics
                .egress_authz_seconds
                .observe(t.elapsed().as_secs_f64());
            match answer {
                Ok(a) if a.allowed => {
                    ctx.metrics
                        .egress_decisions
                        .with_label_values(&["controlplane"])
                        .inc();
                    ctx.egress_cache
                        .remember(cache_key.clone(), snap.generation, &a);
                    a
                }
                Ok(a) => {
                    tracing::debug!(import = %service, reason = %a.reason, "egress denied");
                    ctx.egress_cache.forget(&cache_key);
                    return deny(&mut guard, "policy");
                }
                Err(e) => match ctx.egress_cache.last_good(&cache_key) {
                    // Last-known-good: the control plane is away, the earlier answer's
                    // token is still valid, and the exporting peer checks it anyway.
                    Some(a) if request.rejected_token.is_empty() => {
                        tracing::debug!(import = %service, error = %e, "control plane away; using the last answer");
                        ctx.metrics
                            .egress_decisions
                            .with_label_values(&["last_good"])
                            .inc();
                        a
                    }
                    _ => {
                        tracing::warn!(import = %service, error = %e, "egress authorization unavailable");
                        return deny(&mut guard, "controlplane_unavailable");
                    }
                },
            }
        };
        let Some(peer) = snap.peers.get(&answer.peer) else {
            tracing::warn!(import = %service, peer = %answer.peer, "egress answer names an unknown peer");
            return deny(&mut guard, "unknown_peer");
        };
        // It goes out with the CONNECT request (see Dialer::open). A client that is
        // already gone ends here.
        let first = match &early {
            Some(b) => b.clone(),
            None => match copy::read_early(&client) {
                Ok(b) => b,
                Err(_) => {
                    guard.set_reason(copy::End::LocalReset.reason());
                    return;
                }
            },
        };
        early = Some(first.clone());
        let tunnel = match dialer.open(peer, &answer.access_token, &first).await {
            Ok(t) => {
                ctx.metrics.connect_attempts.observe((attempt + 1) as f64);
                t
            }
            Err(tunnel::Error::Refused { status, reason, .. })
                if !token_retried
                    && attempt + 1 < MAX_ATTEMPTS
                    && matches!(
                        status,
                        http::StatusCode::FORBIDDEN | http::StatusCode::NOT_FOUND
                    ) =>
            {
                tracing::debug!(import = %service, %reason, "token refused; asking again");
                token_retried = true;
                ctx.egress_cache.forget(&cache_key);
                request.rejected_token = answer.access_token;
                continue;
            }
            Err(e)
                if sources > 1
                    && failovers < sources.min(MAX_FAILOVERS)
                    && attempt + 1 < MAX_ATTEMPTS
                    && failover_reason(&e).is_some() =>
            {
                let reason = failover_reason(&e).unwrap_or("unreachable");
                tracing::info!(import = %service, peer = %peer.name, error = %e, "no tunnel; failing over to another source");
                ctx.metrics.failovers.with_label_values(&[reason]).inc();
                failovers += 1;
                ctx.egress_cache.forget(&cache_key);
                request.rejected_token.clear();
                request.failed_peer = answer.peer;
                continue;
            }
            Err(e) => {
                ctx.metrics.connect_attempts.observe((attempt + 1) as f64);
                tracing::info!(import = %service, peer = %peer.name, error = %e, "no tunnel");
                ctx.metrics
                    .denials
                    .with_label_values(&["outbound", "unreachable"])
                    .inc();
                guard.set_reason("unreachable");
                copy::reset_on_drop(&client);
                return;
            }
        };
        ctx.metrics
            .setup_seconds
            .with_label_values(&["outbound"])
            .observe(start.elapsed().as_secs_f64());
        let counters = Counters {
            up: guard.to_target.clone(),
            down: guard.from_target.clone(),
        };
        counters.up.inc_by(first.len() as u64);
        let end = match tunnel {
            Tunnel::H2 { send, recv, lease } => {
                let end = ctx
                    .tracker
                    .run(copy::splice_h2(client, send, recv, &counters))
                    .await;
                drop(lease);
                end
            }
            Tunnel::Mux { stream, lease } => {
                let end = ctx
                    .tracker
                    .run(crate::mux::splice(client, stream, &counters))
                    .await;
                drop(lease);
                end
            }
            Tunnel::H1(io) => {
                ctx.tracker
                    .run(copy::splice_io(client, io, &counters))
                    .await
            }
        };
        guard.set_reason(end.reason());
        return;
    }
    deny(&mut guard, "token_refused");
}

/// Most tunnels tried for one client connection (token retry and failovers together).
const MAX_ATTEMPTS: usize = 5;
/// Most other sources tried after a failure.
const MAX_FAILOVERS: usize = 3;

/// Why a failed tunnel may be tried on another source: nothing of the client's
/// reached a target (`Interrupted` is never retried, a token refusal is retried on
/// its own terms).
fn failover_reason(e: &tunnel::Error) -> Option<&'static str> {
    match e {
        tunnel::Error::NoGateways(_) | tunnel::Error::Gateway { .. } => Some("unreachable"),
        tunnel::Error::Refused { status, .. } if status.is_server_error() => Some("refused"),
        _ => None,
    }
}
