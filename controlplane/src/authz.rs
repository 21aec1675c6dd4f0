//! Authorization. Egress (importing side): for every new connection to an import,
//! pick a source by the import's load-balancing scheme (unreachable peers last, any
//! failure moves on), check local policy in the import's namespace, and get an
//! access token from the remote peer (`POST /authz`), cached per (peer, export,
//! source attributes) until shortly before it expires and dropped on any policy or
//! Peer change. Ingress (exporting side): answer `POST /authz` and `GET /healthz`.
//! Fixes over ClusterLink: the requester's peer name is its mTLS identity, never its
//! claim; a certificate that matches no Peer is refused; an invalid export is never
//! authorized; tokens name the requesting peer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use controlplane_api::v1;
use fabric::names::host_port;
use fabric::sync::lock;
use fabric::wire::{
    AUTHZ_PATH, HEALTHZ_PATH, PEER_LABELS_HEADER, TOKEN_EXPIRES_HEADER, TOKEN_HEADER,
};
use serde::{Deserialize, Serialize};

use crate::core::Core;
use crate::lb;
use crate::pdp;
use crate::peerclient::PeerClient;
use crate::resources::{Key, Kind, Resource};
use crate::selector::Attrs;

/// Lifetime of tokens we mint. Longer than ClusterLink's 5 s so importers can cache
/// them; the policy epoch revokes them early when policy or peers change.
pub const TOKEN_TTL_SECS: u64 = 60;
/// A cached token is used only while it has at least this long to live.
const TOKEN_MARGIN_SECS: u64 = 5;
/// Assumed lifetime of a token from a peer that does not say (ClusterLink: 5 s).
const DEFAULT_REMOTE_TTL_SECS: u64 = 5;
/// How long a peer that just failed (a data plane could not open a tunnel to it, or
/// its `/authz` could not be reached) is put last, as if heartbeats had found it
/// unreachable: about as long as heartbeats take to confirm it.
pub const SUSPECT_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Body of `POST /authz` (Go field names, no JSON tags, as ClusterLink sends it).
#[derive(Debug, Serialize, Deserialize)]
pub struct AuthzRequest {
    #[serde(rename = "ServiceName")]
    pub service_name: String,
    #[serde(rename = "ServiceNamespace")]
    pub service_namespace: String,
    #[serde(rename = "SrcAttributes", default)]
    pub src_attributes: Option<BTreeMap<String, String>>,
}

#[derive(Clone)]
struct Cached {
    token: String,
    expires: u64,
}

pub struct Authz {
    core: Arc<Core>,
    client: PeerClient,
    /// POST /authz calls to remote peers, by peer and result (ok, refused, error).
    pub remote_calls: prometheus::IntCounterVec,
    /// Egress decisions answered from the token cache.
    pub cache_hits: prometheus::IntCounter,
    counters: lb::Counters,
    cache: Mutex<HashMap<String, Cached>>,
    cache_epoch: Mutex<u64>,
    /// Peers that just failed, until when they are put last.
    suspects: Mutex<HashMap<String, std::time::Instant>>,
}

fn deny(reason: impl Into<String>) -> v1::EgressResponse {
    v1::EgressResponse {
        allowed: false,
        reason: reason.into(),
        ..Default::default()
    }
}

impl Authz {
    pub fn new(core: Arc<Core>, client: PeerClient) -> Self {
        Authz {
            core,
            client,
            remote_calls: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "clusterlink_peer_authorization_requests_total",
                    "POST /authz calls to remote peers, by result",
                ),
                &["peer", "result"],
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            cache_hits: prometheus::IntCounter::new(
                "clusterlink_token_cache_hits_total",
                "Egress authorizations answered with a cached access token",
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            counters: lb::Counters::new(),
            cache: Mutex::new(HashMap::new()),
            cache_epoch: Mutex::new(0),
            suspects: Mutex::new(HashMap::new()),
        }
    }

    /// Puts `peer` last for `SUSPECT_FOR`.
    fn suspect(&self, peer: &str) {
        let now = std::time::Instant::now();
        let mut s = lock(&self.suspects);
        s.retain(|_, until| *until > now);
        s.insert(peer.to_owned(), now + SUSPECT_FOR);
    }

    fn is_suspect(&self, peer: &str) -> bool {
        lock(&self.suspects)
            .get(peer)
            .is_some_and(|until| *until > std::time::Instant::now())
    }

    /// Local source attributes: this peer's name and labels, and on Kubernetes those
    /// of the client pod at `client_ip` (outside Kubernetes there are no pods).
    fn source_attrs(&self, local: &str, client_ip: &str) -> Attrs {
        let mut a = client_ip
            .parse()
            .ok()
            .and_then(|ip| self.core.pods.attributes(ip))
            .unwrap_or_default();
        a.insert(pdp::PEER_NAME.into(), local.to_owned());
        for (k, v) in &self.core.local_labels {
            a.insert(format!("{}{k}", pdp::PEER_LABELS_PREFIX), v.clone());
        }
        a
    }

    /// Drops every cached token when policies or Peers changed since it was cached.
    fn cache_guard(&self) {
        let now = *self.core.changes.borrow();
        let mut seen = lock(&self.cache_epoch);
        if *seen != now {
            lock(&self.cache).clear();
            *seen = now;
        }
    }

    pub async fn egress(&self, local: &str, req: v1::EgressRequest) -> v1::EgressResponse {
        tracing::debug!(import = %format!("{}/{}", req.import_namespace, req.import_name), client = %req.client_ip, "egress authorization request");
        self.cache_guard();
        if !req.rejected_token.is_empty() {
            lock(&self.cache).retain(|_, c| c.token != req.rejected_token);
        }
        if !req.failed_peer.is_empty() {
            tracing::info!(peer = %req.failed_peer, "the data plane could not open a tunnel to this peer; putting it last");
            self.suspect(&req.failed_peer);
        }
        let key = Key {
            kind: Kind::Import,
            namespace: req.import_namespace.clone(),
            name: req.import_name.clone(),
        };
        let import = self.core.with_desired(|d, _| match d.resources.get(&key) {
            Some(Resource::Import(o)) => Some(o.clone()),
            _ => None,
        });
        let Some(import) = import else {
            return deny(format!("import '{}/{}' not found", key.namespace, key.name));
        };
        if !self.core.is_valid(&key) {
            return deny(format!(
                "import '{}/{}' is not valid",
                key.namespace, key.name
            ));
        }
        let Some(scheme) = import.spec.scheme() else {
            return deny("unknown lbScheme");
        };
        let src = self.source_attrs(local, &req.client_ip);
        // Where pods are tracked (Kubernetes), a client's attributes change with no new
        // snapshot (a pod relabelled, an address reused), so data planes must ask again
        // for every connection; the token cache below keeps that cheap.
        let reusable = self.core.with_desired(|d, _| d.namespace.is_none());
        let sources = &import.spec.sources;
        let mut cursor = self.counters.cursor(
            &format!("{}/{}", key.namespace, key.name),
            scheme,
            sources.len(),
        );
        let mut why = Vec::new();
        loop {
            let idx = match cursor.select() {
                Ok(i) => i,
                Err(e) => {
                    let detail = if why.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", why.join("; "))
                    };
                    return deny(format!("cannot select import source: {e}{detail}"));
                }
            };
            let Some(source) = sources.get(idx) else {
                continue;
            };
            let export_name = if source.export_name.is_empty() {
                &key.name
            } else {
                &source.export_name
            };
            let export_ns = if source.export_namespace.is_empty() {
                &key.namespace
            } else {
                &source.export_namespace
            };
            // Any failure moves on to the next source (ClusterLink aborts on a missing Peer).
            let peer = self.core.with_desired(|d, _| {
                match d.resources.get(&Key {
                    kind: Kind::Peer,
                    namespace: String::new(),
                    name: source.peer.clone(),
                }) {
                    Some(Resource::Peer(p)) => Some(
                        p.spec
                            .gateways
                            .iter()
                            .map(|g| host_port(&g.host, g.port))
                            .collect::<Vec<_>>(),
                    ),
                    _ => None,
                }
            });
            let Some(gateways) = peer else {
                why.push(format!("peer {} is not defined", source.peer));
                continue;
            };
            let health = self.core.health(&source.peer);
            let reachable = health.reachable == Some(true) && !self.is_suspect(&source.peer);
            if !reachable && !cursor.is_delayed() {
                cursor.delay();
                continue;
            }
            let mut dst = Attrs::new();
            dst.insert(pdp::EXPORT_NAME.into(), export_name.clone());
            dst.insert(pdp::EXPORT_NAMESPACE.into(), export_ns.clone());
            dst.insert(pdp::PEER_NAME.into(), source.peer.clone());
            let import_labels = self.core.with_desired(|d, _| {
                d.resources
                    .get(&key)
                    .map(|r| r.metadata().labels.clone())
                    .unwrap_or_default()
            });
            for (k, v) in import_labels {
                dst.insert(format!("{}{k}", pdp::EXPORT_LABELS_PREFIX), v);
            }
            for (k, v) in health.labels.clone().unwrap_or_default() {
                dst.insert(format!("{}{k}", pdp::PEER_LABELS_PREFIX), v);
            }
            let decision = self
                .core
                .with_desired(|_, p| p.decide(&src, &dst, &key.namespace));
            if !decision.allowed {
                tracing::info!(import = %key, peer = %source.peer, policy = %decision.policy, "egress denied by policy");
                why.push(format!("denied by {} for {}", decision.policy, source.peer));
                continue;
            }
            let cache_key = format!(
                "{}|{export_ns}|{export_name}|{}",
                source.peer,
                serde_json::to_string(&src).unwrap_or_default()
            );
            let now = fabric::clock::unix_secs();
            if let Some(c) = lock(&self.cache)
                .get(&cache_key)
                .filter(|c| c.expires > now + TOKEN_MARGIN_SECS)
                .cloned()
            {
                self.cache_hits.inc();
                return allow(&source.peer, c, reusable);
            }
            let body = AuthzRequest {
                service_name: export_name.clone(),
                service_namespace: export_ns.clone(),
                src_attributes: Some(src.clone()),
            };
            let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
            match self
                .client
                .call(
                    &source.peer,
                    &gateways,
                    http::Method::POST,
                    AUTHZ_PATH,
                    body,
                )
                .await
            {
                Ok(resp) => {
                    self.remote_calls
                        .with_label_values(&[&source.peer, "ok"])
                        .inc();
                    let Some(token) = resp
                        .headers
                        .get(TOKEN_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                    else {
                        why.push(format!("{} answered /authz without a token", source.peer));
                        continue;
                    };
                    let expires = resp
                        .headers
                        .get(TOKEN_EXPIRES_HEADER)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(now + DEFAULT_REMOTE_TTL_SECS);
                    let c = Cached { token, expires };
                    lock(&self.cache).insert(cache_key, c.clone());
                    return allow(&source.peer, c, reusable);
                }
                Err(e) => {
                    let result = if matches!(e, crate::peerclient::Error::Status { .. }) {
                        "refused"
                    } else {
                        // Not reached: the next requests try it last.
                        self.suspect(&source.peer);
                        "error"
                    };
                    self.remote_calls
                        .with_label_values(&[&source.peer, result])
                        .inc();
                    tracing::info!(import = %key, peer = %source.peer, error = %e, "authorization by the remote peer failed");
                    why.push(e.to_string());
                }
            }
        }
    }

    /// Answers a request a remote peer made on our gateway.
    pub fn peer_request(&self, local: &str, req: v1::PeerHttpRequest) -> v1::PeerHttpResponse {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", HEALTHZ_PATH) => {
                let labels = if self.core.local_labels.is_empty() {
                    "null".to_owned()
                } else {
                    serde_json::to_string(&self.core.local_labels).unwrap_or_else(|_| "{}".into())
                };
                v1::PeerHttpResponse {
                    status: 200,
                    headers: vec![v1::Header {
                        name: PEER_LABELS_HEADER.into(),
                        value: B64.encode(labels).into_bytes(),
                    }],
                    body: Vec::new(),
                }
            }
            ("POST", AUTHZ_PATH) => self.ingress(local, &req),
            _ => text(404, format!("no route for {} {}", req.method, req.path)),
        }
    }

    fn ingress(&self, local: &str, req: &v1::PeerHttpRequest) -> v1::PeerHttpResponse {
        let identity = req.peer_identity.as_str();
        let known = self.core.with_desired(|d, _| {
            d.resources.contains_key(&Key {
                kind: Kind::Peer,
                namespace: String::new(),
                name: identity.to_owned(),
            })
        });
        if !known {
            tracing::warn!(
                peer = identity,
                "authorization request from a certificate that matches no Peer"
            );
            return text(403, format!("Peer '{identity}' is not known here."));
        }
        let body: AuthzRequest = match serde_json::from_slice(&req.body) {
            Ok(b) => b,
            Err(e) => return text(400, format!("bad authorization request: {e}")),
        };
        let ns = body.service_namespace.as_str();
        let name = body.service_name.as_str();
        let key = Key {
            kind: Kind::Export,
            namespace: ns.to_owned(),
            name: name.to_owned(),
        };
        let export_labels = self.core.with_desired(|d, _| match d.resources.get(&key) {
            Some(Resource::Export(o)) => Some(o.metadata.labels.clone()),
            _ => None,
        });
        let Some(export_labels) = export_labels.filter(|_| self.core.is_valid(&key)) else {
            return text(404, format!("Exported service '{ns}/{name}' not found."));
        };
        // The requester is who its certificate says, and its peer labels are those this
        // peer learned from its heartbeats (the Peer's status.labels), whatever the
        // request claims; the client attributes in the request stay the importing
        // peer's claims about its own clients.
        let mut src: Attrs = body
            .src_attributes
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !k.starts_with(pdp::PEER_PREFIX))
            .collect();
        src.insert(pdp::PEER_NAME.into(), identity.to_owned());
        for (k, v) in self.core.health(identity).labels.unwrap_or_default() {
            src.insert(format!("{}{k}", pdp::PEER_LABELS_PREFIX), v);
        }
        let mut dst = Attrs::new();
        dst.insert(pdp::EXPORT_NAME.into(), name.to_owned());
        dst.insert(pdp::EXPORT_NAMESPACE.into(), ns.to_owned());
        dst.insert(pdp::PEER_NAME.into(), local.to_owned());
        for (k, v) in export_labels {
            dst.insert(format!("{}{k}", pdp::EXPORT_LABELS_PREFIX), v);
        }
        for (k, v) in &self.core.local_labels {
            dst.insert(format!("{}{k}", pdp::PEER_LABELS_PREFIX), v.clone());
        }
        let decision = self.core.with_desired(|_, p| p.decide(&src, &dst, ns));
        if !decision.allowed {
            tracing::info!(peer = identity, export = %format!("{ns}/{name}"), policy = %decision.policy, "ingress denied");
            return text(403, format!("Permission denied for '{ns}/{name}'."));
        }
        let expires = fabric::clock::unix_secs() + TOKEN_TTL_SECS;
        let token = fabric::token::mint(
            &self.core.token_key(),
            &fabric::token::Claims {
                iss: local.to_owned(),
                aud: identity.to_owned(),
                export_namespace: ns.to_owned(),
                export_name: name.to_owned(),
                exp: expires,
                epoch: self.core.epoch(),
            },
        );
        v1::PeerHttpResponse {
            status: 200,
            headers: vec![
                v1::Header {
                    name: TOKEN_HEADER.into(),
                    value: token.into_bytes(),
                },
                v1::Header {
                    name: TOKEN_EXPIRES_HEADER.into(),
                    value: expires.to_string().into_bytes(),
                },
            ],
            body: Vec::new(),
        }
    }
}

/// An allowed answer; `reusable` as the API says (false where pods are tracked).
fn allow(peer: &str, c: Cached, reusable: bool) -> v1::EgressResponse {
    v1::EgressResponse {
        allowed: true,
        reason: String::new(),
        peer: peer.to_owned(),
        access_token: c.token,
        expires_unix_ms: (c.expires as i64).saturating_mul(1000),
        reusable,
    }
}

fn text(status: u32, body: String) -> v1::PeerHttpResponse {
    v1::PeerHttpResponse {
        status,
        headers: vec![v1::Header {
            name: "content-type".into(),
            value: b"text/plain".to_vec(),
        }],
        body: body.into_bytes(),
    }
}
