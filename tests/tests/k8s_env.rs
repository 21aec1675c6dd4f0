//! The Kubernetes test environment itself (`tests/k8s/env.sh`): a real kube-apiserver
//! with ClusterLink's own CRDs, as `.ci/run` starts it. These tests check the harness
//! the Kubernetes platform is being built on (CRDs established, server-side apply of
//! ClusterLink's samples, CEL validation enforced, namespace deletion by the
//! controller manager), not yet our control plane.
//!
//! They need `CL_TEST_KUBECONFIG` and `CL_TEST_KUBECTL` (set by `.ci/run`, or by hand:
//! `tests/k8s/env.sh start DIR`, then `DIR/kubeconfig` and `DIR/kubectl`). Without them they skip
//! with a message, except under CI (`CI` set), where they fail.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

struct Cluster {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    /// The cluster of the environment, `None` (skip) outside CI when there is none.
    fn from_env(test: &str) -> Result<Option<Cluster>> {
        match (
            std::env::var_os("CL_TEST_KUBECTL"),
            std::env::var_os("CL_TEST_KUBECONFIG"),
        ) {
            (Some(k), Some(c)) => Ok(Some(Cluster {
                kubectl: k.into(),
                kubeconfig: c.into(),
            })),
            _ if std::env::var_os("CI").is_some() => {
                bail!("{test}: CL_TEST_KUBECTL and CL_TEST_KUBECONFIG must be set under CI (.ci/run starts the API server)")
            }
            _ => {
                eprintln!("{test}: skipped: no test cluster (CL_TEST_KUBECTL, CL_TEST_KUBECONFIG; see tests/k8s/env.sh)");
                Ok(None)
            }
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        use std::io::Write as _;
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("running kubectl")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.unwrap_or("").as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// kubectl `args`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.run(args, None)?;
        ensure!(
            o.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

fn manifests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/clusterlink-manifests")
}

fn crds_established(c: &Cluster) -> Result<()> {
    let crds = manifests().join("crds");
    let crds = crds.to_str().context("path")?;
    c.ok(&["apply", "--server-side", "-f", crds])?;
    c.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "-f",
        crds,
    ])?;
    Ok(())
}

#[test]
fn clusterlink_crds_and_samples_apply_server_side() -> Result<()> {
    let Some(c) = Cluster::from_env("clusterlink_crds_and_samples_apply_server_side")? else {
        return Ok(());
    };
    crds_established(&c)?;
    // Unchanged, into the namespace they name (default).
    let samples = manifests().join("samples/bookinfo");
    let files: Vec<String> = [
        "export-reviews.yaml",
        "import-reviews.yaml",
        "allow-policy.yaml",
    ]
    .iter()
    .map(|f| samples.join(f).to_string_lossy().into_owned())
    .collect();
    for f in &files {
        c.ok(&["apply", "--server-side", "-f", f])?;
    }
    let got = c.ok(&[
        "get",
        "exports,imports,accesspolicies",
        "-n",
        "default",
        "-o",
        "name",
    ])?;
    for want in [
        "export.clusterlink.net/reviews",
        "import.clusterlink.net/reviews",
        "accesspolicy.clusterlink.net/allow-policy",
    ] {
        ensure!(got.contains(want), "{want} missing from:\n{got}");
    }
    for f in &files {
        c.ok(&["delete", "-f", f])?;
    }
    Ok(())
}

#[test]
fn the_api_server_enforces_the_crds_validation() -> Result<()> {
    let Some(c) = Cluster::from_env("the_api_server_enforces_the_crds_validation")? else {
        return Ok(());
    };
    crds_established(&c)?;
    let import = |name: &str| {
        format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  port: 80\n  lbScheme: round-robin\n  sources: [{{exportName: x, exportNamespace: default, peer: p}}]\n"
        )
    };
    // ClusterLink's CEL rule: an Import name has at most 63 characters.
    let long = "a".repeat(64);
    let o = c.run(&["apply", "--server-side", "-f", "-"], Some(&import(&long)))?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("import name cannot exceed 63 chars"),
        "a 64-character Import name was not refused by the rule: {err}"
    );
    let ok = "a".repeat(63);
    let o = c.run(&["apply", "--server-side", "-f", "-"], Some(&import(&ok)))?;
    ensure!(
        o.status.success(),
        "a 63-character Import name was refused: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.ok(&["delete", "import", &ok, "-n", "default"])?;
    Ok(())
}

#[test]
fn the_controller_manager_finishes_namespace_deletion() -> Result<()> {
    let Some(c) = Cluster::from_env("the_controller_manager_finishes_namespace_deletion")? else {
        return Ok(());
    };
    let ns = "cl-env-deleted";
    c.ok(&["create", "namespace", ns])?;
    c.ok(&["create", "configmap", "x", "-n", ns])?;
    c.ok(&["delete", "namespace", ns, "--wait=false"])?;
    // Without kube-controller-manager the namespace would stay Terminating.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = c.run(&["get", "namespace", ns], None)?;
        if !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("NotFound") {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "namespace {ns} still there after 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
