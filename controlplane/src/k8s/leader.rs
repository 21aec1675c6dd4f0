//! Leader election on the `cl-controlplane` Lease in the ClusterLink namespace
//! (kube-lease-manager): `true` while this replica holds it. A replica that cannot
//! renew in time reports `false` before the lease runs out, so that two replicas
//! never write at once.

use std::sync::Arc;

use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use super::{Error, Kube};

pub const LEASE: &str = "cl-controlplane";

/// Starts the election; the receiver follows this replica's leadership.
pub async fn elect(
    kube: Arc<Kube>,
    duration_secs: u64,
) -> Result<(watch::Receiver<bool>, tokio::task::JoinHandle<()>), Error> {
    let duration = duration_secs.max(2);
    let grace = (duration / 3).max(1);
    let manager = LeaseManagerBuilder::new(kube.client.clone(), LEASE)
        .with_namespace(&kube.namespace)
        .with_identity(&kube.identity)
        .with_field_manager(format!("{}-lease", super::FIELD_MANAGER))
        .with_duration(duration)
        .with_grace(grace)
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (rx, task) = manager.watch().await;
    let mut log = rx.clone();
    let handle = tokio::spawn(async move {
        let identity = kube.identity.clone();
        let logger = async {
            while log.changed().await.is_ok() {
                let leading = *log.borrow_and_update();
                tracing::info!(identity = %identity, leading, "leadership changed");
            }
        };
        tokio::select! {
            r = task => if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "leader election stopped");
            },
            () = logger => {}
        }
    });
    Ok((rx, handle))
}
