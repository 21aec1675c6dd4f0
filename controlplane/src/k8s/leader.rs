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
    let (inner, task) = manager.watch().await;
    // Our own channel, so that leadership reads false once the election has stopped
    // (the manager's channel would keep its last value).
    let (tx, rx) = watch::channel(*inner.borrow());
    let mut follow = inner;
    let handle = tokio::spawn(async move {
        let identity = kube.identity.clone();
        let forward = async {
            while follow.changed().await.is_ok() {
                let leading = *follow.borrow_and_update();
                tracing::info!(identity = %identity, leading, "leadership changed");
                tx.send_replace(leading);
            }
        };
        tokio::select! {
            r = task => match r {
                Ok(Err(e)) => tracing::error!(error = %e, "leader election stopped"),
                Err(e) => tracing::error!(error = %e, "leader election stopped"),
                Ok(Ok(_)) => tracing::warn!("leader election ended"),
            },
            () = forward => tracing::error!("leader election stopped"),
        }
        tx.send_replace(false);
    });
    Ok((rx, handle))
}
