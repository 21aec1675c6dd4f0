//! The double hops a user would build instead: stunnel, HAProxy and nginx (stream
//! module) as mutual-TLS gateway pairs with the same certificates as ours (ECDSA P-256,
//! TLS 1.3, client certificate required and verified against the fabric CA, B's name
//! checked by A), and HAProxy as a plain-TCP relay pair, the no-crypto bound. The
//! configuration files are benches/conf/*.in, from ../shared/bench-baselines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tests::{TempDir, PEER_B};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ours::{free_ports, Certs};
use crate::procs::Managed;
use crate::targets::Targets;

const READY_DEADLINE: Duration = Duration::from_secs(15);
const NGINX_MODULES: &str = "/usr/lib/nginx/modules";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Stunnel,
    Haproxy,
    /// HAProxy without TLS on either hop.
    HaproxyPlain,
    Nginx,
}

/// Where each tool was found, or why it cannot run.
pub struct Tools {
    pub stunnel: Result<PathBuf, String>,
    pub haproxy: Result<PathBuf, String>,
    pub nginx: Result<PathBuf, String>,
    /// What the harness did to get them (for the report).
    pub notes: Vec<String>,
}

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

fn nginx_stream_module() -> bool {
    Path::new(NGINX_MODULES)
        .join("ngx_stream_module.so")
        .is_file()
}

fn version(bin: &Path, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.to_lowercase().contains("version") || l.starts_with("stunnel"))
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

impl Tools {
    fn probe(notes: Vec<String>) -> Tools {
        let stunnel = find(&["stunnel4", "stunnel"]).ok_or_else(|| "stunnel not found".into());
        let haproxy = find(&["haproxy"]).ok_or_else(|| "haproxy not found".into());
        let nginx = match find(&["nginx"]) {
            Some(_) if !nginx_stream_module() => Err(format!(
                "nginx has no stream module ({NGINX_MODULES}/ngx_stream_module.so; \
                 Debian package libnginx-mod-stream)"
            )),
            Some(p) => Ok(p),
            None => Err("nginx not found".into()),
        };
        Tools {
            stunnel,
            haproxy,
            nginx,
            notes,
        }
    }

    /// Finds the tools without installing anything.
    pub fn probe_only() -> Tools {
        Tools::probe(Vec::new())
    }

    /// Finds the tools; installs the missing ones with apt-get when `install` is set
    /// and this is root on a Debian-like system, and says so.
    pub fn ensure(install: bool) -> Tools {
        let first = Tools::probe(Vec::new());
        let missing = first.stunnel.is_err() || first.haproxy.is_err() || first.nginx.is_err();
        if !missing || !install {
            return first;
        }
        let mut notes = Vec::new();
        let root = nix::unistd::geteuid().is_root();
        let apt = find(&["apt-get"]);
        match (root, apt) {
            (true, Some(apt)) => {
                let pkgs = ["stunnel4", "haproxy", "nginx-full", "libnginx-mod-stream"];
                eprintln!(
                    "cl-bench: installing the baseline tools with apt-get: {}",
                    pkgs.join(" ")
                );
                let run = |args: &[&str]| {
                    Command::new(&apt)
                        .args(args)
                        .env("DEBIAN_FRONTEND", "noninteractive")
                        .stdout(std::process::Stdio::null())
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false)
                };
                let mut install_args = vec!["install", "-y", "-q"];
                install_args.extend(pkgs);
                let ok = run(&install_args) || (run(&["update", "-q"]) && run(&install_args));
                notes.push(if ok {
                    format!("installed with apt-get: {}", pkgs.join(" "))
                } else {
                    format!("apt-get install {} failed", pkgs.join(" "))
                });
            }
            (false, _) => notes.push(
                "some baseline tools are missing and this is not root, so they were not installed"
                    .into(),
            ),
            (true, None) => notes.push(
                "some baseline tools are missing and there is no apt-get to install them".into(),
            ),
        }
        Tools::probe(notes)
    }

    pub fn binary(&self, tool: Tool) -> Result<&Path, String> {
        let r = match tool {
            Tool::Stunnel => &self.stunnel,
            Tool::Haproxy | Tool::HaproxyPlain => &self.haproxy,
            Tool::Nginx => &self.nginx,
        };
        r.as_deref().map_err(Clone::clone)
    }

    /// One line per found tool with its version.
    pub fn versions(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Ok(p) = &self.stunnel {
            v.push(version(p, "-version"));
        }
        if let Ok(p) = &self.haproxy {
            v.push(version(p, "-v"));
        }
        if let Ok(p) = &self.nginx {
            v.push(version(p, "-v"));
        }
        v.retain(|s| !s.is_empty());
        v
    }
}

/// A running double hop: B first, then A. The directory goes last.
pub struct Pair {
    pub a: Managed,
    pub b: Managed,
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    /// What the mutual-TLS check found (TLS configurations only).
    pub mtls_check: Option<String>,
    _dir: TempDir,
}

fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut s = template.to_owned();
    for (k, v) in vars {
        s = s.replace(&format!("@{k}@"), v);
    }
    s
}

impl Pair {
    pub async fn start(tool: Tool, bin: &Path, certs: &Certs, targets: &Targets) -> Result<Pair> {
        let dir = TempDir::new("cl-bench-baseline")?;
        let d = dir.path();
        let write = |name: &str, text: &str| {
            std::fs::write(d.join(name), text).with_context(|| format!("writing {name}"))
        };
        write("ca.crt", &certs.fabric.ca_pem)?;
        write("client.crt", &certs.a.chain_pem)?;
        write("client.key", &certs.a.key_pem)?;
        write(
            "client.pem",
            &format!("{}{}", certs.a.chain_pem, certs.a.key_pem),
        )?;
        write("server.crt", &certs.b.chain_pem)?;
        write("server.key", &certs.b.key_pem)?;
        write(
            "server.pem",
            &format!("{}{}", certs.b.chain_pem, certs.b.key_pem),
        )?;
        let ports = free_ports(4)?;
        let [a_sink, a_echo, b_sink, b_echo] = ports[..] else {
            bail!("expected 4 free ports");
        };
        let dirs = d.display().to_string();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (ssl_a, ssl_b) = match tool {
            Tool::HaproxyPlain => (String::new(), String::new()),
            _ => (
                format!(
                    "ssl crt {dirs}/client.pem ca-file {dirs}/ca.crt verify required \
                     verifyhost {PEER_B} sni str({PEER_B}) ssl-min-ver TLSv1.3"
                ),
                format!(
                    "ssl crt {dirs}/server.pem ca-file {dirs}/ca.crt verify required \
                     ssl-min-ver TLSv1.3"
                ),
            ),
        };
        let common = vec![
            ("DIR", dirs.clone()),
            ("A_SINK", a_sink.to_string()),
            ("A_ECHO", a_echo.to_string()),
            ("B_SINK", b_sink.to_string()),
            ("B_ECHO", b_echo.to_string()),
            ("T_SINK", targets.sink.to_string()),
            ("T_ECHO", targets.echo.to_string()),
            ("THREADS", threads.to_string()),
            ("PEER_B", PEER_B.to_owned()),
            ("NGINX_MODULES", NGINX_MODULES.to_owned()),
        ];
        let vars = |ssl: &str| {
            let mut v = common.clone();
            v.push(("SSL", ssl.to_owned()));
            v
        };
        let (conf_a, conf_b, ext) = match tool {
            Tool::Stunnel => (
                include_str!("../conf/stunnel-a.conf.in"),
                include_str!("../conf/stunnel-b.conf.in"),
                "conf",
            ),
            Tool::Haproxy | Tool::HaproxyPlain => (
                include_str!("../conf/haproxy-a.cfg.in"),
                include_str!("../conf/haproxy-b.cfg.in"),
                "cfg",
            ),
            Tool::Nginx => (
                include_str!("../conf/nginx-a.conf.in"),
                include_str!("../conf/nginx-b.conf.in"),
                "conf",
            ),
        };
        let path_a = d.join(format!("a.{ext}"));
        let path_b = d.join(format!("b.{ext}"));
        write(&format!("a.{ext}"), &render(conf_a, &vars(&ssl_a)))?;
        write(&format!("b.{ext}"), &render(conf_b, &vars(&ssl_b)))?;

        let command = |side: &str, conf: &Path| -> Command {
            let mut c = Command::new(bin);
            match tool {
                Tool::Stunnel => {
                    c.arg(conf);
                }
                Tool::Haproxy | Tool::HaproxyPlain => {
                    c.arg("-db").arg("-f").arg(conf);
                }
                Tool::Nginx => {
                    c.arg("-e")
                        .arg(d.join(format!("nginx-{side}.err")))
                        .arg("-p")
                        .arg(d)
                        .arg("-c")
                        .arg(conf);
                }
            }
            c
        };
        if matches!(tool, Tool::Haproxy | Tool::HaproxyPlain) {
            for conf in [&path_a, &path_b] {
                let out = Command::new(bin)
                    .arg("-c")
                    .arg("-q")
                    .arg("-f")
                    .arg(conf)
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "haproxy rejects {}: {}",
                        conf.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        let mut b = Managed::spawn("B", &mut command("b", &path_b), &d.join("b.log"))?;
        let mut a = Managed::spawn("A", &mut command("a", &path_a), &d.join("a.log"))?;
        let echo = SocketAddr::from(([127, 0, 0, 1], a_echo));
        let sink = SocketAddr::from(([127, 0, 0, 1], a_sink));
        let outcome = tests::eventually("an echo through the double hop", READY_DEADLINE, || {
            let exited = a.exited().or_else(|| b.exited());
            async move {
                if let Some(status) = exited {
                    return Some(Err(status));
                }
                tokio::time::timeout(crate::load::OP_TIMEOUT, crate::load::echo_once(echo))
                    .await
                    .ok()?
                    .ok()
                    .map(Ok)
            }
        })
        .await;
        let logs = |a: &Managed, b: &Managed| {
            let extra = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();
            format!(
                "A's log:\n{}\n{}{}\nB's log:\n{}\n{}{}",
                a.log_excerpt(10),
                extra("stunnel-a.out"),
                extra("nginx-a.err"),
                b.log_excerpt(10),
                extra("stunnel-b.out"),
                extra("nginx-b.err"),
            )
        };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(status)) => bail!("a gateway exited ({status})\n{}", logs(&a, &b)),
            Err(e) => return Err(e.context(logs(&a, &b))),
        }
        let mtls_check = if tool == Tool::HaproxyPlain {
            None
        } else {
            Some(
                check_mtls(SocketAddr::from(([127, 0, 0, 1], b_echo)), certs)
                    .await
                    .context("B does not enforce mutual TLS as configured")?,
            )
        };
        Ok(Pair {
            a,
            b,
            echo,
            sink,
            mtls_check,
            _dir: dir,
        })
    }
}

/// B's TLS side must echo for A's certificate and refuse a certificate from another CA.
async fn check_mtls(b_echo: SocketAddr, certs: &Certs) -> Result<String> {
    let ca = &certs.fabric.ca_pem;
    let echo = |cert: tests::PeerCert| async move {
        let mut s = tests::tls_connect(b_echo, ca, &cert, PEER_B, &[]).await?;
        s.write_all(&[7u8; 64]).await?;
        let mut back = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .map_err(|_| anyhow!("no echo within 5 s"))??;
        anyhow::Ok(())
    };
    echo(certs.a.clone())
        .await
        .context("with A's certificate")?;
    let rogue = tests::Fabric::new("rogue-fabric")?.issue(tests::PEER_A)?;
    if echo(rogue).await.is_ok() {
        bail!("B echoed for a client certificate from another CA");
    }
    Ok("B echoes for A's certificate and refuses one from another CA".into())
}
