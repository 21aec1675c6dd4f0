//! Reliability: faults a client must not see. Whole peers (real control and data
//! planes, in-process) on loopback.
//!
//! - A gateway of the first of two exporting peers dies: every connection started
//!   after the kill is served, by the other peer, before heartbeats confirm the death.
//! - The first peer's gateway is black-holed (SYNs dropped: a listening socket whose
//!   accept queue is full): every connection is served; what it costs is printed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use tests::site::*;
use tests::*;

const T: Duration = Duration::from_secs(30);

/// cl0 imports `echo` (static: cl1 first, then cl2) from cl1 and cl2, each exporting
/// a server that answers its peer's name.
struct TwoSources {
    _root: TempDir,
    cl0: Site,
    cl1: Option<Site>,
    cl2: Site,
    import: SocketAddr,
}

impl TwoSources {
    async fn start() -> Result<TwoSources> {
        init_logs();
        let fabric = Fabric::new("failover-fabric")?;
        let root = TempDir::new("cl-failover")?;
        let cl0 = Site::start(&fabric, root.path(), "cl0", &[]).await?;
        let cl1 = Site::start(&fabric, root.path(), "cl1", &[]).await?;
        let cl2 = Site::start(&fabric, root.path(), "cl2", &[]).await?;
        for s in [&cl0, &cl1, &cl2] {
            s.write("policy.yaml", ALLOW_ALL)?;
        }
        for s in [&cl1, &cl2] {
            s.write(
                "export.yaml",
                &export_yaml("echo", start_name_server(&s.name).await?),
            )?;
            s.write("peer-cl0.yaml", &cl0.peer_yaml())?;
            cl0.write(&format!("peer-{}.yaml", s.name), &s.peer_yaml())?;
        }
        let port = free_port()?;
        cl0.write(
            "import.yaml",
            &import_yaml("echo", port, &["cl1", "cl2"], "static"),
        )?;
        for s in [&cl1, &cl2] {
            wait_condition(
                &cl0,
                &format!("/api/peers/{}", s.name),
                "PeerReachable",
                "True",
            )
            .await?;
            wait_condition(s, "/api/exports/default/echo", "ExportValid", "True").await?;
            eventually(&format!("Peer cl0 on {}", s.name), T, || async {
                s.get("/api/peers/cl0").await.ok()
            })
            .await?;
        }
        wait_condition(
            &cl0,
            "/api/imports/default/echo",
            "ImportTargetPortValid",
            "True",
        )
        .await?;
        let import: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        eventually("cl1 serves the import", T, || async {
            (access(import).await.as_deref() == Some("cl1")).then_some(())
        })
        .await?;
        Ok(TwoSources {
            _root: root,
            cl0,
            cl1: Some(cl1),
            cl2,
            import,
        })
    }
}

/// Accesses one after the other for `span`; each with how long it took.
async fn accesses_for(import: SocketAddr, span: Duration) -> Vec<(Option<String>, Duration)> {
    let end = Instant::now() + span;
    let mut out = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        let got = access(import).await;
        out.push((got, t.elapsed()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

fn summary(got: &[(Option<String>, Duration)]) -> String {
    let failed = got.iter().filter(|(g, _)| g.is_none()).count();
    let max = got.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let first = got.first().map(|(_, d)| *d).unwrap_or_default();
    format!(
        "{} connections, {failed} failed, first took {first:?}, slowest {max:?}",
        got.len()
    )
}

/// Before, with the first source's gateway gone, new connections failed until
/// heartbeats marked the peer unreachable (about 5 s: 46 of 51 at 10/s); now the data
/// plane reports the peer, the control plane puts it last at once, and the same client
/// connection is tunnelled to the second source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_death_with_two_sources_loses_no_connection() -> Result<()> {
    let mut f = TwoSources::start().await?;
    let cl1 = f.cl1.take().ok_or_else(|| anyhow!("no cl1"))?;
    let Site { dp, cp: _cp1, .. } = cl1;
    dp.shutdown(Duration::ZERO).await;
    // Connections started after the kill, for longer than heartbeats take to notice.
    let got = accesses_for(f.import, Duration::from_secs(7)).await;
    println!("after the gateway's death: {}", summary(&got));
    let failed: Vec<_> = got.iter().filter(|(g, _)| g.is_none()).collect();
    ensure!(failed.is_empty(), "{}: {got:?}", summary(&got));
    ensure!(
        got.iter().all(|(g, _)| g.as_deref() == Some("cl2")),
        "served by cl2 only: {got:?}"
    );
    let m = metrics_of(&f.cl0.dp).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_failover_total",
            &["reason=\"unreachable\""]
        ) >= 1.0,
        "no failover counted\n{m}"
    );
    ensure!(
        metric(&m, "clusterlink_connect_attempts_count", &[]) >= got.len() as f64,
        "connect attempts not observed\n{m}"
    );
    drop(f.cl2);
    Ok(())
}

/// A listening socket that drops every SYN: its accept queue (backlog 0) is filled
/// by connections nobody accepts.
fn black_hole() -> Result<(
    std::net::SocketAddr,
    Vec<std::net::TcpStream>,
    socket2::Socket,
)> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    s.listen(0)?;
    let addr = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| anyhow!("no address"))?;
    let mut fill = Vec::new();
    // Until a connect no longer completes: the queue is full.
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(c) => fill.push(c),
            Err(_) => break,
        }
    }
    ensure!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "the black hole still accepts connections"
    );
    Ok((addr, fill, s))
}

/// cl0's Peer cl1 now names a gateway that drops SYNs. Every connection is served (by
/// cl2); the first ones pay about the connect timeout (1 s), later ones nothing, since
/// the peer is put last at once. Printed, not asserted: timing on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_first_gateway_costs_about_the_connect_timeout() -> Result<()> {
    let f = TwoSources::start().await?;
    let (hole, _fill, _listener) = black_hole()?;
    let cl1 = f.cl1.as_ref().ok_or_else(|| anyhow!("no cl1"))?;
    let peer = cl1.peer_yaml().replace(
        &format!("port: {}", cl1.dp.gateway_addr.port()),
        &format!("port: {}", hole.port()),
    );
    f.cl0.write("peer-cl1.yaml", &peer)?;
    let port = hole.port();
    eventually("cl0's data plane dials the black hole", T, || async {
        let (_, dump) = http_get(f.cl0.dp.admin_addr, "/config_dump").await.ok()?;
        dump.contains(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await?;
    let got = accesses_for(f.import, Duration::from_secs(7)).await;
    println!("first gateway black-holed: {}", summary(&got));
    ensure!(
        got.iter().all(|(g, _)| g.as_deref() == Some("cl2")),
        "{}: {got:?}",
        summary(&got)
    );
    Ok(())
}
