//! The leader's writer: on every change of the resources, of what the heartbeats
//! found, or of leadership (and every few seconds, for writes that failed), it
//! allocates import target ports and keeps the import Services (`imports`), then
//! writes the status of Peers, Exports and Imports through the status subresource:
//! only when it differs, keeping `lastTransitionTime` while a condition's status
//! holds, with `observedGeneration`. A replica that is not the leader writes nothing.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{DynamicObject, Patch, PatchParams};
use kube::ResourceExt as _;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::source::{api_resource, Stores};
use super::{imports, Kube, FIELD_MANAGER};
use crate::core::Core;
use crate::resources::{Key, Kind};

/// How often the writer runs without a trigger (retries failed writes).
const RESYNC: Duration = Duration::from_secs(5);

pub async fn run(
    kube: Arc<Kube>,
    core: Arc<Core>,
    stores: Stores,
    mut desired: watch::Receiver<Arc<crate::store::Desired>>,
    mut leader: watch::Receiver<bool>,
) {
    let mut snapshots = core.subscribe_snapshots();
    let mut allocator = imports::Allocator::default();
    loop {
        if *leader.borrow_and_update() {
            let d = desired.borrow_and_update().clone();
            allocator.run(&kube, &stores, &d).await;
            imports::reconcile_services(&kube, &core, &stores, &d, &leader).await;
            write_statuses(&kube, &core, &stores, &leader).await;
        }
        tokio::select! {
            r = desired.changed() => if r.is_err() { return },
            r = snapshots.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RESYNC) => {}
        }
        // Let a burst settle.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `want`'s conditions keep the `lastTransitionTime` of `have`'s condition of the
/// same type while its status is unchanged, and carry `observedGeneration`.
fn merge_conditions(want: &mut Value, have: &Value, generation: Option<i64>) {
    let Some(conds) = want.get_mut("conditions").and_then(Value::as_array_mut) else {
        return;
    };
    let old = have.get("conditions").and_then(Value::as_array);
    for c in conds.iter_mut() {
        let same = old.and_then(|o| {
            o.iter()
                .find(|h| h.get("type") == c.get("type") && h.get("status") == c.get("status"))
        });
        if let Some(time) = same.and_then(|h| h.get("lastTransitionTime")) {
            c["lastTransitionTime"] = time.clone();
        }
        if let Some(g) = generation {
            c["observedGeneration"] = g.into();
        }
    }
}

async fn write_statuses(kube: &Kube, core: &Core, stores: &Stores, leader: &watch::Receiver<bool>) {
    for kind in [Kind::Peer, Kind::Export, Kind::Import] {
        for obj in stores.of(kind).state() {
            if !*leader.borrow() {
                return;
            }
            let namespace = obj.namespace().unwrap_or_default();
            let key = Key {
                kind,
                namespace: if kind.namespaced() {
                    namespace.clone()
                } else {
                    String::new()
                },
                name: obj.name_any(),
            };
            // An object refused by validation keeps the status of its last valid
            // version (what is in force), or none.
            let Some(mut view) = core.object(&key) else {
                continue;
            };
            let mut want = view["status"].take();
            if want.is_null() {
                continue;
            }
            let have = obj.data.get("status").cloned().unwrap_or(Value::Null);
            merge_conditions(&mut want, &have, obj.metadata.generation);
            if same_status(&want, &have) {
                continue;
            }
            // All three kinds are namespaced objects (a Peer's key has no namespace
            // only because its name alone is the remote's identity).
            let body = json!({
                "apiVersion": crate::resources::API_VERSION,
                "kind": kind.name(),
                "metadata": { "name": key.name, "namespace": namespace },
                "status": want,
            });
            let api = kube::Api::<DynamicObject>::namespaced_with(
                kube.client.clone(),
                &namespace,
                &api_resource(kind),
            );
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch_status(&key.name, &params, &Patch::Apply(&body))
                .await
            {
                Ok(_) => tracing::debug!(object = %key, "status written"),
                Err(e) => tracing::warn!(object = %key, error = %e, "cannot write status"),
            }
        }
    }
}

/// Equal as far as we write them (an empty list or map is the same as none).
fn same_status(want: &Value, have: &Value) -> bool {
    let norm = |v: &Value, field: &str| -> Value {
        match v.get(field) {
            Some(Value::Array(a)) if a.is_empty() => Value::Null,
            Some(x) => x.clone(),
            None => Value::Null,
        }
    };
    norm(want, "conditions") == norm(have, "conditions")
        && norm(want, "labels") == norm(have, "labels")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_holds_while_status_holds() {
        let have = json!({"conditions": [{"type": "ExportValid", "status": "True", "reason": "Verified", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let mut want = json!({"conditions": [{"type": "ExportValid", "status": "True", "reason": "Verified", "message": "", "lastTransitionTime": "2026-12-02T00:00:00Z"}]});
        merge_conditions(&mut want, &have, Some(3));
        assert_eq!(
            want["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(want["conditions"][0]["observedGeneration"], 3);
        assert!(!same_status(&want, &have), "observedGeneration is new");
        let mut flipped = json!({"conditions": [{"type": "ExportValid", "status": "False", "reason": "Error", "message": "x", "lastTransitionTime": "2026-12-02T00:00:00Z"}]});
        merge_conditions(&mut flipped, &have, None);
        assert_eq!(
            flipped["conditions"][0]["lastTransitionTime"],
            "2026-12-02T00:00:00Z"
        );
        assert!(same_status(&json!({"conditions": []}), &json!({})));
    }
}
