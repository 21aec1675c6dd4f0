//! cl-dataplane entry point: flags, logging, runtime, signals.
use std::time::Duration;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = dataplane::Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", config.log_level))?;
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.workers {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        let drain = Duration::from_secs_f64(config.drain_timeout.max(0.0));
        let running = dataplane::start(config).await?;
        tracing::info!(gateway = %running.gateway_addr, admin = %running.admin_addr, "cl-dataplane started");
        wait_for_signal().await?;
        running.shutdown(drain).await;
        tracing::info!("cl-dataplane stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    // Streams still open after the drain are closed with the runtime.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
