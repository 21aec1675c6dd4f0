//! Test support shared by the end-to-end tests and the benchmark harness: a generated
//! fabric (rcgen), temporary peer directories, an in-process fake control plane built
//! on the generated tonic servers, TCP echo targets, gateway pairs, and a
//! poll-with-deadline helper instead of sleeps.

pub mod containers;
pub mod k8s;
pub mod procs;
pub mod site;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use controlplane_api::v1;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

// ---------------------------------------------------------------- environment

/// Whether the environment variable `var` that a test needs is set: `Ok(false)` (skip,
/// with a message saying `how` to get it) outside CI, an error under CI, where
/// `.ci/run` sets it.
pub fn needs_env(test: &str, var: &str, how: &str) -> Result<bool> {
    if std::env::var_os(var).is_some() {
        return Ok(true);
    }
    if std::env::var_os("CI").is_some() {
        bail!("{test}: {var} must be set under CI ({how})");
    }
    eprintln!("{test}: skipped: {var} is not set ({how})");
    Ok(false)
}

// ---------------------------------------------------------------- polling

/// Polls `f` every 20 ms until it returns `Some`, or fails after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- files

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- certificates

/// A fabric CA (ECDSA P-256).
pub struct Fabric {
    pub name: String,
    params: CertificateParams,
    key: KeyPair,
    pub ca_pem: String,
}

/// A peer certificate chain (leaf then CA) and key, as PEM.
#[derive(Clone)]
pub struct PeerCert {
    pub name: String,
    pub chain_pem: String,
    pub key_pem: String,
    pub serial: u64,
}

impl Fabric {
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Fabric {
            name: name.to_owned(),
            params,
            key,
            ca_pem,
        })
    }

    /// A peer certificate whose CN and only DNS SAN are `name`.
    pub fn issue(&self, name: &str) -> Result<PeerCert> {
        self.issue_with(name, None)
    }

    /// As `issue`, valid until `not_after` when given (in the past for expired ones).
    pub fn issue_with(&self, name: &str, not_after: Option<(i32, u8, u8)>) -> Result<PeerCert> {
        static SERIAL: AtomicU64 = AtomicU64::new(1000);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(serial.into());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(y - 1, m, d);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(PeerCert {
            name: name.to_owned(),
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            key_pem: key.serialize_pem(),
            serial,
        })
    }
}

/// The three files a gateway reads.
#[derive(Clone)]
pub struct PeerFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PeerFiles {
    pub fn write(dir: &Path, ca_pem: &str, cert: &PeerCert) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let f = PeerFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        f.replace(ca_pem, cert)?;
        Ok(f)
    }

    /// The peer's TLS material, loaded as a data plane loads it.
    pub fn material(&self) -> Result<fabric::identity::Material> {
        let paths = fabric::identity::CertPaths {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        };
        Ok(fabric::identity::Material::load(&paths, 1)?)
    }

    /// Replaces the files atomically (write then rename), as a secret update would.
    pub fn replace(&self, ca_pem: &str, cert: &PeerCert) -> Result<()> {
        for (path, data) in [
            (&self.ca, ca_pem),
            (&self.key, cert.key_pem.as_str()),
            (&self.cert, cert.chain_pem.as_str()),
        ] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, data)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- fake control plane

type EgressFn = dyn Fn(&v1::EgressRequest) -> v1::EgressResponse + Send + Sync;

struct FakeState {
    snapshot: watch::Sender<v1::Snapshot>,
    egress: Mutex<Arc<EgressFn>>,
    egress_calls: AtomicUsize,
    rejected_tokens: Mutex<Vec<String>>,
}

#[derive(Clone)]
struct FakeService(Arc<FakeState>);

#[tonic::async_trait]
impl v1::config_discovery_server::ConfigDiscovery for FakeService {
    type SubscribeStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::Snapshot, tonic::Status>> + Send>,
    >;

    async fn subscribe(
        &self,
        _req: tonic::Request<v1::SubscribeRequest>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        use tokio_stream::StreamExt;
        let rx = self.0.snapshot.subscribe();
        let s = tokio_stream::wrappers::WatchStream::new(rx).map(Ok);
        Ok(tonic::Response::new(Box::pin(s)))
    }
}

#[tonic::async_trait]
impl v1::authorization_server::Authorization for FakeService {
    async fn authorize_egress(
        &self,
        req: tonic::Request<v1::EgressRequest>,
    ) -> Result<tonic::Response<v1::EgressResponse>, tonic::Status> {
        let req = req.into_inner();
        self.0.egress_calls.fetch_add(1, Ordering::Relaxed);
        if !req.rejected_token.is_empty() {
            if let Ok(mut r) = self.0.rejected_tokens.lock() {
                r.push(req.rejected_token.clone());
            }
        }
        let f = self
            .0
            .egress
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .clone();
        Ok(tonic::Response::new(f(&req)))
    }

    async fn peer_request(
        &self,
        req: tonic::Request<v1::PeerHttpRequest>,
    ) -> Result<tonic::Response<v1::PeerHttpResponse>, tonic::Status> {
        let req = req.into_inner();
        let resp = if req.method == "GET" && req.path == "/healthz" {
            v1::PeerHttpResponse {
                status: 200,
                headers: vec![
                    v1::Header {
                        name: "ClusterLinkPeerLabels".into(),
                        value: b"bnVsbA==".to_vec(),
                    },
                    v1::Header {
                        name: "x-test-peer-identity".into(),
                        value: req.peer_identity.into_bytes(),
                    },
                ],
                body: Vec::new(),
            }
        } else {
            v1::PeerHttpResponse {
                status: 404,
                headers: vec![],
                body: format!("no route for {} {}", req.method, req.path).into_bytes(),
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

/// An in-process fake control plane on its own runtime thread, so that stopping it
/// really closes every connection, as a crashed control plane would.
pub struct FakeControlPlane {
    pub addr: SocketAddr,
    state: Arc<FakeState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeControlPlane {
    pub fn start(snapshot: v1::Snapshot) -> Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, snapshot)
    }

    pub fn start_on(addr: SocketAddr, snapshot: v1::Snapshot) -> Result<Self> {
        let state = Arc::new(FakeState {
            snapshot: watch::channel(snapshot).0,
            egress: Mutex::new(Arc::new(|_: &v1::EgressRequest| v1::EgressResponse {
                allowed: false,
                reason: "no egress rule in the fake control plane".into(),
                ..Default::default()
            })),
            egress_calls: AtomicUsize::new(0),
            rejected_tokens: Mutex::new(Vec::new()),
        });
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = FakeService(state.clone());
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(std_listener) else {
                    return;
                };
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let server = tonic::transport::Server::builder()
                    .add_service(v1::config_discovery_server::ConfigDiscoveryServer::new(
                        svc.clone(),
                    ))
                    .add_service(v1::authorization_server::AuthorizationServer::new(svc))
                    .serve_with_incoming(incoming);
                tokio::select! {
                    _ = server => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime closes every connection it still holds.
            rt.shutdown_background();
        });
        Ok(FakeControlPlane {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The snapshot it serves now.
    pub fn snapshot(&self) -> v1::Snapshot {
        self.state.snapshot.borrow().clone()
    }

    /// Pushes a new snapshot to every subscribed data plane.
    pub fn set_snapshot(&self, s: v1::Snapshot) {
        self.state.snapshot.send_replace(s);
    }

    pub fn update_snapshot(&self, f: impl FnOnce(&mut v1::Snapshot)) {
        self.state.snapshot.send_modify(|s| {
            f(s);
            s.version += 1;
        });
    }

    pub fn set_egress(
        &self,
        f: impl Fn(&v1::EgressRequest) -> v1::EgressResponse + Send + Sync + 'static,
    ) {
        if let Ok(mut e) = self.state.egress.lock() {
            *e = Arc::new(f);
        }
    }

    pub fn egress_calls(&self) -> usize {
        self.state.egress_calls.load(Ordering::Relaxed)
    }

    pub fn rejected_tokens(&self) -> Vec<String> {
        self.state
            .rejected_tokens
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Stops the server and closes its connections.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- targets

/// A TCP echo server: echoes until the client's FIN, then closes its write side.
pub async fn start_echo() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Writes `data`, half-closes, and reads everything back until EOF.
/// Sends `msg` on an established connection to an echo server and expects it back
/// within 30 s.
pub async fn ping(c: &mut TcpStream, msg: &[u8]) -> Result<()> {
    c.write_all(msg).await?;
    let mut b = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(30), c.read_exact(&mut b))
        .await
        .context("no echo")??;
    anyhow::ensure!(b == msg, "echo mismatch");
    Ok(())
}

pub async fn echo_round_trip(addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let mut out = Vec::with_capacity(data.len());
    let read = r.read_to_end(&mut out);
    let (a, b) = tokio::join!(write, read);
    a?;
    b?;
    Ok(out)
}

// ---------------------------------------------------------------- gateways

pub const PEER_A: &str = "peer-a";
pub const PEER_B: &str = "peer-b";
pub const NS: &str = "default";
pub const SERVICE: &str = "echo";
pub const TOKEN_KEY: &[u8; 32] = b"fabric-test-token-key-32-bytes!!";

/// Certificate files of peers A and B of one new fabric, in a new temporary directory
/// (named after `name`, as the fabric is).
pub fn two_peer_files(name: &str) -> Result<(TempDir, PeerFiles, PeerFiles)> {
    let fabric = Fabric::new(name)?;
    let dir = TempDir::new(name)?;
    let files_a = PeerFiles::write(
        &dir.path().join(PEER_A),
        &fabric.ca_pem,
        &fabric.issue(PEER_A)?,
    )?;
    let files_b = PeerFiles::write(
        &dir.path().join(PEER_B),
        &fabric.ca_pem,
        &fabric.issue(PEER_B)?,
    )?;
    Ok((dir, files_a, files_b))
}

pub fn gateway_config(files: &PeerFiles, cp: impl std::fmt::Display) -> dataplane::Config {
    dataplane::Config {
        gateway_addr: "127.0.0.1:0"
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
        admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        import_bind: [127, 0, 0, 1].into(),
        controlplane: cp.to_string(),
        controlplane_host: None,
        site_ca_file: None,
        site_cert_file: None,
        site_key_file: None,
        ca_file: files.ca.clone(),
        cert_file: files.cert.clone(),
        key_file: files.key.clone(),
        drain_timeout: 5.0,
        connect_timeout_ms: 1000,
        handshake_timeout_ms: 2000,
        max_connections_per_peer: 16_384,
        max_streams_per_peer: 65_536,
        peer_requests_per_sec: 1000,
        idle_timeout: 300.0,
        keep_revoked_streams: false,
        cert_reload_ms: 100,
        force_http1: false,
        no_mux: false,
        // In-process gateways share the test runtime; this sets how many pooled
        // connections concurrent streams spread over, the same on every machine.
        workers: Some(2),
        log_level: "info".into(),
    }
}

/// B's snapshot: exports `default/echo` -> `target`, with the token key, and knows
/// peer A (a Peer with no gateway: B never dials it).
pub fn exporter_snapshot(target: SocketAddr) -> v1::Snapshot {
    v1::Snapshot {
        version: 1,
        peers: vec![v1::Peer {
            name: PEER_A.into(),
            gateways: vec![],
            protocol: 0,
        }],
        exports: vec![v1::Export {
            namespace: NS.into(),
            name: SERVICE.into(),
            host: target.ip().to_string(),
            port: target.port().into(),
        }],
        token_key: Some(v1::TokenKey {
            key: TOKEN_KEY.to_vec(),
            min_epoch: 1,
        }),
        ..Default::default()
    }
}

/// A's snapshot: peer B at `gateway`, and the import `default/echo` on a free port.
pub fn importer_snapshot(gateway: SocketAddr) -> v1::Snapshot {
    v1::Snapshot {
        version: 1,
        peers: vec![v1::Peer {
            name: PEER_B.into(),
            gateways: vec![gateway.to_string()],
            protocol: 0,
        }],
        imports: vec![v1::Import {
            namespace: NS.into(),
            name: SERVICE.into(),
            port: 0,
            sources: vec![v1::ImportSource {
                peer: PEER_B.into(),
                export_namespace: NS.into(),
                export_name: SERVICE.into(),
            }],
        }],
        ..Default::default()
    }
}

/// A token B's gateway accepts from `aud` for `default/echo`.
pub fn token_for(aud: &str, ttl_secs: u64, epoch: u64) -> String {
    token_by(PEER_B, aud, ttl_secs, epoch)
}

/// A token for `default/echo` as peer `iss` would mint it for `aud` (with B's key).
pub fn token_by(iss: &str, aud: &str, ttl_secs: u64, epoch: u64) -> String {
    fabric::token::mint(
        TOKEN_KEY,
        &fabric::token::Claims {
            iss: iss.into(),
            aud: aud.into(),
            export_namespace: NS.into(),
            export_name: SERVICE.into(),
            exp: fabric::clock::unix_secs() + ttl_secs,
            epoch,
        },
    )
}

/// Egress answers that send every connection to B with a fresh token.
pub fn allow_to_b() -> impl Fn(&v1::EgressRequest) -> v1::EgressResponse + Send + Sync + 'static {
    |_req| v1::EgressResponse {
        allowed: true,
        reason: String::new(),
        peer: PEER_B.into(),
        access_token: token_for(PEER_A, 60, 1),
        expires_unix_ms: ((fabric::clock::unix_secs() + 60) * 1000) as i64,
        reusable: true,
    }
}

#[derive(Default)]
pub struct Options {
    pub force_http1_a: bool,
    /// A tunnels over h2 instead of `clusterlink-mux/1`.
    pub no_mux_a: bool,
    /// Name in B's certificate, if not "peer-b" (A still dials "peer-b").
    pub cert_name_b: Option<String>,
    /// Drain timeout of both gateways, in seconds (default 5).
    pub drain_timeout: Option<f64>,
    /// Changes to B's configuration.
    pub config_b: Option<fn(&mut dataplane::Config)>,
}

/// Two gateways, each with its own fake control plane, and an echo target behind B:
/// client -> A's import -> mTLS tunnel -> B -> echo.
pub struct Pair {
    pub fabric: Fabric,
    pub dir: TempDir,
    pub files_a: PeerFiles,
    pub files_b: PeerFiles,
    pub cp_a: FakeControlPlane,
    pub cp_b: FakeControlPlane,
    pub a: Option<dataplane::Running>,
    pub b: Option<dataplane::Running>,
    pub target: SocketAddr,
    pub import: SocketAddr,
}

impl Pair {
    pub async fn start(opts: Options) -> Result<Pair> {
        let target = start_echo().await?;
        Self::start_with_target(opts, target).await
    }

    pub async fn start_with_target(opts: Options, target: SocketAddr) -> Result<Pair> {
        init_logs();
        let fabric = Fabric::new("test-fabric")?;
        let dir = TempDir::new("cl-pair")?;
        let cert_a = fabric.issue(PEER_A)?;
        let cert_b = fabric.issue(opts.cert_name_b.as_deref().unwrap_or(PEER_B))?;
        let files_a = PeerFiles::write(&dir.path().join(PEER_A), &fabric.ca_pem, &cert_a)?;
        let files_b = PeerFiles::write(&dir.path().join(PEER_B), &fabric.ca_pem, &cert_b)?;
        let cp_b = FakeControlPlane::start(exporter_snapshot(target))?;
        let mut cfg_b = gateway_config(&files_b, cp_b.addr);
        cfg_b.drain_timeout = opts.drain_timeout.unwrap_or(5.0);
        if let Some(f) = opts.config_b {
            f(&mut cfg_b);
        }
        let b = dataplane::start(cfg_b).await?;
        let cp_a = FakeControlPlane::start(importer_snapshot(b.gateway_addr))?;
        cp_a.set_egress(allow_to_b());
        let mut cfg_a = gateway_config(&files_a, cp_a.addr);
        cfg_a.force_http1 = opts.force_http1_a;
        cfg_a.no_mux = opts.no_mux_a;
        cfg_a.drain_timeout = opts.drain_timeout.unwrap_or(5.0);
        let a = dataplane::start(cfg_a).await?;
        wait_ready(&b).await?;
        wait_ready(&a).await?;
        let import = a
            .import_addr(&format!("{NS}/{SERVICE}"))
            .ok_or_else(|| anyhow!("import listener not bound"))?;
        Ok(Pair {
            fabric,
            dir,
            files_a,
            files_b,
            cp_a,
            cp_b,
            a: Some(a),
            b: Some(b),
            target,
            import,
        })
    }

    pub fn a(&self) -> &dataplane::Running {
        self.a
            .as_ref()
            .unwrap_or_else(|| unreachable!("gateway A was shut down"))
    }

    pub fn b(&self) -> &dataplane::Running {
        self.b
            .as_ref()
            .unwrap_or_else(|| unreachable!("gateway B was shut down"))
    }
}

/// Waits until the gateway's /ready answers 200.
pub async fn wait_ready(r: &dataplane::Running) -> Result<()> {
    let admin = r.admin_addr;
    eventually(
        "gateway readiness",
        Duration::from_secs(10),
        || async move { (http_get(admin, "/ready").await.ok()?.0 == 200).then_some(()) },
    )
    .await
}

/// A minimal HTTP/1.1 GET over plain TCP (admin port); returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let what = || format!("GET {path} from {addr}");
    let mut s = TcpStream::connect(addr).await.with_context(what)?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .with_context(what)?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .with_context(what)?
        .with_context(what)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad response {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one sample in Prometheus text, summed over label sets that contain
/// every string in `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name) && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn metrics_of(r: &dataplane::Running) -> Result<String> {
    Ok(http_get(r.admin_addr, "/metrics").await?.1)
}

/// Logs to the test output, filtered by RUST_LOG (default: warnings).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------- raw peer clients

/// An mTLS connection to a gateway as a peer would make it: `cert` as client
/// certificate, `ca_pem` as trust root, SNI `server_name`.
pub async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &str,
    cert: &PeerCert,
    server_name: &str,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let chain =
        CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    Ok(tls)
}

/// Sends an HTTP/1.1 request head and returns the status and whatever body bytes
/// arrive with the head (the stream is then positioned after the head).
pub async fn h1_request<S>(stream: &mut S, head: &str) -> Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(head.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!(
                    "connection closed before a response head ({} bytes)",
                    buf.len()
                );
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = resp.parse(&buf)? {
                let code = resp.code.unwrap_or(0);
                let body = String::from_utf8_lossy(&buf[len..]).into_owned();
                return Ok((code, body));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("no response head")?
}

/// The head of an HTTP/1.1 CONNECT with an optional bearer token.
pub fn connect_head(token: Option<&str>) -> String {
    match token {
        Some(t) => format!("CONNECT {PEER_B}:443 HTTP/1.1\r\nHost: {PEER_B}:443\r\nAuthorization: Bearer {t}\r\n\r\n"),
        None => format!("CONNECT {PEER_B}:443 HTTP/1.1\r\nHost: {PEER_B}:443\r\n\r\n"),
    }
}

/// Reads until the peer closes or resets the connection; `None` if it is still open
/// after `within`. Returns what was read before the end.
pub async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    within: Duration,
) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(got)
}

/// True if the peer closes or resets the connection within `within`.
pub async fn closed_by_peer<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    read_until_closed(s, within).await.is_some()
}

/// True if a connection to `addr` is refused or reset, or closed without a byte
/// within `within`. A reset can arrive before `connect` returns (the gateway resets
/// refused connections at once), so a failed connect counts as refused.
pub async fn refused(addr: SocketAddr, within: Duration) -> bool {
    match TcpStream::connect(addr).await {
        Err(_) => true,
        Ok(mut c) => {
            let _ = c.write_all(b"ping").await;
            read_until_closed(&mut c, within).await == Some(vec![])
        }
    }
}
