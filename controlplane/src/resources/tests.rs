//! Unit tests of `resources`: the specification's examples, defaults, keys, every
//! validation error, and the stream bounds against hostile and random input (one
//! test parses on a thread to bound its time). They never touch the network or files.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Appendix A of the specification, verbatim (comments included).
const APPENDIX_A: &str = r#"# Remote peer, in the ClusterLink namespace of the importing cluster
apiVersion: clusterlink.net/v1alpha1
kind: Peer
metadata: {name: server, namespace: clusterlink-system}
spec:
  gateways:
  - {host: 172.18.0.3, port: 30443}
---
# Export on the server cluster (Service default/nginx must exist, or set spec.host)
apiVersion: clusterlink.net/v1alpha1
kind: Export
metadata: {name: nginx, namespace: default}
spec: {port: 80}
---
# Import on the client cluster (creates Service default/nginx -> ExternalName -> system Service)
apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata: {name: nginx, namespace: default}
spec:
  port: 80
  lbScheme: static            # optional; default round-robin
  sources:
  - {peer: server, exportName: nginx, exportNamespace: default}
---
# Needed on BOTH sides (namespace = import ns on client side, export ns on server side)
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: allow-all, namespace: default}
spec:
  action: allow
  from: [{workloadSelector: {}}]
  to:   [{workloadSelector: {}}]
---
apiVersion: clusterlink.net/v1alpha1
kind: PrivilegedAccessPolicy
metadata: {name: deny-to-server1}
spec:
  action: deny
  from: [{workloadSelector: {}}]
  to:   [{workloadSelector: {matchLabels: {peer.clusterlink.net/name: server1}}}]
---
apiVersion: clusterlink.net/v1alpha1
kind: Instance
metadata: {name: cl-instance, namespace: clusterlink-operator}
spec:
  dataplane: {type: envoy, replicas: 1}
  ingress: {type: NodePort, port: 30443}
  logLevel: info
  containerRegistry: ghcr.io/clusterlink-net/
  namespace: clusterlink-system
  tag: latest
  peerLabels: {region: eu}
"#;

/// One document in ClusterLink's shape; `metadata` and `spec` in flow style.
fn doc(kind: &str, metadata: &str, spec: &str) -> String {
    format!("apiVersion: {API_VERSION}\nkind: {kind}\nmetadata: {metadata}\nspec: {spec}\n")
}

fn key(kind: Kind, namespace: &str, name: &str) -> Key {
    Key {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn selector(labels: &[(&str, &str)]) -> WorkloadSetOrSelector {
    WorkloadSetOrSelector {
        workload_sets: Vec::new(),
        workload_selector: Some(LabelSelector {
            match_labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            match_expressions: Vec::new(),
        }),
    }
}

/// The single resource of a one-document stream.
fn one(text: &str) -> Result<Resource, Box<dyn std::error::Error>> {
    let mut docs = parse_documents(text);
    match (docs.pop(), docs.is_empty()) {
        (Some(r), true) => Ok(r?),
        (got, _) => Err(format!("want exactly one document, got {got:?} and {docs:?}").into()),
    }
}

/// The error of a one-document stream that must be refused.
fn refused(text: &str) -> Result<String, Box<dyn std::error::Error>> {
    match one(text) {
        Ok(r) => Err(format!("accepted, want refused: {r:?}\n{text}").into()),
        Err(e) => Ok(e.to_string()),
    }
}

fn import(o: &Resource) -> Result<&ImportSpec, Box<dyn std::error::Error>> {
    match o {
        Resource::Import(o) => Ok(&o.spec),
        other => Err(format!("not an Import: {other:?}").into()),
    }
}

#[test]
fn appendix_a_parses_except_instance() -> TestResult {
    let stream = parse_stream(APPENDIX_A);
    assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
    assert_eq!(stream.docs.len(), 6);
    let indexes: Vec<usize> = stream.docs.iter().map(|d| d.index).collect();
    assert_eq!(indexes, [1, 2, 3, 4, 5, 6]);
    let mut docs = stream.docs.into_iter();
    let mut next = || docs.next().ok_or("missing document");

    let d = next()?;
    let want = key(Kind::Peer, "", "server");
    assert_eq!(d.key.as_ref(), Some(&want));
    let Resource::Peer(peer) = d.result? else {
        return Err("document 1 is not a Peer".into());
    };
    assert_eq!(Resource::Peer(peer.clone()).key(), want);
    assert_eq!(peer.api_version, API_VERSION);
    assert_eq!(peer.metadata.name, "server");
    assert_eq!(
        peer.metadata.namespace.as_deref(),
        Some("clusterlink-system")
    );
    assert_eq!(
        peer.spec.gateways,
        [Endpoint {
            host: "172.18.0.3".into(),
            port: 30443
        }]
    );

    let d = next()?;
    let want = key(Kind::Export, "default", "nginx");
    assert_eq!(d.key.as_ref(), Some(&want));
    let r = d.result?;
    assert_eq!(r.key(), want);
    let Resource::Export(export) = r else {
        return Err("document 2 is not an Export".into());
    };
    assert_eq!(
        export.spec,
        ExportSpec {
            host: String::new(),
            port: 80
        }
    );

    let d = next()?;
    let want = key(Kind::Import, "default", "nginx");
    assert_eq!(d.key.as_ref(), Some(&want));
    let r = d.result?;
    assert_eq!(r.key(), want);
    let spec = import(&r)?;
    assert_eq!(spec.port, 80);
    assert_eq!(spec.target_port, 0);
    assert_eq!(spec.listen_port(), 80);
    assert_eq!(spec.lb_scheme, "static");
    assert_eq!(spec.scheme(), Some(LbScheme::Static));
    assert_eq!(
        spec.sources,
        [ImportSource {
            peer: "server".into(),
            export_name: "nginx".into(),
            export_namespace: "default".into(),
        }]
    );

    let d = next()?;
    let want = key(Kind::AccessPolicy, "default", "allow-all");
    assert_eq!(d.key.as_ref(), Some(&want));
    let r = d.result?;
    assert_eq!(r.key(), want);
    let Resource::AccessPolicy(policy) = r else {
        return Err("document 4 is not an AccessPolicy".into());
    };
    assert_eq!(
        policy.spec,
        AccessPolicySpec {
            action: "allow".into(),
            from: vec![selector(&[])],
            to: vec![selector(&[])],
        }
    );

    let d = next()?;
    let want = key(Kind::PrivilegedAccessPolicy, "", "deny-to-server1");
    assert_eq!(d.key.as_ref(), Some(&want));
    let r = d.result?;
    assert_eq!(r.key(), want);
    let Resource::PrivilegedAccessPolicy(policy) = r else {
        return Err("document 5 is not a PrivilegedAccessPolicy".into());
    };
    assert_eq!(
        policy.spec,
        AccessPolicySpec {
            action: "deny".into(),
            from: vec![selector(&[])],
            to: vec![selector(&[("peer.clusterlink.net/name", "server1")])],
        }
    );

    // Instance belongs to the operator: refused, naming the kind.
    let d = next()?;
    assert_eq!(d.index, 6);
    assert_eq!(d.key, None);
    match d.result {
        Err(Error::Parse { doc: 6, message }) => {
            assert!(
                message.contains("kind") && message.contains("\"Instance\""),
                "{message}"
            );
        }
        other => return Err(format!("Instance: want a parse error, got {other:?}").into()),
    }
    Ok(())
}

#[test]
fn appendix_a_round_trips_through_to_json() -> TestResult {
    for r in parse_documents(APPENDIX_A)
        .into_iter()
        .filter_map(Result::ok)
    {
        let json = serde_json::to_string(&r.to_json())?;
        let again = one(&json)?;
        assert_eq!(again, r, "{json}");
    }
    Ok(())
}

#[test]
fn defaults_when_absent() -> TestResult {
    let r = one(&doc(
        "Import",
        "{name: web}",
        "{port: 8080, sources: [{peer: server}]}",
    ))?;
    assert_eq!(r.key(), key(Kind::Import, "default", "web"));
    let spec = import(&r)?;
    assert_eq!(spec.lb_scheme, "round-robin");
    assert_eq!(spec.scheme(), Some(LbScheme::RoundRobin));
    assert_eq!(spec.target_port, 0);
    assert_eq!(spec.listen_port(), 8080);
    assert_eq!(spec.sources[0].export_name, "");
    assert_eq!(spec.sources[0].export_namespace, "");

    // An empty lbScheme is the default too; targetPort wins for listening.
    let r = one(&doc(
        "Import",
        "{name: web, namespace: \"\"}",
        "{port: 8080, targetPort: 23817, lbScheme: \"\", sources: []}",
    ))?;
    assert_eq!(r.key(), key(Kind::Import, "default", "web"));
    let spec = import(&r)?;
    assert_eq!(spec.scheme(), Some(LbScheme::RoundRobin));
    assert_eq!(spec.listen_port(), 23817);

    let r = one(&doc("Export", "{name: web, namespace: apps}", "{}"))?;
    assert_eq!(r.key(), key(Kind::Export, "apps", "web"));
    let Resource::Export(export) = r else {
        return Err("not an Export".into());
    };
    assert_eq!(export.spec, ExportSpec::default());
    assert_eq!(export.spec.host, "");
    assert_eq!(export.spec.port, 0);

    // Peers may list no gateway; their namespace never enters the key.
    let r = one(&doc(
        "Peer",
        "{name: p1, namespace: elsewhere}",
        "{gateways: []}",
    ))?;
    assert_eq!(r.key(), key(Kind::Peer, "", "p1"));
    let r = one(&doc(
        "PrivilegedAccessPolicy",
        "{name: p, namespace: ignored}",
        "{action: allow, from: [{workloadSelector: {}}], to: [{workloadSelector: {}}]}",
    ))?;
    assert_eq!(r.key(), key(Kind::PrivilegedAccessPolicy, "", "p"));
    Ok(())
}

#[test]
fn kubectl_get_output_parses() -> TestResult {
    let text = r#"apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"clusterlink.net/v1alpha1","kind":"Import","metadata":{"annotations":{},"name":"nginx","namespace":"default"},"spec":{"port":80,"sources":[{"exportName":"nginx","exportNamespace":"default","peer":"server"}]}}
  creationTimestamp: "2024-05-01T10:00:00Z"
  generation: 2
  labels:
    import.clusterlink.net/merge: "true"
  managedFields:
  - apiVersion: clusterlink.net/v1alpha1
    fieldsType: FieldsV1
    fieldsV1:
      f:spec:
        .: {}
        f:port: {}
    manager: kubectl-client-side-apply
    operation: Update
    time: "2024-05-01T10:00:00Z"
  name: nginx
  namespace: default
  resourceVersion: "123456"
  uid: 0b6f1f8e-4a4c-4a9e-9d43-5a8b4f6c1e11
spec:
  lbScheme: round-robin
  port: 80
  sources:
  - exportName: nginx
    exportNamespace: default
    peer: server
  targetPort: 23817
status:
  conditions:
  - lastTransitionTime: "2024-05-01T10:00:01Z"
    message: ""
    reason: Leased
    status: "True"
    type: ImportTargetPortValid
  - lastTransitionTime: "2024-05-01T10:00:01Z"
    message: ""
    reason: Valid
    status: "True"
    type: ImportServiceValid
---
apiVersion: clusterlink.net/v1alpha1
kind: Peer
metadata:
  creationTimestamp: 2024-05-01T10:00:00Z
  generation: 1
  name: server
  namespace: clusterlink-system
  resourceVersion: "42"
  uid: 3d7c0a5e-0000-4000-8000-000000000001
spec:
  gateways:
  - host: 172.18.0.3
    port: 30443
status:
  conditions:
  - lastTransitionTime: "2024-05-01T10:00:05Z"
    message: ""
    reason: Heartbeat
    status: "True"
    type: PeerReachable
  labels:
    peer.clusterlink.net/name: server
---
apiVersion: clusterlink.net/v1alpha1
kind: Export
metadata:
  creationTimestamp: "2024-05-01T10:00:00Z"
  generation: 1
  name: nginx
  namespace: default
  resourceVersion: "43"
  uid: 3d7c0a5e-0000-4000-8000-000000000002
spec:
  port: 80
status:
  conditions:
  - lastTransitionTime: "2024-05-01T10:00:05Z"
    message: ""
    reason: Verified
    status: "True"
    type: ExportValid
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata:
  creationTimestamp: "2024-05-01T10:00:00Z"
  generation: 1
  name: allow-all
  namespace: default
  resourceVersion: "44"
  uid: 3d7c0a5e-0000-4000-8000-000000000003
spec:
  action: allow
  from:
  - workloadSelector: {}
  to:
  - workloadSelector:
      matchExpressions:
      - key: peer.clusterlink.net/name
        operator: In
        values:
        - server
"#;
    let results = parse_documents(text);
    assert_eq!(results.len(), 4);
    let mut got = Vec::new();
    for r in results {
        got.push(r?);
    }
    assert_eq!(got[0].key(), key(Kind::Import, "default", "nginx"));
    let md = got[0].metadata();
    assert_eq!(
        md.labels
            .get("import.clusterlink.net/merge")
            .map(String::as_str),
        Some("true")
    );
    assert!(md
        .annotations
        .contains_key("kubectl.kubernetes.io/last-applied-configuration"));
    let spec = import(&got[0])?;
    assert_eq!(spec.target_port, 23817);
    assert_eq!(spec.listen_port(), 23817);
    assert_eq!(got[1].key(), key(Kind::Peer, "", "server"));
    assert_eq!(got[2].key(), key(Kind::Export, "default", "nginx"));
    assert_eq!(
        got[3].key(),
        key(Kind::AccessPolicy, "default", "allow-all")
    );
    Ok(())
}

#[test]
fn refusals_name_the_field() -> TestResult {
    let any = "[{workloadSelector: {}}]";
    let policy = |action: &str, from: &str, to: &str| {
        doc(
            "AccessPolicy",
            "{name: p}",
            &format!("{{action: {action}, from: {from}, to: {to}}}"),
        )
    };
    let imp = |spec: &str| doc("Import", "{name: imp}", spec);
    let cases: Vec<(&str, String, &[&str])> = vec![
            (
                "unknown lbScheme",
                imp("{port: 80, sources: [], lbScheme: least-conn}"),
                &["spec.lbScheme", "least-conn"],
            ),
            (
                "lbScheme is case-sensitive",
                imp("{port: 80, sources: [], lbScheme: Static}"),
                &["spec.lbScheme"],
            ),
            (
                "selector key",
                policy("allow", "[{workloadSelector: {matchLabels: {\"bad key!\": x}}}]", any),
                &["spec.from[0].workloadSelector", "bad key!"],
            ),
            (
                "selector value",
                policy("allow", any, "[{workloadSelector: {matchLabels: {k: \"no spaces\"}}}]"),
                &["spec.to[0].workloadSelector"],
            ),
            (
                "selector operator",
                policy(
                    "allow",
                    "[{workloadSelector: {matchExpressions: [{key: k, operator: Equals, values: [v]}]}}]",
                    any,
                ),
                &["spec.from[0].workloadSelector", "Equals"],
            ),
            (
                "unknown selector field",
                policy("allow", "[{workloadSelector: {matchLabel: {k: v}}}]", any),
                &["spec.from[0].workloadSelector", "matchLabel"],
            ),
            ("empty from", policy("allow", "[]", any), &["spec.from"]),
            ("empty to", policy("deny", any, "[]"), &["spec.to"]),
            ("action", policy("permit", any, any), &["spec.action", "permit"]),
            ("empty action", policy("\"\"", any, any), &["spec.action"]),
            (
                "workloadSets",
                policy("allow", "[{workloadSets: [s1]}]", any),
                &["spec.from[0].workloadSets", "not yet supported"],
            ),
            (
                "neither sets nor selector",
                policy("allow", any, "[{}]"),
                &["spec.to[0]", "exactly one"],
            ),
            (
                "both sets and selector",
                policy("allow", "[{workloadSets: [s1], workloadSelector: {}}]", any),
                &["spec.from[0]", "exactly one"],
            ),
            ("import port 0", imp("{port: 0, sources: []}"), &["spec.port"]),
            (
                "import port over u16",
                imp("{port: 70000, sources: []}"),
                &["spec.port", "70000"],
            ),
            ("import port negative", imp("{port: -1, sources: []}"), &["spec.port"]),
            ("import port string", imp("{port: http, sources: []}"), &["spec.port"]),
            (
                "import targetPort over u16",
                imp("{port: 80, targetPort: 65536, sources: []}"),
                &["spec.targetPort"],
            ),
            ("import without port", imp("{sources: []}"), &["spec", "port"]),
            ("import without sources", imp("{port: 80}"), &["spec", "sources"]),
            (
                "import source peer",
                imp("{port: 80, sources: [{peer: Bad_Peer}]}"),
                &["spec.sources[0].peer"],
            ),
            (
                "lbSchem typo",
                imp("{port: 80, sources: [], lbSchem: random}"),
                &["spec", "lbSchem"],
            ),
            (
                "unknown source field",
                imp("{port: 80, sources: [{peer: p, exportNamspace: x}]}"),
                &["spec.sources[0]", "exportNamspace"],
            ),
            (
                "peer gateway port 0",
                doc("Peer", "{name: p}", "{gateways: [{host: h, port: 0}]}"),
                &["spec.gateways[0].port"],
            ),
            (
                "peer second gateway empty host",
                doc(
                    "Peer",
                    "{name: p}",
                    "{gateways: [{host: h, port: 1}, {host: \"\", port: 443}]}",
                ),
                &["spec.gateways[1].host"],
            ),
            (
                "peer blank host",
                doc("Peer", "{name: p}", "{gateways: [{host: \"  \", port: 443}]}"),
                &["spec.gateways[0].host"],
            ),
            (
                "peer without gateways",
                doc("Peer", "{name: p}", "{}"),
                &["spec", "gateways"],
            ),
            (
                "unknown export field",
                doc("Export", "{name: e}", "{port: 80, hots: x}"),
                &["spec", "hots"],
            ),
            (
                "wrong apiVersion",
                "apiVersion: clusterlink.net/v1\nkind: Peer\nmetadata: {name: p}\nspec: {gateways: []}\n"
                    .into(),
                &["apiVersion", "clusterlink.net/v1"],
            ),
            (
                "missing apiVersion",
                "kind: Peer\nmetadata: {name: p}\nspec: {gateways: []}\n".into(),
                &["apiVersion"],
            ),
            (
                "unknown kind",
                doc("Service", "{name: p}", "{}"),
                &["kind", "\"Service\""],
            ),
            (
                "missing kind",
                format!("apiVersion: {API_VERSION}\nmetadata: {{name: p}}\nspec: {{}}\n"),
                &["kind", "\"\""],
            ),
            (
                "missing metadata.name",
                doc("Peer", "{namespace: x}", "{gateways: []}"),
                &["metadata", "name"],
            ),
            (
                "missing metadata",
                format!("apiVersion: {API_VERSION}\nkind: Peer\nspec: {{gateways: []}}\n"),
                &["metadata"],
            ),
            (
                "missing spec",
                format!("apiVersion: {API_VERSION}\nkind: Export\nmetadata: {{name: e}}\n"),
                &["spec"],
            ),
            (
                "empty name",
                doc("Export", "{name: \"\"}", "{}"),
                &["metadata.name"],
            ),
            (
                "uppercase name",
                doc("Export", "{name: Nginx}", "{}"),
                &["metadata.name", "Nginx"],
            ),
            (
                "name with underscore",
                doc("Peer", "{name: my_peer}", "{gateways: []}"),
                &["metadata.name"],
            ),
            (
                "uppercase namespace",
                doc("Export", "{name: e, namespace: Default}", "{}"),
                &["metadata.namespace"],
            ),
            (
                "dotted namespace",
                doc("Export", "{name: e, namespace: a.b}", "{}"),
                &["metadata.namespace"],
            ),
            (
                "document is a list",
                "- a\n- b\n".into(),
                &["document 1"],
            ),
            ("document is a scalar", "hello\n".into(), &["document 1"]),
        ];
    for (what, text, fields) in cases {
        let message = refused(&text).map_err(|e| format!("{what}: {e}"))?;
        for f in fields {
            assert!(
                message.contains(f),
                "{what}: {message:?} does not name {f:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn import_name_length() -> TestResult {
    // A single DNS label cannot exceed 63 characters anyway, so the Import rule is
    // exercised with a dotted (subdomain) name.
    let name63 = "a".repeat(MAX_IMPORT_NAME);
    let r = one(&doc(
        "Import",
        &format!("{{name: {name63}}}"),
        "{port: 80, sources: []}",
    ))?;
    assert_eq!(r.key().name.len(), 63);
    let dotted63 = format!("{}.{}", "a".repeat(31), "b".repeat(31));
    one(&doc(
        "Import",
        &format!("{{name: {dotted63}}}"),
        "{port: 80, sources: []}",
    ))?;

    let dotted64 = format!("{}.{}", "a".repeat(31), "b".repeat(32));
    assert_eq!(dotted64.len(), 64);
    let message = refused(&doc(
        "Import",
        &format!("{{name: {dotted64}}}"),
        "{port: 80, sources: []}",
    ))?;
    assert!(message.contains("metadata.name"), "{message}");
    assert!(
        message.contains("import name cannot exceed 63 chars"),
        "{message}"
    );

    let label64 = "a".repeat(64);
    let message = refused(&doc(
        "Import",
        &format!("{{name: {label64}}}"),
        "{port: 80, sources: []}",
    ))?;
    assert!(message.contains("metadata.name"), "{message}");

    // The 63-character rule is the Import's only: other kinds take any subdomain.
    one(&doc("Export", &format!("{{name: {dotted64}}}"), "{}"))?;
    Ok(())
}

#[test]
fn invalid_middle_document() -> TestResult {
    let text = [
        doc("Export", "{name: one}", "{port: 80}"),
        doc(
            "Import",
            "{name: two, namespace: ns}",
            "{port: 80, sources: [], lbScheme: fastest}",
        ),
        doc("Export", "{name: three}", "{port: 81}"),
    ]
    .join("---\n");
    let stream = parse_stream(&text);
    assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
    assert_eq!(stream.docs.len(), 3);
    let d = &stream.docs[0];
    assert_eq!(d.index, 1);
    assert_eq!(
        d.result.as_ref().map(Resource::key),
        Ok(key(Kind::Export, "default", "one"))
    );
    let d = &stream.docs[1];
    assert_eq!(d.index, 2);
    assert_eq!(d.key, Some(key(Kind::Import, "ns", "two")));
    match &d.result {
        Err(e @ Error::Invalid { field, .. }) => {
            assert_eq!(field, "spec.lbScheme");
            assert!(e.to_string().contains("fastest"), "{e}");
        }
        other => return Err(format!("document 2: want invalid, got {other:?}").into()),
    }
    let d = &stream.docs[2];
    assert_eq!(d.index, 3);
    assert_eq!(
        d.result.as_ref().map(Resource::key),
        Ok(key(Kind::Export, "default", "three"))
    );

    // A parse (not validation) failure: `doc` is the stream position, and the key
    // is still read leniently from kind and name.
    let text = [
        doc("Export", "{name: one}", "{port: 80}"),
        doc("Import", "{name: two}", "{port: 70000, sources: []}"),
        doc("Export", "{name: three}", "{port: 81}"),
    ]
    .join("---\n");
    let stream = parse_stream(&text);
    assert_eq!(stream.docs.len(), 3);
    assert_eq!(
        stream.docs[1].key,
        Some(key(Kind::Import, "default", "two"))
    );
    match &stream.docs[1].result {
        Err(Error::Parse { doc: 2, message }) => {
            assert!(message.contains("spec.port"), "{message}")
        }
        other => return Err(format!("document 2: want a parse error, got {other:?}").into()),
    }
    assert!(stream.docs[0].result.is_ok() && stream.docs[2].result.is_ok());
    let flat = parse_documents(&text);
    assert_eq!(flat.len(), 3);
    assert!(matches!(flat[1], Err(Error::Parse { doc: 2, .. })));

    // Unreadable kind or name: no key.
    let stream = parse_stream("kind: Import\nmetadata: {namespace: x}\n");
    assert_eq!(stream.docs.len(), 1);
    assert_eq!(stream.docs[0].key, None);
    assert!(stream.docs[0].result.is_err());
    Ok(())
}

#[test]
fn empty_documents_are_skipped_but_counted() -> TestResult {
    let text = format!(
        "# a comment, not a document\n---\n---\n{}",
        doc("Export", "{name: e}", "{}")
    );
    let stream = parse_stream(&text);
    assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
    assert_eq!(stream.docs.len(), 1);
    // The comment before the first `---` starts no document of its own.
    assert_eq!(stream.docs[0].index, 2);
    assert!(parse_stream("").docs.is_empty());
    assert!(parse_stream("---\n...\n").docs.is_empty());
    Ok(())
}

#[test]
fn syntax_error_stops_the_stream() -> TestResult {
    let text = [
        doc("Export", "{name: one}", "{port: 80}"),
        "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {name: two\nspec: {}\n"
            .to_owned(),
        doc("Export", "{name: three}", "{port: 81}"),
    ]
    .join("---\n");
    let stream = parse_stream(&text);
    assert_eq!(stream.docs.len(), 1, "{:?}", stream.docs);
    assert!(stream.docs[0].result.is_ok());
    match &stream.syntax_error {
        Some(Error::Parse { doc: 2, .. }) => {}
        other => return Err(format!("want a syntax error in document 2, got {other:?}").into()),
    }
    let flat = parse_documents(&text);
    assert_eq!(flat.len(), 2);
    assert!(matches!(flat[1], Err(Error::Parse { doc: 2, .. })));

    // Tabs for indentation, and a syntax error in the first document.
    let stream = parse_stream("apiVersion: x\nmetadata:\n\tname: a\n");
    assert!(stream.docs.is_empty());
    assert!(matches!(
        stream.syntax_error,
        Some(Error::Parse { doc: 1, .. })
    ));
    // Duplicate keys are refused rather than silently resolved.
    let stream = parse_stream(&format!("{}kind: Peer\n", doc("Export", "{name: e}", "{}")));
    assert!(stream.docs.is_empty());
    match stream.syntax_error {
        Some(Error::Parse { doc: 1, message }) => {
            assert!(
                message.contains("duplicate entry with key \"kind\""),
                "{message}"
            )
        }
        other => return Err(format!("want a duplicate key error, got {other:?}").into()),
    }
    Ok(())
}

#[test]
fn oversized_streams_are_refused_whole() -> TestResult {
    let one_doc = doc("Export", "{name: e}", "{port: 80}");
    let padding = format!("# {}\n", "x".repeat(MAX_STREAM_BYTES));
    let stream = parse_stream(&format!("{one_doc}{padding}"));
    assert!(stream.docs.is_empty());
    match stream.syntax_error {
        Some(Error::Parse { doc: 1, message }) => {
            assert!(message.contains("bytes"), "{message}")
        }
        other => return Err(format!("want a size error, got {other:?}").into()),
    }
    // Just under the limit is fine.
    let padding = format!("# {}\n", "x".repeat(MAX_STREAM_BYTES - one_doc.len() - 3));
    let text = format!("{one_doc}{padding}");
    assert_eq!(text.len(), MAX_STREAM_BYTES);
    one(&text)?;
    // The densest alias-free streams the size allows stay within the node budget:
    // they are refused as resources, not as YAML.
    for dense in [
        format!("[{}1]", "1,".repeat(MAX_STREAM_BYTES / 2 - 2)),
        "-\n".repeat(MAX_STREAM_BYTES / 2),
        "- - a\n".repeat(MAX_STREAM_BYTES / 6),
    ] {
        assert!(dense.len() <= MAX_STREAM_BYTES);
        let stream = parse_stream(&dense);
        assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
        assert_eq!(stream.docs.len(), 1);
    }
    Ok(())
}

#[test]
fn deep_flow_nesting_is_refused() -> TestResult {
    let deep = format!(
        "{}{}",
        "[".repeat(MAX_FLOW_OPENERS + 1),
        "]".repeat(MAX_FLOW_OPENERS + 1)
    );
    let text = format!("{}---\nx: {deep}\n", doc("Export", "{name: e}", "{}"));
    let stream = parse_stream(&text);
    assert!(stream.docs.is_empty());
    match stream.syntax_error {
        Some(Error::Parse { doc: 2, message }) => {
            assert!(message.contains("line 5"), "{message}")
        }
        other => return Err(format!("want a nesting error, got {other:?}").into()),
    }
    // The count is per document: many documents with a few brackets each pass,
    // as do JSON annotations (`kubectl apply`) in every document.
    let annotated = doc(
        "Export",
        "{name: e, annotations: {last-applied: '{\"a\":[{\"b\":[1]},{\"c\":{}}]}'}}",
        "{port: 80}",
    );
    let text = vec![annotated; MAX_FLOW_OPENERS].join("---\n");
    let stream = parse_stream(&text);
    assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
    assert_eq!(stream.docs.len(), MAX_FLOW_OPENERS);
    assert!(stream.docs.iter().all(|d| d.result.is_ok()));
    Ok(())
}

#[test]
fn alias_expansion_is_bounded() -> TestResult {
    // Ordinary anchors and aliases still work.
    let r = one(&doc(
        "AccessPolicy",
        "{name: p}",
        "{action: allow, from: &any [{workloadSelector: {}}], to: *any}",
    ))?;
    assert_eq!(r.key(), key(Kind::AccessPolicy, "default", "p"));
    // 4000 references to a list of 4000 scalars: 16 million nodes from 28 KB.
    let mut text = String::from("a: &a [");
    text.push_str(&"x, ".repeat(4000));
    text.push_str("]\nb: [");
    text.push_str(&"*a, ".repeat(4000));
    text.push_str("]\n");
    let started = Instant::now();
    let stream = parse_stream(&text);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(stream.docs.is_empty());
    match stream.syntax_error {
        Some(Error::Parse { doc: 1, message }) => {
            assert!(message.contains("aliases"), "{message}")
        }
        other => return Err(format!("want an expansion error, got {other:?}").into()),
    }
    // Tags are kept as serde_yaml_ng keeps them.
    let stream = parse_stream("a: !custom {b: 1}\n");
    assert!(stream.syntax_error.is_none(), "{:?}", stream.syntax_error);
    assert_eq!(stream.docs.len(), 1);
    Ok(())
}

/// xorshift64*: deterministic pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Inputs meant to break the parser: random bytes, YAML-looking noise, mutations of
/// valid manifests, deep nesting, huge scalars, and alias bombs.
fn nasty_inputs() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |what: &str, text: String| out.push((what.to_owned(), text));
    for s in [
            "",
            "\0",
            "\u{feff}",
            "\u{feff}apiVersion: clusterlink.net/v1alpha1",
            ":",
            "-",
            "---",
            "...",
            "{",
            "[",
            "}",
            "]",
            "'",
            "\"",
            "\"\\u",
            "|",
            ">",
            "? ",
            "&",
            "*",
            "&a",
            "*a",
            "&a *a",
            "&a [*a]",
            "&a {k: *a}",
            "a: &a [*a, *a]",
            "<<: *a",
            "a: &a {x: 1}\nb: {<<: *a, <<: *a}",
            "!!binary =====",
            "!!int notanumber",
            "!!float x",
            "!<tag:yaml.org,2002:str> x",
            "!unknown {a: 1}",
            "! x",
            "!!",
            "%YAML 1.1\n---\n",
            "%YAML 9.9\n---\na",
            "%TAG ! tag:x,2000:\n--- !a b",
            "kind: !!int Peer",
            "kind: [Peer]",
            "kind: {Peer: 1}",
            "apiVersion: 1\nkind: 2\nmetadata: 3\nspec: 4",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: null\nspec: null",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: {name: [a]}\nspec: {gateways: {}}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i}\nspec: {port: 99999999999999999999999999999999999999999, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i}\nspec: {port: 1e400, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i}\nspec: {port: .nan, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i}\nspec: {port: 0x50, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: i, labels: {a: [1]}}\nspec: {port: 80, sources: []}",
            "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p}\nspec: {action: allow, from: [{workloadSelector: {matchExpressions: [{key: \"\", operator: In, values: []}]}}], to: []}",
            "? [a, b]\n: c",
            "? {a: b}\n: c",
            "a: b\n  c: d",
            "\t",
            "a:\n\t- b",
            "\r\n\r\n---\r\n",
            "\u{85}\u{2028}\u{2029}",
            "\u{1F600}: \u{1F600}",
            "key: \"\\uD800\"",
            "key: \"\\x00\\0\\a\"",
        ] {
            add("fixed", s.to_owned());
        }

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..64 {
        let n = rng.below(4096);
        let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        add("random bytes", String::from_utf8_lossy(&bytes).into_owned());
    }
    const ALPHABET: &[u8] = b"-:{}[]&*!|>?'\"#%@`,.\n\n   \tabk019~";
    for _ in 0..256 {
        let n = rng.below(512);
        let text: String = (0..n)
            .map(|_| char::from(ALPHABET[rng.below(ALPHABET.len())]))
            .collect();
        add("yaml-ish noise", text);
    }
    let base = APPENDIX_A.as_bytes();
    for _ in 0..256 {
        let mut bytes = base.to_vec();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, ALPHABET[rng.below(ALPHABET.len())]),
                _ => bytes[at] = ALPHABET[rng.below(ALPHABET.len())],
            }
        }
        add(
            "mutated appendix",
            String::from_utf8_lossy(&bytes).into_owned(),
        );
    }

    for depth in [200, 10_000, 100_000] {
        add("deep flow sequence", "[".repeat(depth));
        add(
            "deep closed flow sequence",
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        );
        add("deep flow mapping", "{a: ".repeat(depth));
        add("deep block sequence", format!("{}x\n", "- ".repeat(depth)));
        add(
            "deep block mapping",
            (0..depth.min(10_000))
                .map(|i| format!("{}k:\n", " ".repeat(i)))
                .collect(),
        );
        add(
            "deep spec",
            format!(
                "{}{}{}",
                doc("Export", "{name: e}", "").trim_end(),
                " {a: ".repeat(depth),
                "}".repeat(depth)
            ),
        );
    }

    // Just under the size limit, and over it.
    let big = "x".repeat(MAX_STREAM_BYTES - 64);
    add("huge plain scalar", big.clone());
    add("huge quoted scalar", format!("\"{big}\""));
    add(
        "huge name",
        doc("Export", &format!("{{name: {big}}}"), "{}"),
    );
    add("huge key", format!("{big}: 1"));
    add("over the size limit", "x".repeat(64 << 20));
    add(
        "huge block scalar",
        format!("a: |\n{}", "  line\n".repeat(MAX_STREAM_BYTES / 8)),
    );
    add(
        "many empty documents",
        "---\n".repeat(MAX_STREAM_BYTES / 4 - 1),
    );
    add(
        "many small documents",
        (0..10_000)
            .map(|i| doc("Export", &format!("{{name: e{i}}}"), "{port: 80}"))
            .collect::<Vec<_>>()
            .join("---\n"),
    );
    add(
        "many anchors",
        (0..50_000).map(|i| format!("- &a{i} x\n")).collect(),
    );
    add(
        "long line of commas",
        format!("[{}]", ",".repeat(MAX_STREAM_BYTES - 2)),
    );
    add(
        "many scalars",
        format!("[{}]", "1,".repeat(MAX_STREAM_BYTES / 2 - 1)),
    );
    // As deep as the opener limit allows, then as many tokens as the size allows:
    // the worst case of libyaml's per-token walk over flow levels.
    for opener in ["[", "{a: "] {
        let head = opener.repeat(MAX_FLOW_OPENERS);
        let tail = "a, ".repeat((MAX_STREAM_BYTES - head.len()) / 3 - 1);
        add("deep within the limit", format!("{head}{tail}"));
    }
    add(
        "deep within the limit, many documents",
        format!("{}\n---\n", "[".repeat(MAX_FLOW_OPENERS)).repeat(MAX_STREAM_BYTES / 1030),
    );

    // The "billion laughs": ten levels of ten aliases each.
    let mut laughs = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        laughs.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
    }
    add("billion laughs", laughs.clone());
    add(
            "billion laughs in a resource",
            format!(
                "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: i\n  annotations: {{}}\n  x:\n{}spec: {{port: 80, sources: []}}\n",
                laughs.lines().map(|l| format!("    {l}\n")).collect::<String>()
            ),
        );
    // Quadratic growth within the jump limit: one anchored list of K scalars,
    // referred to K times.
    for k in [2_000, 20_000] {
        let mut s = String::from("a: &a [");
        s.push_str(&"x, ".repeat(k));
        s.push_str("]\nb: [");
        s.push_str(&"*a, ".repeat(k));
        s.push_str("]\n");
        add("quadratic aliases", s);
    }
    // The same, nested: an anchored mapping of lists of aliases.
    let mut s = String::from("a: &a [");
    s.push_str(&"x, ".repeat(1000));
    s.push_str("]\nb: &b [");
    s.push_str(&"*a, ".repeat(1000));
    s.push_str("]\nc: [");
    s.push_str(&"*b, ".repeat(1000));
    s.push_str("]\n");
    add("cubic aliases", s);
    out
}

#[test]
fn garbage_never_panics_and_finishes_quickly() -> TestResult {
    let inputs = nasty_inputs();
    let (tx, rx) = mpsc::channel();
    // On its own thread, so that a hang fails the test instead of stalling it and a
    // panic is reported with the input that caused it.
    std::thread::Builder::new()
        .name("garbage".into())
        .stack_size(8 << 20)
        .spawn(move || {
            for (i, (what, text)) in inputs.iter().enumerate() {
                let started = Instant::now();
                let _ = tx.send(Err((i, what.clone())));
                let stream = parse_stream(text);
                // Everything the stream reports must format without trouble.
                let _ = format!("{stream:?}");
                if text.len() < 1 << 16 {
                    let _ = parse_documents(text).len();
                }
                if tx.send(Ok((what.clone(), started.elapsed()))).is_err() {
                    return;
                }
            }
        })?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut current = None;
    let mut slowest = (String::new(), Duration::ZERO);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Err(i)) => current = Some(i),
            Ok(Ok((what, took))) => {
                current = None;
                if took > slowest.1 {
                    slowest = (what, took);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("still parsing input {current:?} after 120 s").into())
            }
        }
    }
    assert_eq!(current, None, "the parser panicked on input {current:?}");
    // Generous for unoptimised builds; an unbounded expansion takes minutes.
    assert!(
        slowest.1 < Duration::from_secs(20),
        "slowest input: {} took {:?}",
        slowest.0,
        slowest.1
    );
    Ok(())
}

#[test]
fn a_kubectl_list_counts_as_its_items() -> TestResult {
    let text = "apiVersion: v1
kind: List
items:
- apiVersion: clusterlink.net/v1alpha1
  kind: Peer
  metadata: {name: server}
  spec:
    gateways: [{host: 10.0.0.1, port: 30443}]
- apiVersion: clusterlink.net/v1alpha1
  kind: Import
  metadata: {name: bad, namespace: default}
  spec: {port: 80, lbScheme: fastest, sources: []}
---
apiVersion: v1
kind: List
items: {}
";
    let s = parse_stream(text);
    assert!(s.syntax_error.is_none());
    assert_eq!(s.docs.len(), 3);
    assert!(matches!(&s.docs[0].result, Ok(Resource::Peer(_))));
    assert_eq!(s.docs[1].index, 1);
    assert!(s.docs[1].key.is_some());
    assert!(format!("{:?}", s.docs[1].result).contains("spec.lbScheme"));
    assert!(matches!(
        &s.docs[2].result,
        Err(Error::Parse { doc: 2, .. })
    ));
    Ok(())
}

/// The CRD types (`crds`, the API server's schema) and this model read ClusterLink's
/// samples alike: each sample, through the CRD type and back to JSON, parses to the
/// same resource as the sample itself.
#[test]
fn crd_types_and_resources_agree_on_the_samples() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/clusterlink-manifests/samples");
    let mut checked = 0;
    for dir in ["bookinfo", "iperf3", "nginx", "speedtest", "website"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("test input") {
            // The demos substitute `${VAR}` (gateway hosts) before applying.
            let raw =
                std::fs::read_to_string(entry.expect("test input").path()).expect("test input");
            let mut text = String::new();
            let mut rest = raw.as_str();
            while let Some(at) = rest.find("${") {
                let end = rest[at..].find('}').expect("test input");
                text.push_str(&rest[..at]);
                text.push_str("127.0.0.1");
                rest = &rest[at + end + 1..];
            }
            text.push_str(rest);
            for r in parse_documents(&text) {
                let r = r.unwrap_or_else(|e| panic!("{dir}: {e}"));
                let json = r.to_json();
                let through = match r.kind() {
                    Kind::Peer => serde_json::to_value(
                        serde_json::from_value::<crds::Peer>(json).expect("test input"),
                    ),
                    Kind::Export => serde_json::to_value(
                        serde_json::from_value::<crds::Export>(json).expect("test input"),
                    ),
                    Kind::Import => serde_json::to_value(
                        serde_json::from_value::<crds::Import>(json).expect("test input"),
                    ),
                    Kind::AccessPolicy => serde_json::to_value(
                        serde_json::from_value::<crds::AccessPolicy>(json).expect("test input"),
                    ),
                    Kind::PrivilegedAccessPolicy => serde_json::to_value(
                        serde_json::from_value::<crds::PrivilegedAccessPolicy>(json)
                            .expect("test input"),
                    ),
                }
                .expect("test input");
                assert_eq!(parse_object(&through).expect("test input"), r, "{dir}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked} samples");
}
