//! The five ClusterLink resource kinds with ClusterLink's exact YAML schema
//! (`clusterlink.net/v1alpha1`: Peer, Export, Import, AccessPolicy,
//! PrivilegedAccessPolicy), their defaults, parsing of multi-document YAML with the
//! path of the offending field, and validation. Nothing here touches the network.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_yaml_ng::value::{Tag, TaggedValue};
use serde_yaml_ng::{Mapping, Value};

use crate::selector::LabelSelector;

pub const API_VERSION: &str = "clusterlink.net/v1alpha1";
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest Import name (ClusterLink's CEL rule).
pub const MAX_IMPORT_NAME: usize = 63;
/// Largest YAML stream `parse_stream` reads; a larger one is refused whole.
pub const MAX_STREAM_BYTES: usize = 1 << 20;
/// Most `[` and `{` one document may contain. libyaml's scanner walks its whole stack
/// of flow levels for every token, so deep flow nesting is quadratic (400 KB of
/// `{a: ` takes minutes). Counted without regard to quoting, so never below the depth.
pub const MAX_FLOW_OPENERS: usize = 1024;
/// Most YAML nodes a stream may build. Aliases are expanded in full, and serde_yaml_ng
/// only caps alias jumps, not what they copy: 28 KB of `*a` referring to a list of
/// 4000 scalars builds 16 million nodes. An alias-free stream of `MAX_STREAM_BYTES` has
/// at most half as many nodes as bytes.
pub const MAX_STREAM_NODES: usize = 1 << 20;

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
///
/// Streams over `MAX_STREAM_BYTES`, or with a document over `MAX_FLOW_OPENERS`, are
/// refused whole, and expansion stops at `MAX_STREAM_NODES`: each is a syntax error.
pub fn parse_stream(text: &str) -> Stream {
    let mut out = Stream::default();
    if text.len() > MAX_STREAM_BYTES {
        out.syntax_error = Some(Error::Parse {
            doc: 1,
            message: format!(
                "the stream has {} bytes, more than the {MAX_STREAM_BYTES} accepted",
                text.len()
            ),
        });
        return out;
    }
    if let Some((doc, line)) = too_deep(text) {
        out.syntax_error = Some(Error::Parse {
            doc,
            message: format!(
                "line {line}: more than {MAX_FLOW_OPENERS} '[' or '{{' in one document"
            ),
        });
        return out;
    }
    let budget = Cell::new(MAX_STREAM_NODES);
    for (i, d) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match Budget(&budget).deserialize(d) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.syntax_error = Some(Error::Parse {
                    doc: index,
                    message: e.to_string(),
                });
                break;
            }
        };
        // `kubectl get -o yaml` of several objects prints one `kind: List` whose
        // items are the objects: each item counts as a document at this position.
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            match value.get("items").and_then(Value::as_sequence) {
                Some(items) => {
                    for item in items {
                        out.docs.push(Doc {
                            index,
                            key: loose_key(item),
                            result: parse_value(item.clone(), index),
                        });
                    }
                }
                None => out.docs.push(Doc {
                    index,
                    key: None,
                    result: Err(Error::Parse {
                        doc: index,
                        message: "items: a List needs a sequence of items".into(),
                    }),
                }),
            }
            continue;
        }
        out.docs.push(Doc {
            index,
            key: loose_key(&value),
            result: parse_value(value, index),
        });
    }
    out
}

/// The first document with more than `MAX_FLOW_OPENERS` `[` or `{`: its number
/// (best effort) and first line. A line starting with `---` or `...` either closes
/// every flow collection or ends the parse with an error, so the count restarts there.
fn too_deep(text: &str) -> Option<(usize, usize)> {
    let (mut doc, mut open, mut start, mut openers) = (0, false, 1, 0);
    for (i, line) in text.lines().enumerate() {
        let b = line.as_bytes();
        let marker = b.get(3).is_none_or(|c| matches!(c, b' ' | b'\t' | b'\r'));
        let body = line.trim_start();
        if b.starts_with(b"---") && marker {
            (doc, open, start, openers) = (doc + 1, true, i + 1, 0);
        } else if b.starts_with(b"...") && marker {
            (open, start, openers) = (false, i + 1, 0);
        } else if !open && !body.is_empty() && !body.starts_with(['#', '%']) {
            (doc, open) = (doc + 1, true);
        }
        openers += b.iter().filter(|c| matches!(c, b'[' | b'{')).count();
        if openers > MAX_FLOW_OPENERS {
            return Some((doc.max(1), start));
        }
    }
    None
}

/// Builds a `Value` as serde_yaml_ng's own `Deserialize` does, charging one node of
/// the stream's budget per node built, aliases included.
struct Budget<'a>(&'a Cell<usize>);

impl Budget<'_> {
    fn charge<E: de::Error>(&self) -> Result<(), E> {
        match self.0.get().checked_sub(1) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "more than {MAX_STREAM_NODES} YAML nodes once aliases are expanded"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.charge()?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.charge()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Budget(self.0))? {
            out.push(v);
        }
        Ok(Value::Sequence(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.charge()?;
        let mut out = Mapping::new();
        while let Some(k) = map.next_key_seed(Budget(self.0))? {
            if out.contains_key(&k) {
                return Err(de::Error::custom(match &k {
                    Value::Null => "duplicate entry with null key".to_owned(),
                    Value::Bool(b) => format!("duplicate entry with key `{b}`"),
                    Value::Number(n) => format!("duplicate entry with key {n}"),
                    Value::String(s) => format!("duplicate entry with key {s:?}"),
                    _ => "duplicate entry in YAML map".to_owned(),
                }));
            }
            let v = map.next_value_seed(Budget(self.0))?;
            out.insert(k, v);
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        self.charge()?;
        let (tag, contents): (String, _) = data.variant()?;
        if tag.is_empty() {
            return Err(de::Error::custom("empty YAML tag is not allowed"));
        }
        let value = contents.newtype_variant_seed(Budget(self.0))?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Appendix A of the specification, verbatim (comments included).
    const APPENDIX_A: &str = r#"# Remote peer, in the ClusterLink namespace of the importing cluster
apiVersion: clusterlink.net/v1alpha1
kind: Peer
metadata: {name: server, namespace: clusterlink-system}
spec:
  gateways:
  - {host: 172.18.0.3, port: 30443}
---
# Export on the server cluster (Service default/nginx must exist, or set spec.host)
apiVersion: clusterlink.net/v1alpha1
kind: Export
metadata: {name: nginx, namespace: default}
spec: {port: 80}
---
# Import on the client cluster (creates Service default/nginx -> ExternalName -> system Service)
apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata: {name: nginx, namespace: default}
spec:
  port: 80
  lbScheme: static            # optional; default round-robin
  sources:
  - {peer: server, exportName: nginx, exportNamespace: default}
---
# Needed on BOTH sides (namespace = import ns on client side, export ns on server side)
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: allow-all, namespace: default}
spec:
  action: allow
  from: [{workloadSelector: {}}]
  to:   [{workloadSelector: {}}]
---
apiVersion: clusterlink.net/v1alpha1
kind: PrivilegedAccessPolicy
metadata: {name: deny-to-server1}
spec:
  action: deny
  from: [{workloadSelector: {}}]
  to:   [{workloadSelector: {matchLabels: {peer.clusterlink.net/name: server1}}}]
---
apiVersion: clusterlink.net/v1alpha1
kind: Instance
metadata: {name: cl-instance, namespace: clusterlink-operator}
spec:
  dataplane: {type: envoy, replicas: 1}
  ingress: {type: NodePort, port: 30443}
  logLevel: info
  containerRegistry: ghcr.io/clusterlink-net/
  namespace: clusterlink-system
  tag: latest
  peerLabels: {region: eu}
"#;

    /// One document in ClusterLink's shape; `metadata` and `spec` in flow style.
    fn doc(kind: &str, metadata: &str, spec: &str) -> String {
        format!("apiVersion: {API_VERSION}\nkind: {kind}\nmetadata: {metadata}\nspec: {spec}\n")
    }

    fn key(kind: Kind, namespace: &str, name: &str) -> Key {
        Key {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn selector(labels: &[(&str, &str)]) -> WorkloadSetOrSelector {
        WorkloadSetOrSelector {
            workload_sets: Vec::new(),
            workload_selector: Some(LabelSelector {
                match_labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                match_expressions: Vec::new(),
            }),
        }
    }

    /// The single resource of a one-document stream.
    fn one(text: &str) -> Result<Resource, Box<dyn std::error::Error>> {
        let mut docs = parse_documents(text);
        match (docs.pop(), docs.is_empty()) {
            (Some(r), true) => Ok(r?),
            (got, _) => Err(format!("want exactly one document, got {got:?} and {docs:?}").into()),
        }
    }

    /// The error of a one-document stream that must be refused.
    fn refused(text: &str) -> Result<String, Box<dyn std::error::Error>> {
        match one(text) {
            Ok(r) => Err(format!("accepted, want refused: {r:?}\n{text}").into()),
            Err(e) => Ok(e.to_string()),
        }
    }

    fn import(o: &Resource) -> Result<&ImportSpec, Box<dyn std::error::Error>> {
        match o {
            Resource::Import(o) => Ok(&o.spec),
            other => Err(format!("not an Import: {other:?}").into()),
        }
    }

    #[test]
    fn appendix_a_parses_except_instance() -> TestResult {
        let stream = parse_stream(APPENDIX_A);
        assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
        assert_eq!(stream.docs.len(), 6);
        let indexes: Vec<usize> = stream.docs.iter().map(|d| d.index).collect();
        assert_eq!(indexes, [1, 2, 3, 4, 5, 6]);
        let mut docs = stream.docs.into_iter();
        let mut next = || docs.next().ok_or("missing document");

        let d = next()?;
        let want = key(Kind::Peer, "", "server");
        assert_eq!(d.key.as_ref(), Some(&want));
        let Resource::Peer(peer) = d.result? else {
            return Err("document 1 is not a Peer".into());
        };
        assert_eq!(Resource::Peer(peer.clone()).key(), want);
        assert_eq!(peer.api_version, API_VERSION);
        assert_eq!(peer.metadata.name, "server");
        assert_eq!(
            peer.metadata.namespace.as_deref(),
            Some("clusterlink-system")
        );
        assert_eq!(
            peer.spec.gateways,
            [Endpoint {
                host: "172.18.0.3".into(),
                port: 30443
            }]
        );

        let d = next()?;
        let want = key(Kind::Export, "default", "nginx");
        assert_eq!(d.key.as_ref(), Some(&want));
        let r = d.result?;
        assert_eq!(r.key(), want);
        let Resource::Export(export) = r else {
            return Err("document 2 is not an Export".into());
        };
        assert_eq!(
            export.spec,
            ExportSpec {
                host: String::new(),
                port: 80
            }
        );

        let d = next()?;
        let want = key(Kind::Import, "default", "nginx");
        assert_eq!(d.key.as_ref(), Some(&want));
        let r = d.result?;
        assert_eq!(r.key(), want);
        let spec = import(&r)?;
        assert_eq!(spec.port, 80);
        assert_eq!(spec.target_port, 0);
        assert_eq!(spec.listen_port(), 80);
        assert_eq!(spec.lb_scheme, "static");
        assert_eq!(spec.scheme(), Some(LbScheme::Static));
        assert_eq!(
            spec.sources,
            [ImportSource {
                peer: "server".into(),
                export_name: "nginx".into(),
                export_namespace: "default".into(),
            }]
        );

        let d = next()?;
        let want = key(Kind::AccessPolicy, "default", "allow-all");
        assert_eq!(d.key.as_ref(), Some(&want));
        let r = d.result?;
        assert_eq!(r.key(), want);
        let Resource::AccessPolicy(policy) = r else {
            return Err("document 4 is not an AccessPolicy".into());
        };
        assert_eq!(
            policy.spec,
            AccessPolicySpec {
                action: "allow".into(),
                from: vec![selector(&[])],
                to: vec![selector(&[])],
            }
        );

        let d = next()?;
        let want = key(Kind::PrivilegedAccessPolicy, "", "deny-to-server1");
        assert_eq!(d.key.as_ref(), Some(&want));
        let r = d.result?;
        assert_eq!(r.key(), want);
        let Resource::PrivilegedAccessPolicy(policy) = r else {
            return Err("document 5 is not a PrivilegedAccessPolicy".into());
        };
        assert_eq!(
            policy.spec,
            AccessPolicySpec {
                action: "deny".into(),
                from: vec![selector(&[])],
                to: vec![selector(&[("peer.clusterlink.net/name", "server1")])],
            }
        );

        // Instance belongs to the operator: refused, naming the kind.
        let d = next()?;
        assert_eq!(d.index, 6);
        assert_eq!(d.key, None);
        match d.result {
            Err(Error::Parse { doc: 6, message }) => {
                assert!(
                    message.contains("kind") && message.contains("\"Instance\""),
                    "{message}"
                );
            }
            other => return Err(format!("Instance: want a parse error, got {other:?}").into()),
        }
        Ok(())
    }

    #[test]
    fn appendix_a_round_trips_through_to_json() -> TestResult {
        for r in parse_documents(APPENDIX_A)
            .into_iter()
            .filter_map(Result::ok)
        {
            let json = serde_json::to_string(&r.to_json())?;
            let again = one(&json)?;
            assert_eq!(again, r, "{json}");
        }
        Ok(())
    }

    #[test]
    fn defaults_when_absent() -> TestResult {
        let r = one(&doc(
            "Import",
            "{name: web}",
            "{port: 8080, sources: [{peer: server}]}",
        ))?;
        assert_eq!(r.key(), key(Kind::Import, "default", "web"));
        let spec = import(&r)?;
        assert_eq!(spec.lb_scheme, "round-robin");
        assert_eq!(spec.scheme(), Some(LbScheme::RoundRobin));
        assert_eq!(spec.target_port, 0);
        assert_eq!(spec.listen_port(), 8080);
        assert_eq!(spec.sources[0].export_name, "");
        assert_eq!(spec.sources[0].export_namespace, "");

        // An empty lbScheme is the default too; targetPort wins for listening.
        let r = one(&doc(
            "Import",
            "{name: web, namespace: \"\"}",
            "{port: 8080, targetPort: 23817, lbScheme: \"\", sources: []}",
        ))?;
        assert_eq!(r.key(), key(Kind::Import, "default", "web"));
        let spec = import(&r)?;
        assert_eq!(spec.scheme(), Some(LbScheme::RoundRobin));
        assert_eq!(spec.listen_port(), 23817);

        let r = one(&doc("Export", "{name: web, namespace: apps}", "{}"))?;
        assert_eq!(r.key(), key(Kind::Export, "apps", "web"));
        let Resource::Export(export) = r else {
            return Err("not an Export".into());
        };
        assert_eq!(export.spec, ExportSpec::default());
        assert_eq!(export.spec.host, "");
        assert_eq!(export.spec.port, 0);

        // Peers may list no gateway; their namespace never enters the key.
        let r = one(&doc(
            "Peer",
            "{name: p1, namespace: elsewhere}",
            "{gateways: []}",
        ))?;
        assert_eq!(r.key(), key(Kind::Peer, "", "p1"));
        let r = one(&doc(
            "PrivilegedAccessPolicy",
            "{name: p, namespace: ignored}",
            "{action: allow, from: [{workloadSelector: {}}], to: [{workloadSelector: {}}]}",
        ))?;
        assert_eq!(r.key(), key(Kind::PrivilegedAccessPolicy, "", "p"));
        Ok(())
    }

    #[test]
    fn kubectl_get_output_parses() -> TestResult {
        let text = r#"apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"clusterlink.net/v1alpha1","kind":"Import","metadata":{"annotations":{},"name":"nginx","namespace":"default"},"spec":{"port":80,"sources":[{"exportName":"nginx","exportNamespace":"default","peer":"server"}]}}
  creationTimestamp: "2024-05-01T10:00:00Z"
  generation: 2
  labels:
    import.clusterlink.net/merge: "true"
  managedFields:
  - apiVersion: clusterlink.net/v1alpha1
    fieldsType: FieldsV1
    fieldsV1:
      f:spec:
        .: {}
        f:port: {}
    manager: kubectl-client-side-apply
    operation: Update
    time: "2024-05-01T10:00:00Z"
  name: nginx
  namespace: default
  resourceVersion: "123456"
  uid: 0b6f1f8e-4a4c-4a9e-9d43-5a8b4f6c1e11
spec:
  lbScheme: round-robin
  port: 80
  sources:
  - exportName: nginx
    exportNamespace: default
    peer: server
  targetPort: 23817
status:
  conditions:
  - lastTransitionTime: "2024-05-01T10:00:01Z"
    message: ""
    reason: Leased
    status: "True"
    type: ImportTargetPortValid
  - lastTransitionTime: "2024-05-01T10:00:01Z"
    message: ""
    reason: Valid
    status: "True"
    type: ImportServiceValid
---
apiVersion: clusterlink.net/v1alpha1
kind: Peer
metadata:
  creationTimestamp: 2024-05-01T10:00:00Z
  generation: 1
  name: server
  namespace: clusterlink-system
  resourceVersion: "42"
  uid: 3d7c0a5e-0000-4000-8000-000000000001
spec:
  gateways:
  - host: 172.18.0.3
    port: 30443
status:
  conditions:
  - lastTransitionTime: "2024-05-01T10:00:05Z"
    message: ""
    reason: Heartbeat
    status: "True"
    type: PeerReachable
  labels:
    peer.clusterlink.net/name: server
---
apiVersion: clusterlink.net/v1alpha1
kind: Export
metadata:
  creationTimestamp: "2024-05-01T10:00:00Z"
  generation: 1
  name: nginx
  namespace: default
  resourceVersion: "43"
  uid: 3d7c0a5e-0000-4000-8000-000000000002
spec:
  port: 80
status:
  conditions:
  - lastTransitionTime: "2024-05-01T10:00:05Z"
    message: ""
    reason: Verified
    status: "True"
    type: ExportValid
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata:
  creationTimestamp: "2024-05-01T10:00:00Z"
  generation: 1
  name: allow-all
  namespace: default
  resourceVersion: "44"
  uid: 3d7c0a5e-0000-4000-8000-000000000003
spec:
  action: allow
  from:
  - workloadSelector: {}
  to:
  - workloadSelector:
      matchExpressions:
      - key: peer.clusterlink.net/name
        operator: In
        values:
        - server
"#;
        let results = parse_documents(text);
        assert_eq!(results.len(), 4);
        let mut got = Vec::new();
        for r in results {
            got.push(r?);
        }
        assert_eq!(got[0].key(), key(Kind::Import, "default", "nginx"));
        let md = got[0].metadata();
        assert_eq!(
            md.labels
                .get("import.clusterlink.net/merge")
                .map(String::as_str),
            Some("true")
        );
        assert!(md
            .annotations
            .contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        let spec = import(&got[0])?;
        assert_eq!(spec.target_port, 23817);
        assert_eq!(spec.listen_port(), 23817);
        assert_eq!(got[1].key(), key(Kind::Peer, "", "server"));
        assert_eq!(got[2].key(), key(Kind::Export, "default", "nginx"));
        assert_eq!(
            got[3].key(),
            key(Kind::AccessPolicy, "default", "allow-all")
        );
        Ok(())
    }

    #[test]
    fn refusals_name_the_field() -> TestResult {
        let any = "[{workloadSelector: {}}]";
        let policy = |action: &str, from: &str, to: &str| {
            doc(
                "AccessPolicy",
                "{name: p}",
                &format!("{{action: {action}, from: {from}, to: {to}}}"),
            )
        };
        let imp = |spec: &str| doc("Import", "{name: imp}", spec);
        let cases: Vec<(&str, String, &[&str])> = vec![
            (
                "unknown lbScheme",
                imp("{port: 80, sources: [], lbScheme: least-conn}"),
                &["spec.lbScheme", "least-conn"],
            ),
            (
                "lbScheme is case-sensitive",
                imp("{port: 80, sources: [], lbScheme: Static}"),
                &["spec.lbScheme"],
            ),
            (
                "selector key",
                policy("allow", "[{workloadSelector: {matchLabels: {\"bad key!\": x}}}]", any),
                &["spec.from[0].workloadSelector", "bad key!"],
            ),
            (
                "selector value",
                policy("allow", any, "[{workloadSelector: {matchLabels: {k: \"no spaces\"}}}]"),
                &["spec.to[0].workloadSelector"],
            ),
            (
                "selector operator",
                policy(
                    "allow",
                    "[{workloadSelector: {matchExpressions: [{key: k, operator: Equals, values: [v]}]}}]",
                    any,
                ),
                &["spec.from[0].workloadSelector", "Equals"],
            ),
            (
                "unknown selector field",
                policy("allow", "[{workloadSelector: {matchLabel: {k: v}}}]", any),
                &["spec.from[0].workloadSelector", "matchLabel"],
            ),
            ("empty from", policy("allow", "[]", any), &["spec.from"]),
            ("empty to", policy("deny", any, "[]"), &["spec.to"]),
            ("action", policy("permit", any, any), &["spec.action", "permit"]),
            ("empty action", policy("\"\"", any, any), &["spec.action"]),
            (
                "workloadSets",
                policy("allow", "[{workloadSets: [s1]}]", any),
                &["spec.from[0].workloadSets", "not yet supported"],
            ),
            (
                "neither sets nor selector",
                policy("allow", any, "[{}]"),
                &["spec.to[0]", "exactly one"],
            ),
            (
                "both sets and selector",
                policy("allow", "[{workloadSets: [s1], workloadSelector: {}}]", any),
                &["spec.from[0]", "exactly one"],
            ),
            ("import port 0", imp("{port: 0, sources: []}"), &["spec.port"]),
            (
                "import port over u16",
                imp("{port: 70000, sources: []}"),
                &["spec.port", "70000"],
            ),
            ("import port negative", imp("{port: -1, sources: []}"), &["spec.port"]),
            ("import port string", imp("{port: http, sources: []}"), &["spec.port"]),
            (
                "import targetPort over u16",
                imp("{port: 80, targetPort: 65536, sources: []}"),
                &["spec.targetPort"],
            ),
            ("import without port", imp("{sources: []}"), &["spec", "port"]),
            ("import without sources", imp("{port: 80}"), &["spec", "sources"]),
            (
                "import source peer",
                imp("{port: 80, sources: [{peer: Bad_Peer}]}"),
                &["spec.sources[0].peer"],
            ),
            (
                "lbSchem typo",
                imp("{port: 80, sources: [], lbSchem: random}"),
                &["spec", "lbSchem"],
            ),
            (
                "unknown source field",
                imp("{port: 80, sources: [{peer: p, exportNamspace: x}]}"),
                &["spec.sources[0]", "exportNamspace"],
            ),
            (
                "peer gateway port 0",
                doc("Peer", "{name: p}", "{gateways: [{host: h, port: 0}]}"),
                &["spec.gateways[0].port"],
            ),
            (
                "peer second gateway empty host",
                doc(
                    "Peer",
                    "{name: p}",
                    "{gateways: [{host: h, port: 1}, {host: \"\", port: 443}]}",
                ),
                &["spec.gateways[1].host"],
            ),
            (
                "peer blank host",
                doc("Peer", "{name: p}", "{gateways: [{host: \"  \", port: 443}]}"),
                &["spec.gateways[0].host"],
            ),
            (
                "peer without gateways",
                doc("Peer", "{name: p}", "{}"),
                &["spec", "gateways"],
            ),
            (
                "unknown export field",
                doc("Export", "{name: e}", "{port: 80, hots: x}"),
                &["spec", "hots"],
            ),
            (
                "wrong apiVersion",
                "apiVersion: clusterlink.net/v1\nkind: Peer\nmetadata: {name: p}\nspec: {gateways: []}\n"
                    .into(),
                &["apiVersion", "clusterlink.net/v1"],
            ),
            (
                "missing apiVersion",
                "kind: Peer\nmetadata: {name: p}\nspec: {gateways: []}\n".into(),
                &["apiVersion"],
            ),
            (
                "unknown kind",
                doc("Service", "{name: p}", "{}"),
                &["kind", "\"Service\""],
            ),
            (
                "missing kind",
                format!("apiVersion: {API_VERSION}\nmetadata: {{name: p}}\nspec: {{}}\n"),
                &["kind", "\"\""],
            ),
            (
                "missing metadata.name",
                doc("Peer", "{namespace: x}", "{gateways: []}"),
                &["metadata", "name"],
            ),
            (
                "missing metadata",
                format!("apiVersion: {API_VERSION}\nkind: Peer\nspec: {{gateways: []}}\n"),
                &["metadata"],
            ),
            (
                "missing spec",
                format!("apiVersion: {API_VERSION}\nkind: Export\nmetadata: {{name: e}}\n"),
                &["spec"],
            ),
            (
                "empty name",
                doc("Export", "{name: \"\"}", "{}"),
                &["metadata.name"],
            ),
            (
                "uppercase name",
                doc("Export", "{name: Nginx}", "{}"),
                &["metadata.name", "Nginx"],
            ),
            (
                "name with underscore",
                doc("Peer", "{name: my_peer}", "{gateways: []}"),
                &["metadata.name"],
            ),
            (
                "uppercase namespace",
                doc("Export", "{name: e, namespace: Default}", "{}"),
                &["metadata.namespace"],
            ),
            (
                "dotted namespace",
                doc("Export", "{name: e, namespace: a.b}", "{}"),
                &["metadata.namespace"],
            ),
            (
                "document is a list",
                "- a\n- b\n".into(),
                &["document 1"],
            ),
            ("document is a scalar", "hello\n".into(), &["document 1"]),
        ];
        for (what, text, fields) in cases {
            let message = refused(&text).map_err(|e| format!("{what}: {e}"))?;
            for f in fields {
                assert!(
                    message.contains(f),
                    "{what}: {message:?} does not name {f:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn import_name_length() -> TestResult {
        // A single DNS label cannot exceed 63 characters anyway, so the Import rule is
        // exercised with a dotted (subdomain) name.
        let name63 = "a".repeat(MAX_IMPORT_NAME);
        let r = one(&doc(
            "Import",
            &format!("{{name: {name63}}}"),
            "{port: 80, sources: []}",
        ))?;
        assert_eq!(r.key().name.len(), 63);
        let dotted63 = format!("{}.{}", "a".repeat(31), "b".repeat(31));
        one(&doc(
            "Import",
            &format!("{{name: {dotted63}}}"),
            "{port: 80, sources: []}",
        ))?;

        let dotted64 = format!("{}.{}", "a".repeat(31), "b".repeat(32));
        assert_eq!(dotted64.len(), 64);
        let message = refused(&doc(
            "Import",
            &format!("{{name: {dotted64}}}"),
            "{port: 80, sources: []}",
        ))?;
        assert!(message.contains("metadata.name"), "{message}");
        assert!(
            message.contains("import name cannot exceed 63 chars"),
            "{message}"
        );

        let label64 = "a".repeat(64);
        let message = refused(&doc(
            "Import",
            &format!("{{name: {label64}}}"),
            "{port: 80, sources: []}",
        ))?;
        assert!(message.contains("metadata.name"), "{message}");

        // The 63-character rule is the Import's only: other kinds take any subdomain.
        one(&doc("Export", &format!("{{name: {dotted64}}}"), "{}"))?;
        Ok(())
    }

    #[test]
    fn invalid_middle_document() -> TestResult {
        let text = [
            doc("Export", "{name: one}", "{port: 80}"),
            doc(
                "Import",
                "{name: two, namespace: ns}",
                "{port: 80, sources: [], lbScheme: fastest}",
            ),
            doc("Export", "{name: three}", "{port: 81}"),
        ]
        .join("---\n");
        let stream = parse_stream(&text);
        assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
        assert_eq!(stream.docs.len(), 3);
        let d = &stream.docs[0];
        assert_eq!(d.index, 1);
        assert_eq!(
            d.result.as_ref().map(Resource::key),
            Ok(key(Kind::Export, "default", "one"))
        );
        let d = &stream.docs[1];
        assert_eq!(d.index, 2);
        assert_eq!(d.key, Some(key(Kind::Import, "ns", "two")));
        match &d.result {
            Err(e @ Error::Invalid { field, .. }) => {
                assert_eq!(field, "spec.lbScheme");
                assert!(e.to_string().contains("fastest"), "{e}");
            }
            other => return Err(format!("document 2: want invalid, got {other:?}").into()),
        }
        let d = &stream.docs[2];
        assert_eq!(d.index, 3);
        assert_eq!(
            d.result.as_ref().map(Resource::key),
            Ok(key(Kind::Export, "default", "three"))
        );

        // A parse (not validation) failure: `doc` is the stream position, and the key
        // is still read leniently from kind and name.
        let text = [
            doc("Export", "{name: one}", "{port: 80}"),
            doc("Import", "{name: two}", "{port: 70000, sources: []}"),
            doc("Export", "{name: three}", "{port: 81}"),
        ]
        .join("---\n");
        let stream = parse_stream(&text);
        assert_eq!(stream.docs.len(), 3);
        assert_eq!(
            stream.docs[1].key,
            Some(key(Kind::Import, "default", "two"))
        );
        match &stream.docs[1].result {
            Err(Error::Parse { doc: 2, message }) => {
                assert!(message.contains("spec.port"), "{message}")
            }
            other => return Err(format!("document 2: want a parse error, got {other:?}").into()),
        }
        assert!(stream.docs[0].result.is_ok() && stream.docs[2].result.is_ok());
        let flat = parse_documents(&text);
        assert_eq!(flat.len(), 3);
        assert!(matches!(flat[1], Err(Error::Parse { doc: 2, .. })));

        // Unreadable kind or name: no key.
        let stream = parse_stream("kind: Import\nmetadata: {namespace: x}\n");
        assert_eq!(stream.docs.len(), 1);
        assert_eq!(stream.docs[0].key, None);
        assert!(stream.docs[0].result.is_err());
        Ok(())
    }

    #[test]
    fn empty_documents_are_skipped_but_counted() -> TestResult {
        let text = format!(
            "# a comment, not a document\n---\n---\n{}",
            doc("Export", "{name: e}", "{}")
        );
        let stream = parse_stream(&text);
        assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
        assert_eq!(stream.docs.len(), 1);
        // The comment before the first `---` starts no document of its own.
        assert_eq!(stream.docs[0].index, 2);
        assert!(parse_stream("").docs.is_empty());
        assert!(parse_stream("---\n...\n").docs.is_empty());
        Ok(())
    }

    #[test]
    fn syntax_error_stops_the_stream() -> TestResult {
        let text = [
            doc("Export", "{name: one}", "{port: 80}"),
            "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {name: two\nspec: {}\n"
                .to_owned(),
            doc("Export", "{name: three}", "{port: 81}"),
        ]
        .join("---\n");
        let stream = parse_stream(&text);
        assert_eq!(stream.docs.len(), 1, "{:?}", stream.docs);
        assert!(stream.docs[0].result.is_ok());
        match &stream.syntax_error {
            Some(Error::Parse { doc: 2, .. }) => {}
            other => return Err(format!("want a syntax error in document 2, got {other:?}").into()),
        }
        let flat = parse_documents(&text);
        assert_eq!(flat.len(), 2);
        assert!(matches!(flat[1], Err(Error::Parse { doc: 2, .. })));

        // Tabs for indentation, and a syntax error in the first document.
        let stream = parse_stream("apiVersion: x\nmetadata:\n\tname: a\n");
        assert!(stream.docs.is_empty());
        assert!(matches!(
            stream.syntax_error,
            Some(Error::Parse { doc: 1, .. })
        ));
        // Duplicate keys are refused rather than silently resolved.
        let stream = parse_stream(&format!("{}kind: Peer\n", doc("Export", "{name: e}", "{}")));
        assert!(stream.docs.is_empty());
        match stream.syntax_error {
            Some(Error::Parse { doc: 1, message }) => {
                assert!(
                    message.contains("duplicate entry with key \"kind\""),
                    "{message}"
                )
            }
            other => return Err(format!("want a duplicate key error, got {other:?}").into()),
        }
        Ok(())
    }

    #[test]
    fn oversized_streams_are_refused_whole() -> TestResult {
        let one_doc = doc("Export", "{name: e}", "{port: 80}");
        let padding = format!("# {}\n", "x".repeat(MAX_STREAM_BYTES));
        let stream = parse_stream(&format!("{one_doc}{padding}"));
        assert!(stream.docs.is_empty());
        match stream.syntax_error {
            Some(Error::Parse { doc: 1, message }) => {
                assert!(message.contains("bytes"), "{message}")
            }
            other => return Err(format!("want a size error, got {other:?}").into()),
        }
        // Just under the limit is fine.
        let padding = format!("# {}\n", "x".repeat(MAX_STREAM_BYTES - one_doc.len() - 3));
        let text = format!("{one_doc}{padding}");
        assert_eq!(text.len(), MAX_STREAM_BYTES);
        one(&text)?;
        // The densest alias-free streams the size allows stay within the node budget:
        // they are refused as resources, not as YAML.
        for dense in [
            format!("[{}1]", "1,".repeat(MAX_STREAM_BYTES / 2 - 2)),
            "-\n".repeat(MAX_STREAM_BYTES / 2),
            "- - a\n".repeat(MAX_STREAM_BYTES / 6),
        ] {
            assert!(dense.len() <= MAX_STREAM_BYTES);
            let stream = parse_stream(&dense);
            assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
            assert_eq!(stream.docs.len(), 1);
        }
        Ok(())
    }

    #[test]
    fn deep_flow_nesting_is_refused() -> TestResult {
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_FLOW_OPENERS + 1),
            "]".repeat(MAX_FLOW_OPENERS + 1)
        );
        let text = format!("{}---\nx: {deep}\n", doc("Export", "{name: e}", "{}"));
        let stream = parse_stream(&text);
        assert!(stream.docs.is_empty());
        match stream.syntax_error {
            Some(Error::Parse { doc: 2, message }) => {
                assert!(message.contains("line 5"), "{message}")
            }
            other => return Err(format!("want a nesting error, got {other:?}").into()),
        }
        // The count is per document: many documents with a few brackets each pass,
        // as do JSON annotations (`kubectl apply`) in every document.
        let annotated = doc(
            "Export",
            "{name: e, annotations: {last-applied: '{\"a\":[{\"b\":[1]},{\"c\":{}}]}'}}",
            "{port: 80}",
        );
        let text = vec![annotated; MAX_FLOW_OPENERS].join("---\n");
        let stream = parse_stream(&text);
        assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
        assert_eq!(stream.docs.len(), MAX_FLOW_OPENERS);
        assert!(stream.docs.iter().all(|d| d.result.is_ok()));
        Ok(())
    }

    #[test]
    fn alias_expansion_is_bounded() -> TestResult {
        // Ordinary anchors and aliases still work.
        let r = one(&doc(
            "AccessPolicy",
            "{name: p}",
            "{action: allow, from: &any [{workloadSelector: {}}], to: *any}",
        ))?;
        assert_eq!(r.key(), key(Kind::AccessPolicy, "default", "p"));
        // 4000 references to a list of 4000 scalars: 16 million nodes from 28 KB.
        let mut text = String::from("a: &a [");
        text.push_str(&"x, ".repeat(4000));
        text.push_str("]\nb: [");
        text.push_str(&"*a, ".repeat(4000));
        text.push_str("]\n");
        let started = Instant::now();
        let stream = parse_stream(&text);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(stream.docs.is_empty());
        match stream.syntax_error {
            Some(Error::Parse { doc: 1, message }) => {
                assert!(message.contains("aliases"), "{message}")
            }
            other => return Err(format!("want an expansion error, got {other:?}").into()),
        }
        // Tags are kept as serde_yaml_ng keeps them.
        let stream = parse_stream("a: !custom {b: 1}\n");
        assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
        assert_eq!(stream.docs.len(), 1);
        Ok(())
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Inputs meant to break the parser: random bytes, YAML-looking noise, mutations of
    /// valid manifests, deep nesting, huge scalars, and alias bombs.
    fn nasty_inputs() -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut add = |what: &str, text: String| out.push((what.to_owned(), text));
        for s in [
            "",
            "\0",
            "\u{feff}",
            "\u{feff}apiVersion: clusterlink.net/v1alpha1",
            ":",
            "-",
            "---",
            "...",
            "{",
            "[",
            "}",
            "]",
            "'",
            "\"",
            "\"\\u",
            "|",
            ">",
            "? ",
            "&",
            "*",
            "&a",
            "*a",
            "&a *a",
            "&a [*a]",
            "&a {k: *a}",
            "a: &a [*a, *a]",
            "<<: *a",
            "a: &a {x: 1}\nb: {<<: *a, <<: *a}",
            "!!binary =====",
            "!!int notanumber",
            "!!float x",
            "!<tag:yaml.org,2002:str> x",
            "!unknown {a: 1}",
            "! x",
            "!!",
            "%YAML 1.1\n---\n",
            "%YAML 9.9\n---\na",
            "%TAG ! tag:x,2000:\n--- !a b",
            "kind: !!int Peer",
            "kind: [Peer]",
            "kind: {Peer: 1}",
            "apiVersion: 1\nkind: 2\nmetadata: 3\nspec: 4",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: null\nspec: null",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: {name: [a]}\nspec: {gateways: {}}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i}\nspec: {port: 99999999999999999999999999999999999999999, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i}\nspec: {port: 1e400, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i}\nspec: {port: .nan, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i}\nspec: {port: 0x50, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i, labels: {a: [1]}}\nspec: {port: 80, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p}\nspec: {action: allow, from: [{workloadSelector: {matchExpressions: [{key: \"\", operator: In, values: []}]}}], to: []}",
            "? [a, b]\n: c",
            "? {a: b}\n: c",
            "a: b\n  c: d",
            "\t",
            "a:\n\t- b",
            "\r\n\r\n---\r\n",
            "\u{85}\u{2028}\u{2029}",
            "\u{1F600}: \u{1F600}",
            "key: \"\\uD800\"",
            "key: \"\\x00\\0\\a\"",
        ] {
            add("fixed", s.to_owned());
        }

        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..64 {
            let n = rng.below(4096);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            add("random bytes", String::from_utf8_lossy(&bytes).into_owned());
        }
        const ALPHABET: &[u8] = b"-:{}[]&*!|>?'\"#%@`,.\n\n   \tabk019~";
        for _ in 0..256 {
            let n = rng.below(512);
            let text: String = (0..n)
                .map(|_| char::from(ALPHABET[rng.below(ALPHABET.len())]))
                .collect();
            add("yaml-ish noise", text);
        }
        let base = APPENDIX_A.as_bytes();
        for _ in 0..256 {
            let mut bytes = base.to_vec();
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(bytes.len());
                match rng.below(3) {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, ALPHABET[rng.below(ALPHABET.len())]),
                    _ => bytes[at] = ALPHABET[rng.below(ALPHABET.len())],
                }
            }
            add(
                "mutated appendix",
                String::from_utf8_lossy(&bytes).into_owned(),
            );
        }

        for depth in [200, 10_000, 100_000] {
            add("deep flow sequence", "[".repeat(depth));
            add(
                "deep closed flow sequence",
                format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
            );
            add("deep flow mapping", "{a: ".repeat(depth));
            add("deep block sequence", format!("{}x\n", "- ".repeat(depth)));
            add(
                "deep block mapping",
                (0..depth.min(10_000))
                    .map(|i| format!("{}k:\n", " ".repeat(i)))
                    .collect(),
            );
            add(
                "deep spec",
                format!(
                    "{}{}{}",
                    doc("Export", "{name: e}", "").trim_end(),
                    " {a: ".repeat(depth),
                    "}".repeat(depth)
                ),
            );
        }

        // Just under the size limit, and over it.
        let big = "x".repeat(MAX_STREAM_BYTES - 64);
        add("huge plain scalar", big.clone());
        add("huge quoted scalar", format!("\"{big}\""));
        add(
            "huge name",
            doc("Export", &format!("{{name: {big}}}"), "{}"),
        );
        add("huge key", format!("{big}: 1"));
        add("over the size limit", "x".repeat(64 << 20));
        add(
            "huge block scalar",
            format!("a: |\n{}", "  line\n".repeat(MAX_STREAM_BYTES / 8)),
        );
        add(
            "many empty documents",
            "---\n".repeat(MAX_STREAM_BYTES / 4 - 1),
        );
        add(
            "many small documents",
            (0..10_000)
                .map(|i| doc("Export", &format!("{{name: e{i}}}"), "{port: 80}"))
                .collect::<Vec<_>>()
                .join("---\n"),
        );
        add(
            "many anchors",
            (0..50_000).map(|i| format!("- &a{i} x\n")).collect(),
        );
        add(
            "long line of commas",
            format!("[{}]", ",".repeat(MAX_STREAM_BYTES - 2)),
        );
        add(
            "many scalars",
            format!("[{}]", "1,".repeat(MAX_STREAM_BYTES / 2 - 1)),
        );
        // As deep as the opener limit allows, then as many tokens as the size allows:
        // the worst case of libyaml's per-token walk over flow levels.
        for opener in ["[", "{a: "] {
            let head = opener.repeat(MAX_FLOW_OPENERS);
            let tail = "a, ".repeat((MAX_STREAM_BYTES - head.len()) / 3 - 1);
            add("deep within the limit", format!("{head}{tail}"));
        }
        add(
            "deep within the limit, many documents",
            format!("{}\n---\n", "[".repeat(MAX_FLOW_OPENERS)).repeat(MAX_STREAM_BYTES / 1030),
        );

        // The "billion laughs": ten levels of ten aliases each.
        let mut laughs =
            String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            laughs.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        add("billion laughs", laughs.clone());
        add(
            "billion laughs in a resource",
            format!(
                "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: i\n  annotations: {{}}\n  x:\n{}spec: {{port: 80, sources: []}}\n",
                laughs.lines().map(|l| format!("    {l}\n")).collect::<String>()
            ),
        );
        // Quadratic growth within the jump limit: one anchored list of K scalars,
        // referred to K times.
        for k in [2_000, 20_000] {
            let mut s = String::from("a: &a [");
            s.push_str(&"x, ".repeat(k));
            s.push_str("]\nb: [");
            s.push_str(&"*a, ".repeat(k));
            s.push_str("]\n");
            add("quadratic aliases", s);
        }
        // The same, nested: an anchored mapping of lists of aliases.
        let mut s = String::from("a: &a [");
        s.push_str(&"x, ".repeat(1000));
        s.push_str("]\nb: &b [");
        s.push_str(&"*a, ".repeat(1000));
        s.push_str("]\nc: [");
        s.push_str(&"*b, ".repeat(1000));
        s.push_str("]\n");
        add("cubic aliases", s);
        out
    }

    #[test]
    fn garbage_never_panics_and_finishes_quickly() -> TestResult {
        let inputs = nasty_inputs();
        let (tx, rx) = mpsc::channel();
        // On its own thread, so that a hang fails the test instead of stalling it and a
        // panic is reported with the input that caused it.
        std::thread::Builder::new()
            .name("garbage".into())
            .stack_size(8 << 20)
            .spawn(move || {
                for (i, (what, text)) in inputs.iter().enumerate() {
                    let started = Instant::now();
                    let _ = tx.send(Err((i, what.clone())));
                    let stream = parse_stream(text);
                    // Everything the stream reports must format without trouble.
                    let _ = format!("{stream:?}");
                    if text.len() < 1 << 16 {
                        let _ = parse_documents(text).len();
                    }
                    if tx.send(Ok((what.clone(), started.elapsed()))).is_err() {
                        return;
                    }
                }
            })?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut current = None;
        let mut slowest = (String::new(), Duration::ZERO);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Err(i)) => current = Some(i),
                Ok(Ok((what, took))) => {
                    current = None;
                    if took > slowest.1 {
                        slowest = (what, took);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("still parsing input {current:?} after 120 s").into())
                }
            }
        }
        assert_eq!(current, None, "the parser panicked on input {current:?}");
        // Generous for unoptimised builds; an unbounded expansion takes minutes.
        assert!(
            slowest.1 < Duration::from_secs(20),
            "slowest input: {} took {:?}",
            slowest.0,
            slowest.1
        );
        Ok(())
    }

    #[test]
    fn a_kubectl_list_counts_as_its_items() -> TestResult {
        let text = "apiVersion: v1
kind: List
items:
- apiVersion: clusterlink.net/v1alpha1
  kind: Peer
  metadata: {name: server}
  spec:
    gateways: [{host: 10.0.0.1, port: 30443}]
- apiVersion: clusterlink.net/v1alpha1
  kind: Import
  metadata: {name: bad, namespace: default}
  spec: {port: 80, lbScheme: fastest, sources: []}
---
apiVersion: v1
kind: List
items: {}
";
        let s = parse_stream(text);
        assert!(s.syntax_error.is_none());
        assert_eq!(s.docs.len(), 3);
        assert!(matches!(&s.docs[0].result, Ok(Resource::Peer(_))));
        assert_eq!(s.docs[1].index, 1);
        assert!(s.docs[1].key.is_some());
        assert!(format!("{:?}", s.docs[1].result).contains("spec.lbScheme"));
        assert!(matches!(
            &s.docs[2].result,
            Err(Error::Parse { doc: 2, .. })
        ));
        Ok(())
    }
}
