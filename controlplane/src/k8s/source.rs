//! The Kubernetes resource source: reflectors of Peers and the `jwk` Secret in the
//! ClusterLink namespace, Exports, Imports and AccessPolicies in every namespace,
//! PrivilegedAccessPolicies, Services, and Pods (client attributes by address). Each
//! change rebuilds the desired state with the same parser and validation as the
//! directory source: an invalid object is reported (log line, `Warning` Event naming
//! the field) and its last valid version stays in force.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Resource as _, ResourceExt as _};
use tokio::sync::{watch, Notify};

use super::{Error, Kube, IMPORT_NAMESPACE_LABEL, IMPORT_NAME_LABEL, MANAGED_BY, MANAGED_BY_VALUE};
use crate::core::Core;
use crate::resources::{self, Key, Kind, Resource};
use crate::store::{Desired, ServiceInfo, Source, SourceError};

/// The reflector stores, shared with the leader's writers.
#[derive(Clone)]
pub struct Stores {
    pub peers: Store<DynamicObject>,
    pub exports: Store<DynamicObject>,
    pub imports: Store<DynamicObject>,
    pub policies: Store<DynamicObject>,
    pub privileged: Store<DynamicObject>,
    pub services: Store<Service>,
    /// Notified on every change of any store.
    pub changed: Arc<Notify>,
}

impl Stores {
    /// The store and API resource of a kind.
    pub fn of(&self, kind: Kind) -> &Store<DynamicObject> {
        match kind {
            Kind::Peer => &self.peers,
            Kind::Export => &self.exports,
            Kind::Import => &self.imports,
            Kind::AccessPolicy => &self.policies,
            Kind::PrivilegedAccessPolicy => &self.privileged,
        }
    }
}

/// The API resource of a ClusterLink kind.
pub fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Peer => ApiResource::erase::<crds::Peer>(&()),
        Kind::Export => ApiResource::erase::<crds::Export>(&()),
        Kind::Import => ApiResource::erase::<crds::Import>(&()),
        Kind::AccessPolicy => ApiResource::erase::<crds::AccessPolicy>(&()),
        Kind::PrivilegedAccessPolicy => ApiResource::erase::<crds::PrivilegedAccessPolicy>(&()),
    }
}

/// The API of a kind: Peers in the ClusterLink namespace, the rest everywhere.
pub fn api(kube: &Kube, kind: Kind) -> Api<DynamicObject> {
    let ar = api_resource(kind);
    match kind {
        Kind::Peer => Api::namespaced_with(kube.client.clone(), &kube.namespace, &ar),
        _ => Api::all_with(kube.client.clone(), &ar),
    }
}

const KINDS: [Kind; 5] = [
    Kind::Peer,
    Kind::Export,
    Kind::Import,
    Kind::AccessPolicy,
    Kind::PrivilegedAccessPolicy,
];

fn reflect<K>(
    what: &'static str,
    api: Api<K>,
    writer: Writer<K>,
    changed: Arc<Notify>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::spawn(async move {
        let stream = reflector::reflector(
            writer,
            watcher::watcher(api, watcher::Config::default()).default_backoff(),
        );
        futures_util::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(watch = what, error = %e, "watch failed; retrying"),
            }
        }
    })
}

/// The Kubernetes source. Dropping it stops its watches.
pub struct K8sSource {
    rx: watch::Receiver<Arc<Desired>>,
    pub stores: Stores,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for K8sSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Source for K8sSource {
    fn subscribe(&self) -> watch::Receiver<Arc<Desired>> {
        self.rx.clone()
    }
}

impl K8sSource {
    /// Starts the watches and returns once every one has listed, so that the first
    /// desired state is complete (a restarted control plane never publishes less
    /// than is there). `leader` says whether Events are this replica's to write.
    pub async fn start(
        kube: Arc<Kube>,
        core: Arc<Core>,
        leader: watch::Receiver<bool>,
    ) -> Result<K8sSource, Error> {
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let mut readers = Vec::new();
        for kind in KINDS {
            let writer = Writer::new(api_resource(kind));
            readers.push(writer.as_reader());
            tasks.push(reflect(
                kind.name(),
                api(&kube, kind),
                writer,
                changed.clone(),
            ));
        }
        let svc_writer = Writer::<Service>::default();
        let services = svc_writer.as_reader();
        tasks.push(reflect(
            "Service",
            Api::all(kube.client.clone()),
            svc_writer,
            changed.clone(),
        ));
        let (pods_ready_tx, mut pods_ready) = watch::channel(false);
        tasks.push(tokio::spawn(watch_pods(
            Api::all(kube.client.clone()),
            core,
            pods_ready_tx,
        )));
        let [peers, exports, imports, policies, privileged] =
            <[_; 5]>::try_from(readers).unwrap_or_else(|_| unreachable!("one store per kind"));
        let stores = Stores {
            peers,
            exports,
            imports,
            policies,
            privileged,
            services,
            changed: changed.clone(),
        };
        for kind in KINDS {
            stores
                .of(kind)
                .wait_until_ready()
                .await
                .map_err(|_| Error::NotSynced(kind.name()))?;
        }
        stores
            .services
            .wait_until_ready()
            .await
            .map_err(|_| Error::NotSynced("Service"))?;
        pods_ready
            .wait_for(|r| *r)
            .await
            .map_err(|_| Error::NotSynced("Pod"))?;

        let mut builder = Builder {
            namespace: kube.namespace.clone(),
            last_valid: HashMap::new(),
            reported: HashSet::new(),
            recorder: Recorder::new(
                kube.client.clone(),
                Reporter {
                    controller: super::FIELD_MANAGER.into(),
                    instance: Some(kube.identity.clone()),
                },
            ),
            leader,
        };
        let first = builder.build(&stores);
        let (tx, rx) = watch::channel(Arc::new(first));
        {
            let stores = stores.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    changed.notified().await;
                    // Let a burst of events (a fresh list, kubectl apply -f dir) settle.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx.is_closed() {
                        return;
                    }
                    let desired = builder.build(&stores);
                    tx.send_if_modified(|current| {
                        if current.resources == desired.resources
                            && current.errors == desired.errors
                            && current.services == desired.services
                        {
                            return false;
                        }
                        *current = Arc::new(desired);
                        true
                    });
                }
            }));
        }
        Ok(K8sSource { rx, stores, tasks })
    }
}

struct Builder {
    namespace: String,
    /// The last valid version of every object, by key.
    last_valid: HashMap<Key, Resource>,
    /// (uid, resourceVersion) of invalid objects already reported.
    reported: HashSet<(String, String)>,
    recorder: Recorder,
    leader: watch::Receiver<bool>,
}

impl Builder {
    fn build(&mut self, stores: &Stores) -> Desired {
        let mut d = Desired {
            namespace: Some(self.namespace.clone()),
            ..Desired::default()
        };
        let mut seen = HashSet::new();
        let mut reported = HashSet::new();
        for kind in KINDS {
            let ar = api_resource(kind);
            for obj in stores.of(kind).state() {
                let key = Key {
                    kind,
                    namespace: if kind.namespaced() {
                        obj.namespace().unwrap_or_default()
                    } else {
                        String::new()
                    },
                    name: obj.name_any(),
                };
                seen.insert(key.clone());
                let mut json = serde_json::to_value(&*obj).unwrap_or_default();
                json["apiVersion"] = resources::API_VERSION.into();
                json["kind"] = kind.name().into();
                match resources::parse_object(&json) {
                    Ok(r) => {
                        self.last_valid.insert(key.clone(), r.clone());
                        d.resources.insert(key, r);
                    }
                    Err(e) => {
                        let message = match e {
                            resources::Error::Parse { message, .. } => message,
                            other => other.to_string(),
                        };
                        let kept = self.last_valid.get(&key).cloned();
                        let note = match &kept {
                            Some(_) => format!("{message}; the last valid version stays in force"),
                            None => message.clone(),
                        };
                        if let Some(old) = kept {
                            d.resources.insert(key.clone(), old);
                        }
                        let id = (
                            obj.uid().unwrap_or_default(),
                            obj.resource_version().unwrap_or_default(),
                        );
                        if !self.reported.contains(&id) {
                            tracing::warn!(object = %key, error = %note, "resource refused");
                            if *self.leader.borrow() {
                                let recorder = self.recorder.clone();
                                let reference = obj.object_ref(&ar);
                                let event = Event {
                                    type_: EventType::Warning,
                                    reason: "InvalidSpec".into(),
                                    note: Some(note.chars().take(1000).collect()),
                                    action: "Validate".into(),
                                    secondary: None,
                                };
                                tokio::spawn(async move {
                                    if let Err(e) = recorder.publish(&event, &reference).await {
                                        tracing::warn!(error = %e, "cannot write an Event");
                                    }
                                });
                            }
                        }
                        reported.insert(id);
                        d.errors.push(SourceError {
                            file: key.to_string(),
                            message: note,
                        });
                    }
                }
            }
        }
        self.last_valid.retain(|k, _| seen.contains(k));
        self.reported = reported;
        let mut services = BTreeMap::new();
        for svc in stores.services.state() {
            services.insert(
                (svc.namespace().unwrap_or_default(), svc.name_any()),
                service_info(&svc),
            );
        }
        d.services = Some(services);
        d
    }
}

fn service_info(svc: &Service) -> ServiceInfo {
    let spec = svc.spec.as_ref();
    let cluster_ip = spec
        .filter(|s| s.type_.as_deref() != Some("ExternalName"))
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None");
    let labels = svc.labels();
    let import_owner = (labels.get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE))
        .then(|| {
            Some((
                labels.get(IMPORT_NAMESPACE_LABEL)?.clone(),
                labels.get(IMPORT_NAME_LABEL)?.clone(),
            ))
        })
        .flatten();
    ServiceInfo {
        cluster_ip,
        import_owner,
    }
}

/// A pod's client attributes, unless it shares its node's address (host network)
/// or has finished (its address may already be another pod's).
fn pod_entry(pod: &Pod) -> Option<(String, crate::pods::Pod)> {
    let uid = pod.uid()?;
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed"))
    {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return None;
    }
    Some((
        uid,
        crate::pods::Pod {
            ips,
            namespace: pod.namespace().unwrap_or_default(),
            service_account: spec.service_account_name.clone().unwrap_or_default(),
            labels: pod.labels().clone(),
        },
    ))
}

async fn watch_pods(api: Api<Pod>, core: Arc<Core>, ready: watch::Sender<bool>) {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures_util::pin_mut!(stream);
    let mut fresh: Vec<(String, crate::pods::Pod)> = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => fresh.clear(),
            Ok(watcher::Event::InitApply(p)) => fresh.extend(pod_entry(&p)),
            Ok(watcher::Event::InitDone) => {
                core.pods.replace(std::mem::take(&mut fresh));
                ready.send_replace(true);
            }
            Ok(watcher::Event::Apply(p)) => match pod_entry(&p) {
                Some((uid, pod)) => core.pods.upsert(&uid, pod),
                None => core.pods.remove(&p.uid().unwrap_or_default()),
            },
            Ok(watcher::Event::Delete(p)) => core.pods.remove(&p.uid().unwrap_or_default()),
            Err(e) => tracing::warn!(watch = "Pod", error = %e, "watch failed; retrying"),
        }
    }
}
