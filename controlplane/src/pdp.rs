//! The policy decision point: the access policies in force and the allow/deny
//! decision for one connection (source attributes, destination attributes, the
//! namespace of the Import or Export). Two tiers, privileged (PrivilegedAccessPolicy,
//! by name) above regular (AccessPolicy, by namespace/name), deny before allow in
//! each, default deny. Plain data with no locks and no I/O: the owner decides how to
//! share it (e.g. copy, update and swap in a new `Pdp`).

use std::collections::BTreeMap;

use crate::resources::{AccessPolicySpec, WorkloadSetOrSelector};
use crate::selector;
pub use crate::selector::Attrs;

/// Source: the peer's name (also a destination attribute: the exporting peer).
pub const PEER_NAME: &str = "peer.clusterlink.net/name";
/// Every peer attribute starts so: on the exporting side, this peer sets them from
/// what it knows of the requester, never from the request.
pub const PEER_PREFIX: &str = "peer.clusterlink.net/";
/// Prefix of the peer's labels (`--peer-label`s, or `Peer.status.labels`).
pub const PEER_LABELS_PREFIX: &str = "peer.clusterlink.net/labels.";
/// Source: the client pod's namespace.
pub const CLIENT_NAMESPACE: &str = "client.clusterlink.net/namespace";
/// Source: the client pod's service account.
pub const CLIENT_SA: &str = "client.clusterlink.net/service-account";
/// Prefix of the client pod's labels.
pub const CLIENT_LABELS_PREFIX: &str = "client.clusterlink.net/labels.";
/// Destination: the exported service's name.
pub const EXPORT_NAME: &str = "export.clusterlink.net/name";
/// Destination: the exported service's namespace.
pub const EXPORT_NAMESPACE: &str = "export.clusterlink.net/namespace";
/// Prefix of the Export's labels (the Import's labels on the importing side).
pub const EXPORT_LABELS_PREFIX: &str = "export.clusterlink.net/labels.";

/// What [`Decision::policy`] says when no policy matched.
pub const DEFAULT_DENY: &str = "<default deny>";

pub const ACTION_ALLOW: &str = "allow";
pub const ACTION_DENY: &str = "deny";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("spec.action: unsupported policy action {0:?} (want allow or deny)")]
    Action(String),
    #[error("{0}: must list at least one workload selector")]
    Empty(&'static str),
    #[error("{0}: exactly one of workloadSets or workloadSelector must be set")]
    NotExactlyOne(String),
    #[error("{0}.workloadSets: workload sets are not yet supported")]
    WorkloadSets(String),
    /// The selector's reason is part of the message (not a `source`), so that error
    /// chains print it once.
    #[error("{at}.workloadSelector: {reason}")]
    Selector { at: String, reason: selector::Error },
}

/// The outcome for one connection. `policy` and `privileged` are for logs only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `ns/name` (regular), `/name` (privileged) or [`DEFAULT_DENY`].
    pub policy: String,
    pub privileged: bool,
}

/// Policy key: (namespace, name); the namespace is empty in the privileged tier.
type PolicyKey = (String, String);

/// One tier. A name lives in at most one of the two maps.
#[derive(Debug, Clone, Default)]
struct Tier {
    deny: BTreeMap<PolicyKey, AccessPolicySpec>,
    allow: BTreeMap<PolicyKey, AccessPolicySpec>,
}

impl Tier {
    /// Inserts or replaces; returns the version it replaced.
    fn insert(&mut self, key: PolicyKey, spec: &AccessPolicySpec) -> Option<AccessPolicySpec> {
        let old = self.remove(&key);
        let map = if spec.action == ACTION_DENY {
            &mut self.deny
        } else {
            &mut self.allow
        };
        map.insert(key, spec.clone());
        old
    }

    fn remove(&mut self, key: &PolicyKey) -> Option<AccessPolicySpec> {
        // Both maps, always: a name must never survive in either.
        let deny = self.deny.remove(key);
        let allow = self.allow.remove(key);
        deny.or(allow)
    }

    fn len(&self) -> usize {
        self.deny.len() + self.allow.len()
    }
}

/// Whether a policy looks at the client: some `from` selector is not empty.
fn reads_client_attrs(spec: &AccessPolicySpec) -> bool {
    spec.from
        .iter()
        .any(|w| w.workload_selector.as_ref().is_some_and(|s| !s.is_empty()))
}

/// The first policy of `map` in `namespace` (in name order) that matches.
fn first_match<'a>(
    map: &'a BTreeMap<PolicyKey, AccessPolicySpec>,
    namespace: &str,
    src: &Attrs,
    dst: &Attrs,
) -> Option<&'a PolicyKey> {
    map.range((namespace.to_owned(), String::new())..)
        .take_while(|((ns, _), _)| ns == namespace)
        .find(|(_, spec)| policy_matches(spec, src, dst))
        .map(|(key, _)| key)
}

/// A policy matches iff the source matches any `from` element and the destination
/// matches any `to` element.
fn policy_matches(spec: &AccessPolicySpec, src: &Attrs, dst: &Attrs) -> bool {
    spec.from.iter().any(|w| element_matches(w, src))
        && spec.to.iter().any(|w| element_matches(w, dst))
}

/// Only selectors take part; workload sets are refused at validation, and an element
/// without a selector selects nothing (as a nil selector does in Kubernetes).
fn element_matches(w: &WorkloadSetOrSelector, attrs: &Attrs) -> bool {
    w.workload_selector
        .as_ref()
        .is_some_and(|s| s.matches(attrs))
}

/// ClusterLink's validation of a policy spec, in its order: action, `from`, `to`.
pub fn validate(spec: &AccessPolicySpec) -> Result<(), Error> {
    if spec.action != ACTION_ALLOW && spec.action != ACTION_DENY {
        return Err(Error::Action(spec.action.clone()));
    }
    for (field, list) in [("spec.from", &spec.from), ("spec.to", &spec.to)] {
        if list.is_empty() {
            return Err(Error::Empty(field));
        }
        for (i, w) in list.iter().enumerate() {
            let at = format!("{field}[{i}]");
            match (&w.workload_selector, w.workload_sets.is_empty()) {
                (Some(sel), true) => sel
                    .validate()
                    .map_err(|reason| Error::Selector { at, reason })?,
                (None, false) => return Err(Error::WorkloadSets(at)),
                _ => return Err(Error::NotExactlyOne(at)),
            }
        }
    }
    Ok(())
}

/// The policies in force.
#[derive(Debug, Clone, Default)]
pub struct Pdp {
    privileged: Tier,
    regular: Tier,
    /// How many policies [`reads_client_attrs`]. Asked on every connection, so kept
    /// up to date on each change instead of recomputed.
    client_dependent: usize,
}

impl Pdp {
    pub fn new() -> Pdp {
        Pdp::default()
    }

    /// Adds or replaces the PrivilegedAccessPolicy `name` (also when its action
    /// changes). An invalid spec leaves the previous version in force.
    pub fn set_privileged(&mut self, name: &str, spec: &AccessPolicySpec) -> Result<(), Error> {
        validate(spec)?;
        let old = self
            .privileged
            .insert((String::new(), name.to_owned()), spec);
        self.account(old.as_ref(), Some(spec));
        Ok(())
    }

    /// Adds or replaces the AccessPolicy `namespace/name` (also when its action
    /// changes). An invalid spec leaves the previous version in force.
    pub fn set(
        &mut self,
        namespace: &str,
        name: &str,
        spec: &AccessPolicySpec,
    ) -> Result<(), Error> {
        validate(spec)?;
        let old = self
            .regular
            .insert((namespace.to_owned(), name.to_owned()), spec);
        self.account(old.as_ref(), Some(spec));
        Ok(())
    }

    /// Removes the PrivilegedAccessPolicy `name`; false if there was none.
    pub fn remove_privileged(&mut self, name: &str) -> bool {
        let old = self.privileged.remove(&(String::new(), name.to_owned()));
        self.account(old.as_ref(), None);
        old.is_some()
    }

    /// Removes the AccessPolicy `namespace/name`; false if there was none.
    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        let old = self
            .regular
            .remove(&(namespace.to_owned(), name.to_owned()));
        self.account(old.as_ref(), None);
        old.is_some()
    }

    fn account(&mut self, old: Option<&AccessPolicySpec>, new: Option<&AccessPolicySpec>) {
        if old.is_some_and(reads_client_attrs) {
            self.client_dependent -= 1;
        }
        if new.is_some_and(reads_client_attrs) {
            self.client_dependent += 1;
        }
    }

    /// Number of policies in force (both tiers).
    pub fn len(&self) -> usize {
        self.privileged.len() + self.regular.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The decision for a connection from `src` to `dst`, where `namespace` is the
    /// Import's namespace (egress) or the Export's (ingress). Order: privileged deny,
    /// privileged allow, regular deny in `namespace`, regular allow in `namespace`,
    /// default deny. Within a map, policies are tried in name order.
    pub fn decide(&self, src: &Attrs, dst: &Attrs, namespace: &str) -> Decision {
        let steps = [
            (&self.privileged.deny, "", false, true),
            (&self.privileged.allow, "", true, true),
            (&self.regular.deny, namespace, false, false),
            (&self.regular.allow, namespace, true, false),
        ];
        for (map, ns, allowed, privileged) in steps {
            if let Some((ns, name)) = first_match(map, ns, src, dst) {
                return Decision {
                    allowed,
                    policy: format!("{ns}/{name}"),
                    privileged,
                };
            }
        }
        Decision {
            allowed: false,
            policy: DEFAULT_DENY.to_owned(),
            privileged: false,
        }
    }

    /// True if some policy (either tier, any namespace, allow or deny) has a `from`
    /// element whose selector is not empty. Then a connection without source
    /// attributes must be refused before asking [`Pdp::decide`].
    pub fn depends_on_client_attrs(&self) -> bool {
        self.client_dependent > 0
    }
}

#[cfg(test)]
mod tests;
