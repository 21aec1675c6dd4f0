//! Interoperability and bad input on the gateway port: curl as an independent
//! HTTPS-proxy client tunnels over HTTP/1.1 CONNECT (as ClusterLink's Go and Envoy data
//! planes do); garbage, stalls and oversized heads close only their own connection.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);

/// A one-shot HTTP/1.1 server: answers every request with "hello from the export".
async fn http_target() -> Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "hello from the export";
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Runs curl as an HTTPS proxy client: mTLS to B's gateway with A's certificate, then
/// HTTP/1.1 CONNECT with the bearer token, then a GET through the tunnel.
async fn curl(pair: &Pair, dir: &std::path::Path, token: &str) -> Result<std::process::Output> {
    let cert = pair.fabric.issue(PEER_A)?;
    let files = PeerFiles::write(dir, &pair.fabric.ca_pem, &cert)?;
    let port = pair.b().gateway_addr.port();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--proxytunnel"])
        .args(["--proxy", &format!("https://{PEER_B}:{port}")])
        .args(["--resolve", &format!("{PEER_B}:{port}:127.0.0.1")])
        .arg("--proxy-cacert")
        .arg(&files.ca)
        .arg("--proxy-cert")
        .arg(&files.cert)
        .arg("--proxy-key")
        .arg(&files.key)
        .args(["--proxy-header", &format!("Authorization: Bearer {token}")])
        .arg("http://echo.default.invalid/");
    tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("running curl (install it: apt-get install -y curl)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_tunnels_through_http1_connect() -> Result<()> {
    let target = http_target().await?;
    let pair = Pair::start_with_target(Options::default(), target).await?;
    let dir = TempDir::new("cl-curl")?;
    let out = curl(&pair, dir.path(), &token_for(PEER_A, 60, 1)).await?;
    ensure!(
        out.status.success(),
        "curl failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "hello from the export",
        "{:?}",
        out.stdout
    );
    // A token issued to another peer: curl reports the gateway's 403.
    let out = curl(&pair, dir.path(), &token_for("peer-c", 60, 1)).await?;
    ensure!(!out.status.success(), "foreign token accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("403"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_tls_port_closes_only_that_connection() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let mut g = TcpStream::connect(pair.b().gateway_addr).await?;
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage")
        .await?;
    ensure!(closed_by_peer(&mut g, T).await, "plaintext not refused");
    ensure!(
        echo_round_trip(pair.import, b"ok").await? == b"ok",
        "other traffic disturbed"
    );
    let m = metrics_of(pair.b()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_gateway_rejected_total",
            &["reason=\"tls_handshake\""]
        ) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshake_and_stalled_head_time_out() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    // Says nothing at all (the test gateways use a 2 s handshake timeout).
    let mut silent = TcpStream::connect(pair.b().gateway_addr).await?;
    ensure!(
        closed_by_peer(&mut silent, Duration::from_secs(10)).await,
        "silent client kept"
    );
    // Finishes TLS, then sends half a request head.
    let cert = pair.fabric.issue(PEER_A)?;
    let mut s = tls_connect(
        pair.b().gateway_addr,
        &pair.fabric.ca_pem,
        &cert,
        PEER_B,
        &[b"http/1.1"],
    )
    .await?;
    s.write_all(b"CONNECT peer-b:443 HTTP/1.1\r\nHost: pe")
        .await?;
    ensure!(
        closed_by_peer(&mut s, Duration::from_secs(10)).await,
        "stalled head kept"
    );
    let m = metrics_of(pair.b()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_gateway_rejected_total",
            &["reason=\"handshake_timeout\""]
        ) >= 1.0,
        "{m}"
    );
    ensure!(echo_round_trip(pair.import, b"ok").await? == b"ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_is_refused() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let cert = pair.fabric.issue(PEER_A)?;
    let mut s = tls_connect(
        pair.b().gateway_addr,
        &pair.fabric.ca_pem,
        &cert,
        PEER_B,
        &[b"http/1.1"],
    )
    .await?;
    let big = "x".repeat(64 * 1024);
    let head = format!("CONNECT peer-b:443 HTTP/1.1\r\nHost: peer-b\r\nX-Big: {big}\r\n\r\n");
    match h1_request(&mut s, &head).await {
        Ok((status, _)) => ensure!(status == 431, "got {status}"),
        Err(_) => ensure!(closed_by_peer(&mut s, T).await),
    }
    // Over h2 too: the stream or connection is refused, the gateway carries on.
    ensure!(echo_round_trip(pair.import, b"ok").await? == b"ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_requests_reach_the_control_plane_with_the_mtls_identity() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let cert = pair.fabric.issue(PEER_A)?;
    let mut s = tls_connect(
        pair.b().gateway_addr,
        &pair.fabric.ca_pem,
        &cert,
        PEER_B,
        &[b"http/1.1"],
    )
    .await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: peer-b\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(T, s.read(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    ensure!(text.starts_with("http/1.1 200"), "{text}");
    ensure!(text.contains("clusterlinkpeerlabels: bnvsba=="), "{text}");
    ensure!(text.contains("x-test-peer-identity: peer-a"), "{text}");
    ensure!(
        text.contains("clusterlink-tunnel-protocols: h2, http/1.1"),
        "{text}"
    );
    Ok(())
}

/// A stand-in for ClusterLink's Go data plane as a remote peer: it offers h2 in ALPN
/// but cannot tunnel CONNECT over it (answers 500 without our protocols header), and
/// tunnels over HTTP/1.1 CONNECT, answering `200 OK` with `Content-Type: text/plain`.
async fn go_like_gateway(
    files: PeerFiles,
    target: std::net::SocketAddr,
) -> Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let h2_refusals = std::sync::Arc::new(AtomicUsize::new(0));
    let refusals = h2_refusals.clone();
    let addr = tls_listener(&files, move |mut tls| {
        let refusals = refusals.clone();
        async move {
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    refusals.fetch_add(1, Ordering::Relaxed);
                    if let Ok(resp) = http::Response::builder().status(500).body(()) {
                        let _ = respond.send_response(resp, true);
                    }
                }
                return;
            }
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match tls.read(&mut b).await {
                    Ok(1) => head.push(b[0]),
                    _ => return,
                }
            }
            let text = String::from_utf8_lossy(&head).to_lowercase();
            if !text.starts_with("connect ") || !text.contains("authorization: bearer ") {
                let _ = tls
                    .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return;
            }
            let Ok(mut up) = TcpStream::connect(target).await else {
                return;
            };
            if tls
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
        }
    })
    .await?;
    Ok((addr, h2_refusals))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_http1_for_a_peer_that_cannot_tunnel_over_h2() -> Result<()> {
    init_logs();
    let (_dir, files_a, files_b) = two_peer_files("cl-go-peer")?;
    let echo = start_echo().await?;
    let (gw, h2_refusals) = go_like_gateway(files_b, echo).await?;
    let cp = FakeControlPlane::start(importer_snapshot(gw))?;
    cp.set_egress(allow_to_b());
    let a = dataplane::start(gateway_config(&files_a, cp.addr)).await?;
    wait_ready(&a).await?;
    let import = a
        .import_addr(&format!("{NS}/{SERVICE}"))
        .ok_or_else(|| anyhow::anyhow!("no import listener"))?;
    // The first connection tries h2, is refused, and falls back within the same attempt.
    ensure!(echo_round_trip(import, b"first").await? == b"first");
    ensure!(h2_refusals.load(std::sync::atomic::Ordering::Relaxed) == 1);
    // Later connections go straight to HTTP/1.1.
    for i in 0..3 {
        let msg = format!("again {i}");
        ensure!(echo_round_trip(import, msg.as_bytes()).await? == msg.as_bytes());
    }
    ensure!(
        h2_refusals.load(std::sync::atomic::Ordering::Relaxed) == 1,
        "h2 retried for a peer known not to tunnel over it"
    );
    Ok(())
}

/// A remote gateway that reads the CONNECT request's first DATA before it answers, and
/// reports what it got in that time (nothing, if the dialer waits for the answer
/// before sending); it then answers 200 and echoes.
async fn data_before_answer_gateway(
    files: PeerFiles,
    drop_after_first: bool,
) -> Result<(
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = tls_listener(&files, move |tls| {
        let tx = tx.clone();
        async move {
            let Ok(mut conn) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                if drop_after_first {
                    // Got the request (and its first bytes), then the whole
                    // connection goes away without an answer.
                    let mut body = req.into_body();
                    let first = tokio::time::timeout(Duration::from_secs(2), body.data()).await;
                    let first = match first {
                        Ok(Some(Ok(d))) => d.to_vec(),
                        _ => Vec::new(),
                    };
                    let _ = tx.send(first);
                    drop(respond);
                    return;
                }
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let first = tokio::time::timeout(Duration::from_secs(2), body.data()).await;
                    let first = match first {
                        Ok(Some(Ok(d))) => {
                            let _ = body.flow_control().release_capacity(d.len());
                            d.to_vec()
                        }
                        _ => Vec::new(),
                    };
                    let _ = tx.send(first.clone());
                    let Ok(resp) = ours_ok() else {
                        return;
                    };
                    let Ok(mut send) = respond.send_response(resp, false) else {
                        return;
                    };
                    let _ = send.send_data(first.into(), false);
                    while let Some(Ok(d)) = body.data().await {
                        let _ = body.flow_control().release_capacity(d.len());
                        let _ = send.send_data(d, false);
                    }
                    let _ = send.send_data(bytes::Bytes::new(), true);
                });
            }
        }
    })
    .await?;
    Ok((addr, rx))
}

/// Gateway A importing from a `data_before_answer_gateway`, with a slow authorization
/// answer (200 ms): a client's first bytes are surely in A's socket by the time A
/// opens the tunnel.
struct EarlyPeer {
    a: dataplane::Running,
    import: std::net::SocketAddr,
    firsts: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    _cp: FakeControlPlane,
    _dir: TempDir,
}

/// Gateway A importing `default/echo` from peer B at `gw`, with a slow authorization
/// answer (200 ms); returns it, its import address and its control plane.
async fn importer_with_slow_authz(
    files_a: &PeerFiles,
    gw: std::net::SocketAddr,
) -> Result<(dataplane::Running, std::net::SocketAddr, FakeControlPlane)> {
    let cp = FakeControlPlane::start(importer_snapshot(gw))?;
    let allow = allow_to_b();
    cp.set_egress(move |req| {
        std::thread::sleep(Duration::from_millis(200));
        allow(req)
    });
    let a = dataplane::start(gateway_config(files_a, cp.addr)).await?;
    wait_ready(&a).await?;
    let import = a
        .import_addr(&format!("{NS}/{SERVICE}"))
        .ok_or_else(|| anyhow::anyhow!("no import listener"))?;
    Ok((a, import, cp))
}

impl EarlyPeer {
    async fn start(drop_after_first: bool) -> Result<EarlyPeer> {
        init_logs();
        let (dir, files_a, files_b) = two_peer_files("cl-early")?;
        let (gw, firsts) = data_before_answer_gateway(files_b, drop_after_first).await?;
        let (a, import, cp) = importer_with_slow_authz(&files_a, gw).await?;
        Ok(EarlyPeer {
            a,
            import,
            firsts,
            _cp: cp,
            _dir: dir,
        })
    }
}

/// A client's first bytes travel right behind the CONNECT request, not one round trip
/// between the gateways later; the tunnel then works as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_travel_with_the_connect_request() -> Result<()> {
    let early = EarlyPeer::start(false).await?;
    let (a, import, mut firsts) = (&early.a, early.import, early.firsts);
    let mut c = TcpStream::connect(import).await?;
    c.write_all(b"hello").await?;
    let first = tokio::time::timeout(T, firsts.recv())
        .await?
        .context("the gateway saw no request")?;
    ensure!(
        first == b"hello",
        "the gateway got {first:?} before answering, not the client's first bytes"
    );
    let mut back = [0u8; 5];
    tokio::time::timeout(T, c.read_exact(&mut back)).await??;
    ensure!(&back == b"hello");
    // The rest of the connection flows after the answer.
    c.write_all(b" again").await?;
    let mut back = [0u8; 6];
    tokio::time::timeout(T, c.read_exact(&mut back)).await??;
    ensure!(&back == b" again");
    // Counted once: "hello" with the request, " again" by the copy loop.
    let m = metrics_of(a).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_bytes_total",
            &["direction=\"outbound\"", "flow=\"to_target\""]
        ) == 11.0,
        "{m}"
    );
    Ok(())
}

/// A tunnel that fails after the client's first bytes went out with the request is not
/// retried (they may have reached the target): the client is reset, and the remote
/// gateway saw one request only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_are_not_sent_twice_when_the_tunnel_fails() -> Result<()> {
    let early = EarlyPeer::start(true).await?;
    let (import, mut firsts) = (early.import, early.firsts);
    let mut c = TcpStream::connect(import).await?;
    c.write_all(b"hello").await?;
    ensure!(
        read_until_closed(&mut c, T).await == Some(vec![]),
        "the client was not closed"
    );
    let first = firsts.try_recv().context("the gateway saw no request")?;
    ensure!(first == b"hello", "first bytes: {first:?}");
    ensure!(
        firsts.try_recv().is_err(),
        "the request was sent again after the tunnel failed"
    );
    Ok(())
}

/// The 200 our gateway answers a CONNECT with (with our protocols header).
fn ours_ok() -> http::Result<http::Response<()>> {
    http::Response::builder()
        .status(200)
        .header(
            fabric::wire::PROTOCOLS_HEADER,
            fabric::wire::PROTOCOLS_VALUE,
        )
        .body(())
}

/// A TLS acceptor with the certificate of `files` (ALPN h2 and http/1.1: these fakes
/// stand for gateways that do not speak clusterlink-mux/1).
fn acceptor(files: &PeerFiles) -> Result<tokio_rustls::TlsAcceptor> {
    let mut config = (*files.material()?.server).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// A fake remote gateway: listens on 127.0.0.1 with the certificate of `files` (client
/// certificate required) and runs `serve` on each TLS connection, in a task of its own.
async fn tls_listener<F, Fut>(files: &PeerFiles, serve: F) -> Result<std::net::SocketAddr>
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = acceptor(files)?;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    Ok(addr)
}

/// A TCP echo target that also keeps every byte it receives, over all connections.
async fn recording_echo() -> Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let all = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let all = all.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                loop {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if let Ok(mut all) = all.lock() {
                                all.extend_from_slice(&b[..n]);
                            }
                            if s.write_all(&b[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((addr, received))
}

/// An HTTP/2 frame header.
fn frame_head(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// Speaks raw HTTP/2 as a server on `tls`: reads one request and the DATA that follows
/// it (for up to 5 s), then answers GOAWAY(NO_ERROR) naming stream 0 as the last one
/// processed, i.e. that request was not, as when a request crosses the GOAWAY of a
/// gateway that is shutting down. (h2's server cannot say that: it counts a stream as
/// processed once it has read its HEADERS.) Returns the request's DATA.
async fn unprocessed_by_goaway<S>(mut tls: S) -> Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;
    let mut preface = [0u8; PREFACE.len()];
    tls.read_exact(&mut preface).await?;
    ensure!(preface == PREFACE, "not an HTTP/2 client: {preface:?}");
    tls.write_all(&frame_head(0, SETTINGS, 0, 0)).await?;
    tls.flush().await?;
    let mut data = Vec::new();
    let read = async {
        let mut request = false;
        while !request || data.is_empty() {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).await?;
            match (head[3], head[4]) {
                (SETTINGS, flags) if flags & ACK == 0 => {
                    tls.write_all(&frame_head(0, SETTINGS, ACK, 0)).await?;
                    tls.flush().await?;
                }
                (HEADERS, _) => request = true,
                // h2 does not pad DATA.
                (DATA, _) => data.extend_from_slice(&payload),
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    // Without the DATA (a test failure), the GOAWAY is sent anyway.
    if let Ok(read) = tokio::time::timeout(Duration::from_secs(5), read).await {
        read?;
    }
    let mut goaway = frame_head(8, GOAWAY, 0, 0).to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes()); // last stream id
    goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
    tls.write_all(&goaway).await?;
    tls.flush().await?;
    // The dialer closes the connection once it has let go of it.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, tls.read_to_end(&mut rest)).await;
    Ok(data)
}

/// Answers every CONNECT on an h2 connection with 200 and splices its stream to `target`.
async fn tunnel_to<S>(tls: S, target: std::net::SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut conn) = h2::server::handshake(tls).await else {
        return;
    };
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(target).await else {
                return;
            };
            let Ok(resp) = ours_ok() else {
                return;
            };
            let Ok(mut send) = respond.send_response(resp, false) else {
                return;
            };
            let (mut r, mut w) = up.into_split();
            let mut body = req.into_body();
            let to_target = async move {
                while let Some(Ok(d)) = body.data().await {
                    let _ = body.flow_control().release_capacity(d.len());
                    if w.write_all(&d).await.is_err() {
                        return;
                    }
                }
                let _ = w.shutdown().await;
            };
            let from_target = async move {
                let mut b = vec![0u8; 4096];
                loop {
                    match r.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let chunk = bytes::Bytes::copy_from_slice(&b[..n]);
                            if send.send_data(chunk, false).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = send.send_data(bytes::Bytes::new(), true);
            };
            tokio::join!(to_target, from_target);
        });
    }
}

/// A remote gateway whose connections tunnel to `target`, except the first one if
/// `goaway_first`: that one refuses its one request with a graceful GOAWAY (see
/// `unprocessed_by_goaway`) and reports that request's DATA. Counts TLS connections.
async fn tunnel_gateway(
    files: PeerFiles,
    target: std::net::SocketAddr,
    goaway_first: bool,
) -> Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
)> {
    use std::sync::atomic::Ordering;
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = conns.clone();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = tls_listener(&files, move |tls| {
        let (counted, tx) = (counted.clone(), tx.clone());
        async move {
            if counted.fetch_add(1, Ordering::Relaxed) == 0 && goaway_first {
                match unprocessed_by_goaway(tls).await {
                    Ok(data) => {
                        let _ = tx.send(data);
                    }
                    Err(e) => tracing::warn!(error = %e, "first connection"),
                }
            } else {
                tunnel_to(tls, target).await;
            }
        }
    })
    .await?;
    Ok((addr, conns, rx))
}

/// A graceful GOAWAY naming an earlier stream than the CONNECT's says the remote did
/// not process it: gateway A retries it on a new connection, although the client's
/// first bytes went out with it, and they reach the target once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refused_by_graceful_goaway_is_retried_on_a_new_connection() -> Result<()> {
    init_logs();
    let (_dir, files_a, files_b) = two_peer_files("cl-goaway")?;
    let (target, received) = recording_echo().await?;
    let (gw, tls_conns, mut unprocessed) = tunnel_gateway(files_b, target, true).await?;
    let (_a, import, _cp) = importer_with_slow_authz(&files_a, gw).await?;
    let mut c = TcpStream::connect(import).await?;
    c.write_all(b"hello").await?;
    let first = tokio::time::timeout(T, unprocessed.recv())
        .await?
        .context("the first connection saw no request")?;
    ensure!(
        first == b"hello",
        "the refused request carried {first:?}, not the client's first bytes"
    );
    let mut back = [0u8; 5];
    tokio::time::timeout(T, c.read_exact(&mut back))
        .await?
        .context("the CONNECT was not retried")?;
    ensure!(&back == b"hello", "{back:?}");
    c.write_all(b" again").await?;
    let mut back = [0u8; 6];
    tokio::time::timeout(T, c.read_exact(&mut back)).await??;
    ensure!(&back == b" again", "{back:?}");
    let conns = tls_conns.load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        conns == 2,
        "{conns} TLS connections to the remote gateway, not 2"
    );
    let received = received
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    ensure!(
        received == b"hello again",
        "the target received {:?}",
        String::from_utf8_lossy(&received)
    );
    Ok(())
}

/// A remote gateway that takes CONNECT requests over h2 and never answers them; reports
/// the DATA of each request once the dialer gives up on it (resets it).
async fn silent_gateway(
    files: PeerFiles,
) -> Result<(
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = tls_listener(&files, move |tls| {
        let tx = tx.clone();
        async move {
            let Ok(mut conn) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((req, respond))) = conn.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut data = Vec::new();
                    while let Some(Ok(d)) = body.data().await {
                        let _ = body.flow_control().release_capacity(d.len());
                        data.extend_from_slice(&d);
                    }
                    let _ = tx.send(data);
                    drop(respond);
                });
            }
        }
    })
    .await?;
    Ok((addr, rx))
}

/// A dialer as gateway A's, with `response_timeout`, outside a gateway.
fn dialer_of(files_a: &PeerFiles, response_timeout: Duration) -> Result<dataplane::tunnel::Dialer> {
    let (_, tls) = tokio::sync::watch::channel(std::sync::Arc::new(files_a.material()?));
    Ok(dataplane::tunnel::Dialer::new(
        tls,
        std::sync::Arc::new(dataplane::metrics::Metrics::new()),
        Duration::from_secs(1),
        false,
    )
    .with_response_timeout(response_timeout))
}

/// A CONNECT left unanswered is given up on after the response timeout. If the client's
/// first bytes went out with it, the peer's next gateway is not tried (the first one
/// may still deliver them to the target); without them, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_connect_fails_over_only_without_first_bytes() -> Result<()> {
    use dataplane::tunnel::{Error, Tunnel};
    init_logs();
    // Shorter than the default (10 s), which `within` would catch; long enough for
    // the standby to answer in the second part on a loaded machine.
    let response_timeout = Duration::from_secs(2);
    let within = Duration::from_secs(8);
    let (_dir, files_a, files_b) = two_peer_files("cl-silent")?;
    let (silent, mut silent_got) = silent_gateway(files_b.clone()).await?;
    let (standby, standby_conns, _) = tunnel_gateway(files_b, start_echo().await?, false).await?;
    let standby_conns = move || standby_conns.load(std::sync::atomic::Ordering::Relaxed);
    let peer = dataplane::snapshot::Peer {
        name: PEER_B.into(),
        gateways: vec![silent.to_string(), standby.to_string()],
        protocol: dataplane::snapshot::Protocol::Auto,
    };
    let token = token_for(PEER_A, 60, 1);

    let dialer = dialer_of(&files_a, response_timeout)?;
    let early = bytes::Bytes::from_static(b"hello");
    let opened = tokio::time::timeout(within, dialer.open(&peer, &token, &early))
        .await
        .context("no answer to CONNECT, and the dialer still waits")?;
    match opened {
        Err(Error::Interrupted { gateway, reason }) => ensure!(
            gateway == silent.to_string() && reason == "no answer to CONNECT",
            "{gateway}: {reason}"
        ),
        Err(e) => anyhow::bail!("unexpected error: {e}"),
        Ok(_) => anyhow::bail!("a tunnel opened: the first bytes were sent to another gateway"),
    }
    let got = tokio::time::timeout(T, silent_got.recv())
        .await?
        .context("the silent gateway saw no request")?;
    ensure!(got == b"hello", "the silent gateway got {got:?}");
    ensure!(
        standby_conns() == 0,
        "the standby gateway was dialled ({} connections)",
        standby_conns()
    );

    let dialer = dialer_of(&files_a, response_timeout)?;
    let opened = tokio::time::timeout(T, dialer.open(&peer, &token, &bytes::Bytes::new())).await?;
    let (mut send, mut recv) = match opened {
        Ok(Tunnel::H2 { send, recv, .. }) => (send, recv),
        Ok(Tunnel::H1(_)) => anyhow::bail!("fell back to HTTP/1.1"),
        Ok(Tunnel::Mux { .. }) => anyhow::bail!("clusterlink-mux/1 with an h2-only gateway"),
        Err(e) => anyhow::bail!("not failed over: {e}"),
    };
    let got = tokio::time::timeout(T, silent_got.recv())
        .await?
        .context("the silent gateway saw no request")?;
    ensure!(got.is_empty(), "the silent gateway got {got:?}");
    ensure!(standby_conns() == 1, "{} connections", standby_conns());
    // The tunnel goes through the standby gateway.
    send.send_data(bytes::Bytes::from_static(b"ping"), true)?;
    let mut back = Vec::new();
    while let Some(d) = tokio::time::timeout(T, recv.data()).await? {
        back.extend_from_slice(&d?);
    }
    ensure!(back == b"ping", "{back:?}");
    Ok(())
}
