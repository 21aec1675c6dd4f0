//! End-to-end with real control planes and data planes (see `tests::site`): load
//! balancing over an import's sources (spec 3.8; ClusterLink's TestLoadBalancing*)
//! and the policy decision point on both sides of a connection (spec 3.10;
//! TestPolicyLabels, TestPrivilegedPolicies, TestPeerLabels), adapted to peers that
//! run outside Kubernetes: the only source attributes are the local peer's name and
//! its `--peer-label`s.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use tests::site::*;
use tests::*;

/// Deadline for setting up peers (certificates, first heartbeats).
const T: Duration = Duration::from_secs(30);
/// Deadline for a resource change to show in what connections get.
const STEP: Duration = Duration::from_secs(10);
const NAMES: [&str; 3] = ["cl0", "cl1", "cl2"];

// ---------------------------------------------------------------- YAML

fn export_with_labels(name: &str, target: SocketAddr, labels: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata:\n  name: {name}\n  namespace: default\n{}spec:\n  host: {}\n  port: {}\n",
        metadata_labels(labels),
        target.ip(),
        target.port()
    )
}

fn metadata_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut s = "  labels:\n".to_owned();
    for (k, v) in labels {
        s.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    s
}

/// Import `name` in `default` on `port` of export `default/echo` from `peers`, with
/// `scheme` (none: the default, round-robin) and metadata `labels`.
fn import_of_echo(
    name: &str,
    port: u16,
    peers: &[&str],
    scheme: Option<&str>,
    labels: &[(&str, &str)],
) -> String {
    let mut s = format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: {name}\n  namespace: default\n{}spec:\n  port: {port}\n",
        metadata_labels(labels)
    );
    if let Some(scheme) = scheme {
        s.push_str(&format!("  lbScheme: {scheme}\n"));
    }
    s.push_str("  sources:\n");
    for p in peers {
        s.push_str(&format!(
            "  - peer: {p}\n    exportName: echo\n    exportNamespace: default\n"
        ));
    }
    s
}

type Labels<'a> = &'a [(&'a str, &'a str)];

/// An AccessPolicy (namespace `default`) or a PrivilegedAccessPolicy (no namespace)
/// with one `from` and one `to` selector (empty: `{}`, matches everything).
#[derive(Clone, Copy)]
struct Policy<'a> {
    privileged: bool,
    name: &'a str,
    action: &'a str,
    from: Labels<'a>,
    to: Labels<'a>,
}

impl Policy<'_> {
    fn regular<'a>(name: &'a str, action: &'a str, from: Labels<'a>, to: Labels<'a>) -> Policy<'a> {
        Policy {
            privileged: false,
            name,
            action,
            from,
            to,
        }
    }

    fn privileged<'a>(
        name: &'a str,
        action: &'a str,
        from: Labels<'a>,
        to: Labels<'a>,
    ) -> Policy<'a> {
        Policy {
            privileged: true,
            ..Policy::regular(name, action, from, to)
        }
    }

    fn yaml(&self) -> String {
        fn selector(labels: Labels) -> String {
            if labels.is_empty() {
                return "  - workloadSelector: {}\n".into();
            }
            let mut s = "  - workloadSelector:\n      matchLabels:\n".to_owned();
            for (k, v) in labels {
                s.push_str(&format!("        {k}: \"{v}\"\n"));
            }
            s
        }
        let (kind, namespace) = if self.privileged {
            ("PrivilegedAccessPolicy", "")
        } else {
            ("AccessPolicy", "  namespace: default\n")
        };
        format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: {kind}\nmetadata:\n  name: {}\n{namespace}spec:\n  action: {}\n  from:\n{}  to:\n{}",
            self.name,
            self.action,
            selector(self.from),
            selector(self.to)
        )
    }

    /// The spec as the admin API shows it.
    fn spec_json(&self) -> serde_json::Value {
        fn selector(labels: Labels) -> serde_json::Value {
            if labels.is_empty() {
                return serde_json::json!([{ "workloadSelector": {} }]);
            }
            let m: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                .collect();
            serde_json::json!([{ "workloadSelector": { "matchLabels": m } }])
        }
        serde_json::json!({
            "action": self.action,
            "from": selector(self.from),
            "to": selector(self.to),
        })
    }

    fn path(&self) -> String {
        if self.privileged {
            format!("/api/privilegedaccesspolicies/{}", self.name)
        } else {
            format!("/api/accesspolicies/default/{}", self.name)
        }
    }

    fn file(&self) -> String {
        format!("policy-{}.yaml", self.name)
    }
}

/// Writes the policy on `site` and waits until the control plane has it in force.
async fn put(site: &Site, p: Policy<'_>) -> Result<()> {
    site.write(&p.file(), &p.yaml())?;
    let path = p.path();
    let want = p.spec_json();
    eventually(&format!("{} on {}", path, site.name), STEP, || async {
        let v = site.get(&path).await.ok()?;
        (v["spec"] == want).then_some(())
    })
    .await
}

/// Removes the policy's file on `site` and waits until the control plane dropped it.
async fn delete(site: &Site, p: Policy<'_>) -> Result<()> {
    remove(site, &p.file())?;
    gone(site, &p.path()).await
}

async fn gone(site: &Site, path: &str) -> Result<()> {
    eventually(
        &format!("{path} removed on {}", site.name),
        STEP,
        || async { site.get(path).await.is_err().then_some(()) },
    )
    .await
}

// ---------------------------------------------------------------- access

/// Waits until one access gets `want` (`None`: refused), then checks that 3 more in a
/// row get the same.
async fn expect(import: SocketAddr, want: Option<&str>, step: &str) -> Result<()> {
    let last = Mutex::new(None);
    eventually(step, STEP, || async {
        let got = access(import).await;
        let ok = got.as_deref() == want;
        if let Ok(mut l) = last.lock() {
            *l = got;
        }
        ok.then_some(())
    })
    .await
    .map_err(|e| anyhow!("{e}: expected {want:?}, last access got {last:?}"))?;
    let after = accesses(import, 3).await;
    ensure!(
        after.iter().all(|a| a.as_deref() == want),
        "{step}: expected {want:?} to stay, got {after:?}"
    );
    Ok(())
}

/// Waits until a window of 3 consecutive accesses satisfies `ok`; returns it.
async fn settle(
    import: SocketAddr,
    what: &str,
    ok: impl Fn(&[Option<String>]) -> bool,
) -> Result<Vec<Option<String>>> {
    let last = Mutex::new(Vec::new());
    let ok = &ok;
    eventually(what, STEP, || async {
        let window = accesses(import, 3).await;
        let done = ok(&window);
        if let Ok(mut l) = last.lock() {
            l.clone_from(&window);
        }
        done.then_some(window)
    })
    .await
    .map_err(|e| anyhow!("{e}; last window of 3 accesses: {last:?}"))
}

// ---------------------------------------------------------------- load balancing

/// ClusterLink's load-balancing topology: cl0, cl1 and cl2 each export `echo` (a
/// server answering the peer's name) with allow-all; cl0 has Peers for all three
/// (itself included) and imports `my-import` from all three, in that order.
struct Lb {
    _root: TempDir,
    sites: Vec<Site>,
    import: SocketAddr,
}

impl Lb {
    async fn start(scheme: Option<&str>) -> Result<Lb> {
        init_logs();
        let fabric = Fabric::new("lb-fabric")?;
        let root = TempDir::new("cl-lb")?;
        let mut sites = Vec::new();
        for name in NAMES {
            let site = Site::start(&fabric, root.path(), name, &[]).await?;
            site.write(
                "export.yaml",
                &export_yaml("echo", start_name_server(name).await?),
            )?;
            site.write("policy.yaml", ALLOW_ALL)?;
            sites.push(site);
        }
        let cl0 = sites.first().ok_or_else(|| anyhow!("no sites"))?;
        for s in &sites {
            cl0.write(&format!("peer-{}.yaml", s.name), &s.peer_yaml())?;
        }
        // The exporters only answer /authz for peers they know.
        for s in sites.iter().skip(1) {
            s.write("peer-cl0.yaml", &cl0.peer_yaml())?;
        }
        let port = free_port()?;
        cl0.write(
            "import.yaml",
            &import_of_echo("my-import", port, &NAMES, scheme, &[]),
        )?;
        for s in &sites {
            wait_condition(
                cl0,
                &format!("/api/peers/{}", s.name),
                "PeerReachable",
                "True",
            )
            .await?;
            wait_condition(s, "/api/exports/default/echo", "ExportValid", "True").await?;
            eventually(&format!("allow-all on {}", s.name), T, || async {
                s.get("/api/accesspolicies/default/allow-all").await.ok()
            })
            .await?;
        }
        for s in sites.iter().skip(1) {
            eventually(&format!("Peer cl0 on {}", s.name), T, || async {
                s.get("/api/peers/cl0").await.ok()
            })
            .await?;
        }
        wait_condition(
            cl0,
            "/api/imports/default/my-import",
            "ImportTargetPortValid",
            "True",
        )
        .await?;
        Ok(Lb {
            _root: root,
            sites,
            import: format!("127.0.0.1:{port}").parse()?,
        })
    }

    fn site(&self, i: usize) -> Result<&Site> {
        self.sites.get(i).ok_or_else(|| anyhow!("no site {i}"))
    }

    /// Deletes the export of site `i` and waits until its control plane dropped it
    /// (it then answers 404 to `/authz` for it).
    async fn remove_export(&self, i: usize) -> Result<()> {
        let site = self.site(i)?;
        remove(site, "export.yaml")?;
        gone(site, "/api/exports/default/echo").await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancing_round_robin() -> Result<()> {
    let lb = Lb::start(None).await?;
    let import = lb.import;
    // Warm-up: every source serves. These accesses advance the import's counter too.
    eventually("all three sources answer", T, || async {
        (names(&accesses(import, 3).await).len() == 3).then_some(())
    })
    .await?;
    // The counter advances by one per connection: from the phase of the first answer
    // on, the sources follow in list order, cyclically.
    check_round_robin(import, &NAMES).await?;

    // Without cl0's export: a pick of cl0 fails over to cl1 and consumes a counter
    // step, so connections alternate strictly between cl1 and cl2.
    lb.remove_export(0).await?;
    settle(import, "cl0 no longer serves", |w| {
        w.iter().all(|a| a.as_deref() != Some("cl0"))
    })
    .await?;
    let got = accesses(import, 30).await;
    ensure!(
        alternates(&got, "cl1", "cl2"),
        "without cl0's export, expected strict cl1/cl2 alternation, got {got:?}"
    );

    // Without cl1's either: everything goes to cl2.
    lb.remove_export(1).await?;
    settle(import, "only cl2 serves", |w| all(w, "cl2")).await?;
    let got = accesses(import, 30).await;
    ensure!(all(&got, "cl2"), "only cl2 left, got {got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancing_static() -> Result<()> {
    let lb = Lb::start(Some("static")).await?;
    let import = lb.import;
    expect(import, Some("cl0"), "static: the first source serves").await?;
    let got = accesses(import, 30).await;
    ensure!(all(&got, "cl0"), "static: expected all cl0, got {got:?}");

    lb.remove_export(0).await?;
    settle(import, "static: cl1 takes over", |w| all(w, "cl1")).await?;
    let got = accesses(import, 30).await;
    ensure!(
        all(&got, "cl1"),
        "static without cl0's export: expected all cl1, got {got:?}"
    );

    lb.remove_export(1).await?;
    settle(import, "static: cl2 takes over", |w| all(w, "cl2")).await?;
    let got = accesses(import, 30).await;
    ensure!(
        all(&got, "cl2"),
        "static without cl0's and cl1's exports: expected all cl2, got {got:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancing_random() -> Result<()> {
    let lb = Lb::start(Some("random")).await?;
    let import = lb.import;
    eventually("random: a source serves", T, || async {
        access(import).await
    })
    .await?;
    // P(some source missed in 100) = 3 (2/3)^100 ≈ 7e-18.
    let got = accesses(import, 100).await;
    ensure!(
        got.iter().all(Option::is_some) && names(&got) == BTreeSet::from(NAMES),
        "random: expected all three sources, got {got:?}"
    );

    lb.remove_export(0).await?;
    settle(import, "random: cl0 no longer serves", |w| {
        w.iter().all(|a| a.as_deref() != Some("cl0"))
    })
    .await?;
    // P(cl1 or cl2 missed in 60) = 2 (1/2)^60 ≈ 2e-18.
    let got = accesses(import, 60).await;
    ensure!(
        got.iter().all(Option::is_some) && names(&got) == BTreeSet::from(["cl1", "cl2"]),
        "random without cl0's export: expected exactly cl1 and cl2, got {got:?}"
    );

    lb.remove_export(1).await?;
    settle(import, "random: only cl2 serves", |w| all(w, "cl2")).await?;
    let got = accesses(import, 30).await;
    ensure!(
        all(&got, "cl2"),
        "random without cl0's and cl1's exports: expected all cl2, got {got:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------- policies

/// cl0 exports `echo` (a server answering "cl0", Export label env=test); cl1 imports
/// it as `echo` (Import label env=test). Both know each other as Peers; no policies.
async fn policy_pair(
    labels0: &[&str],
    labels1: &[&str],
) -> Result<(TempDir, Site, Site, SocketAddr)> {
    init_logs();
    let fabric = Fabric::new("policy-fabric")?;
    let root = TempDir::new("cl-policy")?;
    let cl0 = Site::start(&fabric, root.path(), "cl0", labels0).await?;
    let cl1 = Site::start(&fabric, root.path(), "cl1", labels1).await?;
    let env = [("env", "test")];
    cl0.write(
        "export.yaml",
        &export_with_labels("echo", start_name_server("cl0").await?, &env),
    )?;
    cl0.write("peer-cl1.yaml", &cl1.peer_yaml())?;
    cl1.write("peer-cl0.yaml", &cl0.peer_yaml())?;
    let port = free_port()?;
    cl1.write(
        "import.yaml",
        &import_of_echo("echo", port, &["cl0"], None, &env),
    )?;
    wait_condition(&cl1, "/api/peers/cl0", "PeerReachable", "True").await?;
    wait_condition(&cl0, "/api/exports/default/echo", "ExportValid", "True").await?;
    eventually("Peer cl1 on cl0", T, || async {
        cl0.get("/api/peers/cl1").await.ok()
    })
    .await?;
    wait_condition(
        &cl1,
        "/api/imports/default/echo",
        "ImportTargetPortValid",
        "True",
    )
    .await?;
    Ok((root, cl0, cl1, format!("127.0.0.1:{port}").parse()?))
}

const PEER_NAME: &str = "peer.clusterlink.net/name";
const EXPORT_NAME: &str = "export.clusterlink.net/name";
const EXPORT_ENV: &str = "export.clusterlink.net/labels.env";
const PEER_CLUSTER: &str = "peer.clusterlink.net/labels.cluster";

/// TestPolicyLabels: policies on the name and labels of peers and exports, on both
/// sides; each step waits for the expected outcome, then checks that it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_labels_sequence() -> Result<()> {
    let (_root, cl0, cl1, import) = policy_pair(&[], &[]).await?;
    let ok = Some("cl0");

    // (1) Allow on both sides, by peer name, export name and export label.
    let allow1 = Policy::regular(
        "allow",
        "allow",
        &[(PEER_NAME, "cl1")],
        &[
            (EXPORT_NAME, "echo"),
            (PEER_NAME, "cl0"),
            (EXPORT_ENV, "test"),
        ],
    );
    let allow0 = Policy::regular(
        "allow",
        "allow",
        &[(PEER_NAME, "cl1")],
        &[(PEER_NAME, "cl0")],
    );
    put(&cl1, allow1).await?;
    put(&cl0, allow0).await?;
    expect(import, ok, "(1) allowed on both sides").await?;

    // (2)-(3) The importer denies the export by name.
    let deny = Policy::regular("deny-export", "deny", &[], &[(EXPORT_NAME, "echo")]);
    put(&cl1, deny).await?;
    expect(import, None, "(2) cl1 denies export echo").await?;
    delete(&cl1, deny).await?;
    expect(import, ok, "(3) cl1's deny removed").await?;

    // (4)-(5) The importer denies the exporting peer.
    let deny = Policy::regular("deny-peer", "deny", &[], &[(PEER_NAME, "cl0")]);
    put(&cl1, deny).await?;
    expect(import, None, "(4) cl1 denies peer cl0").await?;
    delete(&cl1, deny).await?;
    expect(import, ok, "(5) cl1's deny removed").await?;

    // (6)-(7) The exporter denies the importing peer.
    let deny = Policy::regular("deny-cl1", "deny", &[(PEER_NAME, "cl1")], &[]);
    put(&cl0, deny).await?;
    expect(import, None, "(6) cl0 denies peer cl1").await?;
    delete(&cl0, deny).await?;
    expect(import, ok, "(7) cl0's deny removed").await?;

    // (8) The importer's allow now names another export: default deny.
    let bad = Policy::regular(
        "allow",
        "allow",
        &[],
        &[(EXPORT_NAME, "bad-svc"), (PEER_NAME, "cl0")],
    );
    put(&cl1, bad).await?;
    expect(import, None, "(8) cl1 allows only bad-svc").await?;

    // (9) An allow for another value of the import's label does not help.
    put(
        &cl1,
        Policy::regular("allow-prod", "allow", &[], &[(EXPORT_ENV, "prod")]),
    )
    .await?;
    expect(import, None, "(9) cl1 allows env=prod").await?;

    // (10) An allow for the import's label (env=test) does.
    put(
        &cl1,
        Policy::regular("allow-test", "allow", &[], &[(EXPORT_ENV, "test")]),
    )
    .await?;
    expect(import, ok, "(10) cl1 allows env=test").await?;
    Ok(())
}

/// TestPrivilegedPolicies: privileged deny, privileged allow, regular deny, regular
/// allow are decided in that order; removing them one by one flips the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_and_regular_tiers_in_order() -> Result<()> {
    let (_root, cl0, cl1, import) = policy_pair(&[], &[]).await?;
    cl0.write("policy.yaml", ALLOW_ALL)?;
    eventually("allow-all on cl0", T, || async {
        cl0.get("/api/accesspolicies/default/allow-all").await.ok()
    })
    .await?;
    let to: Labels = &[(EXPORT_NAME, "echo"), (PEER_NAME, "cl0")];
    let priv_deny = Policy::privileged("priv-deny", "deny", &[], to);
    let priv_allow = Policy::privileged("priv-allow", "allow", &[], to);
    let reg_deny = Policy::regular("reg-deny", "deny", &[], to);
    let reg_allow = Policy::regular("reg-allow", "allow", &[], to);
    for p in [priv_deny, priv_allow, reg_deny, reg_allow] {
        put(&cl1, p).await?;
    }
    expect(import, None, "all four: the privileged deny wins").await?;
    delete(&cl1, priv_deny).await?;
    expect(import, Some("cl0"), "the privileged allow wins").await?;
    delete(&cl1, priv_allow).await?;
    expect(import, None, "the regular deny wins").await?;
    delete(&cl1, reg_deny).await?;
    expect(import, Some("cl0"), "the regular allow wins").await?;
    delete(&cl1, reg_allow).await?;
    expect(import, None, "default deny").await?;
    Ok(())
}

/// TestPeerLabels: the exporter matches the importer's labels as it sends them; the
/// importer matches the exporter's labels as learned from heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_labels_from_heartbeats() -> Result<()> {
    let (_root, cl0, cl1, import) = policy_pair(&["cluster=cl0"], &["cluster=cl1"]).await?;
    cl0.write("policy.yaml", ALLOW_ALL)?;
    cl1.write("policy.yaml", ALLOW_ALL)?;
    expect(import, Some("cl0"), "allow-all on both sides").await?;
    let peer = eventually("cl0's labels on cl1", T, || async {
        let v = cl1.get("/api/peers/cl0").await.ok()?;
        (v["status"]["labels"]["cluster"] == "cl0").then_some(v)
    })
    .await?;
    ensure!(
        peer["status"]["labels"]["cluster"] == "cl0",
        "labels from heartbeats: {peer}"
    );

    // (1) cl0 denies importers labelled cluster=cl1.
    put(
        &cl0,
        Policy::regular("deny-cl1", "deny", &[(PEER_CLUSTER, "cl1")], &[]),
    )
    .await?;
    expect(import, None, "(1) cl0 denies cluster=cl1").await?;
    // (2) A privileged allow beats the regular deny.
    put(
        &cl0,
        Policy::privileged("allow-cl1", "allow", &[(PEER_CLUSTER, "cl1")], &[]),
    )
    .await?;
    expect(import, Some("cl0"), "(2) cl0 privileged-allows cluster=cl1").await?;
    // (3) cl1 denies exporters labelled otherwise: no effect.
    put(
        &cl1,
        Policy::regular("deny-other", "deny", &[], &[(PEER_CLUSTER, "not-cl0")]),
    )
    .await?;
    expect(import, Some("cl0"), "(3) cl1 denies cluster=not-cl0").await?;
    // (4) cl1 denies exporters labelled cluster=cl0, known from heartbeats.
    put(
        &cl1,
        Policy::regular("deny-cl0", "deny", &[], &[(PEER_CLUSTER, "cl0")]),
    )
    .await?;
    expect(import, None, "(4) cl1 denies cluster=cl0").await?;
    Ok(())
}

/// The exporter takes the requester's peer labels from what it learned of that peer
/// (its heartbeats), never from the request: cl1, labelled env=dev, that claims
/// env=prod in its authorization request gets no token from cl0, whose policy admits
/// only env=prod peers (spec 3.9's hole, which ClusterLink has). Once cl0 admits
/// env=dev, the ordinary path works, from the labels cl0 learned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_peer_labels_are_not_trusted() -> Result<()> {
    let (_root, cl0, cl1, import) = policy_pair(&[], &["env=dev"]).await?;
    cl1.write("policy.yaml", ALLOW_ALL)?;
    let peer_env = "peer.clusterlink.net/labels.env";
    put(
        &cl0,
        Policy::regular("allow", "allow", &[(peer_env, "prod")], &[]),
    )
    .await?;
    // cl0 knows cl1's labels from its heartbeats.
    eventually("cl1's labels on cl0", T, || async {
        let p = cl0.get("/api/peers/cl1").await.ok()?;
        (p["status"]["labels"]["env"] == "dev").then_some(())
    })
    .await?;
    expect(import, None, "cl1 (env=dev) is not admitted").await?;

    // cl1's own certificate, and a request claiming env=prod.
    let cert = PeerCert {
        name: "cl1".into(),
        chain_pem: std::fs::read_to_string(&cl1.files.cert)?,
        key_pem: std::fs::read_to_string(&cl1.files.key)?,
        serial: 0,
    };
    let claim = serde_json::json!({
        "ServiceName": "echo",
        "ServiceNamespace": "default",
        "SrcAttributes": {
            "peer.clusterlink.net/name": "cl1",
            peer_env: "prod",
        },
    })
    .to_string();
    let mut s = tls_connect(
        cl0.dp.gateway_addr,
        &std::fs::read_to_string(&cl0.files.ca)?,
        &cert,
        "cl0",
        &[b"http/1.1"],
    )
    .await?;
    let (status, body) = h1_request(
        &mut s,
        &format!(
            "POST /authz HTTP/1.1\r\nHost: cl0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{claim}",
            claim.len()
        ),
    )
    .await?;
    ensure!(
        status == 403,
        "a claimed env=prod was trusted: {status} {body:?}"
    );

    put(
        &cl0,
        Policy::regular("allow", "allow", &[(peer_env, "dev")], &[]),
    )
    .await?;
    expect(import, Some("cl0"), "cl0 admits env=dev, as it learned").await?;
    Ok(())
}
