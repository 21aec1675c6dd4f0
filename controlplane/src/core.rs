//! The control plane's state: the desired resources in force, the policy decision
//! point built from them, the status of every resource (peer reachability from the
//! heartbeats, export validity, import port leases), the policy epoch that
//! invalidates older access tokens, and the snapshot published to the data planes.
//! Every change of resources or status republishes the snapshot at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use controlplane_api::v1;
use serde::Serialize;
use tokio::sync::watch;

use crate::pdp::Pdp;
use fabric::clock::now_rfc3339;
use fabric::names::host_port;

use crate::resources::{Key, Kind, Resource};
use crate::store::{Desired, SourceError};

use fabric::sync::lock;

/// A Kubernetes-style condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// What the heartbeats found out about a remote peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerHealth {
    /// None until the first decision (ClusterLink: no condition yet).
    pub reachable: Option<bool>,
    pub since: String,
    pub labels: Option<BTreeMap<String, String>>,
    pub protocol: i32,
}

#[derive(Default)]
struct Inner {
    desired: Arc<Desired>,
    pdp: Pdp,
    /// Conditions of exports and imports, by key.
    conditions: BTreeMap<Key, Vec<Condition>>,
    /// Keys of valid exports and of imports with a valid port.
    valid: std::collections::BTreeSet<Key>,
    /// Where each valid export's connections go (its host, or its Service's address).
    targets: BTreeMap<Key, String>,
}

/// The shared state. Readers take short read locks; nothing is held across I/O.
pub struct Core {
    pub local_labels: BTreeMap<String, String>,
    inner: RwLock<Inner>,
    health: Mutex<HashMap<String, PeerHealth>>,
    /// The policy epoch: tokens minted under an older one are void. It never goes
    /// backwards: it starts from where the last run left it (the `epoch` watch is what
    /// is kept: a file on the local platform, the `jwk` Secret on Kubernetes).
    epoch: watch::Sender<u64>,
    /// Whether this process advances the epoch on a change (the local control plane;
    /// on Kubernetes the leader only, and the other replicas follow the Secret).
    advances: std::sync::atomic::AtomicBool,
    token_key: RwLock<Vec<u8>>,
    /// Client pods by address (Kubernetes only).
    pub pods: crate::pods::Index,
    snapshot: watch::Sender<v1::Snapshot>,
    version: std::sync::atomic::AtomicU64,
    /// Bumped whenever a policy or a Peer changes: caches of tokens drop.
    pub changes: watch::Sender<u64>,
}

impl Core {
    /// `epoch`: where the last run left it (1 for a first start).
    pub fn new(
        token_key: Vec<u8>,
        local_labels: BTreeMap<String, String>,
        epoch: u64,
        advances: bool,
    ) -> Arc<Self> {
        Arc::new(Core {
            local_labels,
            inner: RwLock::new(Inner::default()),
            health: Mutex::new(HashMap::new()),
            epoch: watch::channel(epoch.max(1)).0,
            advances: std::sync::atomic::AtomicBool::new(advances),
            token_key: RwLock::new(token_key),
            pods: crate::pods::Index::default(),
            snapshot: watch::channel(v1::Snapshot::default()).0,
            version: std::sync::atomic::AtomicU64::new(0),
            changes: watch::channel(0).0,
        })
    }

    pub fn token_key(&self) -> Vec<u8> {
        self.token_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the access-token key (the `jwk` Secret changed): tokens signed with
    /// the old one stop verifying at the data planes with the next snapshot.
    pub fn set_token_key(&self, key: Vec<u8>) {
        {
            let mut k = self.token_key.write().unwrap_or_else(|p| p.into_inner());
            if *k == key {
                return;
            }
            *k = key;
        }
        tracing::info!("access-token key replaced");
        self.changes.send_modify(|n| *n += 1);
        self.publish();
    }

    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// Follows the epoch (to keep it, or to share it with other replicas).
    pub fn subscribe_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Moves the epoch on: every token minted so far is void. Returns the new one.
    pub fn advance_epoch(&self, why: &str) -> u64 {
        let mut now = 0;
        self.epoch.send_modify(|e| {
            *e += 1;
            now = *e;
        });
        tracing::info!(
            epoch = now,
            why,
            "policy epoch advanced; older access tokens are void"
        );
        self.publish();
        now
    }

    /// Whether this process advances the epoch on a change (Kubernetes: while it leads).
    pub fn set_advances(&self, advances: bool) {
        self.advances
            .store(advances, std::sync::atomic::Ordering::SeqCst);
    }

    /// The epoch another replica (the leader) recorded: followed exactly by a replica
    /// that does not advance it, taken when higher by one that does.
    pub fn adopt_epoch(&self, recorded: u64) {
        let advances = self.advances.load(std::sync::atomic::Ordering::SeqCst);
        let changed = self.epoch.send_if_modified(|e| {
            let next = if advances {
                (*e).max(recorded)
            } else {
                recorded.max(1)
            };
            let changed = next != *e;
            *e = next;
            changed
        });
        if changed {
            tracing::info!(epoch = recorded, "policy epoch recorded by the leader");
            self.publish();
        }
    }

    pub fn subscribe_snapshots(&self) -> watch::Receiver<v1::Snapshot> {
        self.snapshot.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the resources in force.
    pub fn with_desired<T>(&self, f: impl FnOnce(&Desired, &Pdp) -> T) -> T {
        let inner = self.read();
        f(&inner.desired, &inner.pdp)
    }

    pub fn is_valid(&self, key: &Key) -> bool {
        self.read().valid.contains(key)
    }

    pub fn source_errors(&self) -> Vec<SourceError> {
        self.read().desired.errors.clone()
    }

    pub fn health(&self, peer: &str) -> PeerHealth {
        lock(&self.health).get(peer).cloned().unwrap_or_default()
    }

    /// Records a heartbeat decision; republishes if anything the data plane sees or
    /// relies on changed: a peer's tunnel protocol, its reachability (load balancing
    /// reads it) or its labels (policies match them), so that data planes do not keep
    /// reusing answers given before.
    pub fn set_health(&self, peer: &str, h: PeerHealth) {
        let changed = {
            let mut m = lock(&self.health);
            let old = m.insert(peer.to_owned(), h.clone());
            old.as_ref().map(|o| (o.protocol, o.reachable, &o.labels))
                != Some((h.protocol, h.reachable, &h.labels))
        };
        if changed {
            self.publish();
        }
    }

    pub fn forget_health(&self, peer: &str) {
        lock(&self.health).remove(peer);
    }

    /// Applies a new desired state as a whole.
    pub fn apply(&self, desired: Arc<Desired>) {
        let mut pdp = Pdp::new();
        for (key, r) in &desired.resources {
            let result = match r {
                Resource::AccessPolicy(o) => pdp.set(&key.namespace, &key.name, &o.spec),
                Resource::PrivilegedAccessPolicy(o) => pdp.set_privileged(&key.name, &o.spec),
                _ => Ok(()),
            };
            if let Err(e) = result {
                // Validated already; this only guards against a mismatch.
                tracing::error!(%key, error = %e, "policy refused by the decision point");
            }
        }
        let Verdicts {
            mut conditions,
            valid,
            targets,
        } = conditions(&desired);
        let policy_or_peer_changed = {
            let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
            // A condition that did not change keeps its lastTransitionTime.
            for (key, conds) in conditions.iter_mut() {
                if let Some(old) = inner.conditions.get(key) {
                    for c in conds.iter_mut() {
                        if let Some(o) = old.iter().find(|o| {
                            o.type_ == c.type_ && o.status == c.status && o.message == c.message
                        }) {
                            c.last_transition_time = o.last_transition_time.clone();
                        }
                    }
                }
            }
            let changed = relevant(&inner.desired) != relevant(&desired);
            inner.desired = desired;
            inner.pdp = pdp;
            inner.conditions = conditions;
            inner.valid = valid;
            inner.targets = targets;
            changed
        };
        if policy_or_peer_changed {
            self.changes.send_modify(|n| *n += 1);
            if self.advances.load(std::sync::atomic::Ordering::SeqCst) {
                // (publishes)
                self.advance_epoch("policies or peers changed");
                return;
            }
        }
        self.publish();
    }

    /// Builds and pushes the data-plane snapshot.
    pub fn publish(&self) {
        let health = lock(&self.health).clone();
        let inner = self.read();
        let mut s = v1::Snapshot {
            version: self
                .version
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1,
            token_key: Some(v1::TokenKey {
                key: self.token_key(),
                min_epoch: self.epoch(),
            }),
            ..Default::default()
        };
        for (key, r) in &inner.desired.resources {
            match r {
                Resource::Peer(o) => s.peers.push(v1::Peer {
                    name: key.name.clone(),
                    gateways: o
                        .spec
                        .gateways
                        .iter()
                        .map(|g| host_port(&g.host, g.port))
                        .collect(),
                    protocol: health.get(&key.name).map(|h| h.protocol).unwrap_or(0),
                }),
                Resource::Export(o) if inner.valid.contains(key) => s.exports.push(v1::Export {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    host: inner
                        .targets
                        .get(key)
                        .cloned()
                        .unwrap_or_else(|| o.spec.host.clone()),
                    port: o.spec.port.into(),
                }),
                Resource::Import(o) if inner.valid.contains(key) => s.imports.push(v1::Import {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    port: o.spec.listen_port().into(),
                    sources: o
                        .spec
                        .sources
                        .iter()
                        .map(|src| v1::ImportSource {
                            peer: src.peer.clone(),
                            export_namespace: src.export_namespace.clone(),
                            export_name: src.export_name.clone(),
                        })
                        .collect(),
                }),
                _ => {}
            }
        }
        drop(inner);
        self.snapshot.send_replace(s);
    }

    /// The resource in the Kubernetes object shape with its status.
    pub fn object(&self, key: &Key) -> Option<serde_json::Value> {
        let inner = self.read();
        let r = inner.desired.resources.get(key)?;
        let mut v = r.to_json();
        match r {
            Resource::Peer(_) => {
                let h = self.health(&key.name);
                let mut status = serde_json::Map::new();
                if let Some(reachable) = h.reachable {
                    status.insert(
                        "conditions".into(),
                        serde_json::json!([Condition {
                            type_: "PeerReachable".into(),
                            status: if reachable { "True" } else { "False" }.into(),
                            reason: "Heartbeat".into(),
                            message: String::new(),
                            last_transition_time: h.since.clone(),
                        }]),
                    );
                }
                if let Some(labels) = h.labels {
                    status.insert("labels".into(), serde_json::json!(labels));
                }
                v["status"] = status.into();
            }
            Resource::Export(_) | Resource::Import(_) => {
                let conds = inner.conditions.get(key).cloned().unwrap_or_default();
                v["status"] = serde_json::json!({ "conditions": conds });
            }
            _ => {}
        }
        Some(v)
    }

    /// Every resource of a kind, in key order.
    pub fn list(&self, kind: Kind) -> Vec<serde_json::Value> {
        let keys: Vec<Key> = self
            .read()
            .desired
            .resources
            .keys()
            .filter(|k| k.kind == kind)
            .cloned()
            .collect();
        keys.iter().filter_map(|k| self.object(k)).collect()
    }
}

/// Policies and Peers: what access tokens depend on.
fn relevant(d: &Desired) -> Vec<(&Key, &Resource)> {
    d.resources
        .iter()
        .filter(|(k, _)| {
            matches!(
                k.kind,
                Kind::Peer | Kind::AccessPolicy | Kind::PrivilegedAccessPolicy
            )
        })
        .collect()
}

fn cond(type_: &str, ok: bool, reason: &str, message: String, now: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: now.to_owned(),
    }
}

struct Verdicts {
    conditions: BTreeMap<Key, Vec<Condition>>,
    valid: std::collections::BTreeSet<Key>,
    targets: BTreeMap<Key, String>,
}

/// The name of the ClusterIP Service in the ClusterLink namespace `cl` that selects
/// the data plane pods for import `ns/name`: the import's own name in `cl`, else
/// `import-<name[..10]>-<ns[..10]>-<hash>` (ClusterLink's shape; SHA-256 where
/// ClusterLink has MD5), 61 characters at most.
pub fn system_service_name(cl: &str, ns: &str, name: &str) -> String {
    if ns == cl {
        return name.to_owned();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{ns}/{name}").as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cut = |s: &str| s.chars().take(10).collect::<String>();
    format!("import-{}-{}-{hex}", cut(name), cut(ns))
}

/// The Services an import needs, (namespace, name): the system Service, and the user
/// Service in the import's namespace unless that is the ClusterLink namespace.
pub fn import_services(cl: &str, ns: &str, name: &str) -> Vec<(String, String)> {
    let mut out = vec![(cl.to_owned(), system_service_name(cl, ns, name))];
    if ns != cl {
        out.push((ns.to_owned(), name.to_owned()));
    }
    out
}

/// Export and Import conditions, and which are usable. On the local platform an
/// Export needs a host; on Kubernetes one without a host targets its Service (its
/// cluster IP, or its DNS name when headless), and is valid only while the Service
/// exists. Import port claims go by age (an older Import keeps its port) then key.
fn conditions(d: &Desired) -> Verdicts {
    let now = now_rfc3339();
    let mut out = BTreeMap::new();
    let mut valid = std::collections::BTreeSet::new();
    let mut targets = BTreeMap::new();
    let mut ports: HashMap<u16, &Key> = HashMap::new();
    let mut imports: Vec<(
        &Key,
        &crate::resources::Object<crate::resources::ImportSpec>,
    )> = d
        .resources
        .iter()
        .filter_map(|(k, r)| match r {
            Resource::Import(o) => Some((k, o)),
            _ => None,
        })
        .collect();
    imports.sort_by(|(ka, a), (kb, b)| {
        (&a.metadata.creation_timestamp, ka).cmp(&(&b.metadata.creation_timestamp, kb))
    });
    for (key, r) in &d.resources {
        if let Resource::Export(o) = r {
            let mut target = o.spec.host.clone();
            let problem = if o.spec.port == 0 {
                Some("spec.port must be 1-65535".to_owned())
            } else if !o.spec.host.is_empty() {
                None
            } else {
                match &d.services {
                    None => Some(
                        "spec.host is required outside Kubernetes (there is no Service to export)"
                            .to_owned(),
                    ),
                    Some(services) => {
                        match services.get(&(key.namespace.clone(), key.name.clone())) {
                            None => Some(format!(
                                "export service '{}/{}' does not exist",
                                key.namespace, key.name
                            )),
                            Some(svc) => {
                                target = svc.cluster_ip.clone().unwrap_or_else(|| {
                                    format!("{}.{}.svc.cluster.local", key.name, key.namespace)
                                });
                                None
                            }
                        }
                    }
                }
            };
            let c = match problem {
                None => {
                    valid.insert(key.clone());
                    targets.insert(key.clone(), target);
                    cond("ExportValid", true, "Verified", String::new(), &now)
                }
                Some(m) => cond("ExportValid", false, "Error", m, &now),
            };
            out.insert(key.clone(), vec![c]);
        }
    }
    let on_k8s = d.services.as_ref().zip(d.namespace.as_deref());
    for (key, o) in imports {
        let port = o.spec.listen_port();
        let pending = on_k8s.is_some() && o.spec.target_port == 0;
        let conflict = ports.get(&port).map(|k| (*k).clone());
        let c = if pending {
            let m = "waiting for the leader to allocate spec.targetPort".to_owned();
            vec![
                cond("ImportTargetPortValid", false, "Pending", m.clone(), &now),
                cond("ImportServiceValid", false, "Pending", m, &now),
            ]
        } else if let Some(other) = conflict {
            let m = format!(
                "cannot generate listening port: port {port} is already in use by service {}/{}",
                other.namespace, other.name
            );
            vec![
                cond("ImportTargetPortValid", false, "Error", m.clone(), &now),
                cond("ImportServiceValid", false, "Error", m, &now),
            ]
        } else {
            ports.insert(port, key);
            valid.insert(key.clone());
            let service = match on_k8s {
                None => Ok(()),
                Some((services, cl)) => service_problem(services, cl, key),
            };
            vec![
                cond("ImportTargetPortValid", true, "Leased", String::new(), &now),
                match service {
                    Ok(()) => cond("ImportServiceValid", true, "Valid", String::new(), &now),
                    Err((reason, m)) => cond("ImportServiceValid", false, reason, m, &now),
                },
            ]
        };
        out.insert(key.clone(), c);
    }
    Verdicts {
        conditions: out,
        valid,
        targets,
    }
}

/// Whether the Services of an import exist and are its own.
fn service_problem(
    services: &BTreeMap<(String, String), crate::store::ServiceInfo>,
    cl: &str,
    key: &Key,
) -> Result<(), (&'static str, String)> {
    let me = (key.namespace.clone(), key.name.clone());
    let mut missing = None;
    for (ns, name) in import_services(cl, &key.namespace, &key.name) {
        match services.get(&(ns.clone(), name.clone())) {
            None => missing = missing.or(Some(format!("service '{ns}/{name}' is being created"))),
            Some(svc) if svc.import_owner.as_ref() != Some(&me) => {
                let by = match &svc.import_owner {
                    Some((ons, oname)) => format!("import {ons}/{oname}"),
                    None => "someone else (no ClusterLink import labels)".to_owned(),
                };
                return Err((
                    "Error",
                    format!("service '{ns}/{name}' already exists and managed by {by}"),
                ));
            }
            Some(_) => {}
        }
    }
    match missing {
        Some(m) => Err(("Pending", m)),
        None => Ok(()),
    }
}
