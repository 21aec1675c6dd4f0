//! The five ClusterLink resource kinds with ClusterLink's exact YAML schema
//! (`clusterlink.net/v1alpha1`: Peer, Export, Import, AccessPolicy,
//! PrivilegedAccessPolicy), their defaults, parsing of multi-document YAML with the
//! path of the offending field, and validation. Nothing here touches the network.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;

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

fn invalid(kind: &'static str, name: &str, field: &str, message: impl Into<String>) -> Error {
    Error::Invalid {
        kind,
        name: name.to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

fn from_value<T: serde::de::DeserializeOwned>(
    v: serde_yaml_ng::Value,
    doc: usize,
) -> Result<T, Error> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        Error::Parse {
            doc,
            message: if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            },
        }
    })
}

/// One document of a YAML stream: its position (from 1), what it names (read
/// leniently, so that a refused document can still be identified), and the result.
#[derive(Debug)]
pub struct Doc {
    pub index: usize,
    pub key: Option<Key>,
    pub result: Result<Resource, Error>,
}

/// A parsed YAML stream. A syntax error ends the stream: the documents after it
/// cannot be trusted, so the caller should treat the whole file as unreadable.
#[derive(Debug, Default)]
pub struct Stream {
    pub docs: Vec<Doc>,
    pub syntax_error: Option<Error>,
}

/// Parses one YAML stream (documents separated by `---`). Empty documents are
/// skipped; each other document is validated on its own.
pub fn parse_stream(text: &str) -> Stream {
    let mut out = Stream::default();
    for (i, d) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match serde_yaml_ng::Value::deserialize(d) {
            Ok(serde_yaml_ng::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.syntax_error = Some(Error::Parse {
                    doc: index,
                    message: e.to_string(),
                });
                break;
            }
        };
        out.docs.push(Doc {
            index,
            key: loose_key(&value),
            result: parse_value(value, index),
        });
    }
    out
}

/// As `parse_stream`, flattened: every document's result, then the syntax error.
pub fn parse_documents(text: &str) -> Vec<Result<Resource, Error>> {
    let s = parse_stream(text);
    let mut out: Vec<_> = s.docs.into_iter().map(|d| d.result).collect();
    if let Some(e) = s.syntax_error {
        out.push(Err(e));
    }
    out
}

/// Kind, namespace and name of a document, read leniently.
fn loose_key(doc: &serde_yaml_ng::Value) -> Option<Key> {
    let kind = Kind::from_user(doc.get("kind")?.as_str()?)?;
    let md = doc.get("metadata")?;
    let name = md.get("name")?.as_str()?.to_owned();
    let namespace = if kind.namespaced() {
        md.get("namespace")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned()
    } else {
        String::new()
    };
    Some(Key {
        kind,
        namespace,
        name,
    })
}

fn parse_value(value: serde_yaml_ng::Value, doc: usize) -> Result<Resource, Error> {
    let head: Head = from_value(value.clone(), doc)?;
    if head.api_version != API_VERSION {
        return Err(Error::Parse {
            doc,
            message: format!(
                "apiVersion: {:?} is not supported (want {API_VERSION:?})",
                head.api_version
            ),
        });
    }
    let r = match head.kind.as_str() {
        "Peer" => Resource::Peer(from_value(value, doc)?),
        "Export" => Resource::Export(from_value(value, doc)?),
        "Import" => Resource::Import(from_value(value, doc)?),
        "AccessPolicy" => Resource::AccessPolicy(from_value(value, doc)?),
        "PrivilegedAccessPolicy" => Resource::PrivilegedAccessPolicy(from_value(value, doc)?),
        other => {
            return Err(Error::Parse {
                doc,
                message: format!(
                    "kind: {other:?} is not one of Peer, Export, Import, AccessPolicy, PrivilegedAccessPolicy"
                ),
            })
        }
    };
    validate(&r)?;
    Ok(r)
}

/// RFC 1123 subdomain, as Kubernetes names and peer names must be.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Structural validation of one resource. An Export without `spec.host` is valid as
/// a resource; outside Kubernetes it is reported `ExportValid` False (status, not
/// rejection).
pub fn validate(r: &Resource) -> Result<(), Error> {
    let kind = r.kind().name();
    let md = r.metadata();
    let name = md.name.as_str();
    if !is_dns_subdomain(name) {
        return Err(invalid(
            kind,
            name,
            "metadata.name",
            "must be a lowercase RFC 1123 name",
        ));
    }
    if let Some(ns) = md.namespace.as_deref().filter(|n| !n.is_empty()) {
        if ns.contains('.') || !is_dns_subdomain(ns) || ns.len() > 63 {
            return Err(invalid(
                kind,
                name,
                "metadata.namespace",
                "must be a lowercase RFC 1123 label",
            ));
        }
    }
    match r {
        Resource::Peer(o) => {
            for (i, g) in o.spec.gateways.iter().enumerate() {
                if g.host.trim().is_empty() {
                    return Err(invalid(
                        kind,
                        name,
                        &format!("spec.gateways[{i}].host"),
                        "must not be empty",
                    ));
                }
                if g.port == 0 {
                    return Err(invalid(
                        kind,
                        name,
                        &format!("spec.gateways[{i}].port"),
                        "must be 1-65535",
                    ));
                }
            }
        }
        Resource::Export(_) => {}
        Resource::Import(o) => {
            if name.len() > MAX_IMPORT_NAME {
                return Err(invalid(
                    kind,
                    name,
                    "metadata.name",
                    "import name cannot exceed 63 chars",
                ));
            }
            if o.spec.port == 0 {
                return Err(invalid(kind, name, "spec.port", "must be 1-65535"));
            }
            if o.spec.scheme().is_none() {
                return Err(invalid(
                    kind,
                    name,
                    "spec.lbScheme",
                    format!(
                        "{:?} is not one of round-robin, random, static",
                        o.spec.lb_scheme
                    ),
                ));
            }
            for (i, s) in o.spec.sources.iter().enumerate() {
                if !is_dns_subdomain(&s.peer) {
                    return Err(invalid(
                        kind,
                        name,
                        &format!("spec.sources[{i}].peer"),
                        "must be a peer name",
                    ));
                }
            }
        }
        Resource::AccessPolicy(o) | Resource::PrivilegedAccessPolicy(o) => {
            let spec = &o.spec;
            if spec.action != "allow" && spec.action != "deny" {
                return Err(invalid(
                    kind,
                    name,
                    "spec.action",
                    format!("{:?} is not allow or deny", spec.action),
                ));
            }
            for (field, list) in [("spec.from", &spec.from), ("spec.to", &spec.to)] {
                if list.is_empty() {
                    return Err(invalid(
                        kind,
                        name,
                        field,
                        "must list at least one workload selector",
                    ));
                }
                for (i, w) in list.iter().enumerate() {
                    let at = format!("{field}[{i}]");
                    match (&w.workload_selector, w.workload_sets.is_empty()) {
                        (Some(sel), true) => sel.validate().map_err(|e| {
                            invalid(kind, name, &format!("{at}.workloadSelector"), e.to_string())
                        })?,
                        (None, false) => {
                            return Err(invalid(
                                kind,
                                name,
                                &format!("{at}.workloadSets"),
                                "workload sets are not yet supported",
                            ))
                        }
                        _ => {
                            return Err(invalid(
                                kind,
                                name,
                                &at,
                                "set exactly one of workloadSets and workloadSelector",
                            ))
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
