//! Whole peers for end-to-end tests: a real control plane and data plane per peer
//! (in-process, on port 0, started exactly as their binaries start them), configured
//! through YAML files in the peer's resources directory, plus YAML builders.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::*;

const T: Duration = Duration::from_secs(30);

pub struct Site {
    pub name: String,
    pub dir: PathBuf,
    pub files: PeerFiles,
    pub cp: controlplane::Running,
    pub dp: dataplane::Running,
}

impl Site {
    pub async fn start(
        fabric: &Fabric,
        root: &std::path::Path,
        name: &str,
        labels: &[&str],
    ) -> Result<Site> {
        let dir = root.join(name);
        let files = PeerFiles::write(&dir, &fabric.ca_pem, &fabric.issue(name)?)?;
        let resources = dir.join("resources");
        let cp = controlplane::start(controlplane::Config {
            grpc_addr: "127.0.0.1:0".parse()?,
            grpc_socket: None,
            admin_addr: "127.0.0.1:0".parse()?,
            platform: controlplane::app::Platform::Local,
            resources_dir: Some(resources.clone()),
            namespace: "clusterlink-system".into(),
            identity: None,
            lease_duration_secs: 15,
            site_ca_file: None,
            site_cert_file: None,
            site_key_file: None,
            ca_file: files.ca.clone(),
            cert_file: files.cert.clone(),
            key_file: files.key.clone(),
            token_key_file: Some(dir.join("token.key")),
            peer_labels: labels.iter().map(|l| l.to_string()).collect(),
            scan_interval_ms: 50,
            peer_timeout_ms: 1000,
            log_level: "info".into(),
        })
        .await?;
        let dp = dataplane::start(gateway_config(&files, &cp.grpc_endpoint)).await?;
        Ok(Site {
            name: name.into(),
            dir: resources,
            files,
            cp,
            dp,
        })
    }

    pub fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.dir.join(file))?;
        Ok(())
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value> {
        let (status, body) = http_get(self.cp.admin_addr, path).await?;
        ensure!(status == 200, "GET {path}: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    }

    pub fn peer_yaml(&self) -> String {
        format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata:\n  name: {}\n  namespace: clusterlink-system\nspec:\n  gateways:\n  - host: 127.0.0.1\n    port: {}\n",
            self.name,
            self.dp.gateway_addr.port()
        )
    }
}

pub fn condition(obj: &serde_json::Value, type_: &str) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

pub async fn wait_condition(
    site: &Site,
    path: &str,
    type_: &str,
    want: &str,
) -> Result<serde_json::Value> {
    eventually(&format!("{path} {type_}={want}"), T, || async {
        let v = site.get(path).await.ok()?;
        (condition(&v, type_).as_deref() == Some(want)).then_some(v)
    })
    .await
}

pub use crate::procs::free_port;

pub const ALLOW_ALL: &str = "apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata:
  name: allow-all
  namespace: default
spec:
  action: allow
  from:
  - workloadSelector: {}
  to:
  - workloadSelector: {}
";

pub fn export_yaml(name: &str, target: SocketAddr) -> String {
    format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  host: {}\n  port: {}\n",
        target.ip(),
        target.port()
    )
}

pub fn import_yaml(name: &str, port: u16, peers: &[&str], scheme: &str) -> String {
    let mut s = format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Import\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  port: {port}\n  lbScheme: {scheme}\n  sources:\n"
    );
    for p in peers {
        s.push_str(&format!(
            "  - peer: {p}\n    exportName: {name}\n    exportNamespace: default\n"
        ));
    }
    s
}

/// Removes a resource file.
pub fn remove(site: &Site, file: &str) -> Result<()> {
    std::fs::remove_file(site.dir.join(file))?;
    Ok(())
}

/// A TCP server that answers every connection with `name` and closes: tells which
/// peer's export served a connection.
pub async fn start_name_server(name: &str) -> Result<SocketAddr> {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Connects to an import and reads what the export answered until EOF; `None` if the
/// connection was refused, reset or closed empty.
pub async fn access(import: SocketAddr) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(import).await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    (!out.is_empty()).then_some(out)
}

/// `n` accesses through an import, one after the other.
pub async fn accesses(import: SocketAddr, n: usize) -> Vec<Option<String>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(access(import).await);
    }
    out
}

/// Whether every access was served by `name`.
pub fn all(got: &[Option<String>], name: &str) -> bool {
    got.iter().all(|a| a.as_deref() == Some(name))
}

/// The peers that served some of the accesses.
pub fn names(got: &[Option<String>]) -> std::collections::BTreeSet<&str> {
    got.iter().flatten().map(String::as_str).collect()
}

/// Round-robin over `sources` (spec §7.2): once every source serves, one access and
/// then 30 more, which must follow the list cyclically from the first one's phase.
pub async fn check_round_robin(import: SocketAddr, sources: &[&str]) -> anyhow::Result<()> {
    let first = access(import)
        .await
        .ok_or_else(|| anyhow::anyhow!("access failed after the warm-up"))?;
    let start = sources
        .iter()
        .position(|n| *n == first)
        .ok_or_else(|| anyhow::anyhow!("unexpected answer {first:?}"))?;
    let got = accesses(import, 30).await;
    let want: Vec<Option<String>> = (1..=30)
        .map(|i| Some(sources[(start + i) % sources.len()].to_owned()))
        .collect();
    anyhow::ensure!(
        got == want,
        "round-robin after {first}: got {got:?}, want {want:?}"
    );
    Ok(())
}

/// Whether the accesses alternate strictly between `a` and `b` (§7.2's round-robin
/// with the first source gone: its failover consumes a counter step).
pub fn alternates(got: &[Option<String>], a: &str, b: &str) -> bool {
    got.iter()
        .all(|x| x.as_deref() == Some(a) || x.as_deref() == Some(b))
        && got.windows(2).all(|w| w[0] != w[1])
}
