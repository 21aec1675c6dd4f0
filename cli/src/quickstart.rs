//! `clusterlink quickstart`: a whole fabric on this machine in one command. In a
//! temporary directory it creates a fabric and two peers, runs both locally, exports a
//! demo TCP service from B, imports it into A with allow policies on both sides, waits
//! for B to be reachable, sends traffic through A's import and checks every reply,
//! then prints what happened and stops everything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::layout::{self, Run};
use crate::{certs, resources};

const FABRIC: &str = "quickstart";
const A: &str = "peer-a";
const B: &str = "peer-b";

struct Peer {
    dir: PathBuf,
    child: Option<Child>,
    run: Option<Run>,
}

impl Peer {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > end {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn step(n: usize, text: &str) {
    println!("[{n}/6] {text}");
}

async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    use std::io::Write as _;
    let start = Instant::now();
    let mut dots = 0;
    loop {
        if let Some(v) = f().await {
            if dots > 0 {
                println!();
            }
            return Ok(v);
        }
        if start.elapsed() > within {
            if dots > 0 {
                println!();
            }
            bail!("timed out after {within:?} waiting for {what}");
        }
        if start.elapsed().as_millis() / 500 > dots {
            if dots == 0 {
                print!("      waiting for {what} ");
            }
            print!(".");
            let _ = std::io::stdout().flush();
            dots += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_peer(base: &Path, name: &str) -> Result<Peer> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args([
            "deploy",
            "peer",
            "--platform",
            "local",
            "--name",
            name,
            "--fabric",
            FABRIC,
        ])
        .arg("--path")
        .arg(base)
        .args([
            "--gateway-port",
            &free_port()?.to_string(),
            "--admin-port",
            "0",
        ])
        .args([
            "--import-bind",
            "127.0.0.1",
            "--log-level",
            "warn",
            "--drain-timeout",
            "2",
        ])
        .args(["--peer-label", &format!("demo={name}")])
        .stdout(Stdio::null())
        .spawn()
        .context("starting clusterlink deploy peer")?;
    Ok(Peer {
        dir: layout::peer_dir(base, FABRIC, name),
        child: Some(child),
        run: None,
    })
}

async fn ready(p: &mut Peer) -> Result<()> {
    let dir = p.dir.clone();
    let run = wait_for("the peer to start", Duration::from_secs(60), || {
        let dir = dir.clone();
        async move {
            let run = Run::read(&dir)?;
            for admin in [&run.controlplane_admin, &run.dataplane_admin] {
                if !matches!(crate::http::get(admin, "/ready").await, Ok((200, _))) {
                    return None;
                }
            }
            Some(run)
        }
    })
    .await?;
    p.run = Some(run);
    Ok(())
}

fn apply(p: &Peer, file: &str, yaml: &str) -> Result<()> {
    let path = p.dir.join(file);
    std::fs::write(&path, yaml)?;
    resources::apply(&p.dir, &[path.display().to_string()])
}

async fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(echo(l));
    Ok(addr)
}

/// Echoes every connection `l` accepts; accept errors (out of descriptors, say) are
/// waited out, not spun on.
async fn echo(l: TcpListener) {
    loop {
        match l.accept().await {
            Ok((mut s, _)) => {
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `clusterlink echo-server`: the echo service on `listen` until SIGTERM or SIGINT
/// (handled, so that it stops at once also as a container's PID 1).
pub async fn serve_echo(listen: SocketAddr) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    println!("echo service on {}", l.local_addr()?);
    tokio::select! {
        _ = echo(l) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

struct Numbers {
    rtt_p50: Duration,
    rtt_p99: Duration,
    bytes: u64,
    bulk_secs: f64,
    conns: u64,
    conn_secs: f64,
}

async fn traffic(import: SocketAddr) -> Result<Numbers> {
    // Round trips on one connection.
    let mut c = TcpStream::connect(import).await?;
    c.set_nodelay(true)?;
    let mut rtts = Vec::with_capacity(2000);
    let mut buf = [0u8; 64];
    for i in 0..2000u32 {
        let msg = [(i % 251) as u8; 64];
        let t = Instant::now();
        c.write_all(&msg).await?;
        c.read_exact(&mut buf).await?;
        rtts.push(t.elapsed());
        if buf != msg {
            bail!("reply {i} differs from the request");
        }
    }
    drop(c);
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p) as usize];

    // Bulk: write for 2 s while reading the echo back, then check the byte count.
    let c = TcpStream::connect(import).await?;
    let (mut r, mut w) = c.into_split();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let block = vec![0x5au8; 256 * 1024];
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(2) {
            w.write_all(&block).await?;
            sent += block.len() as u64;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(sent)
    });
    let mut got = 0u64;
    let mut rb = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut rb).await?;
        if n == 0 {
            break;
        }
        if rb[..n].iter().any(|b| *b != 0x5a) {
            bail!("bulk reply corrupted");
        }
        got += n as u64;
    }
    let bulk_secs = start.elapsed().as_secs_f64();
    let sent = writer.await??;
    if got != sent {
        bail!("sent {sent} bytes but {got} came back");
    }

    // New connections: 8 workers, connect + 64 B request/response + close, for 2 s.
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..8 {
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut b = [0u8; 64];
            while start.elapsed() < Duration::from_secs(2) {
                let mut c = TcpStream::connect(import).await?;
                c.set_nodelay(true)?;
                c.write_all(&[7u8; 64]).await?;
                c.read_exact(&mut b).await?;
                if b != [7u8; 64] {
                    return Err(anyhow!("reply differs"));
                }
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let mut conns = 0;
    for w in workers {
        conns += w.await??;
    }
    Ok(Numbers {
        rtt_p50: pct(0.50),
        rtt_p99: pct(0.99),
        bytes: sent + got,
        bulk_secs,
        conns,
        conn_secs: start.elapsed().as_secs_f64(),
    })
}

pub async fn run(keep_running: bool) -> Result<()> {
    let base = std::env::temp_dir().join(format!("clusterlink-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let result = run_in(&base, keep_running).await;
    if !keep_running {
        let _ = std::fs::remove_dir_all(&base);
    }
    result
}

async fn run_in(base: &Path, keep_running: bool) -> Result<()> {
    let failed = |n: usize| move |e: anyhow::Error| anyhow!("step {n} failed: {e:#}");
    step(
        1,
        "creating a fabric and two peers, and running both on this machine",
    );
    certs::create_fabric(base, FABRIC, certs::KeyType::EcdsaP256)
        .map_err(|e| failed(1)(e.into()))?;
    for p in [A, B] {
        certs::create_peer_cert(base, FABRIC, p, None, certs::KeyType::EcdsaP256)
            .map_err(|e| failed(1)(e.into()))?;
    }
    let mut a = start_peer(base, A).map_err(failed(1))?;
    let mut b = start_peer(base, B).map_err(failed(1))?;
    ready(&mut a).await.map_err(failed(1))?;
    ready(&mut b).await.map_err(failed(1))?;
    let (ra, rb) = match (&a.run, &b.run) {
        (Some(x), Some(y)) => (x.clone(), y.clone()),
        _ => bail!("step 1 failed: peers did not record their ports"),
    };
    println!(
        "      {A}: gateway 127.0.0.1:{}   {B}: gateway 127.0.0.1:{}",
        ra.gateway_port, rb.gateway_port
    );

    step(
        2,
        "starting a demo TCP echo service on peer-b and exporting it",
    );
    let demo = echo_server().await.map_err(failed(2))?;
    let allow = "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: allow-all\n  namespace: default\nspec:\n  action: allow\n  from:\n  - workloadSelector: {}\n  to:\n  - workloadSelector: {}\n";
    let peer = |name: &str, port: u16| {
        format!("apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata:\n  name: {name}\nspec:\n  gateways:\n  - host: 127.0.0.1\n    port: {port}\n")
    };
    let export = format!("apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata:\n  name: demo\n  namespace: default\nspec:\n  host: 127.0.0.1\n  port: {}\n", demo.port());
    apply(&b, "export.yaml", &export).map_err(failed(2))?;
    apply(&b, "allow.yaml", allow).map_err(failed(2))?;
    apply(&b, "peer.yaml", &peer(A, ra.gateway_port)).map_err(failed(2))?;

    step(
        3,
        "adding peer-b to peer-a and importing the service, with allow policies on both sides",
    );
    let import_port = free_port().map_err(failed(3))?;
    let import = format!("apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: demo\n  namespace: default\nspec:\n  port: {import_port}\n  sources:\n  - peer: {B}\n    exportName: demo\n    exportNamespace: default\n");
    apply(&a, "peer.yaml", &peer(B, rb.gateway_port)).map_err(failed(3))?;
    apply(&a, "import.yaml", &import).map_err(failed(3))?;
    apply(&a, "allow.yaml", allow).map_err(failed(3))?;

    step(4, "waiting until peer-a sees peer-b as reachable");
    let admin = ra.controlplane_admin.clone();
    let since = wait_for("PeerReachable=True", Duration::from_secs(60), || {
        let admin = admin.clone();
        async move {
            let (_, body) = crate::http::get(&admin, &format!("/api/peers/{B}"))
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let c = v["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "PeerReachable")?
                .clone();
            (c["status"] == "True").then(|| {
                c["lastTransitionTime"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
        }
    })
    .await
    .map_err(failed(4))?;
    println!("      peer-b is reachable (since {since})");

    step(
        5,
        "sending traffic through peer-a's import and checking the replies",
    );
    let import_addr: SocketAddr = format!("127.0.0.1:{import_port}")
        .parse()
        .map_err(|e: std::net::AddrParseError| failed(5)(e.into()))?;
    wait_for(
        "the import to carry a first connection",
        Duration::from_secs(30),
        || async move {
            let mut c = TcpStream::connect(import_addr).await.ok()?;
            c.write_all(b"hello").await.ok()?;
            let mut b = [0u8; 5];
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
                .await
                .ok()?
                .ok()?;
            (&b == b"hello").then_some(())
        },
    )
    .await
    .map_err(failed(5))?;
    let n = traffic(import_addr).await.map_err(failed(5))?;

    step(6, "results");
    println!("      reachability   peer-a -> peer-b: True (PeerReachable since {since})");
    println!("      round trip     64 B through the fabric: p50 {:.0} µs, p99 {:.0} µs (2000 round trips)", n.rtt_p50.as_secs_f64() * 1e6, n.rtt_p99.as_secs_f64() * 1e6);
    println!(
        "      bulk           {:.1} MB echoed in {:.1} s: {:.2} Gbit/s each way",
        n.bytes as f64 / 1e6,
        n.bulk_secs,
        n.bytes as f64 / 2.0 * 8.0 / n.bulk_secs / 1e9
    );
    println!("      connections    {} new connections in {:.1} s: {:.0} connections/s (8 concurrent, 64 B each way)", n.conns, n.conn_secs, n.conns as f64 / n.conn_secs);
    println!(
        "      metrics        http://{}/metrics  http://{}/metrics (data planes)",
        ra.dataplane_admin, rb.dataplane_admin
    );
    println!(
        "                     http://{}/metrics  http://{}/metrics (control planes)",
        ra.controlplane_admin, rb.controlplane_admin
    );
    if n.bytes == 0 || n.conns == 0 {
        bail!("step 5 failed: no traffic was carried");
    }
    if keep_running {
        println!(
            "\nBoth peers keep running (files in {}). Try:",
            base.display()
        );
        println!(
            "  clusterlink get peers --name {A} --fabric {FABRIC} --path {}",
            base.display()
        );
        println!("Stop with Ctrl-C.");
        let _ = tokio::signal::ctrl_c().await;
    }
    println!("stopping both peers");
    for (name, p) in [(A, &mut a), (B, &mut b)] {
        match p.stop() {
            Some(s) if s.success() => {}
            Some(s) => bail!("{name} did not stop cleanly: {s}"),
            None => bail!("{name} was not running"),
        }
    }
    println!("quickstart finished");
    Ok(())
}
