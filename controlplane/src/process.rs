//! The process edge of cl-controlplane: flags, logging, runtime, signals. The
//! binary's `main` is this function.

use std::ffi::OsString;

use clap::Parser;

/// Runs cl-controlplane with these command-line arguments (the first is the program
/// name) until SIGTERM or SIGINT.
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    // Help, version and usage errors print and exit as clap intends (0 or 2).
    let config = crate::Config::try_parse_from(args).unwrap_or_else(|e| e.exit());
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", config.log_level))?;
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let running = crate::start(config).await?;
        tracing::info!(grpc = %running.grpc_endpoint, admin = %running.admin_addr, "cl-controlplane started");
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        running.shutdown();
        tracing::info!("cl-controlplane stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}
