//! The Kubernetes test environment itself (`tests/k8s/env.sh`): a real kube-apiserver,
//! as `.ci/run` starts it, with our CRDs (`deploy/crds/`). These tests check the CRDs
//! (ClusterLink's samples apply unchanged, server-side; printer columns; enum and CEL
//! validation enforced) and the harness (namespace deletion by the controller
//! manager). The control plane on it is tested in `k8s_e2e.rs`.
//!
//! They need `CL_TEST_KUBECONFIG` and `CL_TEST_KUBECTL` (set by `.ci/run`, or by hand:
//! `tests/k8s/env.sh start DIR`, then `DIR/kubeconfig` and `DIR/kubectl`). Without them they skip
//! with a message, except under CI (`CI` set), where they fail.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use tests::k8s::Kubectl as Cluster;

fn manifests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/clusterlink-manifests")
}

/// ClusterLink's sample manifests (all but the policy unit-test inputs in `pdp/`),
/// with the demos' `${VAR}` placeholders substituted as their scripts do.
fn samples() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for dir in ["bookinfo", "iperf3", "nginx", "speedtest", "website"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(manifests().join("samples").join(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f)?;
            let mut subst = String::new();
            let mut rest = text.as_str();
            while let Some(i) = rest.find("${") {
                subst.push_str(&rest[..i]);
                let end = rest[i..].find('}').context("unclosed ${")?;
                subst.push_str("127.0.0.1");
                rest = &rest[i + end + 1..];
            }
            subst.push_str(rest);
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            out.push((format!("{dir}/{name}"), subst));
        }
    }
    Ok(out)
}

#[test]
fn clusterlink_samples_apply_server_side_against_our_crds() -> Result<()> {
    let Some(c) = Cluster::from_env("clusterlink_samples_apply_server_side_against_our_crds")?
    else {
        return Ok(());
    };
    c.install_crds()?;
    // Peers live in the ClusterLink namespace; the rest in the namespace they name.
    let o = c.run(&["create", "namespace", "clusterlink-system"], None)?;
    ensure!(
        o.status.success() || String::from_utf8_lossy(&o.stderr).contains("AlreadyExists"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let samples = samples()?;
    ensure!(samples.len() >= 20, "only {} samples found", samples.len());
    for (name, text) in &samples {
        let o = c.run(&["apply", "--server-side", "-f", "-"], Some(text))?;
        ensure!(
            o.status.success(),
            "sample {name} refused: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let table = c.ok(&["get", "peers,exports,imports", "-A"])?;
    for header in [
        "REACHABLE",
        "SINCE",
        "HOST",
        "PORT",
        "TARGET PORT",
        "VALID",
        "AGE",
    ] {
        ensure!(table.contains(header), "{header} missing from:\n{table}");
    }
    for row in [
        "peer.clusterlink.net/cluster17.us-east",
        "export.clusterlink.net/reviews",
        "import.clusterlink.net/nginx-relay",
    ] {
        ensure!(table.contains(row), "{row} missing from:\n{table}");
    }
    // Import's lbScheme has an enum now: a value ClusterLink would store is refused.
    let bad = "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {name: bad-lb, namespace: default}\nspec: {port: 80, lbScheme: fastest, sources: []}\n";
    let o = c.run(&["apply", "--server-side", "-f", "-"], Some(bad))?;
    ensure!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("lbScheme"),
        "lbScheme fastest accepted: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (_, text) in &samples {
        c.run(&["delete", "--ignore-not-found", "-f", "-"], Some(text))?;
    }
    Ok(())
}

#[test]
fn the_api_server_enforces_the_crds_validation() -> Result<()> {
    let Some(c) = Cluster::from_env("the_api_server_enforces_the_crds_validation")? else {
        return Ok(());
    };
    c.install_crds()?;
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
