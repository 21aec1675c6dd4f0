//! cl-operator against a real API server (with kube-controller-manager, so
//! Deployments make ReplicaSets and Pods; no kubelet, so the test marks pods ready
//! through the status subresource): an Instance becomes the deployment of
//! `operator::manifests`, made by the operator running as its rendered ServiceAccount
//! and RBAC; ingress changes are applied, status follows the
//! Deployments, one Instance owns a namespace at a time, and deletion cleans up.

use std::net::SocketAddr;

use anyhow::{ensure, Result};
use tests::k8s::{available, retry, KubeCluster, WAIT};
use tests::procs::{binary, free_port, Proc};
use tests::{http_get, TempDir};

const OP_NS: &str = "clusterlink-operator";
const NS: &str = "clusterlink-system";

fn instance(name: &str, ingress: &str) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Instance\nmetadata: {{name: {name}, namespace: {OP_NS}}}\nspec:\n  namespace: {NS}\n  containerRegistry: registry.example\n  tag: v2\n  peerLabels: {{env: prod}}\n  ingress: {ingress}\n"
    )
}

/// `{.status.<part>.conditions.<ty>.status}/{reason}` of an Instance.
fn instance_condition(c: &KubeCluster, name: &str, part: &str, ty: &str) -> Result<String> {
    c.jsonpath(
        "instance",
        OP_NS,
        name,
        &format!(
            "{{.status.{part}.conditions.{ty}.status}}/{{.status.{part}.conditions.{ty}.reason}}"
        ),
    )
}

async fn until_condition(
    c: &KubeCluster,
    name: &str,
    part: &str,
    ty: &str,
    want: &str,
) -> Result<()> {
    retry(
        &format!("instance {name} {part}.{ty} == {want}"),
        WAIT,
        || async {
            let got = instance_condition(c, name, part, ty)?;
            ensure!(got == want, "is {got:?}");
            Ok(())
        },
    )
    .await
}

async fn until_jsonpath(
    c: &KubeCluster,
    kind: &str,
    name: &str,
    path: &str,
    want: &str,
) -> Result<()> {
    retry(&format!("{kind} {name} {path} == {want}"), WAIT, || async {
        let got = c.jsonpath(kind, NS, name, path)?;
        ensure!(got == want, "is {got:?}");
        Ok(())
    })
    .await
}

async fn until_gone(c: &KubeCluster, kind: &str, name: &str) -> Result<()> {
    retry(&format!("{kind} {name} deleted"), WAIT, || async {
        let o = c.run(&["get", kind, name, "-n", NS], None)?;
        ensure!(!o.status.success(), "still there");
        Ok(())
    })
    .await
}

/// Marks the pods of `app` Running and Ready, as a kubelet would.
fn pods_ready(c: &KubeCluster, app: &str) -> Result<()> {
    let pods = c.ok(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        &format!("app={app}"),
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    ensure!(!pods.trim().is_empty(), "no pods of {app}");
    let now = "2026-01-01T00:00:00Z";
    for pod in pods.split_whitespace() {
        c.ok(&[
            "patch", "pod", pod, "-n", NS, "--subresource=status", "--type=merge", "-p",
            &format!(r#"{{"status":{{"phase":"Running","conditions":[{{"type":"Ready","status":"True","lastTransitionTime":"{now}"}},{{"type":"ContainersReady","status":"True","lastTransitionTime":"{now}"}}]}}}}"#),
        ])?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_operator_reconciles_instances() -> Result<()> {
    if !available("k8s_operator_reconciles_instances")? {
        return Ok(());
    }
    let c = KubeCluster::start("k8s-operator")?;
    let work = TempDir::new("k8s-operator-files")?;
    // The operator's namespace, ServiceAccount and RBAC as the install renders them;
    // the operator runs as that ServiceAccount, so its rights are tested too.
    let spec: crds::InstanceSpec = serde_json::from_value(serde_json::json!({}))?;
    for object in
        operator::manifests::operator_rbac(&spec, &operator::manifests::Options::default())?
    {
        c.apply(&serde_json::to_string(&object)?)?;
    }
    let kubeconfig = c.service_account_kubeconfig(OP_NS, operator::manifests::OPERATOR)?;
    c.ok(&[
        "create",
        "secret",
        "generic",
        "cl-ca",
        "-n",
        NS,
        "--from-literal=ca=one",
    ])?;
    let admin = free_port()?;
    let mut op = Proc::spawn(
        std::process::Command::new(binary("cl-operator")?)
            .env("KUBECONFIG", &kubeconfig)
            .args([
                "--admin-addr",
                &format!("127.0.0.1:{admin}"),
                "--leader-elect",
                "--namespace",
                OP_NS,
            ])
            .args(["--lease-duration-secs", "4", "--identity", "op-1"]),
        &work.path().join("cl-operator.log"),
    )?;
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    retry("the operator is ready", WAIT, || async {
        let (s, _) = http_get(admin, "/readyz").await?;
        ensure!(s == 200, "readyz {s}");
        Ok(())
    })
    .await?;

    // An Instance with a NodePort ingress: the deployment as manifests builds it.
    c.apply(&instance("first", "{type: NodePort, port: 30443}"))?;
    until_jsonpath(
        &c,
        "deployment",
        "cl-controlplane",
        "{.spec.template.spec.containers[0].image}",
        "registry.example/cl-controlplane:v2",
    )
    .await?;
    until_jsonpath(
        &c,
        "deployment",
        "cl-dataplane",
        "{.spec.template.spec.serviceAccountName}",
        "cl-dataplane",
    )
    .await?;
    until_jsonpath(
        &c,
        "service",
        "clusterlink",
        "{.spec.type} {.spec.ports[0].nodePort}",
        "NodePort 30443",
    )
    .await?;
    until_jsonpath(
        &c,
        "service",
        "cl-controlplane",
        "{.spec.ports[0].port}",
        "4444",
    )
    .await?;
    let args = c.jsonpath(
        "deployment",
        NS,
        "cl-controlplane",
        "{.spec.template.spec.containers[0].args}",
    )?;
    ensure!(args.contains("env=prod"), "{args}");
    c.ok(&["get", "clusterrole", "clusterlink-system:cl-controlplane"])?;
    let finalizers = c.jsonpath("instance", OP_NS, "first", "{.metadata.finalizers}")?;
    ensure!(
        finalizers.contains("instance.clusterlink.net/finalizer"),
        "{finalizers}"
    );

    // No kubelet: the pods stay Pending, the Deployments unavailable.
    until_condition(
        &c,
        "first",
        "controlplane",
        "DeploymentReady",
        "False/ProgressingMode",
    )
    .await?;
    until_condition(&c, "first", "controlplane", "ServiceReady", "True/Ready").await?;
    until_condition(&c, "first", "ingress", "ServiceReady", "True/Ready").await?;
    let port = c.jsonpath("instance", OP_NS, "first", "{.status.ingress.port}")?;
    ensure!(port == "30443", "ingress port {port}");
    // Pods marked ready (as a kubelet would): the Deployment becomes Available, and
    // the Instance says so.
    for app in ["cl-controlplane", "cl-dataplane"] {
        retry(&format!("pods of {app}"), WAIT, || async {
            pods_ready(&c, app)
        })
        .await?;
    }
    until_condition(&c, "first", "controlplane", "DeploymentReady", "True/Ready").await?;
    until_condition(&c, "first", "dataplane", "DeploymentReady", "True/Ready").await?;

    // New certificates roll the pods: the pod template's hash follows the Secrets.
    let hash = "{.spec.template.metadata.annotations.clusterlink\\.net/certificates-sha256}";
    let before = c.jsonpath("deployment", NS, "cl-dataplane", hash)?;
    c.apply(&format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: cl-ca, namespace: {NS}}}\nstringData: {{ca: two}}\n"))?;
    c.ok(&[
        "annotate",
        "instance",
        "first",
        "-n",
        OP_NS,
        "--overwrite",
        "touch=1",
    ])?;
    retry("the pod template follows the new Secret", WAIT, || async {
        let now = c.jsonpath("deployment", NS, "cl-dataplane", hash)?;
        ensure!(!now.is_empty() && now != before, "hash {now}");
        Ok(())
    })
    .await?;

    // Changing the ingress is applied (ClusterLink creates the Service once only).
    c.apply(&instance(
        "first",
        "{type: LoadBalancer, port: 8443, annotations: {cloud.example/lb: internal}}",
    ))?;
    until_jsonpath(
        &c,
        "service",
        "clusterlink",
        "{.spec.type} {.spec.ports[0].port} {.metadata.annotations.cloud\\.example/lb}",
        "LoadBalancer 8443 internal",
    )
    .await?;
    retry("ingress status of the LoadBalancer", WAIT, || async {
        let got = c.jsonpath(
            "instance",
            OP_NS,
            "first",
            "{.status.ingress.ip} {.status.ingress.port}",
        )?;
        ensure!(got == "pending 8443", "is {got:?}");
        Ok(())
    })
    .await?;
    c.apply(&instance("first", "{type: none}"))?;
    until_gone(&c, "service", "clusterlink").await?;

    // A second Instance for the same namespace waits, naming the owner.
    c.apply(&instance("second", "{type: NodePort}"))?;
    until_condition(
        &c,
        "second",
        "controlplane",
        "DeploymentReady",
        "False/NotExist",
    )
    .await?;
    let why = c.jsonpath(
        "instance",
        OP_NS,
        "second",
        "{.status.controlplane.conditions.DeploymentReady.message}",
    )?;
    ensure!(why.contains("clusterlink-operator/first"), "{why}");
    ensure!(
        c.run(&["get", "service", "clusterlink", "-n", NS], None)?
            .status
            .code()
            != Some(0),
        "the second Instance acted"
    );

    // The first deleted: its objects go (the Secrets stay), then the second takes over.
    c.ok(&[
        "delete",
        "instance",
        "first",
        "-n",
        OP_NS,
        "--wait=true",
        "--timeout=60s",
    ])?;
    until_jsonpath(&c, "service", "clusterlink", "{.spec.type}", "NodePort").await?;
    until_condition(&c, "second", "controlplane", "ServiceReady", "True/Ready").await?;
    c.ok(&["get", "secret", "cl-ca", "-n", NS])?;

    c.ok(&[
        "delete",
        "instance",
        "second",
        "-n",
        OP_NS,
        "--wait=true",
        "--timeout=60s",
    ])?;
    for (kind, name) in [
        ("deployment", "cl-controlplane"),
        ("deployment", "cl-dataplane"),
        ("service", "cl-controlplane"),
        ("service", "clusterlink"),
        ("serviceaccount", "cl-controlplane"),
    ] {
        until_gone(&c, kind, name).await?;
    }
    let o = c.run(
        &["get", "clusterrole", "clusterlink-system:cl-controlplane"],
        None,
    )?;
    ensure!(!o.status.success(), "the ClusterRole is left");
    c.ok(&["get", "secret", "cl-ca", "-n", NS])?;
    c.ok(&["get", "namespace", NS])?;
    let (_, metrics) = http_get(admin, "/metrics").await?;
    ensure!(
        tests::metric(
            &metrics,
            "clusterlink_operator_reconciles_total",
            &["result=\"ok\""]
        ) > 0.0,
        "{metrics}"
    );
    ensure!(op.ended().is_none(), "the operator exited");
    op.kill();
    Ok(())
}
