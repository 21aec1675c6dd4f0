//! The five ClusterLink resource kinds with ClusterLink's exact YAML schema
//! (`clusterlink.net/v1alpha1`: Peer, Export, Import, AccessPolicy,
//! PrivilegedAccessPolicy), their defaults, parsing of multi-document YAML with the
//! path of the offending field, and validation. Nothing here touches the network.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;

mod parse;
mod validate;

pub use parse::{
    parse_documents, parse_object, parse_stream, Doc, Stream, MAX_FLOW_OPENERS, MAX_STREAM_BYTES,
    MAX_STREAM_NODES,
};
pub use validate::validate;

pub const API_VERSION: &str = "clusterlink.net/v1alpha1";
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest Import name (ClusterLink's CEL rule).
pub const MAX_IMPORT_NAME: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("document {doc}: {message}")]
    Parse { doc: usize, message: String },
    #[error("{kind} {name:?}: {field}: {message}")]
    Invalid {
        kind: &'static str,
        name: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the API server: orders claims (an older Import keeps its port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Set by the API server: written back as conditions' `observedGeneration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    // Anything else a `kubectl get -o yaml` leaves (uid, creationTimestamp, ...) is
    // accepted and ignored.
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerSpec {
    pub gateways: Vec<Endpoint>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportSource {
    pub peer: String,
    #[serde(default)]
    pub export_name: String,
    #[serde(default)]
    pub export_namespace: String,
}

fn default_lb() -> String {
    "round-robin".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportSpec {
    pub port: u16,
    #[serde(default)]
    pub target_port: u16,
    pub sources: Vec<ImportSource>,
    #[serde(default = "default_lb")]
    pub lb_scheme: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbScheme {
    RoundRobin,
    Random,
    Static,
}

impl ImportSpec {
    /// The scheme; an empty string is the default, round-robin (as in ClusterLink).
    pub fn scheme(&self) -> Option<LbScheme> {
        match self.lb_scheme.as_str() {
            "" | "round-robin" => Some(LbScheme::RoundRobin),
            "random" => Some(LbScheme::Random),
            "static" => Some(LbScheme::Static),
            _ => None,
        }
    }

    /// The port imported connections are accepted on: targetPort if set, else port.
    pub fn listen_port(&self) -> u16 {
        if self.target_port != 0 {
            self.target_port
        } else {
            self.port
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSetOrSelector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_sets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessPolicySpec {
    pub action: String,
    pub from: Vec<WorkloadSetOrSelector>,
    pub to: Vec<WorkloadSetOrSelector>,
}

/// A resource as written by the user: `apiVersion`, `kind`, `metadata`, `spec`.
/// `status` is ignored on input (it is ours to write).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Peer(Object<PeerSpec>),
    Export(Object<ExportSpec>),
    Import(Object<ImportSpec>),
    AccessPolicy(Object<AccessPolicySpec>),
    PrivilegedAccessPolicy(Object<AccessPolicySpec>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    Peer,
    Export,
    Import,
    AccessPolicy,
    PrivilegedAccessPolicy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Peer => "Peer",
            Kind::Export => "Export",
            Kind::Import => "Import",
            Kind::AccessPolicy => "AccessPolicy",
            Kind::PrivilegedAccessPolicy => "PrivilegedAccessPolicy",
        }
    }

    /// The kind from `clusterlink get <plural|singular|Kind>`.
    pub fn from_user(s: &str) -> Option<Kind> {
        Some(match s.to_ascii_lowercase().as_str() {
            "peer" | "peers" => Kind::Peer,
            "export" | "exports" => Kind::Export,
            "import" | "imports" => Kind::Import,
            "accesspolicy" | "accesspolicies" => Kind::AccessPolicy,
            "privilegedaccesspolicy" | "privilegedaccesspolicies" => Kind::PrivilegedAccessPolicy,
            _ => return None,
        })
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Peer | Kind::PrivilegedAccessPolicy)
    }
}

/// How a resource is addressed: kind, namespace ("" for cluster-scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Peer(_) => Kind::Peer,
            Resource::Export(_) => Kind::Export,
            Resource::Import(_) => Kind::Import,
            Resource::AccessPolicy(_) => Kind::AccessPolicy,
            Resource::PrivilegedAccessPolicy(_) => Kind::PrivilegedAccessPolicy,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Peer(o) => &o.metadata,
            Resource::Export(o) => &o.metadata,
            Resource::Import(o) => &o.metadata,
            Resource::AccessPolicy(o) => &o.metadata,
            Resource::PrivilegedAccessPolicy(o) => &o.metadata,
        }
    }

    /// Peers are addressed by name only: a Peer's name is the remote's identity.
    /// PrivilegedAccessPolicy is cluster-scoped. The others default to `default`.
    pub fn key(&self) -> Key {
        let kind = self.kind();
        let md = self.metadata();
        let namespace = if kind.namespaced() {
            md.namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into())
        } else {
            String::new()
        };
        Key {
            kind,
            namespace,
            name: md.name.clone(),
        }
    }

    /// The Kubernetes object shape (apiVersion, kind, metadata, spec), for output.
    pub fn to_json(&self) -> serde_json::Value {
        let key = self.key();
        let mut v = match self {
            Resource::Peer(o) => serde_json::to_value(o),
            Resource::Export(o) => serde_json::to_value(o),
            Resource::Import(o) => serde_json::to_value(o),
            Resource::AccessPolicy(o) => serde_json::to_value(o),
            Resource::PrivilegedAccessPolicy(o) => serde_json::to_value(o),
        }
        .unwrap_or_default();
        if !key.namespace.is_empty() {
            v["metadata"]["namespace"] = key.namespace.into();
        }
        v
    }
}

#[cfg(test)]
mod tests;
