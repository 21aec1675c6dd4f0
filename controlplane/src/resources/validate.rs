//! Semantic validation of one parsed resource: names, namespaces, ports, schemes and
//! workload selectors, each error naming the offending field. Pure checks on values
//! already parsed: it never parses YAML and never does I/O.

use fabric::names;

use super::{Error, Resource, MAX_IMPORT_NAME};

fn invalid(kind: &'static str, name: &str, field: &str, message: impl Into<String>) -> Error {
    Error::Invalid {
        kind,
        name: name.to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Structural validation of one resource. An Export without `spec.host` is valid as
/// a resource; outside Kubernetes it is reported `ExportValid` False (status, not
/// rejection).
pub fn validate(r: &Resource) -> Result<(), Error> {
    let kind = r.kind().name();
    let md = r.metadata();
    let name = md.name.as_str();
    // A Peer's name is the remote's identity, the DNS SAN of its certificate: a DNS
    // name too. Other names follow Kubernetes (a DNS-1123 subdomain).
    let named = match r {
        Resource::Peer(_) => names::peer_name(name),
        _ => names::dns1123_subdomain(name),
    };
    if let Err(e) = named {
        return Err(invalid(kind, name, "metadata.name", e.to_string()));
    }
    if let Some(ns) = md.namespace.as_deref().filter(|n| !n.is_empty()) {
        if let Err(e) = names::dns1123_label(ns) {
            return Err(invalid(kind, name, "metadata.namespace", e.to_string()));
        }
    }
    match r {
        Resource::Peer(o) => {
            for (i, g) in o.spec.gateways.iter().enumerate() {
                if let Err(e) = names::host(&g.host) {
                    return Err(invalid(
                        kind,
                        name,
                        &format!("spec.gateways[{i}].host"),
                        e.to_string(),
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
                if let Err(e) = names::peer_name(&s.peer) {
                    return Err(invalid(
                        kind,
                        name,
                        &format!("spec.sources[{i}].peer"),
                        format!("must be a peer name: {e}"),
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
