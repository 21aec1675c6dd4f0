//! The two-site fabric of docker/demo.sh, in containers of the images only: traffic
//! end to end through the import, the exporting peer's data plane killed (the other
//! peer reports it unreachable, and reachable again once it is restarted), and a
//! network partition of one peer (reported, and recovered after reconnecting). Every
//! container and network is removed afterwards by its ID.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tests::containers::{tool_ok, Demo};
use tests::{echo_round_trip, eventually, http_get, site::condition};

const WAIT: Duration = Duration::from_secs(60);

/// PeerReachable of `peer` as the control plane at `admin` reports it.
async fn reachable(admin: SocketAddr, peer: &str) -> Option<String> {
    let (status, body) = http_get(admin, &format!("/api/peers/{peer}")).await.ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    condition(&v, "PeerReachable")
}

async fn until_reachable(admin: SocketAddr, peer: &str, want: &str) -> Result<()> {
    eventually(&format!("{peer} PeerReachable={want}"), WAIT, || async {
        (reachable(admin, peer).await.as_deref() == Some(want)).then_some(())
    })
    .await
}

fn payload(n: usize) -> Vec<u8> {
    // Not periodic in any small window, so that a misplaced chunk shows.
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// One checked round trip of `data` through the import.
async fn carries(import: SocketAddr, data: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(10), echo_round_trip(import, data)).await,
        Ok(Ok(back)) if back == data
    )
}

async fn until_carries(import: SocketAddr, data: &[u8], what: &str) -> Result<()> {
    eventually(what, WAIT, || async {
        carries(import, data).await.then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_fabric_carries_traffic_and_survives_a_dead_gateway_and_a_partition() -> Result<()>
{
    let Some(demo) =
        Demo::up("container_fabric_carries_traffic_and_survives_a_dead_gateway_and_a_partition")?
    else {
        return Ok(());
    };
    let import = demo.addr("B_IMPORT")?;
    let b_admin = demo.addr("B_CONTROLPLANE_ADMIN")?;
    let a_admin = demo.addr("A_CONTROLPLANE_ADMIN")?;
    let data = payload(1 << 20);

    // End to end: host -> b's data plane (import) -> wan -> a's data plane -> echo.
    assert!(carries(import, &data).await, "1 MiB through the import");
    until_reachable(b_admin, "peer-a", "True").await?;
    until_reachable(a_admin, "peer-b", "True").await?;

    // The exporting peer's gateway dies: b reports it, and the import stops carrying.
    let a_dp = demo.get("A_DATAPLANE_ID")?.to_owned();
    let t = Instant::now();
    tool_ok(&["kill", &a_dp]).context("podman kill")?;
    until_reachable(b_admin, "peer-a", "False").await?;
    eprintln!("a's gateway killed: unreachable after {:.1?}", t.elapsed());
    assert!(
        !carries(import, b"while a is down").await,
        "no path while a's gateway is dead"
    );
    // Restarted (same container, same name on the wan), it is back.
    let t = Instant::now();
    tool_ok(&["start", &a_dp]).context("podman start")?;
    until_reachable(b_admin, "peer-a", "True").await?;
    until_carries(import, &data, "traffic after a's gateway restarted").await?;
    eprintln!(
        "a's gateway restarted: reachable and carrying after {:.1?}",
        t.elapsed()
    );

    // A partition: peer b's two containers leave the wan, and come back.
    let wan = demo.get("WAN")?.to_owned();
    let b = [
        demo.get("B_CONTROLPLANE_ID")?.to_owned(),
        demo.get("B_DATAPLANE_ID")?.to_owned(),
    ];
    let t = Instant::now();
    for id in &b {
        tool_ok(&["network", "disconnect", &wan, id]).context("network disconnect")?;
    }
    until_reachable(b_admin, "peer-a", "False").await?;
    until_reachable(a_admin, "peer-b", "False").await?;
    eprintln!(
        "partitioned: unreachable on both sides after {:.1?}",
        t.elapsed()
    );
    assert!(
        !carries(import, b"partitioned").await,
        "no path across the partition"
    );
    let t = Instant::now();
    for id in &b {
        tool_ok(&["network", "connect", &wan, id]).context("network connect")?;
    }
    until_reachable(b_admin, "peer-a", "True").await?;
    until_reachable(a_admin, "peer-b", "True").await?;
    // The pooled tunnel connection b opened before the partition is black-holed (b's
    // containers come back with new addresses) and is found dead only by its
    // TCP_USER_TIMEOUT (dataplane/src/sockopt.rs, 60 s after the last acknowledged
    // byte), so the data path may take that long to heal: a known gap (the hardening
    // issue's failover work), hence the longer bound here.
    eventually(
        "traffic after the partition healed",
        Duration::from_secs(120),
        || async { carries(import, &data).await.then_some(()) },
    )
    .await?;
    eprintln!(
        "reconnected: reachable and carrying after {:.1?}",
        t.elapsed()
    );

    demo.down()
}
