//! The Kubernetes platform (`cl-controlplane --platform k8s`): the resources come from
//! the API server (`source`), the access-token key from the `jwk` Secret (`jwk`), and
//! the elected leader (`leader`) writes status (`status`), allocates import target
//! ports and keeps the import Services (`imports`). Every replica serves its data
//! planes and runs heartbeats; only the leader writes.

use std::sync::Arc;

use kube::Client;

pub mod imports;
pub mod jwk;
pub mod leader;
pub mod source;
pub mod status;

/// Labels of the Services the control plane makes for imports (spec §2.6).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "clusterlink.net";
pub const IMPORT_NAME_LABEL: &str = "clusterlink.net/import-name";
pub const IMPORT_NAMESPACE_LABEL: &str = "clusterlink.net/import-namespace";
/// The data plane pods' label, which system Services select.
pub const DATAPLANE_APP: &str = "cl-dataplane";
/// Field manager of every write.
pub const FIELD_MANAGER: &str = "cl-controlplane";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("the {0} watch ended before its first list")]
    NotSynced(&'static str),
    #[error("leader election: {0}")]
    Lease(String),
}

/// A client and the ClusterLink namespace.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    pub namespace: String,
    /// This replica's name in Events and the Lease (the pod name on a cluster).
    pub identity: String,
}

impl Kube {
    /// A client from `KUBECONFIG` / `~/.kube/config`, or the in-cluster service
    /// account, as kube-rs finds them.
    pub async fn connect(namespace: String, identity: String) -> Result<Arc<Kube>, Error> {
        let client = Client::try_default()
            .await
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Arc::new(Kube {
            client,
            namespace,
            identity,
        }))
    }
}
