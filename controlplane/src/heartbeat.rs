//! Peer health: one monitor task per Peer, following ClusterLink's state machine
//! (spec 3.6): every 1 s while healthy and 10 s while unhealthy; 5 failures make a
//! reachable peer unreachable, 3 successes the other way; a single result decides
//! right after a monitor starts. A heartbeat succeeds only on 200 with a valid
//! `ClusterLinkPeerLabels` header. Peer labels and the peer's tunnel protocols (from
//! our gateway's `clusterlink-tunnel-protocols` header) are refreshed on every
//! success. A deleted or changed Peer stops its old monitor.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use controlplane_api::v1;
use tokio::task::JoinHandle;

use fabric::clock::now_rfc3339;
use fabric::names::host_port;
use fabric::wire::{HEALTHZ_PATH, PEER_LABELS_HEADER};

use crate::core::{Core, PeerHealth};
use crate::peerclient::{PeerClient, Response};
use crate::resources::{Kind, Resource};

pub const HEALTHY_INTERVAL: Duration = Duration::from_secs(1);
pub const UNHEALTHY_INTERVAL: Duration = Duration::from_secs(10);
pub const SUCCESSES_TO_REACHABLE: u32 = 3;
pub const FAILURES_TO_UNREACHABLE: u32 = 5;

/// Labels from a heartbeat answer, or why it does not count as a success.
pub fn parse_labels(resp: &Response) -> Result<Option<BTreeMap<String, String>>, String> {
    let raw = resp
        .headers
        .get(PEER_LABELS_HEADER)
        .ok_or("no ClusterLinkPeerLabels header")?;
    let json = B64
        .decode(raw.as_bytes())
        .map_err(|e| format!("ClusterLinkPeerLabels is not base64: {e}"))?;
    serde_json::from_slice::<Option<BTreeMap<String, String>>>(&json)
        .map_err(|e| format!("ClusterLinkPeerLabels is not a JSON map of strings: {e}"))
}

fn protocol_of(resp: &Response) -> i32 {
    let h2 = resp
        .headers
        .get(fabric::wire::PROTOCOLS_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "h2"));
    if h2 {
        v1::TunnelProtocol::Http2 as i32
    } else {
        v1::TunnelProtocol::Http1 as i32
    }
}

/// Runs one monitor until aborted.
async fn monitor(core: Arc<Core>, client: PeerClient, peer: String, gateways: Vec<String>) {
    let mut reachable = core.health(&peer).reachable == Some(true);
    let mut strikes = 0u32;
    let mut threshold = 1u32;
    let mut period = HEALTHY_INTERVAL;
    loop {
        let result = client
            .call(
                &peer,
                &gateways,
                http::Method::GET,
                HEALTHZ_PATH,
                Bytes::new(),
            )
            .await;
        let (ok, labels, protocol) = match &result {
            Ok(resp) => match parse_labels(resp) {
                Ok(l) => (true, l, protocol_of(resp)),
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "heartbeat answer refused");
                    (false, None, 0)
                }
            },
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "heartbeat failed");
                (false, None, 0)
            }
        };
        if ok {
            // Labels and capability are kept fresh on every success (ClusterLink only
            // refreshed them on transitions).
            let mut h = core.health(&peer);
            if h.reachable == Some(true) && (h.labels != labels || h.protocol != protocol) {
                h.labels = labels.clone();
                h.protocol = protocol;
                core.set_health(&peer, h);
            }
        }
        if ok == reachable {
            strikes = 0;
            if !reachable {
                period = UNHEALTHY_INTERVAL;
            }
        } else {
            strikes += 1;
            if ok {
                period = HEALTHY_INTERVAL;
            }
        }
        if strikes >= threshold {
            if ok {
                threshold = FAILURES_TO_UNREACHABLE;
            } else {
                threshold = SUCCESSES_TO_REACHABLE;
                period = UNHEALTHY_INTERVAL;
            }
            strikes = 0;
            reachable = ok;
            tracing::info!(peer = %peer, reachable, "Peer reachable status changed to: {reachable}");
            let old = core.health(&peer);
            core.set_health(
                &peer,
                PeerHealth {
                    reachable: Some(ok),
                    since: now_rfc3339(),
                    labels: if ok { labels } else { None },
                    // The capability learned stays known while the peer is away.
                    protocol: if ok { protocol } else { old.protocol },
                },
            );
        }
        tokio::time::sleep(period).await;
    }
}

/// Keeps one monitor per Peer in step with the resources in force.
pub struct Monitors {
    core: Arc<Core>,
    client: PeerClient,
    running: HashMap<String, (Vec<String>, JoinHandle<()>)>,
}

impl Monitors {
    pub fn new(core: Arc<Core>, client: PeerClient) -> Self {
        Monitors {
            core,
            client,
            running: HashMap::new(),
        }
    }

    /// Starts monitors for new Peers, restarts those whose gateways changed, stops
    /// those of deleted Peers (and forgets their status).
    pub fn reconcile(&mut self) {
        let wanted: HashMap<String, Vec<String>> = self.core.with_desired(|d, _| {
            d.resources
                .iter()
                .filter(|(k, _)| k.kind == Kind::Peer)
                .filter_map(|(k, r)| match r {
                    Resource::Peer(p) => Some((
                        k.name.clone(),
                        p.spec
                            .gateways
                            .iter()
                            .map(|g| host_port(&g.host, g.port))
                            .collect(),
                    )),
                    _ => None,
                })
                .collect()
        });
        self.running.retain(|name, (gws, task)| {
            let keep = wanted.get(name) == Some(gws);
            if !keep {
                task.abort();
                if !wanted.contains_key(name) {
                    self.core.forget_health(name);
                }
            }
            keep
        });
        for (name, gws) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            let task = tokio::spawn(monitor(
                self.core.clone(),
                self.client.clone(),
                name.clone(),
                gws.clone(),
            ));
            self.running.insert(name, (gws, task));
        }
    }

    pub fn count(&self) -> usize {
        self.running.len()
    }
}

impl Drop for Monitors {
    fn drop(&mut self) {
        for (_, (_, t)) in self.running.drain() {
            t.abort();
        }
    }
}
