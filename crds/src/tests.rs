use super::*;

/// The names, scopes and subresources of ClusterLink's own CRDs.
#[test]
fn names_scopes_and_subresources_are_clusterlinks() {
    let want = [
        ("AccessPolicy", "accesspolicies", "Namespaced", false),
        ("Export", "exports", "Namespaced", true),
        ("Import", "imports", "Namespaced", true),
        ("Instance", "instances", "Namespaced", true),
        ("Peer", "peers", "Namespaced", true),
        (
            "PrivilegedAccessPolicy",
            "privilegedaccesspolicies",
            "Cluster",
            false,
        ),
    ];
    let crds = crds();
    assert_eq!(crds.len(), want.len());
    for (crd, (kind, plural, scope, status)) in crds.iter().zip(want) {
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.spec.names.singular.as_deref(),
            Some(kind.to_lowercase().as_str())
        );
        assert_eq!(
            crd.spec.names.list_kind.as_deref(),
            Some(format!("{kind}List").as_str())
        );
        assert_eq!(crd.spec.scope, scope);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.{GROUP}").as_str())
        );
        let v = &crd.spec.versions[0];
        assert_eq!(
            (v.name.as_str(), v.served, v.storage),
            (VERSION, true, true)
        );
        let has_status = v.subresources.as_ref().is_some_and(|s| s.status.is_some());
        assert_eq!(has_status, status, "{kind} status subresource");
    }
}

fn schema(kind: &str) -> serde_json::Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_json::to_value(&crd.spec.versions[0].schema).expect("test input")["openAPIV3Schema"]
        .clone()
}

#[test]
fn enums_defaults_and_the_import_name_rule() {
    let import = schema("Import");
    let spec = &import["properties"]["spec"]["properties"];
    assert_eq!(
        spec["lbScheme"]["enum"],
        serde_json::json!(["round-robin", "random", "static"])
    );
    assert_eq!(spec["lbScheme"]["default"], "round-robin");
    assert_eq!(spec["port"]["minimum"].as_f64(), Some(1.0));
    let rules = &import["x-kubernetes-validations"];
    assert_eq!(rules[0]["rule"], "size(self.metadata.name) <= 63");
    assert_eq!(rules[0]["message"], "import name cannot exceed 63 chars");
    let source = &spec["sources"]["items"]["required"];
    assert_eq!(
        source,
        &serde_json::json!(["exportName", "exportNamespace", "peer"])
    );
    for kind in ["AccessPolicy", "PrivilegedAccessPolicy"] {
        let spec = &schema(kind)["properties"]["spec"]["properties"];
        assert_eq!(
            spec["action"]["enum"],
            serde_json::json!(["allow", "deny"]),
            "{kind}"
        );
        assert_eq!(spec["from"]["minItems"].as_u64(), Some(1), "{kind}");
    }
    let instance = &schema("Instance")["properties"]["spec"]["properties"];
    assert_eq!(
        instance["ingress"]["properties"]["type"]["enum"],
        serde_json::json!(["none", "LoadBalancer", "NodePort"])
    );
    let replicas = &instance["dataplane"]["properties"]["replicas"];
    assert_eq!(replicas["maximum"].as_f64(), Some(10.0));
    assert_eq!(instance["namespace"]["default"], "clusterlink-system");
}

#[test]
fn printer_columns() {
    let columns = |kind: &str| -> Vec<String> {
        let crd = crds()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .expect("test input");
        crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect()
    };
    assert_eq!(columns("Peer"), ["Reachable", "Since", "Age"]);
    assert_eq!(columns("Import"), ["Port", "Target Port", "Valid", "Age"]);
    assert_eq!(columns("Export"), ["Host", "Port", "Valid", "Age"]);
}
