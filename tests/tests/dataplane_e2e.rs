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
        metric(&m, "clusterlink_tunnels_open", &[]) == 1.0,
        "one pooled h2 tunnel expected:\n{m}"
    );
    ensure!(
        metric(
            &m,
            "clusterlink_bytes_total",
            &["direction=\"outbound\"", "flow=\"to_target\""]
        ) >= 100_000.0
    );
    // A second connection reuses the pooled tunnel: no new handshake.
    let back = echo_round_trip(pair.import, b"again").await?;
    ensure!(back == b"again");
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"ok\""]
        ) == 1.0,
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
