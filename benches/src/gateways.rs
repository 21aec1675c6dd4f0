//! Two real `cl-dataplane` processes, A (importer) and B (exporter), each configured
//! by its own in-process fake control plane:
//! client -> A's import (plain TCP) -> mTLS tunnel -> B -> target.
//! Every port is probed free on 127.0.0.1; the child processes are killed (and reaped)
//! when the pair is dropped, on success, error or interruption alike.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use controlplane_api::v1;
use tests::{Fabric, FakeControlPlane, PeerCert, PeerFiles, TempDir, NS, PEER_A, PEER_B, SERVICE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::targets::Targets;

/// The export (on B) and import (on A) name of the bulk sink; `tests::SERVICE` ("echo")
/// is the echo target.
pub const SINK: &str = "sink";
const READY_DEADLINE: Duration = Duration::from_secs(15);
/// Validity of the access tokens the fake control plane hands out; longer than any run.
const TOKEN_TTL_SECS: u64 = 6 * 3600;

/// The fabric CA and both peer certificates (ECDSA P-256), generated once.
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

/// One running gateway process; killed and reaped on drop.
pub struct Gateway {
    pub name: &'static str,
    pub admin: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn spawn(
        bin: &Path,
        name: &'static str,
        admin: SocketAddr,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // The flags decide everything: no CL_* fallbacks from the caller's environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CL_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Gateway {
            name,
            admin,
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the gateway logged, at most about `n` lines: the first half and the last
    /// half (an error message comes first, a backtrace after it).
    pub fn log_excerpt(&self, n: usize) -> String {
        let lines = self.log_lines();
        let half = (n / 2).max(1);
        if lines.len() <= n {
            return lines.join("\n");
        }
        let (head, tail) = (&lines[..half], &lines[lines.len() - half..]);
        format!("{}\n  [...]\n{}", head.join("\n"), tail.join("\n"))
    }

    /// Lines the gateway logged (at --log-level warn: warnings and errors only).
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Polls `GET /ready` until 200, failing early if the process exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let admin = self.admin;
        let child = &mut self.child;
        let outcome = tests::eventually(
            &format!("gateway {} to be ready", self.name),
            READY_DEADLINE,
            || {
                let exited = child.try_wait().ok().flatten();
                async move {
                    if let Some(status) = exited {
                        return Some(Err::<(), ExitStatus>(status));
                    }
                    match tests::http_get(admin, "/ready").await {
                        Ok((200, _)) => Some(Ok(())),
                        _ => None,
                    }
                }
            },
        )
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => bail!(
                "gateway {} exited ({status}) before it was ready; its log:\n{}",
                self.name,
                self.log_excerpt(20)
            ),
            Err(e) => Err(e.context(format!(
                "gateway {}'s log:\n{}",
                self.name,
                self.log_excerpt(20)
            ))),
        }
    }

    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = tests::http_get(self.admin, "/metrics").await?;
        if status != 200 {
            bail!("gateway {} /metrics answered {status}", self.name);
        }
        Ok(body)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Gateways A and B with their control planes. Fields drop in order: the processes
/// first, then the control planes, then the directory with the certificates and logs.
pub struct Pair {
    pub a: Gateway,
    pub b: Gateway,
    _cp_a: FakeControlPlane,
    _cp_b: FakeControlPlane,
    /// A's import of the echo target.
    pub echo: SocketAddr,
    /// A's import of the sink target.
    pub sink: SocketAddr,
    _dir: TempDir,
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

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn import(name: &str, port: u16) -> v1::Import {
    v1::Import {
        namespace: NS.into(),
        name: name.into(),
        port: port.into(),
        sources: vec![v1::ImportSource {
            peer: PEER_B.into(),
            export_namespace: NS.into(),
            export_name: name.into(),
        }],
    }
}

fn token(export_name: &str) -> String {
    dataplane::token::mint(
        tests::TOKEN_KEY,
        &dataplane::token::Claims {
            sub: PEER_A.into(),
            export_namespace: NS.into(),
            export_name: export_name.into(),
            exp: dataplane::token::now_unix() + TOKEN_TTL_SECS,
            epoch: 1,
        },
    )
}

impl Pair {
    /// Starts B, then A, waits until both are ready and checks one echo round trip
    /// through the tunnel (which also opens the pooled h2 connection, if any).
    pub async fn start(
        bin: &Path,
        certs: &Certs,
        targets: &Targets,
        force_http1: bool,
    ) -> Result<Pair> {
        let dir = TempDir::new("cl-bench")?;
        let files_a = PeerFiles::write(&dir.path().join(PEER_A), &certs.fabric.ca_pem, &certs.a)?;
        let files_b = PeerFiles::write(&dir.path().join(PEER_B), &certs.fabric.ca_pem, &certs.b)?;
        let ports = free_ports(6)?;
        let [gw_a, admin_a, gw_b, admin_b, echo_port, sink_port] = ports[..] else {
            bail!("expected 6 free ports, got {}", ports.len());
        };

        // B exports the echo target (tests' "default/echo") and the sink.
        let mut snap_b = tests::exporter_snapshot(targets.echo);
        snap_b.exports.push(v1::Export {
            namespace: NS.into(),
            name: SINK.into(),
            host: targets.sink.ip().to_string(),
            port: targets.sink.port().into(),
        });
        let cp_b = FakeControlPlane::start(snap_b)?;

        // A imports both from B, on probed ports.
        let mut snap_a = tests::importer_snapshot(local(gw_b));
        snap_a.imports = vec![import(SERVICE, echo_port), import(SINK, sink_port)];
        let cp_a = FakeControlPlane::start(snap_a)?;
        // Tokens are minted once: the fake control plane's cost per egress call stays
        // a lookup, so the bench measures the gateways rather than the fake.
        let (echo_token, sink_token) = (token(SERVICE), token(SINK));
        let expires_unix_ms = ((dataplane::token::now_unix() + TOKEN_TTL_SECS) * 1000) as i64;
        cp_a.set_egress(move |req| {
            let access_token = match req.import_name.as_str() {
                SERVICE => echo_token.clone(),
                SINK => sink_token.clone(),
                _ => {
                    return v1::EgressResponse {
                        allowed: false,
                        reason: format!("no import {:?} in the bench", req.import_name),
                        ..Default::default()
                    }
                }
            };
            v1::EgressResponse {
                allowed: true,
                reason: String::new(),
                peer: PEER_B.into(),
                access_token,
                expires_unix_ms,
            }
        });

        let args = |gw: u16, admin: u16, cp: SocketAddr, files: &PeerFiles| -> Vec<String> {
            let path = |p: &Path| p.display().to_string();
            vec![
                "--gateway-addr".into(),
                local(gw).to_string(),
                "--admin-addr".into(),
                local(admin).to_string(),
                "--import-bind".into(),
                "127.0.0.1".into(),
                "--controlplane".into(),
                cp.to_string(),
                "--ca-file".into(),
                path(&files.ca),
                "--cert-file".into(),
                path(&files.cert),
                "--key-file".into(),
                path(&files.key),
                "--log-level".into(),
                "warn".into(),
            ]
        };
        let mut b = Gateway::spawn(
            bin,
            "B",
            local(admin_b),
            &args(gw_b, admin_b, cp_b.addr, &files_b),
            dir.path().join("gateway-b.log"),
        )?;
        let mut args_a = args(gw_a, admin_a, cp_a.addr, &files_a);
        if force_http1 {
            args_a.push("--force-http1".into());
        }
        let mut a = Gateway::spawn(
            bin,
            "A",
            local(admin_a),
            &args_a,
            dir.path().join("gateway-a.log"),
        )?;
        b.wait_ready().await?;
        a.wait_ready().await?;
        let pair = Pair {
            a,
            b,
            _cp_a: cp_a,
            _cp_b: cp_b,
            echo: local(echo_port),
            sink: local(sink_port),
            _dir: dir,
        };
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(10), echo_once(pair.echo))
                .await
                .map_err(|_| anyhow!("warm-up echo through the tunnel timed out"))?
                .with_context(|| {
                    format!(
                        "warm-up echo through the tunnel failed\nA's log:\n{}\nB's log:\n{}",
                        pair.a.log_excerpt(10),
                        pair.b.log_excerpt(10)
                    )
                })?;
        }
        Ok(pair)
    }
}

/// One 64-byte echo on a fresh connection.
pub async fn echo_once(addr: SocketAddr) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let msg = [0x5au8; 64];
    s.write_all(&msg).await?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).await?;
    if back != msg {
        bail!("echo returned different bytes");
    }
    Ok(())
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
