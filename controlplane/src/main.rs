//! cl-controlplane entry point: flags, logging, runtime, signals.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = controlplane::Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", config.log_level))?;
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let running = controlplane::start(config).await?;
        tracing::info!(grpc = %running.grpc_addr, admin = %running.admin_addr, "cl-controlplane started");
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
