//! Peers as real processes: `cl-controlplane` and `cl-dataplane` binaries from this
//! build (`cargo test --workspace` builds them next to the test executables), on
//! probed free loopback ports, each killable and restartable on the same ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc(Option<Child>);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Proc> {
        let quiet = std::env::var_os("CL_TEST_VERBOSE").is_none();
        if quiet {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        Ok(Proc(Some(cmd.spawn().context("spawning")?)))
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
}

impl ProcPeer {
    pub async fn start(fabric: &Fabric, root: &Path, name: &str) -> Result<ProcPeer> {
        let dir = root.join(name);
        let files = PeerFiles::write(&dir, &fabric.ca_pem, &fabric.issue(name)?)?;
        std::fs::create_dir_all(dir.join("resources"))?;
        let mut p = ProcPeer {
            name: name.into(),
            dir,
            files,
            grpc: free_port()?,
            cp_admin: free_port()?,
            gateway: free_port()?,
            dp_admin: free_port()?,
            cp: Proc(None),
            dp: Proc(None),
        };
        p.start_cp()?;
        p.start_dp()?;
        p.wait_ready().await?;
        Ok(p)
    }

    pub fn resources(&self) -> PathBuf {
        self.dir.join("resources")
    }

    pub fn start_cp(&mut self) -> Result<()> {
        self.cp = Proc::spawn(
            Command::new(binary("cl-controlplane")?)
                .arg("--grpc-addr")
                .arg(format!("127.0.0.1:{}", self.grpc))
                .arg("--admin-addr")
                .arg(format!("127.0.0.1:{}", self.cp_admin))
                .arg("--resources-dir")
                .arg(self.resources())
                .arg("--token-key-file")
                .arg(self.dir.join("token.key"))
                .arg("--ca-file")
                .arg(&self.files.ca)
                .arg("--cert-file")
                .arg(&self.files.cert)
                .arg("--key-file")
                .arg(&self.files.key)
                .args(["--peer-label", &format!("name={}", self.name)])
                .args(["--scan-interval-ms", "50", "--peer-timeout-ms", "1000"]),
        )?;
        Ok(())
    }

    pub fn start_dp(&mut self) -> Result<()> {
        self.dp = Proc::spawn(
            Command::new(binary("cl-dataplane")?)
                .arg("--gateway-addr")
                .arg(format!("127.0.0.1:{}", self.gateway))
                .arg("--admin-addr")
                .arg(format!("127.0.0.1:{}", self.dp_admin))
                .args(["--import-bind", "127.0.0.1"])
                .arg("--controlplane")
                .arg(format!("127.0.0.1:{}", self.grpc))
                .arg("--ca-file")
                .arg(&self.files.ca)
                .arg("--cert-file")
                .arg(&self.files.cert)
                .arg("--key-file")
                .arg(&self.files.key)
                .args(["--drain-timeout", "2", "--cert-reload-ms", "200"]),
        )?;
        Ok(())
    }

    pub async fn wait_ready(&self) -> Result<()> {
        for port in [self.cp_admin, self.dp_admin] {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
            eventually(
                "process readiness",
                Duration::from_secs(30),
                || async move { (http_get(addr, "/ready").await.ok()?.0 == 200).then_some(()) },
            )
            .await?;
        }
        Ok(())
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
