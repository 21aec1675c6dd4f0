//! Our peers as real processes: per peer one `cl-controlplane` (resources from a
//! directory, gRPC on a 0600 Unix socket, as `clusterlink deploy peer` runs it) and one
//! `cl-dataplane`. Peer A imports the echo and sink targets that peer B exports:
//! client -> A's import (plain TCP) -> mTLS tunnel -> B -> target.
//! Every port is probed free on 127.0.0.1; the processes are stopped when the pair is
//! dropped, on success, error or interruption alike.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tests::{Fabric, PeerCert, PeerFiles, TempDir, PEER_A, PEER_B};

use crate::procs::Managed;
use crate::targets::Targets;

/// Export and import names of the targets.
pub const ECHO: &str = "echo";
pub const SINK: &str = "sink";
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// The fabric CA and both peer certificates (ECDSA P-256), generated once per run of
/// the harness and used by the baselines too.
pub struct Certs {
    pub fabric: Fabric,
    pub a: PeerCert,
    pub b: PeerCert,
}

impl Certs {
    pub fn generate() -> Result<Self> {
        let fabric = Fabric::new("bench-fabric")?;
        let a = fabric.issue(PEER_A)?;
        let b = fabric.issue(PEER_B)?;
        Ok(Certs { fabric, a, b })
    }
}

/// The two component binaries.
pub struct Bins {
    pub dataplane: PathBuf,
    pub controlplane: PathBuf,
    /// Extra arguments for both data planes.
    pub dataplane_args: Vec<String>,
}

/// One peer: its control plane and data plane. Fields drop in order: the data plane
/// first.
pub struct Peer {
    pub dp: Managed,
    pub cp: Managed,
    pub dp_admin: SocketAddr,
    pub cp_admin: SocketAddr,
}

/// Peers A and B. The directory with certificates, resources and logs goes last.
pub struct Pair {
    pub a: Peer,
    pub b: Peer,
    /// A's import of the echo target.
    pub echo: SocketAddr,
    /// A's import of the sink target.
    pub sink: SocketAddr,
    _dir: TempDir,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Probes `n` distinct free ports on 127.0.0.1 (all held until every one is read).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("probing free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

const API: &str = "apiVersion: clusterlink.net/v1alpha1";

fn peer_yaml(name: &str, gateway: u16) -> String {
    format!(
        "{API}\nkind: Peer\nmetadata:\n  name: {name}\n  namespace: clusterlink-system\n\
         spec:\n  gateways:\n  - host: 127.0.0.1\n    port: {gateway}\n"
    )
}

fn export_yaml(name: &str, target: SocketAddr) -> String {
    format!(
        "{API}\nkind: Export\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  host: {}\n  port: {}\n",
        target.ip(),
        target.port()
    )
}

fn import_yaml(name: &str, port: u16) -> String {
    format!(
        "{API}\nkind: Import\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  port: {port}\n  sources:\n  - peer: {PEER_B}\n    exportName: {name}\n    \
         exportNamespace: default\n"
    )
}

const ALLOW_ALL: &str = "kind: AccessPolicy\nmetadata:\n  name: allow-all\n  namespace: default\n\
spec:\n  action: allow\n  from:\n  - workloadSelector: {}\n  to:\n  - workloadSelector: {}\n";

impl Peer {
    /// Writes the peer's files and resources, starts its control plane and data plane.
    #[allow(clippy::too_many_arguments)]
    fn start(
        bins: &Bins,
        root: &Path,
        ca_pem: &str,
        cert: &PeerCert,
        resources: &[(&str, String)],
        gateway: u16,
        dp_admin: u16,
        cp_admin: u16,
        flags: &[&str],
    ) -> Result<Peer> {
        let dir = root.join(&cert.name);
        let files = PeerFiles::write(&dir, ca_pem, cert)?;
        let res = dir.join("resources");
        std::fs::create_dir_all(&res)?;
        for (file, yaml) in resources {
            std::fs::write(res.join(file), yaml)?;
        }
        // The control plane's socket lives in a directory only this user can enter.
        let run = dir.join("run");
        std::fs::create_dir_all(&run)?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))?;
        }
        let socket = run.join("controlplane.sock");
        let cp = Managed::spawn(
            &format!("{} control plane", cert.name),
            Command::new(&bins.controlplane)
                .arg("--grpc-socket")
                .arg(&socket)
                .arg("--admin-addr")
                .arg(local(cp_admin).to_string())
                .arg("--resources-dir")
                .arg(&res)
                .arg("--token-key-file")
                .arg(dir.join("token.key"))
                .arg("--ca-file")
                .arg(&files.ca)
                .arg("--cert-file")
                .arg(&files.cert)
                .arg("--key-file")
                .arg(&files.key)
                .args(["--log-level", "warn"]),
            &dir.join("controlplane.log"),
        )?;
        // The data plane retries until the socket exists, but logs each failure: wait.
        let until = std::time::Instant::now() + READY_DEADLINE;
        while !socket.exists() {
            if std::time::Instant::now() > until {
                bail!(
                    "{} did not create {}; its log:\n{}",
                    cp.name,
                    socket.display(),
                    cp.log_excerpt(20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut dp_cmd = Command::new(&bins.dataplane);
        dp_cmd
            .arg("--gateway-addr")
            .arg(local(gateway).to_string())
            .arg("--admin-addr")
            .arg(local(dp_admin).to_string())
            .args(["--import-bind", "127.0.0.1"])
            .arg("--controlplane")
            .arg(format!("unix:{}", socket.display()))
            .arg("--ca-file")
            .arg(&files.ca)
            .arg("--cert-file")
            .arg(&files.cert)
            .arg("--key-file")
            .arg(&files.key)
            .args(["--log-level", "warn"]);
        dp_cmd.args(flags);
        dp_cmd.args(&bins.dataplane_args);
        let dp = Managed::spawn(
            &format!("{} data plane", cert.name),
            &mut dp_cmd,
            &dir.join("dataplane.log"),
        )?;
        Ok(Peer {
            dp,
            cp,
            dp_admin: local(dp_admin),
            cp_admin: local(cp_admin),
        })
    }

    /// Polls both components' `GET /ready` until 200, failing early if one exits.
    async fn wait_ready(&mut self) -> Result<()> {
        for (admin, which) in [(self.cp_admin, 0), (self.dp_admin, 1)] {
            let outcome = tests::eventually("readiness", READY_DEADLINE, || {
                let proc = if which == 0 {
                    &mut self.cp
                } else {
                    &mut self.dp
                };
                let exited = proc.exited();
                async move {
                    if let Some(status) = exited {
                        return Some(Err(status));
                    }
                    match tests::http_get(admin, "/ready").await {
                        Ok((200, _)) => Some(Ok(())),
                        _ => None,
                    }
                }
            })
            .await;
            let proc = if which == 0 { &self.cp } else { &self.dp };
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(status)) => bail!(
                    "{} exited ({status}) before it was ready; its log:\n{}",
                    proc.name,
                    proc.log_excerpt(20)
                ),
                Err(e) => {
                    return Err(e.context(format!(
                        "{} was not ready; its log:\n{}",
                        proc.name,
                        proc.log_excerpt(20)
                    )))
                }
            }
        }
        Ok(())
    }

    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = tests::http_get(self.dp_admin, "/metrics").await?;
        if status != 200 {
            bail!("{} /metrics answered {status}", self.dp.name);
        }
        Ok(body)
    }
}

impl Pair {
    /// Starts B, then A, waits until all four processes are ready and one echo goes
    /// through the tunnel (which also opens the pooled h2 connection, if any, and fills
    /// A's control plane's token cache).
    pub async fn start(
        bins: &Bins,
        certs: &Certs,
        targets: &Targets,
        flags_a: &[&str],
    ) -> Result<Pair> {
        let dir = TempDir::new("cl-bench")?;
        let ports = free_ports(8)?;
        let [gw_a, dp_admin_a, cp_admin_a, gw_b, dp_admin_b, cp_admin_b, echo_port, sink_port] =
            ports[..]
        else {
            bail!("expected 8 free ports, got {}", ports.len());
        };
        let ca = &certs.fabric.ca_pem;
        let allow = format!("{API}\n{ALLOW_ALL}");
        let mut b = Peer::start(
            bins,
            dir.path(),
            ca,
            &certs.b,
            &[
                ("peer-a.yaml", peer_yaml(PEER_A, gw_a)),
                ("export-echo.yaml", export_yaml(ECHO, targets.echo)),
                ("export-sink.yaml", export_yaml(SINK, targets.sink)),
                ("allow-all.yaml", allow.clone()),
            ],
            gw_b,
            dp_admin_b,
            cp_admin_b,
            &[],
        )?;
        let mut a = Peer::start(
            bins,
            dir.path(),
            ca,
            &certs.a,
            &[
                ("peer-b.yaml", peer_yaml(PEER_B, gw_b)),
                ("import-echo.yaml", import_yaml(ECHO, echo_port)),
                ("import-sink.yaml", import_yaml(SINK, sink_port)),
                ("allow-all.yaml", allow),
            ],
            gw_a,
            dp_admin_a,
            cp_admin_a,
            flags_a,
        )?;
        b.wait_ready().await?;
        a.wait_ready().await?;
        let pair = Pair {
            a,
            b,
            echo: local(echo_port),
            sink: local(sink_port),
            _dir: dir,
        };
        // The import listens once A has its snapshot; the first connection may also
        // wait for B's heartbeat to mark the peer reachable.
        tests::eventually("an echo through the tunnel", READY_DEADLINE, || async {
            tokio::time::timeout(crate::load::OP_TIMEOUT, crate::load::echo_once(pair.echo))
                .await
                .ok()?
                .ok()
        })
        .await
        .map_err(|e| {
            anyhow!(
                "{e:#}\nA's data plane log:\n{}\nA's control plane log:\n{}\nB's data plane log:\n{}",
                pair.a.dp.log_excerpt(10),
                pair.a.cp.log_excerpt(10),
                pair.b.dp.log_excerpt(10)
            )
        })?;
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(10), crate::load::echo_once(pair.echo))
                .await
                .map_err(|_| anyhow!("warm-up echo through the tunnel timed out"))?
                .context("warm-up echo through the tunnel")?;
        }
        Ok(pair)
    }
}
