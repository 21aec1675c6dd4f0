//! The ClusterLink custom resources (`clusterlink.net/v1alpha1`) as Rust types: Peer,
//! Export, Import, AccessPolicy, PrivilegedAccessPolicy and Instance, with the kinds,
//! plurals, scopes, field names and status subresources of ClusterLink's own CRDs,
//! plus what those lack: enum validation of `lbScheme` and `action`, port ranges,
//! non-empty policy selectors, printer columns, and Import's 63-character name rule.
//!
//! The types are the API server's schema (`crds()`, written to `deploy/crds/` by
//! `crdgen`) and what the control plane writes status with. The control plane reads
//! objects through its own resource model (`controlplane::resources`), which parses
//! and validates every object the same way whatever its source; a test there checks
//! that the two agree. Nothing here does I/O.

// clippy reads the repeated `type_ = ...` of several `printcolumn(...)`s in one
// `#[kube(...)]` as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::CustomResourceExt;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "clusterlink.net";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "clusterlink.net/v1alpha1";

/// Condition types and reasons the control plane writes.
pub mod condition {
    pub const PEER_REACHABLE: &str = "PeerReachable";
    pub const EXPORT_VALID: &str = "ExportValid";
    pub const IMPORT_TARGET_PORT_VALID: &str = "ImportTargetPortValid";
    pub const IMPORT_SERVICE_VALID: &str = "ImportServiceValid";
}

/// A remote peer: its name is the DNS name in its certificate; its gateways are where
/// its data plane is reached. Read only in the ClusterLink namespace.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "Peer",
    namespaced,
    status = "PeerStatus",
    derive = "PartialEq",
    doc = "Peer defines a remote peer: metadata.name is the DNS name in its certificate.",
    printcolumn(
        name = "Reachable",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="PeerReachable")].status"#,
        description = "Whether the last heartbeats reached the peer"
    ),
    printcolumn(
        name = "Since",
        type_ = "date",
        json_path = r#".status.conditions[?(@.type=="PeerReachable")].lastTransitionTime"#,
        description = "When Reachable last changed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    /// Gateway endpoints of the remote peer (may be empty).
    pub gateways: Vec<Endpoint>,
}

/// A gateway endpoint: host name or IP address, and port.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Host name or IP address.
    pub host: String,
    /// Port (for example a NodePort, or 443 of a LoadBalancer).
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// PeerReachable (reason Heartbeat).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The peer's labels as its last heartbeat response gave them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// A local service offered to other peers.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "Export",
    namespaced,
    status = "ConditionsStatus",
    derive = "PartialEq",
    doc = "Export defines a service exported from the local peer to remote peers.",
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.host"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port"),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="ExportValid")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ExportSpec {
    /// Target host; empty means the Service of the export's name and namespace.
    #[serde(default)]
    pub host: String,
    /// Target port.
    #[serde(default)]
    #[schemars(range(max = 65535))]
    pub port: u16,
}

/// Status made of conditions only (Export, Import).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConditionsStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// How an import picks among its sources.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum LbScheme {
    #[default]
    #[serde(rename = "round-robin")]
    RoundRobin,
    #[serde(rename = "random")]
    Random,
    #[serde(rename = "static")]
    Static,
}

/// A remote service made available locally, on a Service of the import's name.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "Import",
    namespaced,
    status = "ConditionsStatus",
    derive = "PartialEq",
    doc = "Import defines a service that is being imported to the local Peer from a remote Peer.",
    validation = Rule::new("size(self.metadata.name) <= 63").message("import name cannot exceed 63 chars"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port"),
    printcolumn(name = "Target Port", type_ = "integer", json_path = ".spec.targetPort"),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="ImportServiceValid")].status"#
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ImportSpec {
    /// Port of the imported service.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Listening port of the data plane pods; 0 means the control plane picks one and
    /// writes it here.
    #[serde(default)]
    #[schemars(range(max = 65535))]
    pub target_port: u16,
    /// Sources to import from.
    pub sources: Vec<ImportSource>,
    /// Load-balancing scheme.
    #[serde(default)]
    pub lb_scheme: LbScheme,
}

/// An exported service of a remote peer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportSource {
    /// Peer name where the exported service is defined.
    pub peer: String,
    /// Name of the exported service (empty: the import's name).
    pub export_name: String,
    /// Namespace of the exported service (empty: the import's namespace).
    pub export_namespace: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// Who may connect to what: workload selectors on client and service attributes.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "AccessPolicy",
    namespaced,
    derive = "PartialEq",
    doc = "AccessPolicy allows or denies connections in its namespace.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicySpec {
    pub action: Action,
    /// Clients the policy applies to.
    #[schemars(length(min = 1))]
    pub from: Vec<WorkloadSetOrSelector>,
    /// Services the policy applies to.
    #[schemars(length(min = 1))]
    pub to: Vec<WorkloadSetOrSelector>,
}

// Its own struct with the fields of `AccessPolicySpec`: the derive makes one kind per
// spec type.
/// The same as an AccessPolicy, cluster-scoped, decided before every AccessPolicy.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "PrivilegedAccessPolicy",
    derive = "PartialEq",
    doc = "PrivilegedAccessPolicy allows or denies connections cluster-wide, before any AccessPolicy.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PrivilegedAccessPolicySpec {
    pub action: Action,
    #[schemars(length(min = 1))]
    pub from: Vec<WorkloadSetOrSelector>,
    #[schemars(length(min = 1))]
    pub to: Vec<WorkloadSetOrSelector>,
}

/// Exactly one of the two (the control plane checks; workload sets are not yet
/// supported).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSetOrSelector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_sets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneType {
    #[default]
    Envoy,
    Go,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum IngressType {
    #[default]
    #[serde(rename = "none")]
    None,
    LoadBalancer,
    NodePort,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warning,
    Error,
    Fatal,
}

fn default_replicas() -> i32 {
    1
}

fn default_tag() -> String {
    "latest".into()
}

fn default_namespace() -> String {
    "clusterlink-system".into()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneSpec {
    #[serde(default, rename = "type")]
    pub type_: DataplaneType,
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 10))]
    pub replicas: i32,
}

impl Default for DataplaneSpec {
    fn default() -> Self {
        DataplaneSpec {
            type_: DataplaneType::default(),
            replicas: default_replicas(),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    #[serde(default, rename = "type")]
    pub type_: IngressType,
    /// LoadBalancer: the Service port (default 443). NodePort: the nodePort (default:
    /// one the API server picks).
    #[serde(default)]
    #[schemars(range(min = 0, max = 65535))]
    pub port: i32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One ClusterLink deployment (control plane, data plane, gateway Service) in a
/// namespace, made by the operator.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "clusterlink.net",
    version = "v1alpha1",
    kind = "Instance",
    namespaced,
    status = "InstanceStatus",
    derive = "PartialEq",
    doc = "Instance is the Schema for the ClusterLink instances API.",
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.namespace"),
    printcolumn(name = "Ingress", type_ = "string", json_path = ".spec.ingress.type"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.ingress.ip"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".status.ingress.port"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    #[serde(default)]
    pub dataplane: DataplaneSpec,
    #[serde(default)]
    pub ingress: IngressSpec,
    #[serde(default)]
    pub log_level: LogLevel,
    /// Image prefix ("/" appended when missing; empty: bare image names).
    #[serde(default)]
    pub container_registry: String,
    #[serde(default = "default_tag")]
    pub tag: String,
    /// Target namespace (must exist).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peer_labels: BTreeMap<String, String>,
}

/// Conditions keyed by type (ClusterLink's Instance status shape).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
pub struct ComponentStatus {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conditions: BTreeMap<String, Condition>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
pub struct IngressStatus {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conditions: BTreeMap<String, Condition>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(default)]
    pub port: i32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
pub struct InstanceStatus {
    #[serde(default)]
    pub controlplane: ComponentStatus,
    #[serde(default)]
    pub dataplane: ComponentStatus,
    #[serde(default)]
    pub ingress: IngressStatus,
}

/// The six CRDs, in file-name order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut all = vec![
        AccessPolicy::crd(),
        Export::crd(),
        Import::crd(),
        Instance::crd(),
        Peer::crd(),
        PrivilegedAccessPolicy::crd(),
    ];
    for crd in &mut all {
        // As in ClusterLink's CRDs (the API server would default it the same way).
        let names = &mut crd.spec.names;
        names.list_kind = Some(format!("{}List", names.kind));
    }
    all
}

/// `deploy/crds/<name>` file name and YAML text of each CRD (ClusterLink's names:
/// `clusterlink.net_<plural>.yaml`).
pub fn crd_files() -> Vec<(String, String)> {
    crds()
        .into_iter()
        .map(|crd| {
            let file = format!("{GROUP}_{}.yaml", crd.spec.names.plural);
            let body = serde_yaml_ng::to_string(&crd).unwrap_or_default();
            let text = format!(
                "# Generated by `cargo run -p crds --bin crdgen` from crds/src/lib.rs; do not edit.\n---\n{body}"
            );
            (file, text)
        })
        .collect()
}

#[cfg(test)]
mod tests;
