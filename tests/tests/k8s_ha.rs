//! The control plane's availability on real API servers: two replicas with one leader
//! (Lease `cl-controlplane`), restarts that established connections never notice, and
//! the mutually authenticated gRPC API between the planes (the site CA). The planes
//! run as processes (see `tests::k8s::Fleet`); where Kubernetes would put a Service in
//! front of the control plane replicas, a small TCP forwarder stands in for it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _, Result};
use tests::k8s::{export_yaml, import_yaml, retry, until, Fleet, Kubectl, WAIT};
use tests::procs::{binary, free_port, Proc, ProcPeer, SiteFiles};
use tests::{echo_round_trip, http_get, metric, start_echo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const LEASE: Duration = Duration::from_secs(4);

/// The Lease holder of the ClusterLink namespace.
/// The policy epoch the `jwk` Secret records.
fn recorded_epoch(c: &Kubectl) -> Result<f64> {
    use base64::Engine as _;
    let b64 = c.jsonpath("secret", "clusterlink-system", "jwk", "{.data.epoch}")?;
    let text = base64::engine::general_purpose::STANDARD.decode(b64.trim())?;
    Ok(String::from_utf8(text)?.trim().parse()?)
}

/// A control plane's policy epoch, from its metrics.
async fn epoch_at(admin: u16) -> Result<f64> {
    let m = http_get(SocketAddr::from(([127, 0, 0, 1], admin)), "/metrics")
        .await?
        .1;
    ensure!(m.contains("clusterlink_policy_epoch "), "no epoch in {m}");
    Ok(metric(&m, "clusterlink_policy_epoch", &[]))
}

fn holder(c: &Kubectl) -> Result<String> {
    c.jsonpath(
        "lease",
        "clusterlink-system",
        "cl-controlplane",
        "{.spec.holderIdentity}",
    )
}

/// A Lease time (`metav1.MicroTime`, "2026-12-02T16:40:00.123456Z") as seconds of
/// its day; enough to subtract two times less than a day apart.
fn seconds_of_day(t: &str) -> Result<f64> {
    let time = t
        .split_once('T')
        .map(|(_, t)| t.trim_end_matches('Z'))
        .ok_or_else(|| anyhow!("not a time: {t:?}"))?;
    let mut total = 0.0;
    let mut n = 0;
    for (part, unit) in time.split(':').zip([3600.0, 60.0, 1.0]) {
        total += part.parse::<f64>()? * unit;
        n += 1;
    }
    ensure!(n == 3, "not a time: {t:?}");
    Ok(total)
}

fn lease_field(c: &Kubectl, field: &str) -> Result<String> {
    c.jsonpath(
        "lease",
        "clusterlink-system",
        "cl-controlplane",
        &format!("{{.spec.{field}}}"),
    )
}

/// A stand-in for the `cl-controlplane` Service: forwards each connection to the first
/// backend that accepts it, as kube-proxy sends traffic only to live endpoints.
async fn service_forwarder(backends: Vec<SocketAddr>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let backends = backends.clone();
            tokio::spawn(async move {
                for b in backends {
                    let connect = tokio::net::TcpStream::connect(b);
                    if let Ok(Ok(mut server)) =
                        tokio::time::timeout(Duration::from_millis(500), connect).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// An echo import from B into A (target port `target`, 0 to have one allocated);
/// returns the import's listener once traffic flows.
async fn echo_import(f: &Fleet, name: &str, target: u16) -> Result<SocketAddr> {
    let (a, b) = (f.cluster(0)?, f.cluster(1)?);
    let echo = start_echo().await?;
    b.apply(&export_yaml(name, "127.0.0.1", echo.port()))?;
    a.apply(&import_yaml(name, 9000, target, "peer-b", name))?;
    let port = retry("spec.targetPort set", WAIT, || async {
        let t: u16 = a
            .jsonpath("import", "default", name, "{.spec.targetPort}")?
            .parse()?;
        ensure!(t != 0, "still 0");
        Ok(t)
    })
    .await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    retry("traffic through A's import listener", WAIT, || flows(addr)).await?;
    Ok(addr)
}

async fn flows(addr: SocketAddr) -> Result<()> {
    let got = echo_round_trip(addr, b"hello through the fabric").await?;
    ensure!(got == b"hello through the fabric", "echo returned {got:?}");
    Ok(())
}

/// One round trip on an established connection.
async fn ping(s: &mut tokio::net::TcpStream, n: u32) -> Result<()> {
    let msg = format!("ping {n}\n");
    s.write_all(msg.as_bytes()).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .context("no echo within 5 s")??;
    ensure!(buf == msg.as_bytes(), "echoed {buf:?}");
    Ok(())
}

/// New connections every 100 ms until stopped; counts attempts and failures.
struct Traffic {
    attempts: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        let attempts = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let (a, f) = (attempts.clone(), failures.clone());
        let task = tokio::spawn(async move {
            loop {
                a.fetch_add(1, Ordering::Relaxed);
                if flows(addr).await.is_err() {
                    f.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Traffic {
            attempts,
            failures,
            task,
        }
    }

    /// (attempts, failures) so far.
    fn counts(&self) -> (usize, usize) {
        (
            self.attempts.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a client with `cert`/`key`, trusting `ca`, gets an HTTP/2 answer from the
/// gRPC port (the server's SETTINGS frame) to the HTTP/2 preface.
async fn served_grpc(
    grpc: SocketAddr,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<bool> {
    let mut roots = rustls::RootCertStore::empty();
    for c in fabric::identity::load_certs(ca)? {
        roots.add(c)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(fabric::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            fabric::identity::load_certs(cert)?,
            fabric::identity::load_key(key)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(grpc).await?;
    let name = rustls_pki_types::ServerName::try_from("cl-controlplane")?;
    let exchange = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut head = [0u8; 9];
        tls.read_exact(&mut head).await?;
        // A frame header: 24-bit length, then type 4 (SETTINGS).
        Ok::<_, std::io::Error>(head[3] == 4)
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(settings)) => Ok(settings),
        Ok(Err(_)) => Ok(false),
        Err(_) => anyhow::bail!("the gRPC port neither answered nor closed within 10 s"),
    }
}

async fn ready(admin: u16) -> Result<()> {
    retry(&format!("/ready on {admin}"), WAIT, || async {
        let (status, _) = http_get(SocketAddr::from(([127, 0, 0, 1], admin)), "/ready").await?;
        ensure!(status == 200, "status {status}");
        Ok(())
    })
    .await
}

/// Two control plane replicas on A behind a Service stand-in. The first is the
/// leader; killed, the second takes the Lease within the lease time and does the
/// leader's work (allocating a target port, making an import's Services), and new
/// connections through A never fail meanwhile (A's data plane reconnects through the
/// Service to the surviving replica, which serves it as any replica does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_two_replicas_one_leader_and_failover() -> Result<()> {
    let Some(mut f) = Fleet::start("k8s-replicas", &["peer-a", "peer-b"]).await? else {
        return Ok(());
    };
    let a = f.cluster(0)?;
    let first = f.peer(0)?.cp_identity(f.peer(0)?.cp_admin);
    retry("the first replica leads", WAIT, || async {
        let h = holder(a)?;
        ensure!(h == first, "holder {h:?}");
        Ok(())
    })
    .await?;
    let (grpc2, admin2) = (free_port()?, free_port()?);
    let mut second: Proc = f.peer(0)?.spawn_cp_replica(grpc2, admin2)?;
    let second_id = f.peer(0)?.cp_identity(admin2);
    ready(admin2).await?;
    let service = service_forwarder(vec![
        SocketAddr::from(([127, 0, 0, 1], f.peer(0)?.grpc)),
        SocketAddr::from(([127, 0, 0, 1], grpc2)),
    ])
    .await?;
    {
        let pa = f.peer_mut(0)?;
        pa.controlplane_addr = Some(service.to_string());
        pa.dp.kill();
        pa.start_dp()?;
        pa.wait_ready().await?;
    }
    let import = echo_import(&f, "echo", free_port()?).await?;
    let a = f.cluster(0)?;
    ensure!(holder(a)? == first, "the leader changed before the kill");
    ensure!(second.ended().is_none(), "the second replica exited");
    // Both replicas hand their data planes the epoch the leader recorded, so that a
    // token minted by either verifies at every data plane.
    let first_admin = f.peer(0)?.cp_admin;
    let led_epoch = retry("the replicas agree on the recorded epoch", WAIT, || async {
        let recorded = recorded_epoch(a)?;
        let (e1, e2) = (epoch_at(first_admin).await?, epoch_at(admin2).await?);
        ensure!(
            e1 == recorded && e2 == recorded,
            "recorded {recorded}, leader {e1}, follower {e2}"
        );
        Ok(recorded)
    })
    .await?;

    let traffic = Traffic::start(import);
    retry("traffic running", WAIT, || async {
        let (n, _) = traffic.counts();
        ensure!(n >= 5, "{n} attempts");
        Ok(())
    })
    .await?;
    f.peer_mut(0)?.cp.kill();
    let a = f.cluster(0)?;
    // The dead leader's last renewal, read once no further one can come.
    let last_renewal = seconds_of_day(&lease_field(a, "renewTime")?)?;
    retry("the second replica takes the Lease", WAIT, || async {
        let h = holder(a)?;
        ensure!(h == second_id, "holder {h:?}");
        Ok(())
    })
    .await?;
    // Measured on the Lease itself: from the old holder's last renewal to the new
    // holder's acquisition, the lease duration plus kube-lease-manager's check
    // interval and jitter (about a second) and the API's latency.
    let acquired = seconds_of_day(&lease_field(a, "acquireTime")?)?;
    let took = Duration::from_secs_f64((acquired - last_renewal).rem_euclid(86_400.0));
    ensure!(
        took <= LEASE + Duration::from_millis(2500),
        "taken over {took:?} after the last renewal, lease {LEASE:?}"
    );
    // The new leader moves the epoch on (changes may have come while no one led) and
    // records it: never backwards.
    retry("the new leader records a later epoch", WAIT, || async {
        let recorded = recorded_epoch(a)?;
        let e2 = epoch_at(admin2).await?;
        ensure!(
            recorded > led_epoch && e2 == recorded,
            "recorded {recorded}, new leader {e2}, before {led_epoch}"
        );
        Ok(())
    })
    .await?;

    // The new leader does the leader's work: a new import with targetPort 0 gets a
    // port and its Services.
    let b = f.cluster(1)?;
    let echo = start_echo().await?;
    b.apply(&export_yaml("late", "127.0.0.1", echo.port()))?;
    a.apply(&import_yaml("late", 9001, 0, "peer-b", "late"))?;
    until(a, "import", "late", "ImportTargetPortValid", "True").await?;
    until(a, "import", "late", "ImportServiceValid", "True").await?;
    let port: u16 = a
        .jsonpath("import", "default", "late", "{.spec.targetPort}")?
        .parse()?;
    retry("traffic through the late import", WAIT, || {
        flows(SocketAddr::from(([127, 0, 0, 1], port)))
    })
    .await?;

    // Traffic went on for a while after the takeover too.
    let (at_takeover, _) = traffic.counts();
    retry("traffic after the takeover", WAIT, || async {
        let (n, _) = traffic.counts();
        ensure!(n >= at_takeover + 10, "{n} attempts");
        Ok(())
    })
    .await?;
    let (attempts, failures) = traffic.counts();
    eprintln!("the second replica took the Lease {took:?} after the dead leader's last renewal; {attempts} new connections, {failures} failed");
    ensure!(
        failures == 0,
        "{failures} of {attempts} new connections failed across the leader's death"
    );
    second.kill();
    Ok(())
}

/// Both control planes killed and started again: an established connection goes on
/// through it all, the import keeps its allocated `spec.targetPort` and listener, and
/// new connections work afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_controlplane_restart_keeps_connections_and_ports() -> Result<()> {
    let Some(mut f) = Fleet::start("k8s-restart", &["peer-a", "peer-b"]).await? else {
        return Ok(());
    };
    let import = echo_import(&f, "echo", 0).await?;
    let mut conn = tokio::net::TcpStream::connect(import).await?;
    ping(&mut conn, 0).await?;

    for i in 0..2 {
        f.peer_mut(i)?.cp.kill();
    }
    ping(&mut conn, 1)
        .await
        .context("while the control planes are down")?;
    for i in 0..2 {
        let p: &mut ProcPeer = f.peer_mut(i)?;
        p.start_cp()?;
        p.wait_ready().await?;
    }
    let a = f.cluster(0)?;
    // The restarted control plane leads again (it renews the Lease) and does the
    // leader's work: a new import gets its port.
    let renewed = lease_field(a, "renewTime")?;
    retry(
        "the restarted control plane renews the Lease",
        WAIT,
        || async {
            let now = lease_field(a, "renewTime")?;
            ensure!(now != renewed, "renewTime still {now}");
            Ok(())
        },
    )
    .await?;
    let late = echo_import(&f, "late", 0).await?;
    ensure!(late != import, "two imports on one port");
    // The first import kept its allocation and its listener.
    let port: u16 = a
        .jsonpath("import", "default", "echo", "{.spec.targetPort}")?
        .parse()?;
    ensure!(
        port == import.port(),
        "spec.targetPort moved from {} to {port}",
        import.port()
    );
    until(a, "import", "echo", "ImportTargetPortValid", "True").await?;
    // New connections are authorized by the restarted control plane, not by the data
    // plane's last answer.
    let dp_admin = SocketAddr::from(([127, 0, 0, 1], f.peer(0)?.dp_admin));
    let decided = || async {
        let (_, text) = http_get(dp_admin, "/metrics").await?;
        Ok::<_, anyhow::Error>(metric(
            &text,
            "clusterlink_egress_decisions_total",
            &["source=\"controlplane\""],
        ))
    };
    let before = decided().await?;
    retry("new connections after the restart", WAIT, || flows(import)).await?;
    for _ in 0..3 {
        flows(import).await?;
    }
    let after = decided().await?;
    ensure!(
        after >= before + 4.0,
        "{} of the new connections were authorized by the control plane",
        after - before
    );
    for n in 2..5 {
        ping(&mut conn, n)
            .await
            .context("the established connection after the restart")?;
    }
    Ok(())
}

/// The gRPC API between the planes is mutual TLS with the site CA: a data plane with
/// a certificate of another site CA is refused (and never gets a snapshot), as are a
/// client with the peer's fabric certificate and one without TLS; a data plane given
/// the control plane's certificate refuses to start. The fleet's own data plane,
/// with this site's certificate, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_site_tls_refuses_foreign_data_planes() -> Result<()> {
    let Some(f) = Fleet::start("k8s-site-tls", &["peer-a"]).await? else {
        return Ok(());
    };
    let p = f.peer(0)?;
    let cp_admin = SocketAddr::from(([127, 0, 0, 1], p.cp_admin));
    let grpc = SocketAddr::from(([127, 0, 0, 1], p.grpc));
    let refused = || async {
        let (_, text) = http_get(cp_admin, "/metrics").await?;
        Ok::<_, anyhow::Error>(metric(&text, "clusterlink_grpc_tls_refused_total", &[]))
    };
    let before = refused().await?;
    ensure!(before == 0.0, "{before} refusals before any foreign client");

    // A data plane of another deployment (its own site CA).
    let foreign = SiteFiles::write(&f.root.path().join("foreign-site"))?;
    let (dp_admin, gateway) = (free_port()?, free_port()?);
    let log = f.root.path().join("foreign-dataplane.log");
    let mut rogue = Proc::spawn(
        std::process::Command::new(binary("cl-dataplane")?)
            .arg("--controlplane-host")
            .arg(grpc.to_string())
            .args(foreign.dataplane_args())
            .arg("--gateway-addr")
            .arg(format!("127.0.0.1:{gateway}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{dp_admin}"))
            .args(["--import-bind", "127.0.0.1"])
            .arg("--ca-file")
            .arg(&p.files.ca)
            .arg("--cert-file")
            .arg(&p.files.cert)
            .arg("--key-file")
            .arg(&p.files.key),
        &log,
    )?;
    retry(
        "the control plane refuses the foreign data plane",
        WAIT,
        || async {
            let n = refused().await?;
            ensure!(n >= 2.0, "{n} refusals (it retries, so more than one)");
            Ok(())
        },
    )
    .await?;
    ensure!(rogue.ended().is_none(), "the foreign data plane exited");
    let (status, _) = http_get(SocketAddr::from(([127, 0, 0, 1], dp_admin)), "/ready").await?;
    ensure!(
        status == 503,
        "the foreign data plane is ready ({status}): it got a snapshot"
    );
    rogue.kill();

    // Clients built by hand that trust this site's CA (so only the control plane can
    // object): another site's data plane certificate, and the peer's fabric one.
    let site = p.site.as_ref().ok_or_else(|| anyhow!("no site files"))?;
    let before = refused().await?;
    for (what, cert, key) in [
        (
            "another site's cl-dataplane",
            &foreign.dataplane.0,
            &foreign.dataplane.1,
        ),
        ("the peer's fabric certificate", &p.files.cert, &p.files.key),
    ] {
        let served = served_grpc(grpc, &site.ca, cert, key).await?;
        ensure!(!served, "{what} was served the gRPC API");
    }
    // This site's own data plane certificate, the same way: served (the refusals
    // above are the control plane's, not the hand-built client's).
    ensure!(
        served_grpc(grpc, &site.ca, &site.dataplane.0, &site.dataplane.1).await?,
        "this site's cl-dataplane certificate was not served"
    );
    // No TLS at all.
    let mut plain = tokio::net::TcpStream::connect(grpc).await?;
    plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), plain.read(&mut buf))
        .await
        .context("plain client neither served nor closed within 10 s")?
        .unwrap_or(0);
    ensure!(
        !buf[..n].starts_with(b"\x00\x00"),
        "a plain-text client got h2 frames"
    );
    retry("the three refusals counted", WAIT, || async {
        let n = refused().await?;
        ensure!(n >= before + 3.0, "{n} refusals, {before} before");
        Ok(())
    })
    .await?;

    // The control plane's certificate in a data plane: refused at start, with why.
    let log = f.root.path().join("wrong-role-dataplane.log");
    let mut wrong = Proc::spawn(
        std::process::Command::new(binary("cl-dataplane")?)
            .arg("--controlplane-host")
            .arg(grpc.to_string())
            .arg("--site-ca-file")
            .arg(&site.ca)
            .arg("--site-cert-file")
            .arg(&site.controlplane.0)
            .arg("--site-key-file")
            .arg(&site.controlplane.1)
            .args([
                "--gateway-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .arg("--ca-file")
            .arg(&p.files.ca)
            .arg("--cert-file")
            .arg(&p.files.cert)
            .arg("--key-file")
            .arg(&p.files.key),
        &log,
    )?;
    let end = tokio::time::Instant::now() + WAIT;
    let how = loop {
        if let Some(how) = wrong.ended() {
            break how;
        }
        ensure!(
            tokio::time::Instant::now() < end,
            "a data plane with the control plane's certificate still runs after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let err = std::fs::read_to_string(&log)?;
    ensure!(
        !how.contains("exit status: 0") && err.contains("\"cl-dataplane\""),
        "a data plane with the control plane's certificate ({how}): {err}"
    );

    // The fleet's own data plane is served all along.
    let (status, _) = http_get(SocketAddr::from(([127, 0, 0, 1], p.dp_admin)), "/ready").await?;
    ensure!(
        status == 200,
        "the site's own data plane is not ready ({status})"
    );
    Ok(())
}
