//! Imports on Kubernetes (spec §3.5.1-3.5.2), done by the leader. Target ports: an
//! Import without `spec.targetPort` gets a free one in [1024, 49152), written back
//! to its spec (guarded by its resourceVersion, so a concurrent edit wins and the
//! next round retries); ports in use are those of every Import's spec, so
//! allocations survive restarts and failovers. Services: each valid Import has a
//! ClusterIP system Service in the ClusterLink namespace selecting the data plane
//! pods, and an ExternalName user Service of its own name in its namespace, both
//! labelled as its own; a missing or edited one is put back, one whose Import is
//! gone (or lost its port) is deleted, and a foreign Service is never touched (the
//! Import's ImportServiceValid says so). Merge mode (§3.5.4) is not implemented.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::ResourceExt as _;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::source::{api_resource, Stores};
use super::{
    Kube, DATAPLANE_APP, FIELD_MANAGER, IMPORT_NAMESPACE_LABEL, IMPORT_NAME_LABEL, MANAGED_BY,
    MANAGED_BY_VALUE,
};
use crate::core::{import_services, Core};
use crate::resources::{Key, Kind, Resource};
use crate::store::Desired;

pub const PORT_MIN: u16 = 1024;
/// One past the highest allocated port.
pub const PORT_END: u16 = 49152;
const RANDOM_TRIES: usize = 40;

/// A free port in [PORT_MIN, PORT_END): a few random tries, then a scan from PORT_MIN
/// (ClusterLink's scan started at 0 and could return ports below 1024).
pub fn pick_port(taken: &HashSet<u16>) -> Option<u16> {
    for _ in 0..RANDOM_TRIES {
        let p = rand::random_range(PORT_MIN..PORT_END);
        if !taken.contains(&p) {
            return Some(p);
        }
    }
    (PORT_MIN..PORT_END).find(|p| !taken.contains(p))
}

/// Target-port allocation.
#[derive(Default)]
pub struct Allocator {
    /// Ports given out and not yet seen in a spec (the write is on its way).
    pending: BTreeMap<Key, u16>,
}

impl Allocator {
    pub async fn run(&mut self, kube: &Kube, stores: &Stores, d: &Desired) {
        let mut taken: HashSet<u16> = HashSet::new();
        let mut wanting = Vec::new();
        for obj in stores.imports.state() {
            let port = obj.data["spec"]["targetPort"].as_u64().unwrap_or(0);
            let key = Key {
                kind: Kind::Import,
                namespace: obj.namespace().unwrap_or_default(),
                name: obj.name_any(),
            };
            if port == 0 {
                // Only Imports in force (valid) get a port.
                if d.resources.contains_key(&key) {
                    wanting.push((
                        key,
                        obj.namespace().unwrap_or_default(),
                        obj.resource_version(),
                    ));
                }
            } else {
                self.pending.remove(&key);
                taken.insert(u16::try_from(port).unwrap_or(0));
            }
        }
        self.pending
            .retain(|k, _| wanting.iter().any(|(w, _, _)| w == k));
        taken.extend(self.pending.values().copied());
        for (key, ns, rv) in wanting {
            let port = match self.pending.get(&key) {
                Some(p) => *p,
                None => match pick_port(&taken) {
                    Some(p) => p,
                    None => {
                        tracing::warn!(import = %key, "all ports are taken");
                        continue;
                    }
                },
            };
            taken.insert(port);
            let api: Api<kube::api::DynamicObject> =
                Api::namespaced_with(kube.client.clone(), &ns, &api_resource(Kind::Import));
            let patch = json!({
                "metadata": { "resourceVersion": rv },
                "spec": { "targetPort": port },
            });
            match api
                .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(import = %key, port, "target port allocated");
                    self.pending.insert(key, port);
                }
                Err(e) => {
                    tracing::warn!(import = %key, error = %e, "cannot write spec.targetPort; retrying");
                    self.pending.remove(&key);
                }
            }
        }
    }
}

fn labels(import_ns: &str, import_name: &str) -> Value {
    json!({
        MANAGED_BY: MANAGED_BY_VALUE,
        IMPORT_NAME_LABEL: import_name,
        IMPORT_NAMESPACE_LABEL: import_ns,
    })
}

/// The Services an import should have, as `import_services` names them, each with
/// the spec fields we set: the system Service first, then the user Service.
fn wanted(cl: &str, key: &Key, port: u16, target_port: u16) -> Vec<(String, String, Value)> {
    let mut names = import_services(cl, &key.namespace, &key.name).into_iter();
    let mut out = Vec::new();
    if let Some((ns, system)) = names.next() {
        let spec = json!({
            "type": "ClusterIP",
            "selector": { "app": DATAPLANE_APP },
            "ports": [{ "protocol": "TCP", "port": port, "targetPort": target_port }],
        });
        let external = format!("{system}.{cl}.svc.cluster.local");
        out.push((ns, system, spec));
        for (ns, name) in names {
            let spec = json!({ "type": "ExternalName", "externalName": external });
            out.push((ns, name, spec));
        }
    }
    out
}

/// Whether `svc` already has `spec` (the fields we set) and the import's labels.
fn up_to_date(svc: &Service, spec: &Value, labels: &Value) -> bool {
    let have = serde_json::to_value(svc).unwrap_or_default();
    let labels_ok = labels.as_object().is_some_and(|l| {
        l.iter()
            .all(|(k, v)| have["metadata"]["labels"].get(k) == Some(v))
    });
    let spec_ok = spec.as_object().is_some_and(|s| {
        s.iter().all(|(k, v)| match k.as_str() {
            "ports" => {
                let got = have["spec"]["ports"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let want = v.as_array().cloned().unwrap_or_default();
                got.len() == want.len()
                    && got
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| g["port"] == w["port"] && g["targetPort"] == w["targetPort"])
            }
            _ => have["spec"].get(k) == Some(v),
        })
    });
    labels_ok && spec_ok
}

pub async fn reconcile_services(
    kube: &Kube,
    core: &Arc<Core>,
    stores: &Stores,
    d: &Desired,
    leader: &watch::Receiver<bool>,
) {
    let cl = kube.namespace.as_str();
    let existing: BTreeMap<(String, String), Arc<Service>> = stores
        .services
        .state()
        .into_iter()
        .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
        .collect();
    let mut keep: HashSet<(String, String)> = HashSet::new();
    for (key, r) in &d.resources {
        let Resource::Import(o) = r else { continue };
        if o.spec.target_port == 0 || !core.is_valid(key) {
            continue;
        }
        let me = (key.namespace.clone(), key.name.clone());
        let lbl = labels(&key.namespace, &key.name);
        for (ns, name, spec) in wanted(cl, key, o.spec.port, o.spec.target_port) {
            let id = (ns.clone(), name.clone());
            if let Some(svc) = existing.get(&id) {
                let owner = (
                    svc.labels().get(IMPORT_NAMESPACE_LABEL).cloned(),
                    svc.labels().get(IMPORT_NAME_LABEL).cloned(),
                );
                let ours = svc.labels().get(MANAGED_BY).map(String::as_str)
                    == Some(MANAGED_BY_VALUE)
                    && owner == (Some(me.0.clone()), Some(me.1.clone()));
                if !ours {
                    // Reported in ImportServiceValid; never taken over.
                    continue;
                }
                keep.insert(id.clone());
                if up_to_date(svc, &spec, &lbl) {
                    continue;
                }
            } else {
                keep.insert(id.clone());
            }
            if !*leader.borrow() {
                return;
            }
            let body = json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": { "name": name, "namespace": ns, "labels": lbl },
                "spec": spec,
            });
            let api: Api<Service> = Api::namespaced(kube.client.clone(), &ns);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api.patch(&name, &params, &Patch::Apply(&body)).await {
                Ok(_) => {
                    tracing::info!(import = %key, service = %format!("{ns}/{name}"), "import service applied")
                }
                Err(e) => {
                    tracing::warn!(import = %key, service = %format!("{ns}/{name}"), error = %e, "cannot apply import service")
                }
            }
        }
    }
    // Ours, but no longer wanted: the import is gone or lost its port.
    for (id, svc) in &existing {
        let managed = svc.labels().get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE)
            && svc.labels().contains_key(IMPORT_NAME_LABEL);
        if !managed || keep.contains(id) {
            continue;
        }
        // Only Services an import of ours would have: the system Service in the
        // ClusterLink namespace, or a user Service named after its import.
        let (ins, iname) = (
            svc.labels()
                .get(IMPORT_NAMESPACE_LABEL)
                .cloned()
                .unwrap_or_default(),
            svc.labels()
                .get(IMPORT_NAME_LABEL)
                .cloned()
                .unwrap_or_default(),
        );
        if !import_services(cl, &ins, &iname).contains(id) {
            continue;
        }
        if !*leader.borrow() {
            return;
        }
        let api: Api<Service> = Api::namespaced(kube.client.clone(), &id.0);
        match api.delete(&id.1, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(service = %format!("{}/{}", id.0, id.1), "import service deleted")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(service = %format!("{}/{}", id.0, id.1), error = %e, "cannot delete import service")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::system_service_name;

    #[test]
    fn picked_ports_are_free_and_in_range() {
        let mut taken: HashSet<u16> = (PORT_MIN..PORT_END - 1).collect();
        assert_eq!(
            pick_port(&taken),
            Some(PORT_END - 1),
            "the scan finds the last one"
        );
        taken.insert(PORT_END - 1);
        assert_eq!(pick_port(&taken), None);
        for _ in 0..1000 {
            let p = pick_port(&HashSet::new()).expect("test input");
            assert!((PORT_MIN..PORT_END).contains(&p));
        }
    }

    #[test]
    fn system_service_names_fit_a_label() {
        let n = system_service_name(
            "clusterlink-system",
            "a-very-long-namespace",
            "a-very-long-import-name",
        );
        assert!(
            n.len() <= 63 && n.starts_with("import-a-very-lon-a-very-lon-"),
            "{n}"
        );
        assert_eq!(system_service_name("cl", "cl", "x"), "x");
    }
}
