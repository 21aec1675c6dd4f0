//! `clusterlink deploy peer --platform local`: runs the peer's cl-controlplane and
//! cl-dataplane in the foreground, records their ports in the peer directory, and on
//! SIGINT/SIGTERM drains both and exits 0. A component that dies is restarted with
//! backoff while the other keeps running (the data plane serves from its last snapshot
//! meanwhile); one that keeps dying right after each start ends the peer, naming it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::layout::{self, Run};

pub struct Options {
    pub base: PathBuf,
    pub fabric: String,
    pub peer: String,
    pub gateway_port: u16,
    pub admin_port: u16,
    pub import_bind: IpAddr,
    pub labels: Vec<String>,
    pub log_level: String,
    pub drain_timeout: f64,
}

/// How to start a component: its binary next to this executable or on PATH.
pub fn component(name: &str) -> Result<Command> {
    Ok(Command::new(find_binary(name)?))
}

/// A component binary: next to this executable, else on PATH.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("{name} not found next to clusterlink or on PATH (build both: cargo build --release -p dataplane -p controlplane)")
}

/// A plane's command with what both take alike: the peer's CA, certificate and key
/// files, and the log level.
fn plane(name: &str, [ca, cert, key]: [&PathBuf; 3], log_level: &str) -> Result<Command> {
    let mut c = component(name)?;
    c.arg("--ca-file")
        .arg(ca)
        .arg("--cert-file")
        .arg(cert)
        .arg("--key-file")
        .arg(key)
        .args(["--log-level", log_level]);
    Ok(c)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn port_or_free(p: u16) -> Result<u16> {
    if p == 0 {
        free_port()
    } else {
        Ok(p)
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
}

async fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let end = tokio::time::Instant::now() + within;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if tokio::time::Instant::now() >= end {
            let _ = child.kill();
            return child.wait().ok();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(what: &str, admin: &str, components: &mut [&mut Component]) -> Result<()> {
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        for c in components.iter_mut() {
            if let Some(s) = c.exited() {
                bail!(
                    "{} exited during start-up ({s}); run with --log-level debug to see why",
                    c.name
                );
            }
        }
        if matches!(crate::http::get(admin, "/ready").await, Ok((200, _))) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            bail!("{what} did not become ready on {admin} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(o: Options) -> Result<()> {
    let pdir = layout::peer_dir(&o.base, &o.fabric, &o.peer);
    let ca = layout::fabric_dir(&o.base, &o.fabric).join("cert.pem");
    let cert = pdir.join("cert.pem");
    let key = pdir.join("key.pem");
    for f in [&ca, &cert, &key] {
        if !f.is_file() {
            bail!(
                "{} is missing: create the fabric and the peer certificate first (clusterlink create fabric / create peer-cert --name {})",
                f.display(),
                o.peer
            );
        }
    }
    if let Some(run) = Run::read(&pdir) {
        if alive(run.pid) && run.pid != std::process::id() {
            bail!(
                "peer {} already runs (pid {}); stop it first",
                o.peer,
                run.pid
            );
        }
    }
    let resources = layout::resources_dir(&pdir);
    std::fs::create_dir_all(&resources).with_context(|| resources.display().to_string())?;
    let gateway_port = port_or_free(o.gateway_port)?;
    let (dp_admin, cp_admin, grpc) = if o.admin_port == 0 {
        (free_port()?, free_port()?, free_port()?)
    } else {
        // With the default 4445: data plane admin 4445, control plane admin 4446 and
        // gRPC 4444, the components' own defaults.
        let p = o.admin_port;
        let room = || anyhow!("--admin-port {p} needs the ports next to it on both sides");
        let above = p.checked_add(1).ok_or_else(room)?;
        let below = p.checked_sub(1).filter(|q| *q > 0).ok_or_else(room)?;
        (p, above, below)
    };
    // The data-plane API goes over a Unix socket in a 0700 directory of the peer, so
    // that no other local user can subscribe and read the token key. Unix socket
    // paths are limited to about 100 bytes; a deeper peer directory falls back to
    // TCP on loopback, with a warning.
    let socket = std::fs::canonicalize(&pdir)
        .unwrap_or_else(|_| pdir.clone())
        .join("run")
        .join("controlplane.sock");
    let grpc_endpoint = if socket.as_os_str().len() <= 100 {
        format!("unix:{}", socket.display())
    } else {
        eprintln!(
            "warning: {} is too long for a Unix socket; the control plane listens on 127.0.0.1:{grpc} instead",
            socket.display()
        );
        format!("127.0.0.1:{grpc}")
    };
    let run = Run {
        peer: o.peer.clone(),
        pid: std::process::id(),
        gateway_port,
        dataplane_admin: format!("127.0.0.1:{dp_admin}"),
        controlplane_admin: format!("127.0.0.1:{cp_admin}"),
        controlplane_grpc: grpc_endpoint.clone(),
        import_bind: o.import_bind.to_string(),
    };
    let cp_command = {
        let (run, o) = (run.clone(), (o.labels.clone(), o.log_level.clone()));
        let (resources, pdir, ca, cert, key) = (
            resources.clone(),
            pdir.clone(),
            ca.clone(),
            cert.clone(),
            key.clone(),
        );
        move || -> Result<Command> {
            let mut c = plane("cl-controlplane", [&ca, &cert, &key], &o.1)?;
            c.args(match run.controlplane_grpc.strip_prefix("unix:") {
                Some(path) => ["--grpc-socket".to_owned(), path.to_owned()],
                None => ["--grpc-addr".to_owned(), run.controlplane_grpc.clone()],
            })
            .arg("--admin-addr")
            .arg(&run.controlplane_admin)
            .arg("--resources-dir")
            .arg(&resources)
            .arg("--token-key-file")
            .arg(pdir.join("token.key"))
            .args(
                o.0.iter()
                    .flat_map(|l| ["--peer-label".to_owned(), l.clone()]),
            );
            Ok(c)
        }
    };
    let dp_command = {
        let (run, log_level, drain) = (run.clone(), o.log_level.clone(), o.drain_timeout);
        let (ca, cert, key) = (ca.clone(), cert.clone(), key.clone());
        move || -> Result<Command> {
            let mut c = plane("cl-dataplane", [&ca, &cert, &key], &log_level)?;
            c.arg("--gateway-addr")
                .arg(format!("0.0.0.0:{gateway_port}"))
                .arg("--admin-addr")
                .arg(&run.dataplane_admin)
                .arg("--import-bind")
                .arg(&run.import_bind)
                .arg("--controlplane")
                .arg(&run.controlplane_grpc)
                .args(["--drain-timeout", &drain.to_string()]);
            Ok(c)
        }
    };
    let mut cp = Component::new("cl-controlplane", Box::new(cp_command));
    cp.spawn()?;
    let mut dp = Component::new("cl-dataplane", Box::new(dp_command));
    if let Err(e) = dp.spawn() {
        cp.stop(Duration::from_secs(5)).await;
        return Err(e);
    }
    let run_file = layout::run_file(&pdir);
    let result: Result<()> = async {
        let tmp = run_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&run)?)?;
        std::fs::rename(&tmp, &run_file)?;
        wait_ready("cl-controlplane", &run.controlplane_admin, &mut [&mut cp, &mut dp]).await?;
        wait_ready("cl-dataplane", &run.dataplane_admin, &mut [&mut cp, &mut dp]).await?;
        println!(
            "peer {} is running: gateway 0.0.0.0:{gateway_port}, imports on {}, control plane admin http://{}, data plane admin http://{}",
            o.peer, run.import_bind, run.controlplane_admin, run.dataplane_admin
        );
        println!("resources: {}   (stop with Ctrl-C)", resources.display());
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Supervision: a component that dies is restarted with backoff while the other
        // keeps running (the data plane serves from its last snapshot while its control
        // plane is away, and resyncs when it is back; the control plane does not need
        // its data plane); one that keeps dying ends the peer, with the reason.
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            cp.supervise()?;
            dp.supervise()?;
        }
    }
    .await;
    // Drain the data plane first (it keeps serving from its last snapshot), then
    // stop the control plane.
    let drain = Duration::from_secs_f64(o.drain_timeout.max(0.0) + 5.0);
    let dp_status = dp.stop(drain).await;
    let cp_status = cp.stop(Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(&run_file);
    result?;
    for (name, s) in [("cl-dataplane", dp_status), ("cl-controlplane", cp_status)] {
        match s {
            Stopped::Exited(s) if s.success() => {}
            Stopped::Exited(s) => bail!("{name} exited with {s}"),
            Stopped::Hung => bail!("{name} did not exit"),
            // Down (between restarts) when the signal came.
            Stopped::NotRunning => {}
        }
    }
    println!("peer {} stopped", o.peer);
    Ok(())
}

/// Restart backoff: the first wait, and the longest.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A component that ran this long before it died is restarted as if for the first time.
const STABLE: Duration = Duration::from_secs(30);
/// Deaths in a row, each within `STABLE` of its start, after which the peer gives up.
const MAX_QUICK_DEATHS: u32 = 5;

/// How a component ended when the peer stopped.
enum Stopped {
    Exited(std::process::ExitStatus),
    Hung,
    NotRunning,
}

/// One supervised component: how to start it, its process, and its restart state.
struct Component {
    name: &'static str,
    command: Box<dyn Fn() -> Result<Command> + Send>,
    child: Option<Child>,
    started: std::time::Instant,
    restart_at: Option<tokio::time::Instant>,
    deaths: u32,
    backoff: Duration,
}

impl Component {
    fn new(name: &'static str, command: Box<dyn Fn() -> Result<Command> + Send>) -> Self {
        Component {
            name,
            command,
            child: None,
            started: std::time::Instant::now(),
            restart_at: None,
            deaths: 0,
            backoff: FIRST_BACKOFF,
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let child = (self.command)()?
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        self.started = std::time::Instant::now();
        Ok(())
    }

    /// The exit status, if the process has exited (and is then no longer held).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Notices a death and schedules the restart, or restarts when it is due; fails
    /// when the component keeps dying right after its starts.
    fn supervise(&mut self) -> Result<()> {
        if let Some(status) = self.exited() {
            self.died(&status.to_string())?;
        }
        if self
            .restart_at
            .is_some_and(|at| tokio::time::Instant::now() >= at)
        {
            self.restart_at = None;
            match self.spawn() {
                Ok(()) => eprintln!("{}: restarted", self.name),
                Err(e) => self.died(&format!("{e:#}"))?,
            }
        }
        Ok(())
    }

    fn died(&mut self, why: &str) -> Result<()> {
        if self.started.elapsed() >= STABLE {
            self.deaths = 0;
            self.backoff = FIRST_BACKOFF;
        }
        self.deaths += 1;
        if self.deaths > MAX_QUICK_DEATHS {
            bail!(
                "{} keeps dying ({why}): {} times in a row within {} s of starting; giving up (run with --log-level debug to see why)",
                self.name,
                self.deaths,
                STABLE.as_secs()
            );
        }
        eprintln!(
            "{}: died ({why}); restarting in {:.1} s",
            self.name,
            self.backoff.as_secs_f64()
        );
        self.restart_at = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }

    /// SIGTERM, then up to `within` for it to exit (SIGKILL after that).
    async fn stop(&mut self, within: Duration) -> Stopped {
        self.restart_at = None;
        let Some(mut child) = self.child.take() else {
            return Stopped::NotRunning;
        };
        terminate(&mut child);
        match wait_exit(&mut child, within).await {
            Some(s) => Stopped::Exited(s),
            None => Stopped::Hung,
        }
    }
}
