//! `clusterlink deploy peer --platform k8s --start none` against a real API server:
//! the rendered `k8s.yaml` applies (dry run and for real), makes what the spec lists
//! with the flags given, and a second deploy rolls new certificates. The control
//! plane of every Kubernetes end-to-end test runs with this rendering's arguments
//! and RBAC (`tests::k8s::Fleet`), so the tested configuration is the deployed one.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context as _, Result};
use tests::k8s::{available, KubeCluster};
use tests::procs::binary;
use tests::TempDir;

fn clusterlink(dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    // No cluster: --start none needs none, and the others must say so.
    Command::new(binary("clusterlink")?)
        .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
        .args(args)
        .args(["--path", dir.to_str().context("path")?])
        .output()
        .context("running clusterlink")
}

fn ok(dir: &Path, args: &[&str]) -> Result<String> {
    let o = clusterlink(dir, args)?;
    ensure!(
        o.status.success(),
        "clusterlink {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn refused(dir: &Path, args: &[&str], why: &str) -> Result<()> {
    let o = clusterlink(dir, args)?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains(why),
        "clusterlink {args:?} should fail naming {why:?}: {err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_deploy_peer_start_none_renders_what_the_cluster_runs() -> Result<()> {
    if !available("k8s_deploy_peer_start_none")? {
        return Ok(());
    }
    let c = KubeCluster::start("k8s-deploy")?;
    let work = TempDir::new("k8s-deploy-files")?;
    let dir = work.path();
    ok(dir, &["create", "fabric", "--name", "f"])?;
    ok(
        dir,
        &["create", "peer-cert", "--name", "peer1", "--fabric", "f"],
    )?;
    let deploy = [
        "deploy",
        "peer",
        "--name",
        "peer1",
        "--fabric",
        "f",
        "--platform",
        "k8s",
        "--start",
        "none",
        "--ingress",
        "NodePort",
        "--ingress-port",
        "30443",
        "--label",
        "env=prod",
        "--container-registry",
        "registry.example/cl",
        "--tag",
        "v1",
    ];
    ok(dir, &deploy)?;
    let yaml = dir.join("f/peer1/k8s.yaml");
    let mode = std::fs::metadata(&yaml)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "k8s.yaml has mode {mode:o}");
    let file = yaml.to_str().context("path")?;

    // The API server accepts all of it, first as a dry run, then for real.
    c.ok(&["apply", "--server-side", "--dry-run=server", "-f", file])?;
    ensure!(
        c.run(
            &[
                "get",
                "deployment",
                "cl-controlplane",
                "-n",
                "clusterlink-system"
            ],
            None
        )?
        .status
        .code()
            != Some(0),
        "a dry run made objects"
    );
    c.ok(&["apply", "--server-side", "-f", file])?;

    let ns = "clusterlink-system";
    let images = c.ok(&[
        "get",
        "deployments",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.spec.template.spec.containers[0].image} {end}",
    ])?;
    ensure!(
        images.contains("cl-controlplane=registry.example/cl/cl-controlplane:v1")
            && images.contains("cl-dataplane=registry.example/cl/cl-dataplane:v1"),
        "{images}"
    );
    let args = c.jsonpath(
        "deployment",
        ns,
        "cl-controlplane",
        "{.spec.template.spec.containers[0].args}",
    )?;
    ensure!(
        args.contains("env=prod") && args.contains("\"k8s\""),
        "{args}"
    );
    let gateway = c.jsonpath(
        "service",
        ns,
        "clusterlink",
        "{.spec.type} {.spec.ports[0].nodePort} {.spec.ports[0].targetPort}",
    )?;
    ensure!(
        gateway == "NodePort 30443 4443",
        "gateway Service: {gateway}"
    );
    let cp = c.jsonpath(
        "service",
        ns,
        "cl-controlplane",
        "{.spec.selector.app} {.spec.ports[0].port}",
    )?;
    ensure!(cp == "cl-controlplane 4444", "control plane Service: {cp}");
    for (secret, keys) in [
        ("cl-ca", "ca"),
        ("cl-controlplane", "cert key"),
        ("cl-dataplane", "cert key"),
        ("cl-peer", "ca.pem cert.pem key.pem"),
    ] {
        let got = c.ok(&[
            "get",
            "secret",
            secret,
            "-n",
            ns,
            "-o",
            "go-template={{range $k, $v := .data}}{{$k}} {{end}}",
        ])?;
        ensure!(got.trim() == keys, "Secret {secret} has keys {got:?}");
    }
    // The controller manager makes the pods (they stay Pending: no kubelet), as
    // non-root with a read-only root filesystem.
    tests::k8s::retry("the data plane's pod", tests::k8s::WAIT, || async {
        let pods = c.ok(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "app=cl-dataplane",
            "-o",
            "jsonpath={.items[0].spec.securityContext.runAsNonRoot} {.items[0].spec.containers[0].securityContext.readOnlyRootFilesystem}",
        ])?;
        ensure!(pods == "true true", "pod: {pods:?}");
        Ok(())
    })
    .await?;

    // A second deploy makes a new site CA: the Secrets change, and so does the pod
    // template, which rolls the pods.
    let hash = |c: &KubeCluster| {
        c.jsonpath(
            "deployment",
            ns,
            "cl-dataplane",
            "{.spec.template.metadata.annotations.clusterlink\\.net/certificates-sha256}",
        )
    };
    let (ca_before, hash_before) = (c.jsonpath("secret", ns, "cl-ca", "{.data.ca}")?, hash(&c)?);
    ok(dir, &deploy)?;
    c.ok(&["apply", "--server-side", "-f", file])?;
    let (ca_after, hash_after) = (c.jsonpath("secret", ns, "cl-ca", "{.data.ca}")?, hash(&c)?);
    ensure!(
        !hash_before.is_empty(),
        "no certificate hash on the pod template"
    );
    ensure!(ca_after != ca_before, "the site CA Secret did not change");
    ensure!(hash_after != hash_before, "the pod template did not change");

    // What the CLI refuses, and says why.
    let mut bad = deploy.to_vec();
    let port = bad
        .iter()
        .position(|a| *a == "30443")
        .context("port flag")?;
    bad[port] = "8080";
    refused(dir, &bad, "30000-32767")?;
    let mut lb = bad.clone();
    let ingress = lb
        .iter()
        .position(|a| *a == "NodePort")
        .context("ingress")?;
    lb[ingress] = "LoadBalancer";
    ok(dir, &lb)?;
    let mut missing = deploy.to_vec();
    missing[3] = "peer2";
    refused(dir, &missing, "f/peer2 not found")?;
    let all: Vec<&str> = deploy
        .iter()
        .map(|a| if *a == "none" { "all" } else { a })
        .collect();
    refused(dir, &all, "no Kubernetes cluster to deploy to")?;
    Ok(())
}

/// `--start all` and `--start operator` into the current kubectl context, with
/// cl-operator running as a process (no kubelet here to run its Deployment): the
/// CRDs, the operator's objects, the Secrets and the Instance are installed, the
/// operator's report is awaited and shown, and a second run updates the Secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Also ClusterLink's CLI test (spec §7.3) as far as it runs without a kubelet: create
/// fabric, peer-cert, deploy with the registry `docker.io/library` and NodePort 30443,
/// the Deployments present (not rolled out: no pod runs here), delete.
async fn k8s_deploy_peer_start_all_installs_the_operator_and_the_instance() -> Result<()> {
    if !available("k8s_deploy_peer_start_all")? {
        return Ok(());
    }
    let c = KubeCluster::start("k8s-deploy-all")?;
    let work = TempDir::new("k8s-deploy-all-files")?;
    let dir = work.path();
    ok(dir, &["create", "fabric", "--name", "f"])?;
    ok(
        dir,
        &["create", "peer-cert", "--name", "peer1", "--fabric", "f"],
    )?;
    let admin = tests::procs::free_port()?;
    let mut op = tests::procs::Proc::spawn(
        Command::new(binary("cl-operator")?)
            .env("KUBECONFIG", &c.kubeconfig)
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")]),
        &dir.join("cl-operator.log"),
    )?;
    let deploy = |start: &str| -> Result<std::process::Output> {
        Command::new(binary("clusterlink")?)
            .env("KUBECONFIG", &c.kubeconfig)
            .args([
                "deploy",
                "peer",
                "--name",
                "peer1",
                "--fabric",
                "f",
                "--platform",
                "k8s",
            ])
            .args([
                "--start",
                start,
                "--ingress",
                "NodePort",
                "--ingress-port",
                "30443",
                "--container-registry",
                "docker.io/library",
            ])
            // The pods never become ready here (no kubelet): wait briefly.
            .args(["--timeout", "5"])
            .args(["--path", dir.to_str().context("path")?])
            .output()
            .context("running clusterlink")
    };
    let out = deploy("all")?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "deploy --start all: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        said.contains("operator: control plane False (ProgressingMode)")
            && said.contains("not ready after 5 s"),
        "{said}"
    );
    let ns = "clusterlink-system";
    c.ok(&[
        "get",
        "deployment",
        "cl-operator",
        "-n",
        "clusterlink-operator",
    ])?;
    c.ok(&["get", "clusterrole", "cl-operator"])?;
    let ty = c.jsonpath(
        "instance",
        "clusterlink-operator",
        "cl-instance",
        "{.spec.ingress.type} {.spec.ingress.port}",
    )?;
    ensure!(ty == "NodePort 30443", "Instance ingress {ty}");
    for (ns, name) in [
        (ns, "cl-controlplane"),
        (ns, "cl-dataplane"),
        ("clusterlink-operator", "cl-operator"),
    ] {
        let image = c.jsonpath(
            "deployment",
            ns,
            name,
            "{.spec.template.spec.containers[0].image}",
        )?;
        ensure!(
            image == format!("docker.io/library/{name}:latest"),
            "{name} runs {image}"
        );
    }
    let gateway = c.jsonpath("service", ns, "clusterlink", "{.spec.ports[0].nodePort}")?;
    ensure!(gateway == "30443", "gateway nodePort {gateway}");

    // Again: a no-op but for fresh site certificates (ClusterLink never updates them).
    let ca = c.jsonpath("secret", ns, "cl-ca", "{.data.ca}")?;
    let out = deploy("all")?;
    ensure!(
        out.status.success(),
        "second deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        c.jsonpath("secret", ns, "cl-ca", "{.data.ca}")? != ca,
        "the site CA Secret was not updated"
    );

    // --start operator leaves the Instance in a file.
    let out = deploy("operator")?;
    ensure!(
        out.status.success(),
        "deploy --start operator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let instance = std::fs::read_to_string(dir.join("f/peer1/cl-instance.yaml"))?;
    ensure!(
        instance.contains("kind: Instance") && instance.contains("cl-instance"),
        "{instance}"
    );

    // A ClusterLink namespace that does not exist is named.
    let out = Command::new(binary("clusterlink")?)
        .env("KUBECONFIG", &c.kubeconfig)
        .args([
            "deploy",
            "peer",
            "--name",
            "peer1",
            "--fabric",
            "f",
            "--platform",
            "k8s",
        ])
        .args([
            "--namespace",
            "nope",
            "--path",
            dir.to_str().context("path")?,
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("namespace nope does not exist"),
        "{err}"
    );
    // delete peer: what deploy made goes (the operator removes the deployment it
    // made when its Instance goes); the namespace deploy found (clusterlink-system,
    // made with the cluster) stays, the one it created (clusterlink-operator) goes.
    let out = Command::new(binary("clusterlink")?)
        .env("KUBECONFIG", &c.kubeconfig)
        .args([
            "delete",
            "peer",
            "--name",
            "peer1",
            "--path",
            dir.to_str().context("path")?,
        ])
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "delete peer: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for gone in [
        "instance clusterlink-operator/cl-instance",
        "deployment clusterlink-operator/cl-operator",
        "secret clusterlink-system/cl-peer",
        "clusterrole cl-operator",
        "namespace clusterlink-operator",
    ] {
        ensure!(
            said.contains(gone),
            "delete peer did not remove {gone}: {said}"
        );
    }
    ensure!(!said.contains("namespace clusterlink-system"), "{said}");
    for (kind, name) in [
        ("deployment", "cl-dataplane"),
        ("secret", "cl-ca"),
        ("service", "clusterlink"),
    ] {
        let o = c.run(&["get", kind, name, "-n", ns], None)?;
        ensure!(!o.status.success(), "{kind} {name} is left");
    }
    let phase = c.ok(&["get", "namespace", ns, "-o", "jsonpath={.status.phase}"])?;
    ensure!(phase == "Active", "clusterlink-system is {phase}");
    c.ok(&["get", "crd", "imports.clusterlink.net"])?;
    ensure!(op.ended().is_none(), "the operator exited");
    op.kill();
    Ok(())
}
