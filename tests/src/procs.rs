//! Peers as real processes: `cl-controlplane` and `cl-dataplane` binaries from this
//! build (`cargo test --workspace` builds them next to the test executables), on
//! probed free loopback ports, each killable and restartable on the same ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::*;

/// A binary of this workspace, built into the same target directory as the test.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target directory")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first (cargo build --workspace, or run cargo test --workspace)",
            p.display()
        );
    }
    Ok(p)
}

/// `args` with the value after each given flag replaced; every flag must be there
/// once, so that a flag the rendered Deployment loses or renames fails the tests
/// instead of going unnoticed.
pub fn rewrite(
    args: Vec<String>,
    values: &[(&str, std::ffi::OsString)],
) -> Result<Vec<std::ffi::OsString>> {
    let mut out: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    for (flag, value) in values {
        let at: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, a)| a.as_os_str() == std::ffi::OsStr::new(flag))
            .map(|(i, _)| i)
            .collect();
        match at.as_slice() {
            [i] if *i + 1 < out.len() => out[*i + 1] = value.clone(),
            _ => bail!(
                "the rendered arguments have {flag} {} times: {out:?}",
                at.len()
            ),
        }
    }
    Ok(out)
}

/// User plus system CPU time of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, in USER_HZ (100 on Linux).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc(Option<Child>);

impl Proc {
    /// The process ID (0 once it has been reaped).
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Unless CL_TEST_VERBOSE is set (output to the terminal), the process's logs
    /// (stdout) and errors (stderr) go to `log`, new for each start; `ProcPeer` reads
    /// its tail when a start fails.
    pub fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
        if std::env::var_os("CL_TEST_VERBOSE").is_none() {
            let file = std::fs::File::create(log)
                .with_context(|| format!("creating {}", log.display()))?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        Ok(Proc(Some(cmd.spawn().context("spawning")?)))
    }

    /// None while the process runs; otherwise how it ended (or that it never started).
    pub fn ended(&mut self) -> Option<String> {
        match self.0.as_mut().map(Child::try_wait) {
            None => Some("not started".into()),
            Some(Ok(None)) => None,
            Some(Ok(Some(s))) => Some(format!("exited: {s}")),
            Some(Err(e)) => Some(format!("unknown: {e}")),
        }
    }

    /// SIGKILL: a crash, nothing drains.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.0.take() else {
            bail!("not running");
        };
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        let end = std::time::Instant::now() + within;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if std::time::Instant::now() > end {
                let _ = c.kill();
                bail!("did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One peer: its files, ports, and its two processes.
pub struct ProcPeer {
    pub name: String,
    pub dir: PathBuf,
    pub files: PeerFiles,
    pub grpc: u16,
    pub cp_admin: u16,
    pub gateway: u16,
    pub dp_admin: u16,
    pub cp: Proc,
    pub dp: Proc,
    /// Set: the control plane runs with `--platform k8s` on this cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Set (on Kubernetes): the planes talk over the site's mutual TLS.
    pub site: Option<SiteFiles>,
    /// Where the data plane reaches its control plane, when not at `grpc` (a stand-in
    /// for the Kubernetes Service in front of several replicas).
    pub controlplane_addr: Option<String>,
}

/// One deployment's site certificates (`site/` in the peer's directory), fresh from
/// `fabric::certs::site()` as `deploy` makes them.
pub struct SiteFiles {
    pub ca: PathBuf,
    pub controlplane: (PathBuf, PathBuf),
    pub dataplane: (PathBuf, PathBuf),
}

impl SiteFiles {
    pub fn write(dir: &Path) -> Result<SiteFiles> {
        let site = fabric::certs::site()?;
        std::fs::create_dir_all(dir)?;
        let f = SiteFiles {
            ca: dir.join("ca.pem"),
            controlplane: (dir.join("controlplane.pem"), dir.join("controlplane.key")),
            dataplane: (dir.join("dataplane.pem"), dir.join("dataplane.key")),
        };
        std::fs::write(&f.ca, &site.ca)?;
        std::fs::write(&f.controlplane.0, &site.controlplane.chain)?;
        std::fs::write(&f.controlplane.1, &site.controlplane.key)?;
        std::fs::write(&f.dataplane.0, &site.dataplane.chain)?;
        std::fs::write(&f.dataplane.1, &site.dataplane.key)?;
        Ok(f)
    }

    /// The data plane's flags: its certificate, its key and the CA.
    pub fn dataplane_args(&self) -> Vec<std::ffi::OsString> {
        [
            ("--site-ca-file", &self.ca),
            ("--site-cert-file", &self.dataplane.0),
            ("--site-key-file", &self.dataplane.1),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.into(), path.into()])
        .collect()
    }
}

impl ProcPeer {
    pub async fn start(fabric: &Fabric, root: &Path, name: &str) -> Result<ProcPeer> {
        Self::start_on(fabric, root, name, None).await
    }

    /// As `start`, with the control plane on a Kubernetes API when `kubeconfig` is set.
    pub async fn start_on(
        fabric: &Fabric,
        root: &Path,
        name: &str,
        kubeconfig: Option<&Path>,
    ) -> Result<ProcPeer> {
        let dir = root.join(name);
        let files = PeerFiles::write(&dir, &fabric.ca_pem, &fabric.issue(name)?)?;
        std::fs::create_dir_all(dir.join("resources"))?;
        let mut p = ProcPeer {
            name: name.into(),
            dir,
            files,
            grpc: 0,
            cp_admin: 0,
            gateway: 0,
            dp_admin: 0,
            cp: Proc(None),
            dp: Proc(None),
            kubeconfig: kubeconfig.map(Path::to_path_buf),
            site: None,
            controlplane_addr: None,
        };
        if kubeconfig.is_some() {
            p.site = Some(SiteFiles::write(&p.dir.join("site"))?);
        }
        // A probed port can be taken (by another test's connection) before the process
        // binds it; such a start is retried on new ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            p.grpc = free_port()?;
            p.cp_admin = free_port()?;
            p.gateway = free_port()?;
            p.dp_admin = free_port()?;
            p.start_cp()?;
            p.start_dp()?;
            match p.wait_ready_or_exit().await? {
                None => return Ok(p),
                Some(report) if attempt < 3 && report.contains("cannot bind") => {
                    p.cp.kill();
                    p.dp.kill();
                }
                Some(report) => bail!(report),
            }
        }
    }

    pub fn resources(&self) -> PathBuf {
        self.dir.join("resources")
    }

    pub fn start_cp(&mut self) -> Result<()> {
        let log = self.dir.join("cl-controlplane.log");
        self.cp = Proc::spawn(&mut self.cp_command(self.grpc, self.cp_admin)?, &log)?;
        Ok(())
    }

    /// This peer's replica identity on Kubernetes (Lease holder) for the control
    /// plane with admin port `admin`.
    pub fn cp_identity(&self, admin: u16) -> String {
        format!("{}-{admin}", self.name)
    }

    /// Another control plane replica of this peer, on its own ports (on Kubernetes:
    /// the same cluster, so it competes for the Lease).
    pub fn spawn_cp_replica(&self, grpc: u16, admin: u16) -> Result<Proc> {
        let log = self.dir.join(format!("cl-controlplane-{admin}.log"));
        Proc::spawn(&mut self.cp_command(grpc, admin)?, &log)
    }

    fn cp_command(&self, grpc: u16, admin: u16) -> Result<Command> {
        let mut cmd = Command::new(binary("cl-controlplane")?);
        let (Some(kubeconfig), Some(site)) = (&self.kubeconfig, &self.site) else {
            cmd.arg("--resources-dir")
                .arg(self.resources())
                .arg("--grpc-addr")
                .arg(format!("127.0.0.1:{grpc}"))
                .arg("--admin-addr")
                .arg(format!("127.0.0.1:{admin}"))
                .arg("--token-key-file")
                .arg(self.dir.join("token.key"))
                .arg("--ca-file")
                .arg(&self.files.ca)
                .arg("--cert-file")
                .arg(&self.files.cert)
                .arg("--key-file")
                .arg(&self.files.key)
                .args(["--peer-label", &format!("name={}", self.name)])
                .args(["--scan-interval-ms", "50", "--peer-timeout-ms", "1000"]);
            return Ok(cmd);
        };
        // On Kubernetes: the rendered Deployment's arguments and environment, with
        // this machine's ports and files in place of the pod's.
        let args = rewrite(
            operator::manifests::controlplane_args(&self.instance_spec()?),
            &[
                ("--grpc-addr", format!("127.0.0.1:{grpc}").into()),
                ("--admin-addr", format!("127.0.0.1:{admin}").into()),
                ("--ca-file", self.files.ca.clone().into()),
                ("--cert-file", self.files.cert.clone().into()),
                ("--key-file", self.files.key.clone().into()),
                ("--site-ca-file", site.ca.clone().into()),
                ("--site-cert-file", site.controlplane.0.clone().into()),
                ("--site-key-file", site.controlplane.1.clone().into()),
            ],
        )?;
        cmd.args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("CL_NAMESPACE", "clusterlink-system")
            .env("CL_POD_NAME", self.cp_identity(admin))
            // Faster than in a cluster, for the tests' sake.
            .args(["--lease-duration-secs", "4"])
            .args(["--scan-interval-ms", "50", "--peer-timeout-ms", "1000"]);
        Ok(cmd)
    }

    /// The Instance this peer's processes stand for: ClusterLink's defaults, and the
    /// peer label `name=<peer>`.
    fn instance_spec(&self) -> Result<crds::InstanceSpec> {
        Ok(serde_json::from_value(
            serde_json::json!({"peerLabels": {"name": self.name}}),
        )?)
    }

    pub fn start_dp(&mut self) -> Result<()> {
        let log = self.dir.join("cl-dataplane.log");
        let mut cmd = Command::new(binary("cl-dataplane")?);
        let cp = self
            .controlplane_addr
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.grpc));
        match &self.site {
            // On Kubernetes: the rendered Deployment's arguments, with this machine's
            // ports and files.
            Some(site) => cmd.args(rewrite(
                operator::manifests::dataplane_args(&self.instance_spec()?),
                &[
                    ("--controlplane-host", cp.into()),
                    (
                        "--gateway-addr",
                        format!("127.0.0.1:{}", self.gateway).into(),
                    ),
                    (
                        "--admin-addr",
                        format!("127.0.0.1:{}", self.dp_admin).into(),
                    ),
                    ("--import-bind", "127.0.0.1".into()),
                    ("--ca-file", self.files.ca.clone().into()),
                    ("--cert-file", self.files.cert.clone().into()),
                    ("--key-file", self.files.key.clone().into()),
                    ("--site-ca-file", site.ca.clone().into()),
                    ("--site-cert-file", site.dataplane.0.clone().into()),
                    ("--site-key-file", site.dataplane.1.clone().into()),
                ],
            )?),
            None => cmd
                .arg("--controlplane")
                .arg(cp)
                .arg("--gateway-addr")
                .arg(format!("127.0.0.1:{}", self.gateway))
                .arg("--admin-addr")
                .arg(format!("127.0.0.1:{}", self.dp_admin))
                .args(["--import-bind", "127.0.0.1"])
                .arg("--ca-file")
                .arg(&self.files.ca)
                .arg("--cert-file")
                .arg(&self.files.cert)
                .arg("--key-file")
                .arg(&self.files.key),
        };
        self.dp = Proc::spawn(
            cmd.args(["--drain-timeout", "2", "--cert-reload-ms", "200"]),
            &log,
        )?;
        Ok(())
    }

    /// Waits until both processes report ready; if they do not, the error says how
    /// each process stands and ends with the tail of its log.
    pub async fn wait_ready(&mut self) -> Result<()> {
        match self.wait_ready_or_exit().await? {
            None => Ok(()),
            Some(report) => bail!(report),
        }
    }

    /// None once both processes report ready; otherwise (one exited, or 30 s passed)
    /// a report: how the process stands and the tail of its log.
    async fn wait_ready_or_exit(&mut self) -> Result<Option<String>> {
        let procs = [
            ("cl-controlplane", self.cp_admin, &mut self.cp),
            ("cl-dataplane", self.dp_admin, &mut self.dp),
        ];
        for (what, port, proc) in procs {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let end = tokio::time::Instant::now() + Duration::from_secs(30);
            let failure = loop {
                if matches!(http_get(addr, "/ready").await, Ok((200, _))) {
                    break None;
                }
                if let Some(how) = proc.ended() {
                    break Some(how);
                }
                if tokio::time::Instant::now() > end {
                    break Some("running, timed out after 30 s".to_owned());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if let Some(status) = failure {
                let log = std::fs::read_to_string(self.dir.join(format!("{what}.log")))
                    .unwrap_or_default();
                // The last 20 lines, backtrace frames (indented) left out.
                let lines: Vec<&str> = log.lines().filter(|l| !l.starts_with(' ')).collect();
                let tail = &lines[lines.len().saturating_sub(20)..];
                return Ok(Some(format!(
                    "{what} of {} not ready ({status}):\n{}",
                    self.name,
                    tail.join("\n")
                )));
            }
        }
        Ok(None)
    }

    pub fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.resources().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.resources().join(file))?;
        Ok(())
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value> {
        let (status, body) =
            http_get(format!("127.0.0.1:{}", self.cp_admin).parse()?, path).await?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    pub fn peer_yaml(&self) -> String {
        format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata:\n  name: {}\n  namespace: clusterlink-system\nspec:\n  gateways:\n  - host: 127.0.0.1\n    port: {}\n",
            self.name, self.gateway
        )
    }
}
