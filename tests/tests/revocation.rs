//! Live revocation: an established tunnel whose Peer or export a new snapshot removes
//! is reset at both ends on the exporting side, over each tunnel protocol (mux, h2,
//! HTTP/1.1 CONNECT); with `--keep-revoked-streams` it goes on.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use tests::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

/// A client connection through the import, proven to carry.
async fn live(pair: &Pair) -> Result<TcpStream> {
    let mut c = TcpStream::connect(pair.import).await?;
    ping(&mut c, b"established").await?;
    Ok(c)
}

/// Waits for `c` to end (EOF or reset); how long that took.
async fn ends(c: &mut TcpStream) -> Result<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(T, c.read(&mut buf)).await {
            Err(_) => return Err(anyhow!("still open after {T:?}")),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

async fn revoked(pair: &Pair, reason: &str) -> Result<f64> {
    let m = metrics_of(pair.b()).await?;
    Ok(metric(
        &m,
        "clusterlink_revoked_streams_total",
        &[&format!("reason=\"{reason}\"")],
    ))
}

fn protocols() -> Vec<(&'static str, Options)> {
    vec![
        ("mux", Options::default()),
        (
            "h2",
            Options {
                no_mux_a: true,
                ..Options::default()
            },
        ),
        (
            "http/1.1",
            Options {
                force_http1_a: true,
                ..Options::default()
            },
        ),
    ]
}

/// Waits until B's gateway runs the snapshot its control plane serves now.
async fn applied(pair: &Pair) -> Result<()> {
    let want = pair.cp_b.snapshot().version as f64;
    eventually("B applied the snapshot", T, || async {
        let m = metrics_of(pair.b()).await.ok()?;
        (metric(&m, "clusterlink_snapshot_version", &[]) == want).then_some(())
    })
    .await
}

/// `change` to B's snapshot ends each of `tunnels`, counted under `reason`.
async fn cut_by(
    pair: &Pair,
    protocol: &str,
    tunnels: &mut [TcpStream],
    reason: &str,
    change: impl FnOnce(&mut controlplane_api::v1::Snapshot),
) -> Result<()> {
    let before = revoked(pair, reason).await?;
    pair.cp_b.update_snapshot(change);
    for (i, c) in tunnels.iter_mut().enumerate() {
        let took = ends(c)
            .await
            .context(format!("{protocol}: {reason}, tunnel {i}"))?;
        eprintln!("{protocol}: tunnel {i} ended {took:?} after the change ({reason})");
    }
    let n = revoked(pair, reason).await? - before;
    ensure!(
        n == tunnels.len() as f64,
        "{protocol}: {n} counted under {reason}, {} tunnels",
        tunnels.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_peer_or_the_export_resets_established_tunnels() -> Result<()> {
    for (protocol, opts) in protocols() {
        let pair = Pair::start(opts).await?;
        let snapshot = pair.cp_b.snapshot();
        let again = || async {
            pair.cp_b.update_snapshot(|s| *s = snapshot.clone());
            eventually("a tunnel again", T, || async { live(&pair).await.ok() }).await
        };

        // The Peer goes: both of its tunnels end, the client sees the end.
        let mut two = [live(&pair).await?, live(&pair).await?];
        cut_by(&pair, protocol, &mut two, "peer_removed", |s| {
            s.peers.retain(|p| p.name != PEER_A)
        })
        .await?;
        // The Peer is back, the export goes.
        let mut one = [again().await?];
        cut_by(&pair, protocol, &mut one, "export_removed", |s| {
            s.exports.clear()
        })
        .await?;

        // Snapshots that remove neither (another peer comes and goes) leave it alone.
        let mut c = again().await?;
        pair.cp_b.update_snapshot(|s| {
            s.peers.push(controlplane_api::v1::Peer {
                name: "peer-c".into(),
                gateways: vec!["127.0.0.1:9".into()],
                protocol: 0,
            })
        });
        applied(&pair).await?;
        pair.cp_b
            .update_snapshot(|s| s.peers.retain(|p| p.name != "peer-c"));
        applied(&pair).await?;
        ping(&mut c, b"still carries").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_revoked_streams_leaves_them_running() -> Result<()> {
    let pair = Pair::start(Options {
        config_b: Some(|c| c.keep_revoked_streams = true),
        ..Options::default()
    })
    .await?;
    let mut c = live(&pair).await?;
    pair.cp_b
        .update_snapshot(|s| s.peers.retain(|p| p.name != PEER_A));
    // Once B applied it (a new tunnel is refused), the old one still carries.
    eventually("new tunnels refused", T, || async {
        echo_round_trip(pair.import, b"x")
            .await
            .is_err()
            .then_some(())
    })
    .await?;
    ping(&mut c, b"kept").await?;
    ensure!(revoked(&pair, "peer_removed").await? == 0.0);
    Ok(())
}
