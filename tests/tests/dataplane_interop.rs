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
    let material = dataplane::tls::Material::load(
        &dataplane::tls::CertPaths {
            ca: files.ca.clone(),
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        1,
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(material.server.clone());
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let h2_refusals = std::sync::Arc::new(AtomicUsize::new(0));
    let refusals = h2_refusals.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
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
            });
        }
    });
    Ok((addr, h2_refusals))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_http1_for_a_peer_that_cannot_tunnel_over_h2() -> Result<()> {
    init_logs();
    let fabric = Fabric::new("interop-fabric")?;
    let dir = TempDir::new("cl-go-peer")?;
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
    let material = dataplane::tls::Material::load(
        &dataplane::tls::CertPaths {
            ca: files.ca.clone(),
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        1,
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(material.server.clone());
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
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
                        let Ok(resp) = http::Response::builder()
                            .status(200)
                            .header(
                                dataplane::tunnel::PROTOCOLS_HEADER,
                                dataplane::tunnel::PROTOCOLS_VALUE,
                            )
                            .body(())
                        else {
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
            });
        }
    });
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

impl EarlyPeer {
    async fn start(drop_after_first: bool) -> Result<EarlyPeer> {
        init_logs();
        let fabric = Fabric::new("early-data-fabric")?;
        let dir = TempDir::new("cl-early")?;
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
        let (gw, firsts) = data_before_answer_gateway(files_b, drop_after_first).await?;
        let cp = FakeControlPlane::start(importer_snapshot(gw))?;
        let allow = allow_to_b();
        cp.set_egress(move |req| {
            std::thread::sleep(Duration::from_millis(200));
            allow(req)
        });
        let a = dataplane::start(gateway_config(&files_a, cp.addr)).await?;
        wait_ready(&a).await?;
        let import = a
            .import_addr(&format!("{NS}/{SERVICE}"))
            .ok_or_else(|| anyhow::anyhow!("no import listener"))?;
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
