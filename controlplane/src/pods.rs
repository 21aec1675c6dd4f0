//! Client attributes by source address (spec §3.10): on Kubernetes, the pod a
//! connection comes from gives `client.clusterlink.net/namespace`, `/service-account`
//! and `/labels.<key>`. The index is filled by the Kubernetes source and read by
//! egress authorization; on the local platform it stays empty. No I/O here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::RwLock;

use crate::pdp::{CLIENT_LABELS_PREFIX, CLIENT_NAMESPACE, CLIENT_SA};

/// One pod as authorization sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub ips: Vec<IpAddr>,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

impl Pod {
    /// The pod's client attributes.
    pub fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert(CLIENT_NAMESPACE.to_owned(), self.namespace.clone());
        a.insert(CLIENT_SA.to_owned(), self.service_account.clone());
        for (k, v) in &self.labels {
            a.insert(format!("{CLIENT_LABELS_PREFIX}{k}"), v.clone());
        }
        a
    }
}

#[derive(Default)]
struct Inner {
    /// Pods by uid.
    pods: HashMap<String, Pod>,
    /// The uid of the pod holding each address. When two pods claim one address (a
    /// finished pod and its successor), the later claim wins until it goes.
    by_ip: HashMap<IpAddr, String>,
}

/// Pods by address.
#[derive(Default)]
pub struct Index {
    inner: RwLock<Inner>,
}

impl Index {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds or replaces a pod.
    pub fn upsert(&self, uid: &str, pod: Pod) {
        let mut inner = self.write();
        Self::remove_locked(&mut inner, uid);
        for ip in &pod.ips {
            inner.by_ip.insert(*ip, uid.to_owned());
        }
        inner.pods.insert(uid.to_owned(), pod);
    }

    pub fn remove(&self, uid: &str) {
        Self::remove_locked(&mut self.write(), uid);
    }

    fn remove_locked(inner: &mut Inner, uid: &str) {
        let Some(old) = inner.pods.remove(uid) else {
            return;
        };
        for ip in old.ips {
            if inner.by_ip.get(&ip).is_some_and(|u| u == uid) {
                inner.by_ip.remove(&ip);
                // Another pod with the same address takes it back.
                if let Some((other, _)) = inner.pods.iter().find(|(_, p)| p.ips.contains(&ip)) {
                    let other = other.clone();
                    inner.by_ip.insert(ip, other);
                }
            }
        }
    }

    /// Replaces the whole index (after a fresh list).
    pub fn replace(&self, pods: Vec<(String, Pod)>) {
        let mut inner = self.write();
        *inner = Inner::default();
        for (uid, pod) in pods {
            for ip in &pod.ips {
                inner.by_ip.insert(*ip, uid.clone());
            }
            inner.pods.insert(uid, pod);
        }
    }

    /// The client attributes of the pod at `ip`, if any.
    pub fn attributes(&self, ip: IpAddr) -> Option<BTreeMap<String, String>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let uid = inner.by_ip.get(&ip)?;
        inner.pods.get(uid).map(Pod::attributes)
    }

    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pods
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ip: &str, ns: &str) -> Pod {
        Pod {
            ips: vec![ip.parse().expect("test input")],
            namespace: ns.into(),
            service_account: "default".into(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
        }
    }

    #[test]
    fn attributes_by_address_follow_upserts_and_removals() {
        let idx = Index::default();
        let ip: IpAddr = "10.0.0.5".parse().expect("test input");
        assert_eq!(idx.attributes(ip), None);
        idx.upsert("a", pod("10.0.0.5", "ns1"));
        let a = idx.attributes(ip).expect("test input");
        assert_eq!(a[CLIENT_NAMESPACE], "ns1");
        assert_eq!(a[CLIENT_SA], "default");
        assert_eq!(a["client.clusterlink.net/labels.app"], "web");
        // A successor with the same address wins; when it goes, the first is back.
        idx.upsert("b", pod("10.0.0.5", "ns2"));
        assert_eq!(
            idx.attributes(ip).expect("test input")[CLIENT_NAMESPACE],
            "ns2"
        );
        idx.remove("b");
        assert_eq!(
            idx.attributes(ip).expect("test input")[CLIENT_NAMESPACE],
            "ns1"
        );
        // A pod that moves address releases the old one.
        idx.upsert("a", pod("10.0.0.6", "ns1"));
        assert_eq!(idx.attributes(ip), None);
        idx.replace(vec![]);
        assert!(idx.is_empty());
    }
}
