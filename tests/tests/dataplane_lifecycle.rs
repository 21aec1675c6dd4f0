//! Gateway lifecycle: certificate rotation under live tunnels, operation on the last
//! snapshot while the control plane is away, and the drain.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

async fn generation(admin: SocketAddr) -> Option<u64> {
    let body = http_get(admin, "/config_dump").await.ok()?.1;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["certificate_generation"].as_u64()
}

fn served_serial(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<Vec<u8>> {
    let der = tls.get_ref().1.peer_certificates()?.first()?.clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.raw_serial().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_live_streams_and_new_tunnels_use_the_new_certificate() -> Result<()> {
    rotation(Options::default()).await
}

/// The same with pooled h2 CONNECT tunnels (toward a gateway without the multiplexer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_over_h2_keeps_live_streams_and_closes_the_old_tunnel() -> Result<()> {
    rotation(Options {
        no_mux_a: true,
        ..Options::default()
    })
    .await
}

async fn rotation(opts: Options) -> Result<()> {
    let pair = Pair::start(opts).await?;
    let mut live = TcpStream::connect(pair.import).await?;
    ping(&mut live, b"before").await?;

    // Rotate B (server side): new key, new serial, same name.
    let new_b = pair.fabric.issue(PEER_B)?;
    pair.files_b.replace(&pair.fabric.ca_pem, &new_b)?;
    let admin_b = pair.b().admin_addr;
    eventually("B reloads", T, || async move {
        (generation(admin_b).await? == 2).then_some(())
    })
    .await?;
    let cert_a = pair.fabric.issue(PEER_A)?;
    let tls = tls_connect(
        pair.b().gateway_addr,
        &pair.fabric.ca_pem,
        &cert_a,
        PEER_B,
        &[],
    )
    .await?;
    let want: Vec<u8> = {
        let mut s = new_b.serial.to_be_bytes().to_vec();
        while s.len() > 1 && s[0] == 0 {
            s.remove(0);
        }
        s
    };
    ensure!(
        served_serial(&tls) == Some(want),
        "B still serves the old certificate"
    );
    ping(&mut live, b"after B rotated").await?;

    // Rotate A (client side): the live stream stays on its tunnel, a new connection
    // gets a new tunnel made with the new certificate.
    pair.files_a
        .replace(&pair.fabric.ca_pem, &pair.fabric.issue(PEER_A)?)?;
    let admin_a = pair.a().admin_addr;
    eventually("A reloads", T, || async move {
        (generation(admin_a).await? == 2).then_some(())
    })
    .await?;
    let back = echo_round_trip(pair.import, b"new connection").await?;
    ensure!(back == b"new connection");
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"ok\""]
        ) == 2.0,
        "a second tunnel (new certificate) expected:\n{m}"
    );
    ping(&mut live, b"after A rotated").await?;

    // A broken file is reported and changes nothing.
    std::fs::write(&pair.files_a.cert, "not a certificate")?;
    eventually("A reports the bad file", T, || async move {
        let m = http_get(admin_a, "/metrics").await.ok()?.1;
        (metric(
            &m,
            "clusterlink_certificate_reloads_total",
            &["result=\"error\""],
        ) >= 1.0)
            .then_some(())
    })
    .await?;
    ensure!(generation(admin_a).await == Some(2));
    ping(&mut live, b"after a bad file").await?;
    ensure!(echo_round_trip(pair.import, b"still fine").await? == b"still fine");

    // The tunnel made with the old certificate carried `live` to its end and then
    // closed; the new ones stay.
    drop(live);
    eventually(
        "the old tunnel closes after its last stream",
        T,
        || async move {
            let m = http_get(admin_a, "/metrics").await.ok()?.1;
            let made = metric(
                &m,
                "clusterlink_tunnel_handshakes_total",
                &["side=\"client\"", "result=\"ok\""],
            );
            (metric(&m, "clusterlink_tunnels_open", &[]) == made - 1.0).then_some(())
        },
    )
    .await?;
    ensure!(echo_round_trip(pair.import, b"after it closed").await? == b"after it closed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_control_planes_existing_and_new_connections_still_work() -> Result<()> {
    let mut pair = Pair::start(Options::default()).await?;
    let mut live = TcpStream::connect(pair.import).await?;
    ping(&mut live, b"before").await?;
    pair.cp_a.stop();
    pair.cp_b.stop();
    for admin in [pair.a().admin_addr, pair.b().admin_addr] {
        eventually("the stream down in the metrics", T, || async move {
            let m = http_get(admin, "/metrics").await.ok()?.1;
            (metric(&m, "clusterlink_controlplane_connected", &[]) == 0.0).then_some(())
        })
        .await?;
    }
    ping(&mut live, b"control planes gone").await?;
    let back = echo_round_trip(pair.import, b"new connection").await?;
    ensure!(
        back == b"new connection",
        "new connection failed on the last snapshot"
    );
    // Still ready: the last snapshot is in force.
    ensure!(http_get(pair.a().admin_addr, "/ready").await?.0 == 200);

    // The control plane comes back on the same address: the stream reconnects.
    let snap = importer_snapshot(pair.b().gateway_addr);
    let cp = FakeControlPlane::start_on(pair.cp_a.addr, snap)?;
    cp.set_egress(allow_to_b());
    let admin = pair.a().admin_addr;
    eventually("A reconnects", T, || async move {
        let m = http_get(admin, "/metrics").await.ok()?.1;
        (metric(&m, "clusterlink_controlplane_connected", &[]) == 1.0).then_some(())
    })
    .await?;
    ensure!(echo_round_trip(pair.import, b"back").await? == b"back");
    ensure!(
        cp.egress_calls() >= 1,
        "the new control plane was not asked"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_a_stream_in_flight_finish() -> Result<()> {
    let mut pair = Pair::start(Options::default()).await?;
    let mut live = TcpStream::connect(pair.import).await?;
    ping(&mut live, b"before").await?;
    let b = pair.b.take().context("B")?;
    let (gateway, admin) = (b.gateway_addr, b.admin_addr);
    let drain = tokio::spawn(b.shutdown(Duration::from_secs(15)));
    eventually("B not ready", T, || async move {
        (http_get(admin, "/ready").await.ok()?.0 == 503).then_some(())
    })
    .await?;
    eventually("B stops accepting", T, || async move {
        TcpStream::connect(gateway).await.is_err().then_some(())
    })
    .await?;
    ping(&mut live, b"during the drain").await?;
    ensure!(!drain.is_finished(), "drain ended with a stream in flight");
    live.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(T, live.read_to_end(&mut rest)).await??;
    // Well before the 15 s deadline, once the stream ended.
    tokio::time::timeout(Duration::from_secs(5), drain).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_what_is_left() -> Result<()> {
    let mut pair = Pair::start(Options::default()).await?;
    let mut live = TcpStream::connect(pair.import).await?;
    ping(&mut live, b"before").await?;
    let b = pair.b.take().context("B")?;
    tokio::time::timeout(T, b.shutdown(Duration::from_millis(300))).await?;
    ensure!(
        closed_by_peer(&mut live, T).await,
        "stream not closed after the drain deadline"
    );
    Ok(())
}

/// cl-dataplane as a process with its certificates and a control plane that is not
/// there (it keeps retrying), its admin port on `admin`; extra arguments last.
fn dataplane_command(
    files: &PeerFiles,
    admin: u16,
    extra: &[&str],
) -> Result<std::process::Command> {
    let mut c = std::process::Command::new(tests::procs::binary("cl-dataplane")?);
    let cp = tests::procs::free_port()?;
    c.args([
        "--gateway-addr",
        "127.0.0.1:0",
        "--import-bind",
        "127.0.0.1",
    ])
    .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
    .args(["--controlplane", &format!("127.0.0.1:{cp}")])
    .arg("--ca-file")
    .arg(&files.ca)
    .arg("--cert-file")
    .arg(&files.cert)
    .arg("--key-file")
    .arg(&files.key)
    .args(extra)
    .stdin(std::process::Stdio::null());
    Ok(c)
}

/// A flag value a `Duration` cannot hold (`inf`, `NaN`, 1e30) is refused with the
/// reason at start-up, by both the data plane and `deploy peer`; before, `inf` was
/// accepted and panicked in `Duration::from_secs_f64` when the data plane started.
#[test]
fn drain_timeouts_that_cannot_be_durations_are_refused() -> Result<()> {
    let (_dir, files, _) = two_peer_files("drain-flag")?;
    for bad in ["inf", "NaN", "1e30", "-1"] {
        let admin = tests::procs::free_port()?;
        let flag = format!("--drain-timeout={bad}");
        let mut child = dataplane_command(&files, admin, &[&flag])?
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if std::time::Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("cl-dataplane --drain-timeout {bad} is still running");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err)?;
        }
        ensure!(
            status.code() == Some(2)
                && err.contains("--drain-timeout")
                && !err.contains("panicked"),
            "cl-dataplane --drain-timeout {bad}: {status} {err}"
        );
    }
    let out = std::process::Command::new(tests::procs::binary("clusterlink")?)
        .args(["deploy", "peer", "--name", "p", "--drain-timeout", "inf"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && err.contains("--drain-timeout"),
        "deploy peer --drain-timeout inf: {} {err}",
        out.status
    );
    Ok(())
}

/// Out of descriptors, the admin port backs off instead of spinning: with the data
/// plane's descriptor limit filled by idle admin connections, the connections waiting
/// in the backlog make every accept fail at once (EMFILE); the process must stay
/// nearly idle meanwhile. Before, the accept loop retried at once and burned a core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_accept_backs_off_when_out_of_descriptors() -> Result<()> {
    let (dir, files, _) = two_peer_files("admin-emfile")?;
    let admin = tests::procs::free_port()?;
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg("--nofile=64:64").arg("--");
    let inner = dataplane_command(&files, admin, &[])?;
    cmd.arg(inner.get_program()).args(inner.get_args());
    let mut p = tests::procs::Proc::spawn(&mut cmd, &dir.path().join("dataplane.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    eventually("admin port", T, || async move {
        TcpStream::connect(addr).await.ok().map(drop)
    })
    .await?;
    // Idle connections until the limit bites (the kernel queues more than the
    // process can accept), held while measuring; the admin port closes idle ones
    // after 5 s, so the measurement stays well inside that.
    let mut held = Vec::new();
    for _ in 0..96 {
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => held.push(c),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = p.pid();
    let cpu = || tests::procs::cpu_seconds(pid).context("/proc stat");
    let before = cpu()?;
    let t = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let share = (cpu()? - before) / t.elapsed().as_secs_f64();
    let opened = held.len();
    drop(held);
    ensure!(p.ended().is_none(), "the data plane exited");
    p.kill();
    // More connections than the process has descriptors: the limit was reached.
    ensure!(opened > 64, "only {opened} connections opened");
    ensure!(
        share < 0.25,
        "the data plane used {:.0} % of a CPU while out of descriptors",
        share * 100.0
    );
    let log = std::fs::read_to_string(dir.path().join("dataplane.log")).unwrap_or_default();
    ensure!(
        log.contains("admin accept failed"),
        "no accept failure logged"
    );
    Ok(())
}

/// An import whose port another process holds is bound as soon as the port is free,
/// without waiting for another snapshot (which may never come); /ready says 503
/// meanwhile. Before, the listener was tried again only at the next snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_port_held_elsewhere_is_bound_once_free() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let holder = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = holder.local_addr()?.port();
    pair.cp_a
        .update_snapshot(|s| s.imports[0].port = u32::from(port));
    let admin = pair.a().admin_addr;
    eventually("/ready 503 while the port is held", T, || async move {
        (http_get(admin, "/ready").await.ok()?.0 == 503).then_some(())
    })
    .await?;
    drop(holder);
    let import = SocketAddr::from(([127, 0, 0, 1], port));
    eventually("the import on the freed port", T, || async move {
        let got = echo_round_trip(import, b"bound at last").await.ok()?;
        (got == b"bound at last").then_some(())
    })
    .await?;
    ensure!(http_get(admin, "/ready").await?.0 == 200, "not ready again");
    Ok(())
}
