//! `clusterlink apply|delete -f` and `clusterlink get` against a local peer. `apply`
//! validates every document first and writes nothing if any is wrong; each resource is
//! then written atomically, one file per resource, into the peer's resources
//! directory, where its control plane picks it up. `get` reads objects with their
//! status from the running control plane's admin port.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use controlplane::resources::{self, Key, Kind, Resource};

use crate::layout::{self, Run};

/// Reads `-f` arguments: files, directories (their *.yaml / *.yml), or `-` (stdin).
fn read_inputs(inputs: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for i in inputs {
        if i == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            out.push(("<stdin>".to_owned(), s));
            continue;
        }
        let p = Path::new(i);
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {i}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).with_context(|| f.display().to_string())?;
                out.push((f.display().to_string(), text));
            }
        } else {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {i}"))?;
            out.push((i.clone(), text));
        }
    }
    Ok(out)
}

/// Parses and validates everything; any error fails the whole set.
fn parse_all(inputs: &[String]) -> Result<Vec<Resource>> {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (file, text) in read_inputs(inputs)? {
        let stream = resources::parse_stream(&text);
        for d in stream.docs {
            match d.result {
                Ok(r) => ok.push(r),
                Err(e) => errors.push(format!("{file}: {e}")),
            }
        }
        if let Some(e) = stream.syntax_error {
            errors.push(format!("{file}: {e}"));
        }
    }
    if !errors.is_empty() {
        bail!("nothing was applied:\n  {}", errors.join("\n  "));
    }
    if ok.is_empty() {
        bail!("no resources found in {}", inputs.join(", "));
    }
    Ok(ok)
}

fn file_name(key: &Key) -> String {
    let kind = key.kind.name().to_ascii_lowercase();
    if key.namespace.is_empty() {
        format!("{kind}--{}.yaml", key.name)
    } else {
        format!("{kind}-{}-{}.yaml", key.namespace, key.name)
    }
}

fn to_yaml(r: &Resource) -> Result<String> {
    Ok(serde_yaml_ng::to_string(&r.to_json())?)
}

pub fn apply(peer_dir: &Path, inputs: &[String]) -> Result<()> {
    if !peer_dir.is_dir() {
        bail!(
            "{} does not exist: create the peer certificate first",
            peer_dir.display()
        );
    }
    let all = parse_all(inputs)?;
    let dir = layout::resources_dir(peer_dir);
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    for r in &all {
        let key = r.key();
        let path = dir.join(file_name(&key));
        let tmp = dir.join(format!(".{}.tmp", file_name(&key)));
        std::fs::write(&tmp, to_yaml(r)?).with_context(|| tmp.display().to_string())?;
        std::fs::rename(&tmp, &path).with_context(|| path.display().to_string())?;
        println!("{} configured", display(&key));
    }
    Ok(())
}

fn display(key: &Key) -> String {
    let kind = key.kind.name().to_ascii_lowercase();
    if key.namespace.is_empty() {
        format!("{kind}/{}", key.name)
    } else {
        format!("{kind}/{} (namespace {})", key.name, key.namespace)
    }
}

pub fn delete(peer_dir: &Path, inputs: &[String]) -> Result<()> {
    let all = parse_all(inputs)?;
    let dir = layout::resources_dir(peer_dir);
    let mut missing = Vec::new();
    for r in &all {
        let key = r.key();
        let path = dir.join(file_name(&key));
        match std::fs::remove_file(&path) {
            Ok(()) => println!("{} deleted", display(&key)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(display(&key)),
            Err(e) => return Err(e).with_context(|| path.display().to_string()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "not found (not applied with clusterlink apply): {}",
            missing.join(", ")
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

fn cond<'a>(obj: &'a serde_json::Value, t: &str) -> Option<&'a serde_json::Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn table(kind: Kind, items: &[serde_json::Value]) -> String {
    let (head, rows): (Vec<&str>, Vec<Vec<String>>) = match kind {
        Kind::Peer => (
            vec!["NAME", "GATEWAYS", "REACHABLE", "SINCE"],
            items
                .iter()
                .map(|o| {
                    let c = cond(o, "PeerReachable");
                    let gws = o["spec"]["gateways"]
                        .as_array()
                        .map(|g| {
                            g.iter()
                                .map(|g| match g["port"].as_u64().map(u16::try_from) {
                                    Some(Ok(port)) => {
                                        fabric::names::host_port(&s(&g["host"]), port)
                                    }
                                    _ => format!("{}:{}", s(&g["host"]), s(&g["port"])),
                                })
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    vec![
                        s(&o["metadata"]["name"]),
                        gws,
                        c.map(|c| s(&c["status"]))
                            .unwrap_or_else(|| "Unknown".into()),
                        c.map(|c| s(&c["lastTransitionTime"])).unwrap_or_default(),
                    ]
                })
                .collect(),
        ),
        Kind::Export => (
            vec!["NAMESPACE", "NAME", "HOST", "PORT", "VALID", "MESSAGE"],
            items
                .iter()
                .map(|o| {
                    let c = cond(o, "ExportValid");
                    vec![
                        s(&o["metadata"]["namespace"]),
                        s(&o["metadata"]["name"]),
                        s(&o["spec"]["host"]),
                        s(&o["spec"]["port"]),
                        c.map(|c| s(&c["status"]))
                            .unwrap_or_else(|| "Unknown".into()),
                        c.map(|c| s(&c["message"])).unwrap_or_default(),
                    ]
                })
                .collect(),
        ),
        Kind::Import => (
            vec!["NAMESPACE", "NAME", "PORT", "SOURCES", "VALID", "MESSAGE"],
            items
                .iter()
                .map(|o| {
                    let c = cond(o, "ImportTargetPortValid");
                    let port = o["spec"]["targetPort"]
                        .as_u64()
                        .filter(|p| *p != 0)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| s(&o["spec"]["port"]));
                    let sources = o["spec"]["sources"]
                        .as_array()
                        .map(|v| {
                            v.iter()
                                .map(|x| s(&x["peer"]))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    vec![
                        s(&o["metadata"]["namespace"]),
                        s(&o["metadata"]["name"]),
                        port,
                        sources,
                        c.map(|c| s(&c["status"]))
                            .unwrap_or_else(|| "Unknown".into()),
                        c.map(|c| s(&c["message"])).unwrap_or_default(),
                    ]
                })
                .collect(),
        ),
        Kind::AccessPolicy | Kind::PrivilegedAccessPolicy => (
            vec!["NAMESPACE", "NAME", "ACTION"],
            items
                .iter()
                .map(|o| {
                    vec![
                        s(&o["metadata"]["namespace"]),
                        s(&o["metadata"]["name"]),
                        s(&o["spec"]["action"]),
                    ]
                })
                .collect(),
        ),
    };
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r));
    }
    out
}

pub async fn get(
    peer_dir: &Path,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> Result<String> {
    let kind = Kind::from_user(kind)
        .ok_or_else(|| anyhow!("unknown kind {kind:?}: use peers, exports, imports, accesspolicies or privilegedaccesspolicies"))?;
    let run = Run::read(peer_dir).ok_or_else(|| {
        anyhow!("the peer in {} is not running (start it with clusterlink deploy peer --platform local)", peer_dir.display())
    })?;
    let plural = match kind {
        Kind::Peer => "peers",
        Kind::Export => "exports",
        Kind::Import => "imports",
        Kind::AccessPolicy => "accesspolicies",
        Kind::PrivilegedAccessPolicy => "privilegedaccesspolicies",
    };
    let path = match (name, kind.namespaced()) {
        (None, _) => format!("/api/{plural}"),
        (Some(n), true) => format!(
            "/api/{plural}/{}/{n}",
            namespace.unwrap_or(resources::DEFAULT_NAMESPACE)
        ),
        (Some(n), false) => format!("/api/{plural}/{n}"),
    };
    let (status, body) = crate::http::get(&run.controlplane_admin, &path)
        .await
        .with_context(|| format!("asking the control plane of {}", run.peer))?;
    let v: serde_json::Value = serde_json::from_str(&body).context("control plane answer")?;
    if status != 200 {
        bail!("{}", v["error"].as_str().unwrap_or(&body));
    }
    let items: Vec<serde_json::Value> = match name {
        Some(_) => vec![v.clone()],
        None => v["items"].as_array().cloned().unwrap_or_default(),
    };
    let items: Vec<serde_json::Value> = items
        .into_iter()
        .filter(|o| {
            namespace.is_none()
                || !kind.namespaced()
                || o["metadata"]["namespace"].as_str() == namespace
        })
        .collect();
    Ok(match output {
        Output::Table => table(kind, &items),
        Output::Json => serde_json::to_string_pretty(&if name.is_some() {
            v
        } else {
            serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
        })?,
        Output::Yaml => serde_yaml_ng::to_string(&if name.is_some() {
            v
        } else {
            serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
        })?,
    })
}
