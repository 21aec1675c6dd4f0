//! The process edge of cl-dataplane: flags, logging, runtime, signals. The binary's
//! `main` is this function.

use std::ffi::OsString;
use std::time::Duration;

use clap::Parser;

/// Runs cl-dataplane with these command-line arguments (the first is the program
/// name) until SIGTERM or SIGINT.
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    // Help, version and usage errors print and exit as clap intends (0 or 2).
    let config = crate::Config::try_parse_from(args).unwrap_or_else(|e| e.exit());
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", config.log_level))?;
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    // This runtime runs the control side (control-plane stream, admin port, import
    // reconciliation, certificate reloads, signals); connections run on the workers
    // (`crate::workers`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let drain = Duration::from_secs_f64(config.drain_timeout.max(0.0));
        let running = crate::start(config).await?;
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
