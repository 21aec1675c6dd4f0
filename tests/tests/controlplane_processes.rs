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

/// Asks `b`'s gateway, as `cert`'s peer, for a token to `default/echo`.
async fn authz_token(fabric: &Fabric, b: &ProcPeer, cert: &PeerCert) -> Option<String> {
    let gateway: std::net::SocketAddr = format!("127.0.0.1:{}", b.gateway).parse().ok()?;
    let mut s = tls_connect(gateway, &fabric.ca_pem, cert, &b.name, &[b"http/1.1"])
        .await
        .ok()?;
    let body = r#"{"ServiceName":"echo","ServiceNamespace":"default","SrcAttributes":null}"#;
    let req = format!(
        "POST /authz HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{body}",
        b.name,
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
            .await
            .ok()?
            .ok()?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    head.starts_with("HTTP/1.1 200").then_some(())?;
    head.lines()
        .find_map(|l| l.strip_prefix("x-access-token: "))
        .map(str::to_owned)
}

/// CONNECTs to `b`'s `default/echo` with `token`; the answer's status.
async fn connect_with(fabric: &Fabric, b: &ProcPeer, cert: &PeerCert, token: &str) -> Result<u16> {
    let gateway: std::net::SocketAddr = format!("127.0.0.1:{}", b.gateway).parse()?;
    let mut s = tls_connect(gateway, &fabric.ca_pem, cert, &b.name, &[b"http/1.1"]).await?;
    let head = format!(
        "CONNECT {0}:443 HTTP/1.1\r\nHost: {0}:443\r\nAuthorization: Bearer {token}\r\n\r\n",
        b.name
    );
    Ok(h1_request(&mut s, &head).await?.0)
}

async fn epoch_of(p: &ProcPeer) -> Option<f64> {
    let addr = format!("127.0.0.1:{}", p.cp_admin).parse().ok()?;
    let m = http_get(addr, "/metrics").await.ok()?.1;
    m.contains("clusterlink_policy_epoch ")
        .then(|| metric(&m, "clusterlink_policy_epoch", &[]))
}

/// The policy epoch never goes backwards: a token minted before a control plane
/// restart is refused after it (the changes made before the restart push the epoch
/// well above where a restarted counter would begin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_before_a_control_plane_restart_is_refused_after_it() -> Result<()> {
    let fabric = Fabric::new("proc-fabric")?;
    let root = TempDir::new("cl-procs")?;
    let mut b = ProcPeer::start(&fabric, root.path(), "peer-b").await?;
    let peer_a = fabric.issue("peer-a")?;
    let echo = start_echo().await?;
    b.write("export.yaml", &export_yaml("echo", echo))?;
    b.write(
        "peers.yaml",
        &format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata:\n  name: peer-a\n  namespace: clusterlink-system\nspec:\n  gateways:\n  - host: 127.0.0.1\n    port: {}\n",
            free_port()?
        ),
    )?;
    // Policy changes, each one applied before the next: epoch up by one each.
    for i in 0..6 {
        let before = eventually("an epoch", T, || epoch_of(&b)).await?;
        b.write(
            "policy.yaml",
            &ALLOW_ALL.replace("name: allow-all", &format!("name: allow-all-{i}")),
        )?;
        eventually("the change applied", T, || async {
            (epoch_of(&b).await? > before).then_some(())
        })
        .await?;
    }
    let token = {
        let (fabric_, b_, a_) = (&fabric, &b, &peer_a);
        eventually("a token", T, || async move {
            let token = authz_token(fabric_, b_, a_).await?;
            (connect_with(fabric_, b_, a_, &token).await.ok()? == 200).then_some(token)
        })
        .await?
    };
    let before = epoch_of(&b).await.context("epoch")?;

    b.cp.kill();
    b.start_cp()?;
    b.wait_ready().await?;
    let after = eventually("the restarted control plane's epoch", T, || epoch_of(&b)).await?;
    ensure!(
        after > before,
        "epoch went from {before} to {after} across the restart"
    );
    let (fabric_, b_, a_, token) = (&fabric, &b, &peer_a, token.as_str());
    eventually("the old token refused", T, || async move {
        (connect_with(fabric_, b_, a_, token).await.ok()? == 403).then_some(())
    })
    .await?;
    // And a fresh one works.
    eventually("a fresh token", T, || async move {
        let token = authz_token(fabric_, b_, a_).await?;
        (connect_with(fabric_, b_, a_, &token).await.ok()? == 200).then_some(())
    })
    .await?;
    Ok(())
}
