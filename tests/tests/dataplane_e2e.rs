//! End-to-end: two real gateways (in-process, port 0) with fake control planes and a
//! TCP target, client -> A's import -> mTLS tunnel -> B -> target.

use std::time::Duration;

use anyhow::{ensure, Result};
use tests::*;

const T: Duration = Duration::from_secs(20);

async fn round_trip(opts: Options) -> Result<Pair> {
    let pair = Pair::start(opts).await?;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let back = tokio::time::timeout(T, echo_round_trip(pair.import, &data)).await??;
    ensure!(
        back == data,
        "echo mismatch: {} bytes back of {}",
        back.len(),
        data.len()
    );
    Ok(pair)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_over_h2() -> Result<()> {
    let pair = round_trip(Options::default()).await?;
    let m = metrics_of(pair.a()).await?;
    ensure!(
        (1.0..=2.0).contains(&metric(&m, "clusterlink_tunnels_open", &[])),
        "one pooled h2 tunnel per worker that carried a connection expected:\n{m}"
    );
    ensure!(
        metric(
            &m,
            "clusterlink_bytes_total",
            &["direction=\"outbound\"", "flow=\"to_target\""]
        ) >= 100_000.0
    );
    // Later connections reuse the pooled tunnels: at most one handshake per worker
    // (2 in tests), however many connections.
    for i in 0..10 {
        let msg = format!("again {i}");
        let back = echo_round_trip(pair.import, msg.as_bytes()).await?;
        ensure!(back == msg.as_bytes());
    }
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"ok\""]
        ) <= 2.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_over_http1_connect() -> Result<()> {
    let pair = round_trip(Options {
        force_http1_a: true,
        ..Default::default()
    })
    .await?;
    let back = echo_round_trip(pair.import, b"again").await?;
    ensure!(back == b"again");
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(&m, "clusterlink_tunnels_open", &[]) == 0.0,
        "no h2 tunnel expected:\n{m}"
    );
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"ok\""]
        ) == 2.0,
        "one TLS connection per tunnel:\n{m}"
    );
    Ok(())
}

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The client half-closes first: the target sees EOF, then answers, and the answer
/// still reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_client() -> Result<()> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let taddr = target.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = target.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                // Reads to EOF: only a carried FIN ends this.
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = s
                        .write_all(format!("got {} bytes", got.len()).as_bytes())
                        .await;
                }
            });
        }
    });
    for http1 in [false, true] {
        let pair = Pair::start_with_target(
            Options {
                force_http1_a: http1,
                ..Default::default()
            },
            taddr,
        )
        .await?;
        let mut c = TcpStream::connect(pair.import).await?;
        c.write_all(&[7u8; 5000]).await?;
        c.shutdown().await?;
        let mut answer = String::new();
        tokio::time::timeout(T, c.read_to_string(&mut answer)).await??;
        ensure!(answer == "got 5000 bytes", "http1={http1}: {answer:?}");
    }
    Ok(())
}

/// The target half-closes first: the client reads EOF and can still send, and the
/// target receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_target() -> Result<()> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let taddr = target.local_addr()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<usize>(4);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = target.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = s.write_all(b"hello").await;
                let _ = s.shutdown().await;
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = tx.send(got.len()).await;
                }
            });
        }
    });
    for http1 in [false, true] {
        let pair = Pair::start_with_target(
            Options {
                force_http1_a: http1,
                ..Default::default()
            },
            taddr,
        )
        .await?;
        let mut c = TcpStream::connect(pair.import).await?;
        let mut greeting = Vec::new();
        tokio::time::timeout(T, c.read_to_end(&mut greeting)).await??;
        ensure!(greeting == b"hello", "http1={http1}: {greeting:?}");
        c.write_all(&[1u8; 10_000]).await?;
        c.shutdown().await?;
        let n = tokio::time::timeout(T, rx.recv()).await?;
        ensure!(n == Some(10_000), "http1={http1}: target got {n:?}");
    }
    Ok(())
}

/// 256 MiB through the fabric, checked with SHA-256 at the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_256_mib_with_checksum() -> Result<()> {
    use sha2::{Digest, Sha256};
    const TOTAL: usize = 256 << 20;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let taddr = target.local_addr()?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = target.accept().await {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0usize;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        h.update(&buf[..k]);
                        n += k;
                    }
                }
            }
            let mut out = n.to_be_bytes().to_vec();
            out.extend_from_slice(&h.finalize());
            let _ = s.write_all(&out).await;
        }
    });
    let pair = Pair::start_with_target(Options::default(), taddr).await?;
    let mut c = TcpStream::connect(pair.import).await?;
    let mut h = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let send = async {
        for _ in 0..(TOTAL >> 20) {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            h.update(&block);
            c.write_all(&block).await?;
        }
        c.shutdown().await?;
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await?;
        Ok::<_, anyhow::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(120), send).await??;
    ensure!(answer.len() == 8 + 32, "short answer {answer:?}");
    let n = usize::from_be_bytes(answer[..8].try_into()?);
    ensure!(n == TOTAL, "target got {n} bytes of {TOTAL}");
    ensure!(answer[8..] == h.finalize()[..], "checksum mismatch");
    Ok(())
}

/// 200 connections open at once through one pooled tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let mut conns = Vec::new();
    for i in 0..200u32 {
        let mut c = TcpStream::connect(pair.import).await?;
        c.write_all(&i.to_be_bytes()).await?;
        conns.push(c);
    }
    let mut tasks = Vec::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut b = [0u8; 4];
            c.read_exact(&mut b).await?;
            ensure!(
                u32::from_be_bytes(b) == i as u32,
                "connection {i} got another's bytes"
            );
            Ok::<_, anyhow::Error>(c)
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        open.push(tokio::time::timeout(T, t).await???);
    }
    let b = pair.b().admin_addr;
    eventually("200 active inbound connections on B", T, || async move {
        let m = http_get(b, "/metrics").await.ok()?.1;
        (metric(
            &m,
            "clusterlink_connections_active",
            &["direction=\"inbound\""],
        ) == 200.0)
            .then_some(())
    })
    .await?;
    for (i, c) in open.iter_mut().enumerate() {
        c.write_all(format!("bye {i}").as_bytes()).await?;
        c.shutdown().await?;
    }
    for (i, mut c) in open.into_iter().enumerate() {
        let mut rest = Vec::new();
        tokio::time::timeout(T, c.read_to_end(&mut rest)).await??;
        ensure!(rest == format!("bye {i}").as_bytes());
    }
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\""]
        ) <= 2.0,
        "pooling expected:\n{m}"
    );
    Ok(())
}

/// Steady state: the control plane is asked once, and later connections of a
/// single-source import reuse its answer until a new snapshot arrives (the control
/// plane publishes one on every policy, peer or reachability change). A multi-source
/// import asks on every connection, so that load balancing acts per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_answers_are_reused_until_the_snapshot_changes() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    for _ in 0..10 {
        ensure!(echo_round_trip(pair.import, b"x").await? == b"x");
    }
    ensure!(
        pair.cp_a.egress_calls() == 1,
        "10 connections made {} egress calls",
        pair.cp_a.egress_calls()
    );
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_egress_decisions_total",
            &["source=\"cache\""]
        ) == 9.0
            && metric(
                &m,
                "clusterlink_egress_decisions_total",
                &["source=\"controlplane\""]
            ) == 1.0,
        "{m}"
    );

    let admin = pair.a().admin_addr;
    let applied = |version: f64| async move {
        eventually("the new snapshot", T, || async move {
            let m = http_get(admin, "/metrics").await.ok()?.1;
            (metric(&m, "clusterlink_snapshot_version", &[]) == version).then_some(())
        })
        .await
    };
    pair.cp_a.update_snapshot(|_| {});
    applied(2.0).await?;
    ensure!(echo_round_trip(pair.import, b"y").await? == b"y");
    ensure!(
        pair.cp_a.egress_calls() == 2,
        "a new snapshot did not end the reuse ({} calls)",
        pair.cp_a.egress_calls()
    );

    pair.cp_a.update_snapshot(|s| {
        s.imports[0]
            .sources
            .push(controlplane_api::v1::ImportSource {
                peer: "peer-c".into(),
                export_namespace: NS.into(),
                export_name: SERVICE.into(),
            })
    });
    applied(3.0).await?;
    for _ in 0..3 {
        ensure!(echo_round_trip(pair.import, b"z").await? == b"z");
    }
    ensure!(
        pair.cp_a.egress_calls() == 5,
        "a two-source import reused answers ({} calls, expected 5)",
        pair.cp_a.egress_calls()
    );
    Ok(())
}

/// Concurrent streams spread over the gateway's workers (2 in tests), each of which
/// carries its streams on its own pooled connection, and no more: one h2 connection is
/// driven by one task. With 5 streams held, the import port's balancing puts at least
/// one on each worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_spread_over_one_connection_per_worker() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pair = Pair::start(Options::default()).await?;
    let mut held = Vec::new();
    for i in 0..5u8 {
        let mut c = tokio::net::TcpStream::connect(pair.import).await?;
        c.write_all(&[i]).await?;
        let mut b = [0u8; 1];
        tokio::time::timeout(T, c.read_exact(&mut b)).await??;
        ensure!(b == [i]);
        held.push(c);
    }
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(&m, "clusterlink_tunnels_open", &[]) == 2.0,
        "5 concurrent streams with 2 workers should use 2 pooled connections:\n{m}"
    );
    drop(held);
    Ok(())
}

/// A TCP forwarder to `to` that relays only the first connection it accepts and closes
/// every later one at once: a gateway that can be dialed once.
async fn first_connection_only(to: std::net::SocketAddr) -> Result<std::net::SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut s, _)) = l.accept().await {
            if !first {
                drop(s);
                continue;
            }
            first = false;
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Gateway A with `workers` workers, importing the service from the gateway at `gw`
/// and allowed to reach it: its control plane (keep it), the gateway, and the
/// import's address.
async fn importer(
    files_a: &PeerFiles,
    gw: std::net::SocketAddr,
    workers: usize,
) -> Result<(FakeControlPlane, dataplane::Running, std::net::SocketAddr)> {
    let cp_a = FakeControlPlane::start(importer_snapshot(gw))?;
    cp_a.set_egress(allow_to_b());
    let mut cfg_a = gateway_config(files_a, cp_a.addr);
    cfg_a.workers = Some(workers);
    let a = dataplane::start(cfg_a).await?;
    wait_ready(&a).await?;
    let import = a
        .import_addr(&format!("{NS}/{SERVICE}"))
        .ok_or_else(|| anyhow::anyhow!("no import listener"))?;
    Ok((cp_a, a, import))
}

/// When a second pooled connection (to spread concurrent streams) cannot be made, the
/// stream goes over the busy connection that works, the gateway is not marked failed,
/// and the next streams do not each try again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pool_growth_falls_back_to_the_working_connection() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_logs();
    let (_dir, files_a, files_b) = two_peer_files("cl-pool")?;
    let target = start_echo().await?;
    let cp_b = FakeControlPlane::start(exporter_snapshot(target))?;
    let b = dataplane::start(gateway_config(&files_b, cp_b.addr)).await?;
    let once = first_connection_only(b.gateway_addr).await?;
    wait_ready(&b).await?;
    let (_cp_a, a, import) = importer(&files_a, once, 2).await?;
    // Eight streams open at once: the first makes the pooled connection; the first
    // stream on the other worker tries to add one and fails; all must use the first.
    let mut held = Vec::new();
    for i in 0..8u8 {
        let mut c = tokio::net::TcpStream::connect(import).await?;
        c.write_all(&[i]).await?;
        let mut back = [0u8; 1];
        tokio::time::timeout(T, c.read_exact(&mut back))
            .await
            .map_err(|_| anyhow::anyhow!("stream {i}: no echo"))??;
        ensure!(back == [i], "stream {i}: wrong echo");
        held.push(c);
    }
    let m = metrics_of(&a).await?;
    ensure!(
        metric(&m, "clusterlink_tunnels_open", &[]) == 1.0,
        "one pooled connection expected:\n{m}"
    );
    ensure!(
        metric(
            &m,
            "clusterlink_authorization_denials_total",
            &["direction=\"outbound\"", "reason=\"unreachable\""]
        ) == 0.0,
        "a stream was refused:\n{m}"
    );
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"error\""]
        ) <= 1.0,
        "a failed pool growth was retried for later streams:\n{m}"
    );
    drop(held);
    Ok(())
}

/// A target that holds every connection whose first byte is `S` without reading it,
/// and echoes the others.
async fn stall_or_echo() -> Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let mut stalled = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let mut first = [0u8; 1];
            if s.read_exact(&mut first).await.is_err() {
                continue;
            }
            if first[0] == b'S' {
                stalled.push(s);
                continue;
            }
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if w.write_all(&first).await.is_ok() {
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Streams whose target stopped reading fill the exporting gateway's queues until the
/// pooled multiplexer connection has no credit left; a new stream then goes over a new
/// pooled connection at once, instead of waiting behind them (before: up to the
/// response timeout, 10 s, or for good without first bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_congested_tunnel_sends_new_streams_to_another() -> Result<()> {
    init_logs();
    let (_dir, files_a, files_b) = two_peer_files("cl-congested")?;
    let cp_b = FakeControlPlane::start(exporter_snapshot(stall_or_echo().await?))?;
    let b = dataplane::start(gateway_config(&files_b, cp_b.addr)).await?;
    wait_ready(&b).await?;
    let (_cp_a, a, import) = importer(&files_a, b.gateway_addr, 1).await?;
    ensure!(echo_round_trip(import, b"first").await? == b"first");
    let handshakes = |m: &str| {
        metric(
            m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"ok\""],
        )
    };
    ensure!(handshakes(&metrics_of(&a).await?) == 1.0);
    // Eight streams with 4 MiB windows against the connection's 16 MiB: up to 1 MiB
    // of each window may be written at B and not yet credited back, so with five a
    // connection can stall with every stream out of credit and its own not yet gone;
    // with eight it runs out. (Streams opened once it has may go to a second one.)
    let (mut hogs, mut hog_conns) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let c = std::sync::Arc::new(TcpStream::connect(import).await?);
        hog_conns.push(c.clone());
        hogs.push(tokio::spawn(async move {
            let chunk = vec![b'S'; 256 * 1024];
            while c.writable().await.is_ok() {
                match c.try_write(&chunk) {
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break,
                    _ => {}
                }
            }
        }));
    }
    // They have stalled when A's bytes toward the target stop growing, well past the
    // 16 MiB window: A's connection credit is gone.
    let sent = |m: &str| {
        metric(
            m,
            "clusterlink_bytes_total",
            &["direction=\"outbound\"", "flow=\"to_target\""],
        )
    };
    let deadline = tokio::time::Instant::now() + T;
    let (mut last, mut same) = (-1.0, 0);
    while same < 3 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the streams did not stall"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sent(&metrics_of(&a).await?);
        same = if now == last && now > 16.0 * 1048576.0 {
            same + 1
        } else {
            0
        };
        last = now;
    }
    // One try, with half the response timeout: plenty on loopback, too little to wait
    // for credit on the congested connection and be retried on another.
    let back = tokio::time::timeout(Duration::from_secs(5), echo_round_trip(import, b"fresh"))
        .await
        .map_err(|_| anyhow::anyhow!("the new stream waited behind the congested connection"))??;
    ensure!(back == b"fresh");
    let m = metrics_of(&a).await?;
    ensure!(
        handshakes(&m) >= 2.0,
        "another pooled connection expected: {} handshakes, {} sent\n{m}",
        handshakes(&m),
        sent(&m)
    );
    // Once the stalled streams are reset, the extra connections are idle: the next
    // streams leave one per worker (1 here) and the others close.
    for h in hogs {
        h.abort();
    }
    for c in hog_conns {
        // Closed with RST: the stream is reset, not half-closed behind stalled data.
        dataplane::copy::reset_on_drop(&c);
    }
    let a = &a;
    eventually("the idle extra connections close", T, || async move {
        let back = echo_round_trip(import, b"later").await.ok()?;
        let m = metrics_of(a).await.ok()?;
        (back == b"later" && metric(&m, "clusterlink_tunnels_open", &[]) == 1.0).then_some(())
    })
    .await?;
    Ok(())
}

/// An import that takes the port of one removed in the same snapshot is bound at once:
/// the old listener's copies (one per worker) are closed before the new bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_import_takes_the_port_of_a_removed_one() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let port = pair.import.port();
    pair.cp_a.update_snapshot(|s| {
        s.imports[0].name = "renamed".into();
        s.imports[0].port = port.into();
    });
    let a = pair.a();
    let key = format!("{NS}/renamed");
    let addr = eventually("the renamed import's listener", T, || async {
        a.import_addr(&key)
    })
    .await?;
    ensure!(addr == pair.import, "bound on {addr}, not {}", pair.import);
    ensure!(a.import_addr(&format!("{NS}/{SERVICE}")).is_none());
    let back = echo_round_trip(pair.import, b"same port").await?;
    ensure!(back == b"same port");
    Ok(())
}
