//! Load balancing and access policies end-to-end on real API servers (spec §7.2:
//! TestLoadBalancingRoundRobin/Static, TestPolicyLabels, TestPrivilegedPolicies,
//! TestPodAttributes), with every object made by kubectl and the planes as processes
//! (see `tests::k8s::Fleet`). The exported services answer with their peer's name,
//! so each access tells which peer served it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use tests::k8s::{peer_yaml, retry, until, Fleet, Kubectl, WAIT};
use tests::procs::free_port;
use tests::site::{access, accesses, all, alternates, check_round_robin, start_name_server};
use tests::{http_get, metric};

/// How long a resource change may take to show in what new connections get.
const STEP: Duration = Duration::from_secs(15);

/// An Export of `port` on 127.0.0.1 as default/`name`, with metadata labels.
fn export(name: &str, port: u16, labels: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {{name: {name}, namespace: default, labels: {{{}}}}}\nspec: {{host: 127.0.0.1, port: {port}}}\n",
        pairs(labels)
    )
}

/// An Import default/`name` of export `echo` from `peers`, in that order.
fn import(
    name: &str,
    target: u16,
    peers: &[&str],
    scheme: Option<&str>,
    labels: &[(&str, &str)],
) -> String {
    let sources: Vec<String> = peers
        .iter()
        .map(|p| format!("{{peer: {p}, exportName: echo, exportNamespace: default}}"))
        .collect();
    let scheme = scheme
        .map(|s| format!("  lbScheme: {s}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {{name: {name}, namespace: default, labels: {{{}}}}}\nspec:\n  port: 80\n  targetPort: {target}\n{scheme}  sources: [{}]\n",
        pairs(labels),
        sources.join(", ")
    )
}

fn pairs(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("\"{k}\": \"{v}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

type Labels<'a> = &'a [(&'a str, &'a str)];

/// An access policy: `privileged` ones are PrivilegedAccessPolicies (cluster-wide),
/// the others AccessPolicies in `default`.
#[derive(Clone, Copy)]
struct Policy<'a> {
    privileged: bool,
    name: &'a str,
    action: &'a str,
    from: Labels<'a>,
    to: Labels<'a>,
}

impl<'a> Policy<'a> {
    fn regular(name: &'a str, action: &'a str, from: Labels<'a>, to: Labels<'a>) -> Self {
        Policy {
            privileged: false,
            name,
            action,
            from,
            to,
        }
    }

    fn privileged(name: &'a str, action: &'a str, from: Labels<'a>, to: Labels<'a>) -> Self {
        Policy {
            privileged: true,
            ..Self::regular(name, action, from, to)
        }
    }

    fn yaml(&self) -> String {
        let (kind, ns) = if self.privileged {
            ("PrivilegedAccessPolicy", String::new())
        } else {
            ("AccessPolicy", ", namespace: default".to_owned())
        };
        format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: {kind}\nmetadata: {{name: {}{ns}}}\nspec:\n  action: {}\n  from: [{{workloadSelector: {{matchLabels: {{{}}}}}}}]\n  to: [{{workloadSelector: {{matchLabels: {{{}}}}}}}]\n",
            self.name,
            self.action,
            pairs(self.from),
            pairs(self.to)
        )
    }

    fn put(&self, c: &Kubectl) -> Result<()> {
        c.apply(&self.yaml())
    }

    fn delete(&self, c: &Kubectl) -> Result<()> {
        let mut args = vec![
            "delete",
            if self.privileged {
                "privilegedaccesspolicy"
            } else {
                "accesspolicy"
            },
            self.name,
        ];
        if !self.privileged {
            args.extend(["-n", "default"]);
        }
        c.ok(&args).map(drop)
    }
}

// ---------------------------------------------------------------- access

/// Where the importing side is watched: its import listener and its data plane's
/// admin port, whose `clusterlink_authorization_denials_total{direction="outbound",
/// reason="policy"}` tells a policy refusal from any other failure.
#[derive(Clone, Copy)]
struct Importer {
    import: SocketAddr,
    admin: SocketAddr,
}

impl Importer {
    async fn policy_denials(&self) -> Result<f64> {
        let (_, text) = http_get(self.admin, "/metrics").await?;
        Ok(metric(
            &text,
            "clusterlink_authorization_denials_total",
            &["direction=\"outbound\"", "reason=\"policy\""],
        ))
    }
}

/// Waits until one access gets `want` (`None`: refused), then checks that 3 more in a
/// row get the same; a refusal must be the importer's policy decision.
async fn expect(at: Importer, want: Option<&str>, step: &str) -> Result<()> {
    expect_from(None, at, want, step).await
}

/// As `expect`, connecting from `source` (an address of this host) when given.
async fn expect_from(
    source: Option<std::net::IpAddr>,
    at: Importer,
    want: Option<&str>,
    step: &str,
) -> Result<()> {
    let import = at.import;
    let once = || async {
        match source {
            None => access(import).await,
            Some(ip) => access_from(ip, import).await,
        }
    };
    retry(step, STEP, || async {
        let got = once().await;
        ensure!(
            got.as_deref() == want,
            "expected {want:?}, last access got {got:?}"
        );
        Ok(())
    })
    .await?;
    let before = at.policy_denials().await?;
    for _ in 0..3 {
        let got = once().await;
        ensure!(
            got.as_deref() == want,
            "{step}: expected {want:?} to stay, got {got:?}"
        );
    }
    if want.is_none() {
        let after = at.policy_denials().await?;
        ensure!(
            after >= before + 3.0,
            "{step}: 3 refusals, but {} of them by policy",
            after - before
        );
    }
    Ok(())
}

/// Connects to an import from `source` and reads what the export answered until EOF;
/// `None` if the connection was refused, reset or closed empty.
async fn access_from(source: std::net::IpAddr, import: SocketAddr) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(source, 0)).ok()?;
    let mut s = socket.connect(import).await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(STEP, s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    (!out.is_empty()).then_some(out)
}

/// Waits until a window of 3 consecutive accesses satisfies `ok`.
async fn settle(
    import: SocketAddr,
    what: &str,
    ok: impl Fn(&[Option<String>]) -> bool,
) -> Result<()> {
    let ok = &ok;
    retry(what, STEP, || async {
        let window = accesses(import, 3).await;
        ensure!(ok(&window), "last window of 3 accesses: {window:?}");
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------- load balancing

const NAMES: [&str; 3] = ["cl0", "cl1", "cl2"];

/// ClusterLink's load-balancing topology: cl0, cl1 and cl2 each export `echo`; cl0
/// knows all three as Peers (itself included) and imports `echo` from all three, in
/// that order, twice: `rr` with the default scheme (round-robin) and `st` static.
/// The 30-access patterns are §7.2's: round-robin cycles cl0, cl1, cl2; without
/// cl0's export it alternates strictly between cl1 and cl2 (the failover consumes a
/// counter step); without cl1's too, all cl2. Static: all cl0, then all cl1, then all
/// cl2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_load_balancing_round_robin_and_static() -> Result<()> {
    let Some(f) = Fleet::start("k8s-lb", &NAMES).await? else {
        return Ok(());
    };
    let cl0 = f.cluster(0)?;
    cl0.apply(&peer_yaml("cl0", f.peer(0)?.gateway))?;
    for (i, name) in NAMES.iter().enumerate() {
        let server = start_name_server(name).await?;
        f.cluster(i)?.apply(&export("echo", server.port(), &[]))?;
    }
    let (rr_port, st_port) = (free_port()?, free_port()?);
    cl0.apply(&import("rr", rr_port, &NAMES, None, &[]))?;
    cl0.apply(&import("st", st_port, &NAMES, Some("static"), &[]))?;
    for (i, name) in NAMES.iter().enumerate() {
        until(cl0, "peer", name, "PeerReachable", "True").await?;
        until(f.cluster(i)?, "export", "echo", "ExportValid", "True").await?;
    }
    let rr: SocketAddr = ([127, 0, 0, 1], rr_port).into();
    let st: SocketAddr = ([127, 0, 0, 1], st_port).into();
    let at_st = Importer {
        import: st,
        admin: ([127, 0, 0, 1], f.peer(0)?.dp_admin).into(),
    };

    // Round-robin: once all three serve, the sources follow in list order, cyclically,
    // from the phase of the first answer on.
    retry("all three sources answer", WAIT, || async {
        let got = accesses(rr, 3).await;
        let mut names: Vec<_> = got.iter().flatten().collect();
        names.sort();
        names.dedup();
        ensure!(names.len() == 3, "got {got:?}");
        Ok(())
    })
    .await?;
    check_round_robin(rr, &NAMES).await?;
    // Static: the first source serves every connection.
    expect(at_st, Some("cl0"), "static: the first source serves").await?;
    let got = accesses(st, 30).await;
    ensure!(all(&got, "cl0"), "static: expected all cl0, got {got:?}");

    // Without cl0's export.
    cl0.ok(&["delete", "export", "echo", "-n", "default"])?;
    settle(rr, "cl0 no longer serves round-robin", |w| {
        w.iter().all(|a| a.as_deref() != Some("cl0"))
    })
    .await?;
    let got = accesses(rr, 30).await;
    ensure!(
        alternates(&got, "cl1", "cl2"),
        "without cl0's export, expected strict cl1/cl2 alternation, got {got:?}"
    );
    settle(st, "static: cl1 takes over", |w| all(w, "cl1")).await?;
    let got = accesses(st, 30).await;
    ensure!(
        all(&got, "cl1"),
        "static without cl0: expected all cl1, got {got:?}"
    );

    // Without cl1's either.
    f.cluster(1)?
        .ok(&["delete", "export", "echo", "-n", "default"])?;
    settle(rr, "only cl2 serves round-robin", |w| all(w, "cl2")).await?;
    let got = accesses(rr, 30).await;
    ensure!(all(&got, "cl2"), "round-robin with cl2 only, got {got:?}");
    settle(st, "static: cl2 takes over", |w| all(w, "cl2")).await?;
    let got = accesses(st, 30).await;
    ensure!(all(&got, "cl2"), "static with cl2 only, got {got:?}");
    Ok(())
}

// ---------------------------------------------------------------- policies

const PEER_NAME: &str = "peer.clusterlink.net/name";
const EXPORT_NAME: &str = "export.clusterlink.net/name";
const EXPORT_ENV: &str = "export.clusterlink.net/labels.env";
const CLIENT_SA: &str = "client.clusterlink.net/service-account";

/// cl0 exports `echo` (labels env=test), cl1 imports it (Import labels env=test) on
/// a free port; returns when traffic flows under the fleet's allow-all policies.
async fn policy_pair(test: &str) -> Result<Option<(Fleet, Importer)>> {
    let Some(f) = Fleet::start(test, &["cl0", "cl1"]).await? else {
        return Ok(None);
    };
    let env = [("env", "test")];
    let server = start_name_server("cl0").await?;
    f.cluster(0)?.apply(&export("echo", server.port(), &env))?;
    let port = free_port()?;
    f.cluster(1)?
        .apply(&import("echo", port, &["cl0"], None, &env))?;
    until(f.cluster(1)?, "peer", "cl0", "PeerReachable", "True").await?;
    let at = Importer {
        import: ([127, 0, 0, 1], port).into(),
        admin: ([127, 0, 0, 1], f.peer(1)?.dp_admin).into(),
    };
    expect(at, Some("cl0"), "allow-all on both sides").await?;
    Ok(Some((f, at)))
}

fn allow_all() -> Policy<'static> {
    Policy::regular("allow-all", "allow", &[], &[])
}

/// TestPolicyLabels: policies on the names and labels of peers and exports, on both
/// sides; each step waits for the expected outcome, then checks that it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_policy_labels_sequence() -> Result<()> {
    let Some((f, import)) = policy_pair("k8s-policy-labels").await? else {
        return Ok(());
    };
    let (cl0, cl1) = (f.cluster(0)?, f.cluster(1)?);
    let ok = Some("cl0");
    allow_all().delete(cl0)?;
    allow_all().delete(cl1)?;
    expect(import, None, "no policies: default deny").await?;
    // (1) Allow on both sides, by peer name, export name and export label.
    Policy::regular(
        "allow",
        "allow",
        &[(PEER_NAME, "cl1")],
        &[
            (EXPORT_NAME, "echo"),
            (PEER_NAME, "cl0"),
            (EXPORT_ENV, "test"),
        ],
    )
    .put(cl1)?;
    Policy::regular(
        "allow",
        "allow",
        &[(PEER_NAME, "cl1")],
        &[(PEER_NAME, "cl0")],
    )
    .put(cl0)?;
    expect(import, ok, "(1) allowed on both sides").await?;

    // (2)-(3) The importer denies the export by name.
    let deny = Policy::regular("deny-export", "deny", &[], &[(EXPORT_NAME, "echo")]);
    deny.put(cl1)?;
    expect(import, None, "(2) cl1 denies export echo").await?;
    deny.delete(cl1)?;
    expect(import, ok, "(3) cl1's deny removed").await?;

    // (4)-(5) The importer denies the exporting peer.
    let deny = Policy::regular("deny-peer", "deny", &[], &[(PEER_NAME, "cl0")]);
    deny.put(cl1)?;
    expect(import, None, "(4) cl1 denies peer cl0").await?;
    deny.delete(cl1)?;
    expect(import, ok, "(5) cl1's deny removed").await?;

    // (6)-(7) The exporter denies the importing peer.
    let deny = Policy::regular("deny-cl1", "deny", &[(PEER_NAME, "cl1")], &[]);
    deny.put(cl0)?;
    expect(import, None, "(6) cl0 denies peer cl1").await?;
    deny.delete(cl0)?;
    expect(import, ok, "(7) cl0's deny removed").await?;

    // (8) The importer's allow now names another export: default deny.
    Policy::regular(
        "allow",
        "allow",
        &[],
        &[(EXPORT_NAME, "bad-svc"), (PEER_NAME, "cl0")],
    )
    .put(cl1)?;
    expect(import, None, "(8) cl1 allows only bad-svc").await?;
    // (9) An allow for another value of the import's label does not help.
    Policy::regular("allow-prod", "allow", &[], &[(EXPORT_ENV, "prod")]).put(cl1)?;
    expect(import, None, "(9) cl1 allows env=prod").await?;
    // (10) An allow for the import's label (env=test) does.
    Policy::regular("allow-test", "allow", &[], &[(EXPORT_ENV, "test")]).put(cl1)?;
    expect(import, ok, "(10) cl1 allows env=test").await?;
    Ok(())
}

/// TestPrivilegedPolicies: privileged deny, privileged allow, regular deny, regular
/// allow are decided in that order; removing them one by one flips the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_privileged_policies_sequence() -> Result<()> {
    let Some((f, import)) = policy_pair("k8s-privileged").await? else {
        return Ok(());
    };
    let cl1 = f.cluster(1)?;
    let to: Labels = &[(EXPORT_NAME, "echo"), (PEER_NAME, "cl0")];
    let priv_deny = Policy::privileged("priv-deny", "deny", &[], to);
    let priv_allow = Policy::privileged("priv-allow", "allow", &[], to);
    let reg_deny = Policy::regular("reg-deny", "deny", &[], to);
    let reg_allow = Policy::regular("reg-allow", "allow", &[], to);
    for p in [priv_deny, priv_allow, reg_deny, reg_allow] {
        p.put(cl1)?;
    }
    allow_all().delete(cl1)?;
    expect(import, None, "all four: the privileged deny wins").await?;
    priv_deny.delete(cl1)?;
    expect(import, Some("cl0"), "the privileged allow wins").await?;
    priv_allow.delete(cl1)?;
    expect(import, None, "the regular deny wins").await?;
    reg_deny.delete(cl1)?;
    expect(import, Some("cl0"), "the regular allow wins").await?;
    reg_allow.delete(cl1)?;
    expect(import, None, "default deny").await?;
    Ok(())
}

/// TestPodAttributes: a client pod on the importing cluster (a Pod object whose
/// status.podIP, set through the status subresource, is the loopback address the
/// client connects from) is known by its namespace, service account and labels, on
/// the importing side and, forwarded, on the exporting side. A connection from an
/// address no pod holds has no client attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_pod_attributes_in_policies() -> Result<()> {
    let Some((f, import)) = policy_pair("k8s-pod-attributes").await? else {
        return Ok(());
    };
    let (cl0, cl1) = (f.cluster(0)?, f.cluster(1)?);
    let pod_ip: std::net::IpAddr = [127, 0, 0, 5].into();
    // The namespace's default ServiceAccount is made by the controller manager.
    retry("ServiceAccount default/default", WAIT, || async {
        cl1.ok(&["get", "serviceaccount", "default", "-n", "default"])
            .map(drop)
    })
    .await?;
    cl1.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: echo-client, namespace: default, labels: {app: echo-client}}\nspec:\n  containers: [{name: client, image: client}]\n")?;
    cl1.ok(&[
        "patch",
        "pod",
        "echo-client",
        "-n",
        "default",
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(r#"{{"status":{{"podIP":"{pod_ip}","podIPs":[{{"ip":"{pod_ip}"}}]}}}}"#),
    ])?;
    let from_pod = |want, step| expect_from(Some(pod_ip), import, want, step);
    let ok = Some("cl0");
    // (1) allow-all on both sides.
    from_pod(ok, "(1) the pod connects").await?;

    // (2) Denying another service account, on both sides, changes nothing.
    let other = Policy::regular("deny-other", "deny", &[(CLIENT_SA, "non-default")], &[]);
    other.put(cl0)?;
    other.put(cl1)?;
    // (A refusal would show within the step's time: policies apply in well under it.)
    retry("both deny-other policies in force", STEP, || async {
        for c in [cl0, cl1] {
            c.ok(&["get", "accesspolicy", "deny-other", "-n", "default"])?;
        }
        Ok(())
    })
    .await?;
    from_pod(ok, "(2) denying another service account changes nothing").await?;
    // (3) The importer denies the pod's service account: the pod is refused, a
    // connection from an address no pod holds is not.
    let deny = Policy::regular("deny-default", "deny", &[(CLIENT_SA, "default")], &[]);
    deny.put(cl1)?;
    from_pod(None, "(3) cl1 denies service account default").await?;
    expect(import, ok, "(3) no pod at 127.0.0.1: no client attributes").await?;
    deny.delete(cl1)?;
    from_pod(ok, "(3) cl1's deny removed").await?;
    // (4) The exporter denies it, on the attributes the importer forwarded.
    deny.put(cl0)?;
    from_pod(None, "(4) cl0 denies service account default").await?;
    deny.delete(cl0)?;
    from_pod(ok, "(4) cl0's deny removed").await?;

    // (5) A label expression: deny clients whose app label is not echo-client. The
    // pod passes; a connection from an address no pod holds has no labels and is
    // denied.
    cl1.apply("apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata: {name: deny-not-client, namespace: default}\nspec:\n  action: deny\n  from: [{workloadSelector: {matchExpressions: [{key: client.clusterlink.net/labels.app, operator: NotIn, values: [echo-client]}]}}]\n  to: [{workloadSelector: {}}]\n")?;
    expect(import, None, "(5) no app label: denied").await?;
    from_pod(ok, "(5) app=echo-client: allowed").await?;

    // The pod relabelled: its new attributes are in force at once.
    cl1.ok(&[
        "label",
        "pod",
        "echo-client",
        "-n",
        "default",
        "--overwrite",
        "app=other",
    ])?;
    from_pod(None, "(5) app=other: denied").await?;
    Ok(())
}
