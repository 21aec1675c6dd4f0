use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::pool::Driving;
use crate::metrics::Metrics;

#[test]
fn a_driver_dropped_at_shutdown_is_no_longer_counted() -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let dead = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let driving = Driving::new(dead.clone(), metrics.clone());
    // A driver that never finishes on its own, like one whose connection is idle.
    rt.spawn(async move {
        let _driving = driving;
        std::future::pending::<()>().await;
    });
    rt.block_on(tokio::task::yield_now());
    anyhow::ensure!(metrics.tunnels_open.get() == 1);
    drop(rt);
    anyhow::ensure!(metrics.tunnels_open.get() == 0, "still counted");
    anyhow::ensure!(dead.load(Ordering::Relaxed), "not marked dead");
    Ok(())
}
