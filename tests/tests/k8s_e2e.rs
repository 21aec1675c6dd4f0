//! End-to-end on real API servers (spec §7.2): `cl-controlplane --platform k8s` and
//! `cl-dataplane` as processes on this machine, as pods would run them, each cluster
//! its own etcd + kube-apiserver + kube-controller-manager (`tests/k8s/env.sh`),
//! every object made with kubectl. Without a kubelet nothing runs in a pod, so the
//! exported services are echo servers here, on loopback, or on the loopback cluster
//! IP of their Service (what kube-proxy would route).

use anyhow::{ensure, Result};
use tests::echo_round_trip;
use tests::k8s::{export_yaml, import_yaml, retry, until, Fleet, KubeCluster, WAIT};
use tests::procs::{free_port, ProcPeer};

/// Two clusters: A imports, B exports. Peers on both, allow-all in `default` on both.
struct Pair {
    // Dropped in this order: processes, clusters, files.
    _pa: ProcPeer,
    pb: ProcPeer,
    a: KubeCluster,
    b: KubeCluster,
    _root: tests::TempDir,
}

impl Pair {
    async fn start(test: &str) -> Result<Option<Pair>> {
        let Some(f) = Fleet::start(test, &["peer-a", "peer-b"]).await? else {
            return Ok(None);
        };
        let Fleet {
            peers,
            clusters,
            root,
            ..
        } = f;
        let (Ok([pa, pb]), Ok([a, b])) = (
            <[ProcPeer; 2]>::try_from(peers),
            <[KubeCluster; 2]>::try_from(clusters),
        ) else {
            anyhow::bail!("a fleet of two");
        };
        Ok(Some(Pair {
            _pa: pa,
            pb,
            a,
            b,
            _root: root,
        }))
    }

    /// An echo server exported by B as default/echo, imported by A as default/echo
    /// on port 9000 with a free target port; returns once traffic flows.
    async fn echo_import(&self) -> Result<(u16, std::net::SocketAddr)> {
        let echo = tests::start_echo().await?;
        self.b
            .apply(&export_yaml("echo", "127.0.0.1", echo.port()))?;
        let target = free_port()?;
        self.a
            .apply(&import_yaml("echo", 9000, target, "peer-b", "echo"))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], target));
        retry("traffic through A's import listener", WAIT, || flows(addr)).await?;
        Ok((target, addr))
    }
}

async fn flows(addr: std::net::SocketAddr) -> Result<()> {
    let got = echo_round_trip(addr, b"hello through the fabric").await?;
    ensure!(got == b"hello through the fabric", "echo returned {got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_connectivity_import_services_and_status() -> Result<()> {
    let Some(p) = Pair::start("k8s-connectivity").await? else {
        return Ok(());
    };
    let (target, _) = p.echo_import().await?;

    // Status written back by each side's leader.
    until(&p.b, "export", "echo", "ExportValid", "True").await?;
    until(&p.a, "import", "echo", "ImportTargetPortValid", "True").await?;
    until(&p.a, "import", "echo", "ImportServiceValid", "True").await?;
    until(&p.a, "peer", "peer-b", "PeerReachable", "True").await?;
    let generation =
        p.a.jsonpath("import", "default", "echo", "{.metadata.generation}")?;
    let observed = p.a.jsonpath(
        "import",
        "default",
        "echo",
        "{.status.conditions[?(@.type==\"ImportServiceValid\")].observedGeneration}",
    )?;
    ensure!(
        generation == observed,
        "observedGeneration {observed:?}, generation {generation:?}"
    );
    let labels = p.a.jsonpath(
        "peer",
        "clusterlink-system",
        "peer-b",
        "{.status.labels.name}",
    )?;
    ensure!(labels == "peer-b", "Peer status.labels.name is {labels:?}");

    // The import's Services: the ExternalName user Service in default, pointing at
    // the ClusterIP system Service in clusterlink-system, which selects the data plane.
    let external =
        p.a.jsonpath("service", "default", "echo", "{.spec.externalName}")?;
    let system = external
        .strip_suffix(".clusterlink-system.svc.cluster.local")
        .unwrap_or_default()
        .to_owned();
    ensure!(
        system.starts_with("import-echo-default-"),
        "externalName {external:?}"
    );
    let sys_spec = p.a.jsonpath(
        "service",
        "clusterlink-system",
        &system,
        "{.spec.type} {.spec.selector.app} {.spec.ports[0].port} {.spec.ports[0].targetPort}",
    )?;
    ensure!(
        sys_spec == format!("ClusterIP cl-dataplane 9000 {target}"),
        "system Service: {sys_spec:?}"
    );

    // Printer columns.
    let table = p.a.ok(&["get", "peers,imports", "-A"])?;
    ensure!(
        table.contains("REACHABLE") && table.contains("TARGET PORT") && table.contains("VALID"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.contains("peer-b"))
        .unwrap_or_default();
    ensure!(row.contains("True"), "peer row: {row}");

    // Self-healing: a deleted system Service comes back.
    p.a.ok(&["delete", "service", &system, "-n", "clusterlink-system"])?;
    retry("system Service restored", WAIT, || async {
        let t =
            p.a.jsonpath("service", "clusterlink-system", &system, "{.spec.type}")?;
        ensure!(t == "ClusterIP", "is {t:?}");
        Ok(())
    })
    .await?;

    // Deletion removes both Services.
    p.a.ok(&["delete", "import", "echo", "-n", "default"])?;
    retry("import Services removed", WAIT, || async {
        let o =
            p.a.run(&["get", "service", "echo", "-n", "default"], None)?;
        ensure!(!o.status.success(), "user Service still there");
        let o = p.a.run(
            &["get", "service", &system, "-n", "clusterlink-system"],
            None,
        )?;
        ensure!(!o.status.success(), "system Service still there");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_peer_reachable_follows_the_remote_data_plane() -> Result<()> {
    let Some(mut p) = Pair::start("k8s-reachable").await? else {
        return Ok(());
    };
    until(&p.a, "peer", "peer-b", "PeerReachable", "True").await?;
    let since = p.a.jsonpath(
        "peer",
        "clusterlink-system",
        "peer-b",
        "{.status.conditions[0].lastTransitionTime}",
    )?;
    p.pb.dp.kill();
    until(&p.a, "peer", "peer-b", "PeerReachable", "False").await?;
    let reason = p.a.jsonpath(
        "peer",
        "clusterlink-system",
        "peer-b",
        "{.status.conditions[0].reason}",
    )?;
    ensure!(reason == "Heartbeat", "reason {reason:?}");
    let later = p.a.jsonpath(
        "peer",
        "clusterlink-system",
        "peer-b",
        "{.status.conditions[0].lastTransitionTime}",
    )?;
    ensure!(later != since, "lastTransitionTime did not move: {since}");
    p.pb.start_dp()?;
    p.pb.wait_ready().await?;
    until(&p.a, "peer", "peer-b", "PeerReachable", "True").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_export_without_host_follows_its_service() -> Result<()> {
    let Some(p) = Pair::start("k8s-export-service").await? else {
        return Ok(());
    };
    // The exported service listens on its Service's (loopback) cluster IP.
    let ip = p.b.service_ip(20);
    let listener = tokio::net::TcpListener::bind((ip.as_str(), 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    p.b.apply(&format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {{name: web, namespace: default}}\nspec: {{port: {port}}}\n"
    ))?;
    until(&p.b, "export", "web", "ExportValid", "False").await?;
    let msg = p.b.jsonpath(
        "export",
        "default",
        "web",
        "{.status.conditions[0].message}",
    )?;
    ensure!(
        msg.contains("default/web") && msg.contains("does not exist"),
        "message {msg:?}"
    );
    let target = free_port()?;
    p.a.apply(&import_yaml("web", 80, target, "peer-b", "web"))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], target));
    retry("the import listener", WAIT, || async {
        tokio::net::TcpStream::connect(addr).await?;
        Ok(())
    })
    .await?;
    ensure!(
        flows(addr).await.is_err(),
        "traffic flowed to an export with no Service"
    );

    p.b.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{port: {port}}}]}}\n"
    ))?;
    until(&p.b, "export", "web", "ExportValid", "True").await?;
    retry("traffic to the Service's address", WAIT, || flows(addr)).await?;

    p.b.ok(&["delete", "service", "web", "-n", "default"])?;
    until(&p.b, "export", "web", "ExportValid", "False").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_import_port_allocation_conflicts_and_foreign_services() -> Result<()> {
    let Some(p) = Pair::start("k8s-import-ports").await? else {
        return Ok(());
    };
    // targetPort 0: the leader picks one in [1024, 49152) and writes it to the spec.
    p.a.apply(&import_yaml("auto", 7000, 0, "peer-b", "echo"))?;
    let port = retry("spec.targetPort allocated", WAIT, || async {
        let t: u32 =
            p.a.jsonpath("import", "default", "auto", "{.spec.targetPort}")?
                .parse()?;
        ensure!(t != 0, "still 0");
        Ok(t)
    })
    .await?;
    ensure!((1024..49152).contains(&port), "allocated {port}");
    until(&p.a, "import", "auto", "ImportTargetPortValid", "True").await?;

    // The same target port explicitly on a younger Import: refused, the older keeps it.
    p.a.apply(&import_yaml("clash", 7001, port as u16, "peer-b", "echo"))?;
    until(&p.a, "import", "clash", "ImportTargetPortValid", "False").await?;
    let msg = p.a.jsonpath(
        "import",
        "default",
        "clash",
        "{.status.conditions[0].message}",
    )?;
    ensure!(
        msg.contains(&format!(
            "port {port} is already in use by service default/auto"
        )),
        "{msg:?}"
    );
    until(&p.a, "import", "auto", "ImportTargetPortValid", "True").await?;

    // A foreign Service holding the import's name: reported, never taken over; once
    // it goes, the import makes its own.
    p.a.apply("apiVersion: v1\nkind: Service\nmetadata: {name: taken, namespace: default}\nspec: {ports: [{port: 1}]}\n")?;
    p.a.apply(&import_yaml("taken", 7002, free_port()?, "peer-b", "echo"))?;
    until(&p.a, "import", "taken", "ImportServiceValid", "False").await?;
    let msg = p.a.jsonpath(
        "import",
        "default",
        "taken",
        "{.status.conditions[?(@.type==\"ImportServiceValid\")].message}",
    )?;
    ensure!(
        msg.contains("service 'default/taken' already exists"),
        "{msg:?}"
    );
    let ty =
        p.a.jsonpath("service", "default", "taken", "{.spec.type}")?;
    ensure!(ty == "ClusterIP", "the foreign Service was changed to {ty}");
    p.a.ok(&["delete", "service", "taken", "-n", "default"])?;
    until(&p.a, "import", "taken", "ImportServiceValid", "True").await?;
    let ty =
        p.a.jsonpath("service", "default", "taken", "{.spec.type}")?;
    ensure!(ty == "ExternalName", "the import's Service is {ty:?}");

    // The API server refuses a 64-character Import name (CEL rule).
    let long = "a".repeat(64);
    let o = p.a.run(
        &["apply", "-f", "-"],
        Some(&import_yaml(&long, 80, 0, "peer-b", "echo")),
    )?;
    ensure!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("import name cannot exceed 63 chars"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_invalid_policy_keeps_the_last_valid_one_and_is_reported() -> Result<()> {
    let Some(p) = Pair::start("k8s-invalid-policy").await? else {
        return Ok(());
    };
    let (_, addr) = p.echo_import().await?;
    // Valid for the API server's schema, refused by the control plane (a label key
    // that is no qualified name): B's allow-all stays in force.
    p.b.apply("apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata: {name: allow-all, namespace: default}\nspec:\n  action: allow\n  from: [{workloadSelector: {matchLabels: {\"bad key!\": x}}}]\n  to: [{workloadSelector: {}}]\n")?;
    let event = retry("an Event naming the problem", WAIT, || async {
        let out = p.b.ok(&["get", "events", "-n", "default", "-o", "jsonpath={range .items[*]}{.reason}|{.regarding.name}{.involvedObject.name}|{.note}{.message}{\"\\n\"}{end}"])?;
        let line = out
            .lines()
            .find(|l| l.starts_with("InvalidSpec|allow-all|"))
            .map(str::to_owned);
        line.ok_or_else(|| anyhow::anyhow!("no InvalidSpec event yet: {out}"))
    })
    .await?;
    ensure!(
        event.contains("workloadSelector") && event.contains("last valid version"),
        "{event}"
    );
    // New connections are still allowed (each one is authorized afresh).
    for _ in 0..3 {
        flows(addr).await?;
    }
    Ok(())
}
