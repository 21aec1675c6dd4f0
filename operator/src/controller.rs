//! cl-operator's reconciler (spec §6.2, with ClusterLink's defects fixed): an
//! `Instance` becomes the objects of `manifests` in its target namespace, applied
//! server-side (so changed ingress types, ports and annotations are applied too),
//! and its status says how the Deployments and Services stand.
//! - One Instance per target namespace: the oldest (by creation time, then
//!   namespace/name) owns it; the others report `NotExist` naming the owner, and the
//!   next oldest takes over as soon as the owner is gone.
//! - A finalizer: a deleted owner removes what it made (found by its labels; the
//!   Secrets stay, they are `deploy`'s), then the next oldest is reconciled at once.
//!   Owner references cannot cross namespaces, and the Instance usually lives in
//!   `clusterlink-operator`, so the finalizer does the cleanup.
//! - The pod templates carry a hash of the certificate Secrets, so that new
//!   certificates roll the pods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crds::{IngressType, Instance, InstanceStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::manifests::{self, CONTROLPLANE, DATAPLANE, GATEWAY_SERVICE};

/// How often an Instance waiting for another's namespace checks whether it is free.
const WAITING_RECHECK: Duration = Duration::from_secs(3);

pub const FINALIZER: &str = "instance.clusterlink.net/finalizer";
pub const FIELD_MANAGER: &str = "cl-operator";
/// Which Instance made an object.
pub const LABEL_INSTANCE: &str = "clusterlink.net/instance";
pub const LABEL_INSTANCE_NAMESPACE: &str = "clusterlink.net/instance-namespace";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Manifests(#[from] manifests::Error),
    #[error("Instance {0} has no namespace")]
    NoNamespace(String),
    #[error("building the Instance status: {0}")]
    Status(serde_json::Error),
    #[error("the Instance cache is gone")]
    StoreGone,
}

/// What every reconcile shares.
pub struct Ctx {
    pub client: Client,
    /// The controller's cache of all Instances.
    pub instances: Store<Instance>,
    /// Asks for every Instance to be reconciled (after an owner went away).
    pub reconcile_all: tokio::sync::mpsc::Sender<()>,
}

fn key(i: &Instance) -> (String, String, String) {
    (
        i.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        i.namespace().unwrap_or_default(),
        i.name_any(),
    )
}

/// The Instance that owns target namespace `target`: the oldest of those naming it.
pub fn owner_of<'a>(instances: &'a [Arc<Instance>], target: &str) -> Option<&'a Arc<Instance>> {
    instances
        .iter()
        .filter(|i| i.spec.namespace == target)
        .min_by_key(|i| key(i))
}

fn same(a: &Instance, b: &Instance) -> bool {
    a.namespace() == b.namespace() && a.name_any() == b.name_any()
}

fn instance_labels(i: &Instance) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_INSTANCE.to_owned(), i.name_any()),
        (
            LABEL_INSTANCE_NAMESPACE.to_owned(),
            i.namespace().unwrap_or_default(),
        ),
    ])
}

fn selector(i: &Instance) -> String {
    instance_labels(i)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The Instance an object was made for, from its labels (for the watches on the
/// objects the operator makes).
pub fn instance_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjectRef<Instance>> {
    let labels = meta.labels.as_ref()?;
    Some(ObjectRef::new(labels.get(LABEL_INSTANCE)?).within(labels.get(LABEL_INSTANCE_NAMESPACE)?))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Server-side apply of a namespaced object in `ns` as field manager `manager`.
pub async fn apply_namespaced<K>(
    client: &Client,
    ns: &str,
    obj: &K,
    manager: &str,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// Server-side apply of a cluster-scoped object as field manager `manager`.
pub async fn apply_cluster_scoped<K>(client: &Client, obj: &K, manager: &str) -> Result<(), Error>
where
    K: Resource<Scope = ClusterResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// Deletes `name` if it is there and carries this Instance's labels.
async fn delete_ours<K>(api: &Api<K>, name: &str, i: &Instance) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await? {
        Some(o) if instance_of(o.meta()).is_some_and(|r| r == ObjectRef::from_obj(i)) => {
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        _ => Ok(()),
    }
}

/// Removes what this Instance made in `target` and its cluster-wide RBAC.
async fn cleanup(client: &Client, i: &Instance, target: &str) -> Result<(), Error> {
    let lp = ListParams::default().labels(&selector(i));
    macro_rules! delete_all {
        ($t:ty) => {{
            let api: Api<$t> = Api::namespaced(client.clone(), target);
            for o in api.list(&lp).await? {
                delete_ours(&api, &o.name_any(), i).await?;
            }
        }};
    }
    delete_all!(Deployment);
    delete_all!(Service);
    delete_all!(ServiceAccount);
    delete_all!(Role);
    delete_all!(RoleBinding);
    let name = manifests::cluster_role_name(target);
    delete_ours(&Api::<ClusterRoleBinding>::all(client.clone()), &name, i).await?;
    delete_ours(&Api::<ClusterRole>::all(client.clone()), &name, i).await?;
    Ok(())
}

/// A hash of the certificate Secrets in `target` (what is there of them).
async fn secrets_hash(client: &Client, target: &str) -> Result<String, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), target);
    let mut h = Sha256::new();
    for name in [
        manifests::SECRET_CA,
        manifests::SECRET_CONTROLPLANE,
        manifests::SECRET_DATAPLANE,
        manifests::SECRET_PEER,
    ] {
        if let Some(s) = api.get_opt(name).await? {
            for (k, v) in s.data.unwrap_or_default() {
                h.update(name.as_bytes());
                h.update(k.as_bytes());
                h.update((v.0.len() as u64).to_be_bytes());
                h.update(&v.0);
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A condition as the Instance status holds them (keyed by type).
fn condition(ok: bool, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
    })
}

/// `DeploymentReady` of Deployment `name` (spec §6.2 step 5).
fn deployment_ready(d: Option<&Deployment>) -> serde_json::Value {
    let Some(d) = d else {
        return condition(false, "NotExist", "Deployment does not exist");
    };
    let conditions = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    if conditions
        .iter()
        .any(|c| c.type_ == "Available" && c.status == "True")
    {
        return condition(true, "Ready", "Deployment is ready");
    }
    if let Some(c) = conditions
        .iter()
        .find(|c| (c.type_ == "Progressing" || c.type_ == "ReplicaFailure") && c.status != "True")
    {
        return condition(
            false,
            c.reason.as_deref().unwrap_or("NotReady"),
            c.message.as_deref().unwrap_or(""),
        );
    }
    condition(
        false,
        "ProgressingMode",
        "Deployment is in progressing mode",
    )
}

fn service_ready(s: Option<&Service>) -> serde_json::Value {
    match s {
        Some(_) => condition(true, "Ready", "Service is ready"),
        None => condition(false, "NotExist", "Service does not exist"),
    }
}

/// The ingress address: a LoadBalancer's first ingress IP (or host name, or
/// `pending`) and its port; a NodePort's first Node address and node port.
async fn ingress_address(client: &Client, s: &Service) -> Result<(String, i32), Error> {
    let spec = s.spec.clone().unwrap_or_default();
    let port = spec.ports.unwrap_or_default().into_iter().next();
    if spec.type_.as_deref() == Some("NodePort") {
        let nodes: Api<Node> = Api::all(client.clone());
        let ip = nodes
            .list(&ListParams::default().limit(1))
            .await?
            .items
            .into_iter()
            .next()
            .and_then(|n| n.status?.addresses?.into_iter().next())
            .map(|a| a.address)
            .unwrap_or_else(|| "pending".into());
        return Ok((ip, port.and_then(|p| p.node_port).unwrap_or(0)));
    }
    let ip = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .unwrap_or_else(|| "pending".into());
    Ok((ip, port.map(|p| p.port).unwrap_or(0)))
}

/// Gives each condition of `want` a lastTransitionTime: the old one while its status
/// and message hold, now otherwise.
fn stamp(want: &mut serde_json::Value, have: &serde_json::Value) {
    let now = fabric::clock::now_rfc3339();
    for part in ["controlplane", "dataplane", "ingress"] {
        let Some(conds) = want[part]["conditions"].as_object_mut() else {
            continue;
        };
        for (ty, c) in conds.iter_mut() {
            c["type"] = json!(ty);
            let old = &have[part]["conditions"][ty];
            let kept = old["status"] == c["status"] && old["message"] == c["message"];
            c["lastTransitionTime"] = if kept && old["lastTransitionTime"].is_string() {
                old["lastTransitionTime"].clone()
            } else {
                json!(now)
            };
        }
    }
}

/// Writes `status` (conditions without type and time) when it differs from what the
/// Instance has.
async fn write_status(
    api: &Api<Instance>,
    i: &Instance,
    mut status: serde_json::Value,
) -> Result<(), Error> {
    let have = serde_json::to_value(i.status.clone().unwrap_or_default()).map_err(Error::Status)?;
    stamp(&mut status, &have);
    let want: InstanceStatus = serde_json::from_value(status).map_err(Error::Status)?;
    if i.status.as_ref() == Some(&want) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "clusterlink.net/v1alpha1",
        "kind": "Instance",
        "status": want,
    });
    api.patch_status(&i.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Reconciles one Instance.
pub async fn reconcile(i: Arc<Instance>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // Ownership is decided on the whole set of Instances: wait for the first list.
    ctx.instances
        .wait_until_ready()
        .await
        .map_err(|_| Error::StoreGone)?;
    let client = &ctx.client;
    let ns = i
        .namespace()
        .ok_or_else(|| Error::NoNamespace(i.name_any()))?;
    let api: Api<Instance> = Api::namespaced(client.clone(), &ns);
    let target = i.spec.namespace.clone();
    let all = ctx.instances.state();
    let owns = owner_of(&all, &target).is_none_or(|o| same(o, &i));

    if i.metadata.deletion_timestamp.is_some() {
        if i.finalizers().iter().any(|f| f == FINALIZER) {
            if owns {
                cleanup(client, &i, &target).await?;
                tracing::info!(instance = %i.name_any(), namespace = %target, "instance deleted; its objects removed");
            }
            let rest: Vec<&String> = i.finalizers().iter().filter(|f| *f != FINALIZER).collect();
            api.patch(
                &i.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": rest, "resourceVersion": i.resource_version()}})),
            )
            .await?;
            // The next oldest Instance for the namespace takes over now.
            let _ = ctx.reconcile_all.try_send(());
        }
        return Ok(Action::await_change());
    }
    if !i.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = i.finalizers().to_vec();
        finalizers.push(FINALIZER.to_owned());
        api.patch(
            &i.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": finalizers, "resourceVersion": i.resource_version()}})),
        )
        .await?;
    }

    if !owns {
        let owner = owner_of(&all, &target)
            .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
            .unwrap_or_default();
        let why = format!("namespace {target} is managed by instance {owner}");
        let not = condition(false, "NotExist", &why);
        write_status(
            &api,
            &i,
            json!({
                "controlplane": {"conditions": {"DeploymentReady": not, "ServiceReady": not}},
                "dataplane": {"conditions": {"DeploymentReady": not, "ServiceReady": not}},
                "ingress": {"conditions": {"ServiceReady": not}},
            }),
        )
        .await?;
        // The owner's deletion triggers a reconcile of all, but this Instance's store
        // may still hold the owner then (its last update not yet seen): look again
        // soon rather than wait for a change that may not come.
        return Ok(Action::requeue(WAITING_RECHECK));
    }

    if Api::<Namespace>::all(client.clone())
        .get_opt(&target)
        .await?
        .is_none()
    {
        let why = format!("target namespace {target} does not exist");
        let not = condition(false, "NotExist", &why);
        write_status(
            &api,
            &i,
            json!({
                "controlplane": {"conditions": {"DeploymentReady": not}},
                "dataplane": {"conditions": {"DeploymentReady": not}},
            }),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }

    let opts = manifests::Options {
        controlplane_replicas: 1,
        managed_by: FIELD_MANAGER.into(),
        certificates_hash: Some(secrets_hash(client, &target).await?),
        labels: instance_labels(&i),
    };
    let spec = &i.spec;
    macro_rules! apply_here {
        ($($object:expr),+ $(,)?) => {
            $(apply_namespaced(client, &target, &$object, FIELD_MANAGER).await?;)+
        };
    }
    for sa in manifests::service_accounts(spec, &opts) {
        apply_here!(sa);
    }
    apply_cluster_scoped(client, &manifests::cluster_role(spec, &opts), FIELD_MANAGER).await?;
    apply_cluster_scoped(
        client,
        &manifests::cluster_role_binding(spec, &opts),
        FIELD_MANAGER,
    )
    .await?;
    apply_here!(
        manifests::role(spec, &opts),
        manifests::role_binding(spec, &opts),
        manifests::controlplane_service(spec, &opts),
        manifests::controlplane_deployment(spec, &opts),
        manifests::dataplane_deployment(spec, &opts),
    );
    let services: Api<Service> = Api::namespaced(client.clone(), &target);
    match manifests::gateway_service(spec, &opts) {
        Some(s) => {
            // A change of type can need fields the API server set for the old one
            // (a NodePort's node port) to go: replace a Service of another type.
            if let Some(old) = services.get_opt(GATEWAY_SERVICE).await? {
                let old_type = old.spec.as_ref().and_then(|s| s.type_.clone());
                let new_type = s.spec.as_ref().and_then(|s| s.type_.clone());
                if old_type != new_type {
                    delete_ours(&services, GATEWAY_SERVICE, &i).await?;
                }
            }
            apply_namespaced(client, &target, &s, FIELD_MANAGER).await?;
        }
        None => delete_ours(&services, GATEWAY_SERVICE, &i).await?,
    }

    // Status, from what is there now.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &target);
    let cp = deployments.get_opt(CONTROLPLANE).await?;
    let dp = deployments.get_opt(DATAPLANE).await?;
    let cp_service = services.get_opt(CONTROLPLANE).await?;
    let gateway = services.get_opt(GATEWAY_SERVICE).await?;
    let cp_ready = deployment_ready(cp.as_ref());
    let dp_ready = deployment_ready(dp.as_ref());
    let progressing =
        cp_ready["reason"] == "ProgressingMode" || dp_ready["reason"] == "ProgressingMode";
    let mut status = json!({
        "controlplane": {"conditions": {"DeploymentReady": cp_ready, "ServiceReady": service_ready(cp_service.as_ref())}},
        "dataplane": {"conditions": {"DeploymentReady": dp_ready}},
        "ingress": {},
    });
    if spec.ingress.type_ != IngressType::None {
        let ready = service_ready(gateway.as_ref());
        status["dataplane"]["conditions"]["ServiceReady"] = ready.clone();
        status["ingress"]["conditions"] = json!({"ServiceReady": ready});
        if let Some(g) = &gateway {
            let (ip, port) = ingress_address(client, g).await?;
            status["ingress"]["ip"] = json!(ip);
            status["ingress"]["port"] = json!(port);
        }
    }
    write_status(&api, &i, status).await?;
    Ok(Action::requeue(if progressing {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(300)
    }))
}

/// Retries a failed reconcile with a short delay.
pub fn error_policy(i: Arc<Instance>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(instance = %i.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}
