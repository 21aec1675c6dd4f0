//! Unit tests of `pdp`: tier and action order, namespaces, replacement and removal,
//! validation, and selector edge cases, through policies parsed from YAML. Plain data
//! like the module: they never take locks, sleep or touch the network or files.

use super::*;
use crate::resources::{parse_documents, Resource};
use crate::selector::LabelSelector;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn attrs(pairs: &[(&str, &str)]) -> Attrs {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn select(pairs: &[(&str, &str)]) -> WorkloadSetOrSelector {
    WorkloadSetOrSelector {
        workload_sets: Vec::new(),
        workload_selector: Some(LabelSelector {
            match_labels: attrs(pairs),
            match_expressions: Vec::new(),
        }),
    }
}

fn spec(action: &str, from: WorkloadSetOrSelector, to: WorkloadSetOrSelector) -> AccessPolicySpec {
    AccessPolicySpec {
        action: action.into(),
        from: vec![from],
        to: vec![to],
    }
}

fn trivial() -> Attrs {
    attrs(&[("key", "val")])
}

fn trivial_spec(action: &str) -> AccessPolicySpec {
    spec(action, select(&[("key", "val")]), select(&[("key", "val")]))
}

/// Loads every policy of a YAML stream into `pdp`, as the controller would.
fn load(pdp: &mut Pdp, text: &str) -> TestResult {
    for doc in parse_documents(text) {
        let resource = doc?;
        let key = resource.key();
        match resource {
            Resource::AccessPolicy(o) => pdp.set(&key.namespace, &key.name, &o.spec)?,
            Resource::PrivilegedAccessPolicy(o) => pdp.set_privileged(&key.name, &o.spec)?,
            _ => return Err(format!("not a policy: {key}").into()),
        }
    }
    Ok(())
}

fn default_deny() -> Decision {
    Decision {
        allowed: false,
        policy: DEFAULT_DENY.into(),
        privileged: false,
    }
}

#[test]
fn privileged_vs_regular() -> TestResult {
    let mut pdp = Pdp::new();
    assert_eq!(
        pdp.decide(&trivial(), &trivial(), "default"),
        default_deny()
    );

    pdp.set("default", "reg", &trivial_spec("allow"))?;
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!(
        d,
        Decision {
            allowed: true,
            policy: "default/reg".into(),
            privileged: false
        }
    );

    pdp.set_privileged("priv", &trivial_spec("deny"))?;
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!(
        d,
        Decision {
            allowed: false,
            policy: "/priv".into(),
            privileged: true
        }
    );
    Ok(())
}

/// One policy per tier and action; the lower the priority, the broader the match.
const ALL_LAYERS: &str = r#"
apiVersion: clusterlink.net/v1alpha1
kind: PrivilegedAccessPolicy
metadata: {name: deny-private-workloads-to-prod-metering}
spec:
  action: deny
  from: [{workloadSelector: {matchLabels: {classification: private}}}]
  to:
  - workloadSelector: {matchLabels: {workloadName: global-metering-service, environment: prod}}
---
apiVersion: clusterlink.net/v1alpha1
kind: PrivilegedAccessPolicy
metadata: {name: allow-all-to-prod-metering}
spec:
  action: allow
  from: [{workloadSelector: {}}]
  to:
  - workloadSelector: {matchLabels: {workloadName: global-metering-service, environment: prod}}
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: deny-all-to-metering, namespace: default}
spec:
  action: deny
  from: [{workloadSelector: {}}]
  to: [{workloadSelector: {matchLabels: {workloadName: global-metering-service}}}]
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: allow-all-to-named-workloads, namespace: default}
spec:
  action: allow
  from: [{workloadSelector: {}}]
  to:
  - workloadSelector:
      matchExpressions: [{key: workloadName, operator: Exists}]
"#;

#[test]
fn all_layers_in_order() -> TestResult {
    let mut pdp = Pdp::new();
    load(&mut pdp, ALL_LAYERS)?;
    assert_eq!(pdp.len(), 4);
    let ns = "default";

    assert_eq!(pdp.decide(&trivial(), &trivial(), ns), default_deny());

    let non_metering = attrs(&[("workloadName", "non-metering-service")]);
    let d = pdp.decide(&trivial(), &non_metering, ns);
    assert!(d.allowed && !d.privileged, "{d:?}");
    assert_eq!(d.policy, "default/allow-all-to-named-workloads");

    let metering = attrs(&[("workloadName", "global-metering-service")]);
    let d = pdp.decide(&trivial(), &metering, ns);
    assert!(!d.allowed && !d.privileged, "{d:?}");
    assert_eq!(d.policy, "default/deny-all-to-metering");

    let prod_metering = attrs(&[
        ("workloadName", "global-metering-service"),
        ("environment", "prod"),
    ]);
    let d = pdp.decide(&trivial(), &prod_metering, ns);
    assert!(d.allowed && d.privileged, "{d:?}");
    assert_eq!(d.policy, "/allow-all-to-prod-metering");

    let private = attrs(&[("classification", "private"), ("environment", "prod")]);
    let d = pdp.decide(&private, &prod_metering, ns);
    assert!(!d.allowed && d.privileged, "{d:?}");
    assert_eq!(d.policy, "/deny-private-workloads-to-prod-metering");

    // Peel the layers off from the top; the same connection falls through each.
    assert!(pdp.remove_privileged("deny-private-workloads-to-prod-metering"));
    let d = pdp.decide(&private, &prod_metering, ns);
    assert!(d.allowed && d.privileged, "{d:?}");

    assert!(pdp.remove_privileged("allow-all-to-prod-metering"));
    let d = pdp.decide(&private, &prod_metering, ns);
    assert!(!d.allowed && !d.privileged, "{d:?}");
    assert_eq!(d.policy, "default/deny-all-to-metering");

    assert!(pdp.remove(ns, "deny-all-to-metering"));
    let d = pdp.decide(&private, &prod_metering, ns);
    assert!(d.allowed && !d.privileged, "{d:?}");

    assert!(pdp.remove(ns, "allow-all-to-named-workloads"));
    assert_eq!(pdp.decide(&private, &prod_metering, ns), default_deny());
    assert!(pdp.is_empty());
    Ok(())
}

#[test]
fn deny_beats_allow_in_a_tier() -> TestResult {
    let mut pdp = Pdp::new();
    // Names chosen so that the allow sorts first: the order of maps decides, not names.
    pdp.set("default", "a-allow", &trivial_spec("allow"))?;
    pdp.set("default", "z-deny", &trivial_spec("deny"))?;
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!((d.allowed, d.policy.as_str()), (false, "default/z-deny"));

    pdp.set_privileged("a-allow", &trivial_spec("allow"))?;
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!(
        (d.allowed, d.policy.as_str(), d.privileged),
        (true, "/a-allow", true)
    );
    pdp.set_privileged("z-deny", &trivial_spec("deny"))?;
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!(
        (d.allowed, d.policy.as_str(), d.privileged),
        (false, "/z-deny", true)
    );
    Ok(())
}

#[test]
fn regular_policies_apply_in_their_namespace_only() -> TestResult {
    let mut pdp = Pdp::new();
    pdp.set("team-a", "allow", &trivial_spec("allow"))?;
    pdp.set("team-b", "deny", &trivial_spec("deny"))?;
    let d = pdp.decide(&trivial(), &trivial(), "team-a");
    assert_eq!((d.allowed, d.policy.as_str()), (true, "team-a/allow"));
    let d = pdp.decide(&trivial(), &trivial(), "team-b");
    assert_eq!((d.allowed, d.policy.as_str()), (false, "team-b/deny"));
    assert_eq!(
        pdp.decide(&trivial(), &trivial(), "default"),
        default_deny()
    );
    // A namespace that is a prefix of another is still a different namespace.
    assert_eq!(pdp.decide(&trivial(), &trivial(), "team"), default_deny());
    assert_eq!(pdp.decide(&trivial(), &trivial(), ""), default_deny());
    Ok(())
}

#[test]
fn privileged_policies_apply_in_every_namespace() -> TestResult {
    let mut pdp = Pdp::new();
    pdp.set_privileged("everyone", &trivial_spec("allow"))?;
    for ns in ["default", "team-a", ""] {
        let d = pdp.decide(&trivial(), &trivial(), ns);
        assert_eq!(
            (d.allowed, d.policy.as_str(), d.privileged),
            (true, "/everyone", true)
        );
    }
    Ok(())
}

#[test]
fn same_name_in_both_tiers_is_two_policies() -> TestResult {
    let mut pdp = Pdp::new();
    pdp.set_privileged("p", &trivial_spec("deny"))?;
    pdp.set("default", "p", &trivial_spec("allow"))?;
    assert_eq!(pdp.len(), 2);
    assert!(!pdp.decide(&trivial(), &trivial(), "default").allowed);
    assert!(pdp.remove_privileged("p"));
    assert!(pdp.decide(&trivial(), &trivial(), "default").allowed);
    Ok(())
}

#[test]
fn default_deny_when_nothing_matches() -> TestResult {
    let mut pdp = Pdp::new();
    pdp.set("default", "reg", &trivial_spec("allow"))?;
    let other = attrs(&[("key", "other")]);
    assert_eq!(pdp.decide(&other, &trivial(), "default"), default_deny());
    assert_eq!(pdp.decide(&trivial(), &other, "default"), default_deny());
    assert_eq!(
        pdp.decide(&Attrs::new(), &Attrs::new(), "default"),
        default_deny()
    );
    Ok(())
}

#[test]
fn replacing_with_the_opposite_action() -> TestResult {
    let mut pdp = Pdp::new();
    pdp.set("default", "p", &trivial_spec("allow"))?;
    assert!(pdp.decide(&trivial(), &trivial(), "default").allowed);
    pdp.set("default", "p", &trivial_spec("deny"))?;
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!((d.allowed, d.policy.as_str()), (false, "default/p"));
    pdp.set("default", "p", &trivial_spec("allow"))?;
    assert!(pdp.decide(&trivial(), &trivial(), "default").allowed);
    assert_eq!(pdp.len(), 1);

    pdp.set_privileged("q", &trivial_spec("deny"))?;
    pdp.set_privileged("q", &trivial_spec("allow"))?;
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!((d.allowed, d.policy.as_str()), (true, "/q"));
    assert_eq!(pdp.len(), 2);

    // One removal leaves nothing behind in either map.
    assert!(pdp.remove_privileged("q"));
    assert!(pdp.remove("default", "p"));
    assert!(pdp.is_empty());
    assert_eq!(
        pdp.decide(&trivial(), &trivial(), "default"),
        default_deny()
    );
    Ok(())
}

#[test]
fn replacing_with_a_narrower_selector() -> TestResult {
    let mut pdp = Pdp::new();
    pdp.set("default", "p", &spec("allow", select(&[]), select(&[])))?;
    assert!(pdp.decide(&Attrs::new(), &Attrs::new(), "default").allowed);
    pdp.set("default", "p", &trivial_spec("allow"))?;
    assert!(!pdp.decide(&Attrs::new(), &Attrs::new(), "default").allowed);
    assert!(pdp.decide(&trivial(), &trivial(), "default").allowed);
    Ok(())
}

#[test]
fn removing_missing_policies_reports_it() -> TestResult {
    let mut pdp = Pdp::new();
    assert!(!pdp.remove_privileged("no-such-policy"));
    assert!(!pdp.remove("default", "no-such-policy"));
    pdp.set("default", "p", &trivial_spec("allow"))?;
    // Wrong tier, wrong namespace.
    assert!(!pdp.remove_privileged("p"));
    assert!(!pdp.remove("other", "p"));
    assert!(pdp.remove("default", "p"));
    assert!(!pdp.remove("default", "p"));
    Ok(())
}

#[test]
fn invalid_policies_are_refused_and_the_old_one_stays() -> TestResult {
    let mut pdp = Pdp::new();
    pdp.set("default", "p", &trivial_spec("allow"))?;

    let bad = spec(
        "allow",
        select(&[("this is not a key", "This val is bad!@#$%^")]),
        select(&[]),
    );
    let err = pdp
        .set("default", "p", &bad)
        .err()
        .ok_or("accepted a bad selector")?;
    assert!(
        err.to_string()
            .starts_with("spec.from[0].workloadSelector: "),
        "{err}"
    );
    assert!(err.to_string().contains("this is not a key"), "{err}");
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!((d.allowed, d.policy.as_str()), (true, "default/p"));

    pdp.set_privileged("q", &trivial_spec("deny"))?;
    let err = pdp
        .set_privileged("q", &trivial_spec(""))
        .err()
        .ok_or("accepted an empty action")?;
    assert_eq!(err, Error::Action(String::new()));
    let d = pdp.decide(&trivial(), &trivial(), "default");
    assert_eq!((d.allowed, d.policy.as_str()), (false, "/q"));
    assert_eq!(pdp.len(), 2);
    assert!(pdp.depends_on_client_attrs());
    Ok(())
}

#[test]
fn validation() {
    let ok = trivial_spec("deny");
    assert_eq!(validate(&ok), Ok(()));
    for action in ["", "notAnAction", "Allow", "DENY"] {
        assert_eq!(
            validate(&trivial_spec(action)),
            Err(Error::Action(action.into()))
        );
    }
    let no_from = AccessPolicySpec {
        from: Vec::new(),
        ..ok.clone()
    };
    assert_eq!(validate(&no_from), Err(Error::Empty("spec.from")));
    let no_to = AccessPolicySpec {
        to: Vec::new(),
        ..ok.clone()
    };
    assert_eq!(validate(&no_to), Err(Error::Empty("spec.to")));

    let sets = WorkloadSetOrSelector {
        workload_sets: vec!["set".into()],
        workload_selector: None,
    };
    let with_sets = AccessPolicySpec {
        to: vec![select(&[]), sets.clone()],
        ..ok.clone()
    };
    assert_eq!(
        validate(&with_sets),
        Err(Error::WorkloadSets("spec.to[1]".into()))
    );
    let both = WorkloadSetOrSelector {
        workload_selector: Some(LabelSelector::default()),
        ..sets
    };
    let with_both = AccessPolicySpec {
        from: vec![both],
        ..ok.clone()
    };
    assert_eq!(
        validate(&with_both),
        Err(Error::NotExactlyOne("spec.from[0]".into()))
    );
    let neither = AccessPolicySpec {
        from: vec![WorkloadSetOrSelector::default()],
        ..ok
    };
    assert_eq!(
        validate(&neither),
        Err(Error::NotExactlyOne("spec.from[0]".into()))
    );
}

#[test]
fn bad_selector_is_refused_in_both_tiers() {
    let bad_op = AccessPolicySpec {
        action: "allow".into(),
        from: vec![select(&[])],
        to: vec![WorkloadSetOrSelector {
            workload_sets: Vec::new(),
            workload_selector: Some(LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![selector::Requirement {
                    key: "env".into(),
                    operator: "Exist".into(),
                    values: Vec::new(),
                }],
            }),
        }],
    };
    let mut pdp = Pdp::new();
    assert!(matches!(
        pdp.set("default", "p", &bad_op),
        Err(Error::Selector { .. })
    ));
    assert!(matches!(
        pdp.set_privileged("p", &bad_op),
        Err(Error::Selector { .. })
    ));
    assert!(pdp.is_empty());
}

#[test]
fn any_from_and_any_to() -> TestResult {
    let mut pdp = Pdp::new();
    let s = AccessPolicySpec {
        action: "allow".into(),
        from: vec![select(&[("a", "1")]), select(&[("b", "2")])],
        to: vec![select(&[("c", "3")]), select(&[("d", "4")])],
    };
    pdp.set("default", "p", &s)?;
    let ok = |src: &[(&str, &str)], dst: &[(&str, &str)]| {
        pdp.decide(&attrs(src), &attrs(dst), "default").allowed
    };
    assert!(ok(&[("a", "1")], &[("c", "3")]));
    assert!(ok(&[("b", "2")], &[("d", "4")]));
    assert!(ok(&[("a", "1"), ("b", "0")], &[("d", "4")]));
    assert!(!ok(&[("a", "0")], &[("c", "3")]));
    assert!(!ok(&[("a", "1")], &[("c", "0")]));
    // src and dst are matched against their own lists only.
    assert!(!ok(&[("c", "3")], &[("a", "1")]));
    Ok(())
}

#[test]
fn empty_selectors_match_connections_without_attributes() -> TestResult {
    let mut pdp = Pdp::new();
    load(
        &mut pdp,
        "apiVersion: clusterlink.net/v1alpha1\n\
             kind: AccessPolicy\n\
             metadata: {name: allow-all, namespace: default}\n\
             spec: {action: allow, from: [{workloadSelector: {}}], to: [{workloadSelector: {}}]}\n",
    )?;
    let d = pdp.decide(&Attrs::new(), &Attrs::new(), "default");
    assert_eq!((d.allowed, d.policy.as_str()), (true, "default/allow-all"));
    assert!(!pdp.depends_on_client_attrs());
    Ok(())
}

#[test]
fn selector_edge_cases_through_the_pdp() -> TestResult {
    let mut pdp = Pdp::new();
    load(
        &mut pdp,
        r#"
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: not-from-dev}
spec:
  action: allow
  from:
  - workloadSelector:
      matchExpressions:
      - {key: client.clusterlink.net/labels.env, operator: NotIn, values: [dev]}
      - {key: client.clusterlink.net/labels.debug, operator: DoesNotExist}
  to:
  - workloadSelector:
      matchLabels: {export.clusterlink.net/name: db}
      matchExpressions:
      - {key: peer.clusterlink.net/name, operator: In, values: [peer1, peer2]}
"#,
    )?;
    let db_on = |peer: &str| {
        attrs(&[
            (EXPORT_NAME, "db"),
            (EXPORT_NAMESPACE, "default"),
            (PEER_NAME, peer),
        ])
    };
    let env = format!("{CLIENT_LABELS_PREFIX}env");
    let debug = format!("{CLIENT_LABELS_PREFIX}debug");
    // NotIn and DoesNotExist both hold for a source without those attributes.
    assert!(
        pdp.decide(&Attrs::new(), &db_on("peer1"), "default")
            .allowed
    );
    assert!(
        pdp.decide(&attrs(&[(&env, "prod")]), &db_on("peer2"), "default")
            .allowed
    );
    assert!(
        !pdp.decide(&attrs(&[(&env, "dev")]), &db_on("peer1"), "default")
            .allowed
    );
    assert!(
        !pdp.decide(&attrs(&[(&debug, "")]), &db_on("peer1"), "default")
            .allowed
    );
    assert!(
        !pdp.decide(&Attrs::new(), &db_on("peer3"), "default")
            .allowed
    );
    assert!(
        !pdp.decide(&Attrs::new(), &attrs(&[(PEER_NAME, "peer1")]), "default")
            .allowed
    );
    // Non-empty selector expressions in `from`: attribute-less clients are refused
    // up front even though this policy would let them through.
    assert!(pdp.depends_on_client_attrs());
    Ok(())
}

#[test]
fn depends_on_client_attrs() -> TestResult {
    let mut pdp = Pdp::new();
    assert!(!pdp.depends_on_client_attrs());

    // An empty `from` selector does not look at the client.
    pdp.set(
        "default",
        "any",
        &spec("allow", select(&[]), select(&[("key", "val")])),
    )?;
    assert!(!pdp.depends_on_client_attrs());

    // Neither does a specific `to`.
    pdp.set(
        "default",
        "to-only",
        &spec("deny", select(&[]), select(&[("key", "val")])),
    )?;
    assert!(!pdp.depends_on_client_attrs());

    pdp.set(
        "other-ns",
        "specific",
        &spec("allow", select(&[("key", "val")]), select(&[])),
    )?;
    assert!(pdp.depends_on_client_attrs());
    assert!(pdp.remove("other-ns", "specific"));
    assert!(!pdp.depends_on_client_attrs());

    // Replacing a specific policy with a broad one clears it too.
    pdp.set(
        "default",
        "any",
        &spec("deny", select(&[("key", "val")]), select(&[])),
    )?;
    assert!(pdp.depends_on_client_attrs());
    pdp.set("default", "any", &spec("deny", select(&[]), select(&[])))?;
    assert!(!pdp.depends_on_client_attrs());

    pdp.set_privileged(
        "priv",
        &spec("deny", select(&[("key", "val")]), select(&[])),
    )?;
    assert!(pdp.depends_on_client_attrs());
    assert!(pdp.remove_privileged("priv"));
    assert!(!pdp.depends_on_client_attrs());

    // Re-adding the same specific policy counts it once; so does a change of action.
    let specific = spec("allow", select(&[("key", "val")]), select(&[]));
    pdp.set("default", "twice", &specific)?;
    pdp.set("default", "twice", &specific)?;
    pdp.set(
        "default",
        "twice",
        &AccessPolicySpec {
            action: "deny".into(),
            ..specific
        },
    )?;
    assert!(pdp.remove("default", "twice"));
    assert!(!pdp.depends_on_client_attrs());
    // A refused update leaves the count alone.
    assert!(pdp
        .set(
            "default",
            "any",
            &spec("allow", select(&[("key", "val")]), select(&[("-", "")]))
        )
        .is_err());
    assert!(!pdp.depends_on_client_attrs());

    // A matchExpression counts as much as a matchLabels entry.
    let mut s = spec("allow", select(&[]), select(&[]));
    s.from.push(WorkloadSetOrSelector {
        workload_sets: Vec::new(),
        workload_selector: Some(LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![selector::Requirement {
                key: CLIENT_SA.into(),
                operator: "Exists".into(),
                values: Vec::new(),
            }],
        }),
    });
    pdp.set_privileged("expr", &s)?;
    assert!(pdp.depends_on_client_attrs());
    Ok(())
}

#[test]
fn decisions_do_not_depend_on_insertion_order() -> TestResult {
    let specs = [
        ("b", trivial_spec("deny")),
        ("a", trivial_spec("deny")),
        ("c", spec("allow", select(&[]), select(&[]))),
    ];
    let mut forward = Pdp::new();
    let mut backward = Pdp::new();
    for (name, s) in &specs {
        forward.set("default", name, s)?;
    }
    for (name, s) in specs.iter().rev() {
        backward.set("default", name, s)?;
    }
    let d = forward.decide(&trivial(), &trivial(), "default");
    assert_eq!(d, backward.decide(&trivial(), &trivial(), "default"));
    // Deterministic: the first deny in name order is reported.
    assert_eq!(d.policy, "default/a");
    Ok(())
}

#[test]
fn malformed_or_foreign_documents_are_errors() {
    let mut pdp = Pdp::new();
    assert!(load(&mut pdp, "spec: [unclosed").is_err());
    assert!(load(
        &mut pdp,
        "apiVersion: clusterlink.net/v1alpha1\nkind: Policy\n"
    )
    .is_err());
    let no_from = "apiVersion: clusterlink.net/v1alpha1\n\
                       kind: AccessPolicy\n\
                       metadata: {name: p}\n\
                       spec: {action: deny, from: [], to: [{workloadSelector: {}}]}\n";
    assert!(load(&mut pdp, no_from).is_err());
    assert!(pdp.is_empty());
}

#[test]
fn attribute_names() {
    assert_eq!(PEER_NAME, "peer.clusterlink.net/name");
    assert_eq!(PEER_LABELS_PREFIX, "peer.clusterlink.net/labels.");
    assert_eq!(CLIENT_NAMESPACE, "client.clusterlink.net/namespace");
    assert_eq!(CLIENT_SA, "client.clusterlink.net/service-account");
    assert_eq!(CLIENT_LABELS_PREFIX, "client.clusterlink.net/labels.");
    assert_eq!(EXPORT_NAME, "export.clusterlink.net/name");
    assert_eq!(EXPORT_NAMESPACE, "export.clusterlink.net/namespace");
    assert_eq!(EXPORT_LABELS_PREFIX, "export.clusterlink.net/labels.");
}
