//! Kubernetes API servers for tests (`tests/k8s/env.sh`): `Kubectl` drives one (the
//! shared cluster `.ci/run` starts, or one of a test's own), and `KubeCluster` starts
//! a fresh one with our CRDs installed and the ClusterLink namespace made, stopped
//! when dropped. The tests that need one skip with a message when the environment
//! has no test cluster (`CL_TEST_KUBECTL` unset), except under CI, where they fail.
//! `Fleet` is the end-to-end topology: one cluster per peer, each with its control
//! plane (`--platform k8s`, as the rendered ServiceAccount with the rendered RBAC)
//! and data plane as processes, Peers and allow-all made with kubectl; the YAML builders and `until` serve the scenarios on top of it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

use crate::procs::ProcPeer;
use crate::{Fabric, TempDir};

fn env_sh() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("k8s/env.sh")
}

/// Whether the environment has a test cluster: `Ok(false)` (skip, with a message)
/// outside CI without one, an error under CI.
pub fn available(test: &str) -> Result<bool> {
    crate::needs_env(
        test,
        "CL_TEST_KUBECTL",
        "a test cluster: tests/k8s/env.sh; .ci/run builds and starts the test API server",
    )
}

/// kubectl on one cluster.
pub struct Kubectl {
    pub kubectl: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    /// The environment's shared cluster (`CL_TEST_KUBECTL`, `CL_TEST_KUBECONFIG`, as
    /// `.ci/run` sets them); `None` (skip) as `available` says.
    pub fn from_env(test: &str) -> Result<Option<Kubectl>> {
        if !available(test)? {
            return Ok(None);
        }
        match (
            std::env::var_os("CL_TEST_KUBECTL"),
            std::env::var_os("CL_TEST_KUBECONFIG"),
        ) {
            (Some(k), Some(c)) => Ok(Some(Kubectl {
                kubectl: k.into(),
                kubeconfig: c.into(),
            })),
            _ => bail!("{test}: CL_TEST_KUBECONFIG must be set with CL_TEST_KUBECTL"),
        }
    }

    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        use std::io::Write as _;
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.unwrap_or("").as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// kubectl `args`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.run(args, None)?;
        ensure!(
            o.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `kubectl apply --server-side -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let o = self.run(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(yaml),
        )?;
        ensure!(
            o.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    }

    /// A JSONPath of one object (`kubectl get KIND NAME -n NS -o jsonpath=...`);
    /// empty when the object or the field is missing.
    pub fn jsonpath(&self, kind: &str, ns: &str, name: &str, path: &str) -> Result<String> {
        let o = self.run(
            &[
                "get",
                kind,
                name,
                "-n",
                ns,
                "-o",
                &format!("jsonpath={path}"),
            ],
            None,
        )?;
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    }

    /// Our CRDs (`deploy/crds/`, generated from the `crds` crate), applied and
    /// established.
    pub fn install_crds(&self) -> Result<()> {
        let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        let crds = crds.to_str().context("path")?;
        self.ok(&["apply", "--server-side", "-f", crds])?;
        self.ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds,
        ])?;
        Ok(())
    }
}

/// A test's own API server.
pub struct KubeCluster {
    kubectl: Kubectl,
    net: u8,
    pub dir: TempDir,
}

static STARTED: AtomicU32 = AtomicU32::new(0);

impl KubeCluster {
    /// A fresh API server (etcd, kube-apiserver, kube-controller-manager), our CRDs
    /// established, namespace `clusterlink-system`. Service cluster IPs are loopback
    /// addresses (127.N.0.0/16, N different for each cluster of this process), so a
    /// test can serve on a Service's cluster IP as kube-proxy would make it reachable.
    pub fn start(name: &str) -> Result<KubeCluster> {
        let dir = TempDir::new(&format!("k8s-{name}"))?;
        let net = 100 + (STARTED.fetch_add(1, Ordering::Relaxed) % 150) as u8;
        let out = Command::new("bash")
            .arg(env_sh())
            .arg("start")
            .arg(dir.path())
            .env("CL_TEST_SERVICE_CIDR", format!("127.{net}.0.0/16"))
            .stdin(Stdio::null())
            .output()
            .context("running tests/k8s/env.sh")?;
        let c = KubeCluster {
            kubectl: Kubectl {
                kubectl: dir.path().join("kubectl"),
                kubeconfig: dir.path().join("kubeconfig"),
            },
            net,
            dir,
        };
        ensure!(
            out.status.success(),
            "env.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.install_crds()?;
        c.ok(&["create", "namespace", "clusterlink-system"])?;
        Ok(c)
    }

    /// A kubeconfig that authenticates as ServiceAccount `ns`/`name` (a token from
    /// the TokenRequest API, valid for a day), for a process to run with exactly the
    /// rights its pod would have.
    pub fn service_account_kubeconfig(&self, ns: &str, name: &str) -> Result<PathBuf> {
        let token = self.ok(&["create", "token", name, "-n", ns, "--duration=24h"])?;
        let server = self.ok(&[
            "config",
            "view",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ])?;
        let path = self.dir.path().join(format!("kubeconfig-{ns}-{name}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: {name}}}\ncurrent-context: test\n",
                server.trim(),
                self.dir.path().join("ca.crt").display(),
                token.trim()
            ),
        )?;
        Ok(path)
    }

    /// The control plane's ServiceAccounts and RBAC as `deploy peer` renders them,
    /// and a kubeconfig for its ServiceAccount: the end-to-end tests run the control
    /// plane with the rights the deployment gives it.
    pub fn install_controlplane_rbac(&self) -> Result<PathBuf> {
        let spec: crds::InstanceSpec = serde_json::from_value(serde_json::json!({}))?;
        for object in operator::manifests::rbac(&spec, &operator::manifests::Options::default())? {
            self.apply(&serde_json::to_string(&object)?)?;
        }
        self.service_account_kubeconfig("clusterlink-system", operator::manifests::CONTROLPLANE)
    }

    /// An address of this cluster's Service range (`127.N.0.i`), for a Service with
    /// an explicit cluster IP; `i` from 10 up (the API server takes .1 itself).
    pub fn service_ip(&self, i: u8) -> String {
        format!("127.{}.0.{i}", self.net)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl std::ops::Deref for KubeCluster {
    type Target = Kubectl;

    fn deref(&self) -> &Kubectl {
        &self.kubectl
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(env_sh())
            .arg("stop")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `status` of condition `ty` (jsonpath filter).
pub fn condition(ty: &str) -> String {
    format!("{{.status.conditions[?(@.type==\"{ty}\")].status}}")
}

/// How long a scenario step may take to show.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Calls `f` every 100 ms until it succeeds; after `deadline`, fails with its last error.
pub async fn retry<T, F, Fut>(what: &str, deadline: std::time::Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() > end => {
                return Err(e.context(format!("{what}: not within {deadline:?}")))
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// Waits until condition `ty` of `kind`/`name` (Peers in the ClusterLink namespace,
/// the rest in `default`) has status `want`.
pub async fn until(c: &Kubectl, kind: &str, name: &str, ty: &str, want: &str) -> Result<()> {
    let ns = if kind == "peer" {
        "clusterlink-system"
    } else {
        "default"
    };
    let path = condition(ty);
    retry(&format!("{kind} {name} {ty} == {want:?}"), WAIT, || async {
        let got = c.jsonpath(kind, ns, name, &path)?;
        ensure!(got == want, "is {got:?}");
        Ok(())
    })
    .await
}

pub fn peer_yaml(name: &str, gateway: u16) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: {{name: {name}, namespace: clusterlink-system}}\nspec:\n  gateways: [{{host: 127.0.0.1, port: {gateway}}}]\n"
    )
}

pub const ALLOW_ALL: &str = "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata: {name: allow-all, namespace: default}\nspec:\n  action: allow\n  from: [{workloadSelector: {}}]\n  to: [{workloadSelector: {}}]\n";

pub fn export_yaml(name: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {{name: {name}, namespace: default}}\nspec: {{host: \"{host}\", port: {port}}}\n"
    )
}

pub fn import_yaml(name: &str, port: u16, target: u16, peer: &str, export: &str) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  port: {port}\n  targetPort: {target}\n  sources: [{{peer: {peer}, exportName: {export}, exportNamespace: default}}]\n"
    )
}

/// One cluster per peer of a new fabric, started in parallel; on each, the peer's
/// control plane on that cluster and its data plane, a Peer object for every other
/// peer and allow-all in `default`.
pub struct Fleet {
    // Dropped in this order: the processes, then their clusters, then the files.
    pub peers: Vec<ProcPeer>,
    pub clusters: Vec<KubeCluster>,
    pub fabric: Fabric,
    pub root: TempDir,
}

impl Fleet {
    /// `None` (skip) when the environment has no test cluster, as `available` says.
    pub async fn start(test: &str, names: &[&str]) -> Result<Option<Fleet>> {
        if !available(test)? {
            return Ok(None);
        }
        let clusters: Vec<Result<KubeCluster>> = std::thread::scope(|s| {
            let started: Vec<_> = names
                .iter()
                .map(|n| s.spawn(move || KubeCluster::start(&format!("{test}-{n}"))))
                .collect();
            started
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("cluster start panicked"))?)
                .collect()
        });
        let clusters = clusters.into_iter().collect::<Result<Vec<_>>>()?;
        let root = TempDir::new(test)?;
        let fabric = Fabric::new("fabric")?;
        let mut peers = Vec::new();
        for (name, c) in names.iter().zip(&clusters) {
            let kubeconfig = c.install_controlplane_rbac()?;
            peers.push(ProcPeer::start_on(&fabric, root.path(), name, Some(&kubeconfig)).await?);
        }
        for (i, c) in clusters.iter().enumerate() {
            for (j, p) in peers.iter().enumerate() {
                if i != j {
                    c.apply(&peer_yaml(&p.name, p.gateway))?;
                }
            }
            c.apply(ALLOW_ALL)?;
        }
        Ok(Some(Fleet {
            peers,
            clusters,
            fabric,
            root,
        }))
    }

    pub fn cluster(&self, i: usize) -> Result<&KubeCluster> {
        self.clusters
            .get(i)
            .ok_or_else(|| anyhow!("no cluster {i}"))
    }

    pub fn peer(&self, i: usize) -> Result<&ProcPeer> {
        self.peers.get(i).ok_or_else(|| anyhow!("no peer {i}"))
    }

    pub fn peer_mut(&mut self, i: usize) -> Result<&mut ProcPeer> {
        self.peers.get_mut(i).ok_or_else(|| anyhow!("no peer {i}"))
    }
}
