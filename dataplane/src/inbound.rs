//! The gateway port: mTLS (client certificate required, verified against the fabric
//! CA), then HTTP/2 or HTTP/1.1 by ALPN. CONNECT requests are tunnels to exports,
//! authorized locally by the access token (no control-plane call per connection);
//! every other request is a peer request (GET /healthz, POST /authz) answered by the
//! control plane. Bad input ends only its own connection or stream, with a status and
//! a counter; nothing here panics on input.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use controlplane_api::v1;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admission::{idle, Activity, Admission, Refusal};
use crate::copy::{self, Counters};
use crate::cpclient::ControlPlane;
use crate::drain::Tracker;
use crate::metrics::{ConnGuard, Metrics};
use crate::mux;
use crate::snapshot::Store;
use crate::workers::{Port, Workers};
use crate::{h2conf, sockopt};
use fabric::identity::{remote_identity, Material};
use fabric::token;
use fabric::wire::{ALPN_H2, ALPN_MUX, ALPN_MUX2, PROTOCOLS_HEADER, PROTOCOLS_VALUE};

/// Largest request head accepted (both HTTP versions).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest peer-request body (ClusterLink's Envoy limit).
pub const MAX_BODY: usize = 64 * 1024;

/// What the gateway port's connections use, and nothing else.
pub struct Context {
    /// Certificates for new handshakes; live connections keep theirs.
    pub tls: watch::Receiver<Arc<Material>>,
    /// The snapshot in force: token key, policy epoch, exports.
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Where peer requests (`/healthz`, `/authz`) go.
    pub cp: ControlPlane,
    pub tracker: Arc<Tracker>,
    pub workers: Arc<Workers>,
    /// For the TLS handshake, and then for a complete request head.
    pub handshake_timeout: Duration,
    /// For connecting to an export's target.
    pub connect_timeout: Duration,
    /// Who may use the gateway port, and how much.
    pub admission: Arc<Admission>,
    /// A mux or h2 connection with no stream this long is closed (GOAWAY first).
    pub idle_timeout: Option<Duration>,
    /// Established tunnels are reset when a snapshot removes their peer or export.
    pub revoke: bool,
}

/// Whether `identity` matches a Peer of the snapshot in force.
fn known(ctx: &Context, identity: &str) -> bool {
    ctx.store.load().peers.contains_key(identity)
}

/// Counts a refusal by admission, and logs it (at debug: a stranger must not be able
/// to flood the log).
fn refused(ctx: &Context, identity: &str, r: Refusal) {
    ctx.metrics.rejected.with_label_values(&[r.metric()]).inc();
    tracing::debug!(
        peer = identity,
        reason = r.metric(),
        "gateway admission refused"
    );
}

/// Accepts gateway connections on worker `index` until `stop` turns true. A
/// connection goes to another worker when that one carries fewer gateway connections
/// (see `workers`).
pub async fn serve(
    listener: std::net::TcpListener,
    index: usize,
    ctx: Arc<Context>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(worker = index, error = %e, "cannot accept on the gateway port");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = fabric::sync::stopped(&mut stop) => return,
        };
        match accepted {
            Ok((tcp, _)) => {
                let (ctx, stop) = (ctx.clone(), stop.clone());
                let workers = ctx.workers.clone();
                workers.dispatch(Port::Gateway, index, tcp, move |tcp, load| {
                    connection(tcp, ctx, stop, load)
                });
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    tcp: TcpStream,
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
    _load: crate::workers::LoadGuard,
) {
    sockopt::tune_accepted(&tcp);
    let material = ctx.tls.borrow().clone();
    let acceptor = TlsAcceptor::from(material.server.clone());
    let tls = match tokio::time::timeout(ctx.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "gateway TLS handshake failed");
            ctx.metrics
                .handshakes
                .with_label_values(&["server", "error"])
                .inc();
            ctx.metrics
                .rejected
                .with_label_values(&["tls_handshake"])
                .inc();
            return;
        }
        Err(_) => {
            ctx.metrics
                .handshakes
                .with_label_values(&["server", "error"])
                .inc();
            ctx.metrics
                .rejected
                .with_label_values(&["handshake_timeout"])
                .inc();
            return;
        }
    };
    ctx.metrics
        .handshakes
        .with_label_values(&["server", "ok"])
        .inc();
    let Some(identity) = remote_identity(tls.get_ref().1.peer_certificates()) else {
        ctx.metrics
            .rejected
            .with_label_values(&["no_identity"])
            .inc();
        return;
    };
    let identity: Arc<str> = identity.into();
    let alpn = tls.get_ref().1.alpn_protocol();
    // Tunnels are for identities that match a Peer; the mux carries nothing else.
    let is_known = known(&ctx, &identity);
    let is_mux = alpn == Some(ALPN_MUX) || alpn == Some(ALPN_MUX2);
    if !is_known && is_mux {
        return refused(&ctx, &identity, Refusal::UnknownPeer);
    }
    let _permit = match ctx.admission.connection(&identity, is_known) {
        Ok(p) => p,
        Err(r) => return refused(&ctx, &identity, r),
    };
    if is_mux || alpn == Some(ALPN_H2) {
        sockopt::set_user_timeout(tls.get_ref().0);
    }
    if is_mux {
        serve_mux(tls, identity, ctx, stop).await;
    } else if alpn == Some(ALPN_H2) {
        serve_h2(tls, identity, ctx, stop).await;
    } else {
        serve_h1(tls, identity, ctx, stop).await;
    }
}

async fn serve_h2(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    identity: Arc<str>,
    ctx: Arc<Context>,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = h2conf::server();
    builder.max_header_list_size(MAX_HEADER_BYTES as u32);
    let handshake = builder.handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(ctx.handshake_timeout, handshake).await {
        Ok(Ok(c)) => c,
        _ => {
            ctx.metrics
                .rejected
                .with_label_values(&["h2_preface"])
                .inc();
            return;
        }
    };
    let mut draining = false;
    let activity = Arc::new(Activity::default());
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            _ = fabric::sync::stopped(&mut stop), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            _ = idle(&activity, ctx.idle_timeout), if !draining && ctx.idle_timeout.is_some() => {
                draining = true;
                ctx.metrics.idle_closed.with_label_values(&["h2"]).inc();
                conn.graceful_shutdown();
                continue;
            }
        };
        match next {
            Some(Ok((req, respond))) => {
                let ctx = ctx.clone();
                let identity = identity.clone();
                let active = activity.enter();
                tokio::spawn(async move {
                    h2_stream(req, respond, identity, ctx).await;
                    drop(active);
                });
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "h2 gateway connection error");
                ctx.metrics
                    .rejected
                    .with_label_values(&["h2_protocol"])
                    .inc();
                return;
            }
            None => return,
        }
    }
}

async fn serve_mux(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    identity: Arc<str>,
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
) {
    let on_open = {
        let ctx = ctx.clone();
        move |incoming: mux::Incoming| {
            let (ctx, identity) = (ctx.clone(), identity.clone());
            tokio::spawn(mux_stream(incoming, identity, ctx));
        }
    };
    match mux::serve(tls, on_open, stop, ctx.idle_timeout).await {
        Ok(mux::Ending::Idle) => ctx.metrics.idle_closed.with_label_values(&["mux"]).inc(),
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, "mux gateway connection error");
            if matches!(e, mux::Error::Protocol(_)) {
                ctx.metrics
                    .rejected
                    .with_label_values(&["mux_protocol"])
                    .inc();
            }
        }
    }
}

async fn mux_stream(incoming: mux::Incoming, identity: Arc<str>, ctx: Arc<Context>) {
    let start = Instant::now();
    let _permit = match ctx.admission.stream(&identity, known(&ctx, &identity)) {
        Ok(p) => p,
        Err(r) => {
            refused(&ctx, &identity, r);
            return incoming.refuse(r.status().as_u16(), r.public()).await;
        }
    };
    let auth = incoming.authorization().map(str::to_owned);
    match authorize_and_dial(auth.as_deref(), &identity, &ctx).await {
        Ok((target, service)) => {
            let Ok(stream) = incoming.accept().await else {
                return;
            };
            relay_inbound(
                &ctx,
                &identity,
                &service,
                start,
                target,
                |target, counters| async move { mux::splice(target, stream, &counters).await },
            )
            .await;
        }
        Err((status, reason)) => incoming.refuse(status.as_u16(), &reason).await,
    }
}

/// Runs an established inbound tunnel's relay (mux, h2 or HTTP/1.1) with its bookkeeping:
/// tracked for the drain, counted per service, set-up time observed, end reason kept;
/// and, unless `--keep-revoked-streams`, reset at both ends once a snapshot no longer
/// has its peer or its export (live revocation).
async fn relay_inbound<F, Fut>(
    ctx: &Context,
    identity: &str,
    service: &str,
    start: Instant,
    target: TcpStream,
    relay: F,
) where
    F: FnOnce(TcpStream, Counters) -> Fut,
    Fut: std::future::Future<Output = copy::End>,
{
    let _track = ctx.tracker.track();
    let mut guard = ConnGuard::new(&ctx.metrics, "inbound", service);
    ctx.metrics
        .setup_seconds
        .with_label_values(&["inbound"])
        .observe(start.elapsed().as_secs_f64());
    let counters = Counters {
        up: guard.from_target.clone(),
        down: guard.to_target.clone(),
    };
    // A second handle on the target's socket, to reset it when the relay (which owns
    // the target) is dropped on revocation.
    let reset = ctx
        .revoke
        .then(|| std::os::fd::AsFd::as_fd(&target).try_clone_to_owned().ok())
        .flatten();
    let relay = ctx.tracker.run(relay(target, counters));
    let end = match &reset {
        None => relay.await,
        Some(socket) => {
            tokio::select! {
                end = relay => end,
                reason = revoked(ctx, identity, service) => {
                    // The relay (and with it the tunnel's stream, which its remote sees
                    // reset) is dropped; the target gets RST, not an orderly FIN.
                    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
                    ctx.metrics.revoked.with_label_values(&[reason]).inc();
                    tracing::info!(peer = identity, export = service, reason, "established tunnel revoked");
                    copy::End::Revoked
                }
            }
        }
    };
    guard.set_reason(end.reason());
}

/// Resolves, with the reason, once a snapshot no longer allows `identity`'s tunnel to
/// `service`: its Peer or its export is gone.
async fn revoked(ctx: &Context, identity: &str, service: &str) -> &'static str {
    let mut applied = ctx.store.subscribe();
    loop {
        if applied.changed().await.is_err() {
            return std::future::pending().await;
        }
        let snap = ctx.store.load();
        if !snap.peers.contains_key(identity) {
            return "peer_removed";
        }
        if !snap.exports.contains_key(service) {
            return "export_removed";
        }
    }
}

fn response(status: StatusCode) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(PROTOCOLS_HEADER, PROTOCOLS_VALUE)
}

async fn h2_stream(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    identity: Arc<str>,
    ctx: Arc<Context>,
) {
    let (parts, mut body) = req.into_parts();
    let is_known = known(&ctx, &identity);
    if parts.method == Method::CONNECT {
        let start = Instant::now();
        let _permit = match ctx.admission.stream(&identity, is_known) {
            Ok(p) => p,
            Err(r) => {
                refused(&ctx, &identity, r);
                return h2_reply(
                    &mut respond,
                    r.status(),
                    Bytes::from_static(r.public().as_bytes()),
                );
            }
        };
        match authorize_and_dial(auth_header(&parts.headers), &identity, &ctx).await {
            Ok((target, service)) => {
                let Ok(resp) = response(StatusCode::OK).body(()) else {
                    return;
                };
                let Ok(send) = respond.send_response(resp, false) else {
                    return;
                };
                relay_inbound(
                    &ctx,
                    &identity,
                    &service,
                    start,
                    target,
                    |target, counters| async move {
                        copy::splice_h2(target, send, body, &counters).await
                    },
                )
                .await;
            }
            Err((status, reason)) => {
                h2_reply(&mut respond, status, Bytes::from(reason));
            }
        }
        return;
    }
    // A peer request: admitted, then its body read, bounded.
    if let Err(r) = ctx.admission.request(
        &identity,
        is_known,
        is_healthz(&parts.method, parts.uri.path()),
    ) {
        refused(&ctx, &identity, r);
        return h2_reply(
            &mut respond,
            r.status(),
            Bytes::from_static(r.public().as_bytes()),
        );
    }
    let data = match read_body(&parts.headers, &mut body, &ctx).await {
        Ok(data) => data,
        Err(e) => {
            h2_reply(&mut respond, e.status(), Bytes::from_static(e.reason()));
            return;
        }
    };
    let (status, headers, body) = peer_request(
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        data,
        &identity,
        &ctx,
    )
    .await;
    let mut builder = response(status);
    for (k, v) in headers {
        builder = builder.header(k, v);
    }
    if let Ok(resp) = builder.body(()) {
        if let Ok(mut send) = respond.send_response(resp, body.is_empty()) {
            if !body.is_empty() {
                let _ = send.send_data(body, true);
            }
        }
    }
}

/// Why a peer request's body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyError {
    /// Declared (Content-Length) or sent beyond `MAX_BODY`.
    TooLarge,
    /// An unparsable Content-Length, or a broken stream.
    Bad,
    /// Not complete within the handshake timeout.
    Timeout,
}

impl BodyError {
    fn status(self) -> StatusCode {
        match self {
            BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Bad => StatusCode::BAD_REQUEST,
            BodyError::Timeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn reason(self) -> &'static [u8] {
        match self {
            BodyError::TooLarge => b"request body too large",
            BodyError::Bad => b"bad request body",
            BodyError::Timeout => b"request body not received in time",
        }
    }

    /// The `clusterlink_rejected_total` reason.
    fn metric(self) -> &'static str {
        match self {
            BodyError::TooLarge | BodyError::Bad => "body",
            BodyError::Timeout => "body_timeout",
        }
    }
}

/// A request body as chunks of data, for `read_body` (h2's and HTTP/1.1's).
trait Chunks {
    /// The next chunk of data; `None` at the end, `Err` on a broken stream.
    fn next_chunk(&mut self)
        -> impl std::future::Future<Output = Option<Result<Bytes, ()>>> + Send;
}

impl Chunks for h2::RecvStream {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, ()>> {
        let chunk = self.data().await?;
        Some(match chunk {
            Ok(b) => {
                let _ = self.flow_control().release_capacity(b.len());
                Ok(b)
            }
            Err(_) => Err(()),
        })
    }
}

impl Chunks for Incoming {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, ()>> {
        loop {
            match self.frame().await? {
                // Trailers carry no data; skip them.
                Ok(frame) => match frame.into_data() {
                    Ok(data) => return Some(Ok(data)),
                    Err(_) => continue,
                },
                Err(_) => return Some(Err(())),
            }
        }
    }
}

/// Reads a peer request's body with the same limits on both HTTP versions: a declared
/// length over `MAX_BODY` is refused before reading a byte, more than `MAX_BODY` sent
/// as soon as it arrives, and the whole body must arrive within the handshake timeout
/// (a slow body holds a connection no longer than a slow head). Refusals are counted.
async fn read_body(
    headers: &http::HeaderMap,
    body: &mut impl Chunks,
    ctx: &Context,
) -> Result<Vec<u8>, BodyError> {
    let result = async {
        let declared = match headers.get(http::header::CONTENT_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(BodyError::Bad)?,
            ),
        };
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(BodyError::TooLarge);
        }
        let read = async {
            let mut data = Vec::with_capacity(declared.map_or(0, |n| n as usize));
            while let Some(chunk) = body.next_chunk().await {
                let chunk = chunk.map_err(|()| BodyError::Bad)?;
                if data.len() + chunk.len() > MAX_BODY {
                    return Err(BodyError::TooLarge);
                }
                data.extend_from_slice(&chunk);
            }
            Ok(data)
        };
        tokio::time::timeout(ctx.handshake_timeout, read)
            .await
            .map_err(|_| BodyError::Timeout)?
    }
    .await;
    if let Err(e) = result {
        ctx.metrics.rejected.with_label_values(&[e.metric()]).inc();
    }
    result
}

fn h2_reply(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode, body: Bytes) {
    if let Ok(resp) = response(status).body(()) {
        if let Ok(mut send) = respond.send_response(resp, body.is_empty()) {
            if !body.is_empty() {
                let _ = send.send_data(body, true);
            }
        }
    }
}

async fn serve_h1(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    identity: Arc<str>,
    ctx: Arc<Context>,
    mut stop: watch::Receiver<bool>,
) {
    let svc_ctx = ctx.clone();
    let svc =
        hyper::service::service_fn(move |req| h1_request(req, identity.clone(), svc_ctx.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.handshake_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(tls), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = fabric::sync::stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP/1.1 gateway connection error");
        let reason = if e.is_timeout() {
            "header_timeout"
        } else if e.is_parse_too_large() {
            "header_too_large"
        } else {
            "http1_protocol"
        };
        ctx.metrics.rejected.with_label_values(&[reason]).inc();
    }
}

type H1Response = Response<Full<Bytes>>;

/// `resp`, ending its connection.
fn closing(mut resp: H1Response) -> H1Response {
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

/// The one peer request an unknown identity may send.
fn is_healthz(method: &Method, path: &str) -> bool {
    method == Method::GET && path == "/healthz"
}

fn h1_reply(status: StatusCode, body: impl Into<Bytes>) -> H1Response {
    response(status)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

async fn h1_request(
    req: Request<Incoming>,
    identity: Arc<str>,
    ctx: Arc<Context>,
) -> Result<H1Response, Infallible> {
    let is_known = known(&ctx, &identity);
    if req.method() == Method::CONNECT {
        let start = Instant::now();
        let permit = match ctx.admission.stream(&identity, is_known) {
            Ok(p) => p,
            Err(r) => {
                refused(&ctx, &identity, r);
                return Ok(closing(h1_reply(r.status(), r.public())));
            }
        };
        return Ok(
            match authorize_and_dial(auth_header(req.headers()), &identity, &ctx).await {
                Ok((target, service)) => {
                    // Tracked from here, so that a drain waits for the upgrade too.
                    let track = ctx.tracker.track();
                    tokio::spawn(async move {
                        let _track = track;
                        let _permit = permit;
                        match hyper::upgrade::on(req).await {
                            Ok(upgraded) => {
                                relay_inbound(
                                    &ctx,
                                    &identity,
                                    &service,
                                    start,
                                    target,
                                    |target, counters| async move {
                                        copy::splice_io(target, TokioIo::new(upgraded), &counters)
                                            .await
                                    },
                                )
                                .await
                            }
                            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                        }
                    });
                    h1_reply(StatusCode::OK, Bytes::new())
                }
                Err((status, reason)) => h1_reply(status, reason),
            },
        );
    }
    let (parts, mut body) = req.into_parts();
    if let Err(r) = ctx.admission.request(
        &identity,
        is_known,
        is_healthz(&parts.method, parts.uri.path()),
    ) {
        // Its body (if any) is not read: the connection cannot carry another request.
        refused(&ctx, &identity, r);
        return Ok(closing(h1_reply(r.status(), r.public())));
    }
    let data = match read_body(&parts.headers, &mut body, &ctx).await {
        Ok(data) => data,
        Err(e) => {
            // The rest of the body is not read: the connection cannot carry another
            // request.
            return Ok(closing(h1_reply(e.status(), e.reason())));
        }
    };
    let (status, headers, body) = peer_request(
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        data,
        &identity,
        &ctx,
    )
    .await;
    let mut builder = response(status);
    for (k, v) in headers {
        builder = builder.header(k, v);
    }
    Ok(builder.body(Full::new(body)).unwrap_or_else(|_| {
        h1_reply(
            StatusCode::BAD_GATEWAY,
            "control plane sent an invalid header",
        )
    }))
}

/// Forwards a non-CONNECT request to the control plane.
async fn peer_request(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Vec<u8>,
    identity: &str,
    ctx: &Context,
) -> (StatusCode, Vec<(String, Vec<u8>)>, Bytes) {
    let req = v1::PeerHttpRequest {
        method: method.to_string(),
        path: path.to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| v1::Header {
                name: k.as_str().to_owned(),
                value: v.as_bytes().to_vec(),
            })
            .collect(),
        body,
        peer_identity: identity.to_owned(),
    };
    match ctx.cp.peer_request(req).await {
        Ok(r) => {
            let status = u16::try_from(r.status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::BAD_GATEWAY);
            let headers = r.headers.into_iter().map(|h| (h.name, h.value)).collect();
            (status, headers, Bytes::from(r.body))
        }
        Err(e) => {
            tracing::warn!(error = %e, "peer request: control plane unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Vec::new(),
                Bytes::from("control plane unavailable"),
            )
        }
    }
}

/// Verifies the CONNECT's token against the snapshot's key and the caller's mTLS
/// identity, then dials the export. The error is the status and reason to answer.
fn auth_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""))
}

async fn authorize_and_dial(
    auth: Option<&str>,
    identity: &str,
    ctx: &Context,
) -> Result<(TcpStream, String), (StatusCode, String)> {
    // The remote peer learns the category of a refusal, never this side's internals
    // (token claims naming peers, the export's host and port, error texts); those go
    // to the local log with the requester's identity.
    let deny = |reason: &'static str, status: StatusCode, public: &str, detail: String| {
        ctx.metrics
            .denials
            .with_label_values(&["inbound", reason])
            .inc();
        tracing::info!(peer = identity, reason, detail = %detail, "inbound tunnel refused");
        (status, public.to_owned())
    };
    let Some(auth) = auth else {
        return Err(deny(
            "no_token",
            StatusCode::BAD_REQUEST,
            "Missing 'authorization' header.",
            "no authorization header".into(),
        ));
    };
    let Some(token) = auth.strip_prefix("Bearer ") else {
        return Err(deny(
            "no_token",
            StatusCode::BAD_REQUEST,
            "Authorization header is not using the bearer scheme.",
            "authorization header without the bearer scheme".into(),
        ));
    };
    let snap = ctx.store.load();
    // Issued by this peer (its certificate's name: another peer holding the same key
    // cannot mint for this gateway), to the peer presenting it.
    let verified = token::verify(
        &snap.token_key,
        snap.min_epoch,
        token,
        &ctx.tls.borrow().identity,
        identity,
        fabric::clock::unix_secs(),
    );
    let claims = verified.map_err(|e| {
        let (reason, public) = match e {
            token::Error::Expired => ("token_expired", "access token expired"),
            token::Error::StaleEpoch { .. } => {
                ("token_stale", "access token minted under an older policy")
            }
            token::Error::WrongPeer { .. } => ("token_wrong_peer", "access token not valid"),
            token::Error::WrongIssuer { .. } => ("token_wrong_issuer", "access token not valid"),
            _ => ("token_invalid", "access token not valid"),
        };
        deny(reason, StatusCode::FORBIDDEN, public, e.to_string())
    })?;
    let service = crate::snapshot::key(&claims.export_namespace, &claims.export_name);
    let Some(export) = snap.exports.get(&service) else {
        // The name is the requester's own (from the token this peer minted for it).
        return Err(deny(
            "unknown_export",
            StatusCode::NOT_FOUND,
            &format!("Exported service '{service}' not found."),
            format!("no export {service}"),
        ));
    };
    let target = (export.host.as_str(), export.port);
    match tokio::time::timeout(ctx.connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok((tcp, service))
        }
        Ok(Err(e)) => Err(deny(
            "target_unreachable",
            StatusCode::BAD_GATEWAY,
            "exported service unreachable",
            format!(
                "cannot reach {}:{} for '{service}': {e}",
                export.host, export.port
            ),
        )),
        Err(_) => Err(deny(
            "target_unreachable",
            StatusCode::GATEWAY_TIMEOUT,
            "exported service did not answer in time",
            format!(
                "timed out connecting to {}:{} for '{service}'",
                export.host, export.port
            ),
        )),
    }
}
