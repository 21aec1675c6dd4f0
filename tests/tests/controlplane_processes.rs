//! End-to-end with real cl-controlplane and cl-dataplane processes per peer: peer
//! status follows the remote gateway, and a control plane restarted under traffic
//! loses no established connection while its data plane reconverges.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use tests::procs::*;
use tests::site::{condition, export_yaml, import_yaml, ALLOW_ALL};
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(45);

async fn reachable(p: &ProcPeer, peer: &str) -> Option<String> {
    let v = p.get(&format!("/api/peers/{peer}")).await.ok()?;
    condition(&v, "PeerReachable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_status_follows_the_remote_gateway() -> Result<()> {
    let fabric = Fabric::new("proc-fabric")?;
    let root = TempDir::new("cl-procs")?;
    let a = ProcPeer::start(&fabric, root.path(), "peer-a").await?;
    let mut b = ProcPeer::start(&fabric, root.path(), "peer-b").await?;
    a.write("peers.yaml", &b.peer_yaml())?;
    eventually("peer-b reachable", T, || async {
        (reachable(&a, "peer-b").await? == "True").then_some(())
    })
    .await?;
    let v = a.get("/api/peers/peer-b").await?;
    ensure!(
        v["status"]["labels"]["name"] == "peer-b",
        "labels from heartbeats: {v}"
    );
    b.dp.kill();
    eventually("peer-b unreachable", T, || async {
        (reachable(&a, "peer-b").await? == "False").then_some(())
    })
    .await?;
    let m = http_get(format!("127.0.0.1:{}", a.cp_admin).parse()?, "/metrics")
        .await?
        .1;
    ensure!(
        metric(&m, "clusterlink_peer_reachable", &["peer=\"peer-b\""]) == 0.0,
        "{m}"
    );
    b.start_dp()?;
    eventually("peer-b reachable again", T, || async {
        (reachable(&a, "peer-b").await? == "True").then_some(())
    })
    .await?;
    // Deleting the Peer removes it and its monitor.
    std::fs::remove_file(a.resources().join("peers.yaml"))?;
    eventually("peer-b gone", T, || async {
        a.get("/api/peers/peer-b").await.is_err().then_some(())
    })
    .await?;
    Ok(())
}

async fn ping(c: &mut TcpStream, msg: &[u8]) -> Result<()> {
    c.write_all(msg).await?;
    let mut b = vec![0u8; msg.len()];
    tokio::time::timeout(T, c.read_exact(&mut b))
        .await
        .context("no echo")??;
    ensure!(b == msg, "echo mismatch");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_under_traffic_loses_no_connection() -> Result<()> {
    let fabric = Fabric::new("proc-fabric")?;
    let root = TempDir::new("cl-procs")?;
    let mut a = ProcPeer::start(&fabric, root.path(), "peer-a").await?;
    let b = ProcPeer::start(&fabric, root.path(), "peer-b").await?;
    let echo = start_echo().await?;
    let port = free_port()?;
    b.write("export.yaml", &export_yaml("echo", echo))?;
    b.write("policy.yaml", ALLOW_ALL)?;
    b.write("peers.yaml", &a.peer_yaml())?;
    a.write("peers.yaml", &b.peer_yaml())?;
    a.write("policy.yaml", ALLOW_ALL)?;
    a.write(
        "import.yaml",
        &import_yaml("echo", port, &["peer-b"], "round-robin"),
    )?;
    let import: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    eventually("traffic", T, || async {
        echo_round_trip(import, b"x")
            .await
            .ok()
            .filter(|b| b == b"x")
    })
    .await?;

    let mut live = TcpStream::connect(import).await?;
    ping(&mut live, b"before").await?;
    a.cp.kill();
    let dp_admin: std::net::SocketAddr = format!("127.0.0.1:{}", a.dp_admin).parse()?;
    eventually(
        "the data plane sees its control plane gone",
        T,
        || async move {
            let m = http_get(dp_admin, "/metrics").await.ok()?.1;
            (metric(&m, "clusterlink_controlplane_connected", &[]) == 0.0).then_some(())
        },
    )
    .await?;
    ping(&mut live, b"control plane down").await?;
    ensure!(echo_round_trip(import, b"new while down").await? == b"new while down");

    a.start_cp()?;
    a.wait_ready().await?;
    eventually("the data plane reconnects", T, || async move {
        let m = http_get(dp_admin, "/metrics").await.ok()?.1;
        (metric(&m, "clusterlink_controlplane_connected", &[]) == 1.0).then_some(())
    })
    .await?;
    ping(&mut live, b"control plane back").await?;
    ensure!(echo_round_trip(import, b"new after").await? == b"new after");
    // And the restarted control plane decides again: a deny policy takes effect.
    a.write(
        "deny.yaml",
        "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: deny\n  namespace: default\nspec:\n  action: deny\n  from:\n  - workloadSelector: {}\n  to:\n  - workloadSelector: {}\n",
    )?;
    eventually("deny applies", T, || async {
        match echo_round_trip(import, b"z").await {
            Ok(back) if back == b"z" => None,
            _ => Some(()),
        }
    })
    .await?;
    ping(&mut live, b"established connections are not cut by policy").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() -> Result<()> {
    let fabric = Fabric::new("proc-fabric")?;
    let root = TempDir::new("cl-procs")?;
    let mut a = ProcPeer::start(&fabric, root.path(), "peer-a").await?;
    let s = a.dp.terminate(Duration::from_secs(10))?;
    ensure!(s.success(), "cl-dataplane exit status {s}");
    let s = a.cp.terminate(Duration::from_secs(10))?;
    ensure!(s.success(), "cl-controlplane exit status {s}");
    Ok(())
}
