//! Snapshots: one complete, validated configuration from the control plane, swapped in
//! whole as an immutable `Arc<Snapshot>`. The data path reads it without locks. An
//! invalid item is refused on its own, with its reason logged and counted; the rest of
//! the snapshot applies. It never talks to the control plane (`cpclient` does) and
//! never holds a lock the data path would wait on.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use controlplane_api::v1;
use serde::Serialize;

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// h2 if the peer offers it, HTTP/1.1 after an h2 CONNECT failure.
    Auto,
    Http2,
    Http1,
}

#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub name: String,
    /// "host:port", in order of preference.
    pub gateways: Vec<String>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize)]
pub struct Export {
    pub namespace: String,
    pub name: String,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Import {
    pub namespace: String,
    pub name: String,
    /// 0 lets the system pick a free port (tests); the bound port is in /config_dump.
    pub port: u16,
    /// How many exporting peers the import names. With one, the control plane's answer
    /// cannot depend on load balancing, so the data plane may reuse it.
    pub sources: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub version: u64,
    /// How many snapshots this data plane had applied when it applied this one
    /// (unlike `version`, which restarts with the control plane, it never repeats).
    pub generation: u64,
    pub peers: HashMap<String, Peer>,
    /// Keyed by "namespace/name".
    pub exports: HashMap<String, Export>,
    /// Keyed by "namespace/name".
    pub imports: HashMap<String, Import>,
    #[serde(skip)]
    pub token_key: Vec<u8>,
    pub min_epoch: u64,
}

pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Snapshot {
    /// Validates a snapshot from the control plane item by item.
    pub fn from_proto(s: v1::Snapshot, metrics: &Metrics) -> Snapshot {
        let reject = |kind: &str, what: &str, why: &str| {
            tracing::warn!(kind, item = what, reason = why, "snapshot item refused");
            metrics.snapshot_rejected.with_label_values(&[kind]).inc();
        };
        let mut out = Snapshot {
            version: s.version,
            ..Default::default()
        };
        for p in s.peers {
            if fabric::names::peer_name(&p.name).is_err() {
                reject("peer", &p.name, "peer name is not a DNS name");
                continue;
            }
            if let Some(bad) = p
                .gateways
                .iter()
                .find(|g| fabric::names::split_host_port(g).is_err())
            {
                reject(
                    "peer",
                    &p.name,
                    &format!("gateway {bad:?} is not host:port"),
                );
                continue;
            }
            let protocol = match v1::TunnelProtocol::try_from(p.protocol) {
                Ok(v1::TunnelProtocol::Http2) => Protocol::Http2,
                Ok(v1::TunnelProtocol::Http1) => Protocol::Http1,
                _ => Protocol::Auto,
            };
            out.peers.insert(
                p.name.clone(),
                Peer {
                    name: p.name,
                    gateways: p.gateways,
                    protocol,
                },
            );
        }
        for e in s.exports {
            let k = key(&e.namespace, &e.name);
            let port = u16::try_from(e.port).ok().filter(|p| *p != 0);
            match port {
                Some(port) if !e.host.is_empty() && !e.name.is_empty() => {
                    out.exports.insert(
                        k,
                        Export {
                            namespace: e.namespace,
                            name: e.name,
                            host: e.host,
                            port,
                        },
                    );
                }
                _ => reject(
                    "export",
                    &k,
                    "export needs a name, a host and a port 1-65535",
                ),
            }
        }
        for i in s.imports {
            let k = key(&i.namespace, &i.name);
            match u16::try_from(i.port) {
                Ok(port) if !i.name.is_empty() => {
                    out.imports.insert(
                        k,
                        Import {
                            sources: i.sources.len(),
                            namespace: i.namespace,
                            name: i.name,
                            port,
                        },
                    );
                }
                _ => reject("import", &k, "import needs a name and a port 0-65535"),
            }
        }
        if let Some(t) = s.token_key {
            out.token_key = t.key;
            out.min_epoch = t.min_epoch;
        }
        out
    }
}

/// The snapshot in force, readable without locks.
pub struct Store {
    current: ArcSwap<Snapshot>,
    applied: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn new() -> Self {
        Store {
            current: ArcSwap::from_pointee(Snapshot::default()),
            applied: tokio::sync::watch::channel(0).0,
        }
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn swap(&self, mut s: Snapshot) {
        let version = s.version;
        s.generation = *self.applied.borrow() + 1;
        self.current.store(Arc::new(s));
        // Count of snapshots applied; listeners reconcile on every change.
        self.applied.send_modify(|n| *n += 1);
        tracing::debug!(version, "snapshot applied");
    }

    /// Changes on every applied snapshot; the value is how many have been applied.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_items_keeps_good_ones() {
        let m = Metrics::new();
        let s = v1::Snapshot {
            version: 7,
            peers: vec![
                v1::Peer {
                    name: "peer-b".into(),
                    gateways: vec!["127.0.0.1:4443".into(), "[::1]:4443".into()],
                    protocol: 0,
                },
                v1::Peer {
                    name: "bad name!".into(),
                    gateways: vec![],
                    protocol: 0,
                },
                v1::Peer {
                    name: "peer-c".into(),
                    gateways: vec!["nohost".into()],
                    protocol: 0,
                },
            ],
            exports: vec![
                v1::Export {
                    namespace: "default".into(),
                    name: "echo".into(),
                    host: "127.0.0.1".into(),
                    port: 7,
                },
                v1::Export {
                    namespace: "default".into(),
                    name: "big".into(),
                    host: "127.0.0.1".into(),
                    port: 70_000,
                },
            ],
            imports: vec![v1::Import {
                namespace: "default".into(),
                name: "echo".into(),
                port: 80_000,
                sources: vec![],
            }],
            token_key: None,
        };
        let snap = Snapshot::from_proto(s, &m);
        assert_eq!(snap.version, 7);
        assert_eq!(snap.peers.len(), 1);
        assert!(snap.peers.contains_key("peer-b"));
        assert_eq!(snap.exports.len(), 1);
        assert!(snap.imports.is_empty());
        assert_eq!(m.snapshot_rejected.with_label_values(&["peer"]).get(), 2);
        assert_eq!(m.snapshot_rejected.with_label_values(&["export"]).get(), 1);
        assert_eq!(m.snapshot_rejected.with_label_values(&["import"]).get(), 1);
    }
}
