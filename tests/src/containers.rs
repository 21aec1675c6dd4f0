//! The container images (`docker/build.sh`) and the two-site container fabric
//! (`docker/demo.sh`) for tests. The tool (podman, as `.ci/run` installs it) always
//! runs through `docker/env.sh`, so that tests see the storage and settings the
//! scripts use. Tests that need the images skip with a message when `CL_TEST_IMAGES`
//! is unset (`.ci/run` sets it after building them), except under CI, where they fail.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{anyhow, ensure, Context as _, Result};

use crate::TempDir;

/// The images `docker/build.sh` builds, one per binary.
pub const IMAGES: [&str; 4] = [
    "cl-controlplane",
    "cl-dataplane",
    "cl-operator",
    "clusterlink",
];

pub fn docker_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docker")
}

/// Whether the images are built: `Ok(false)` (skip, with a message) outside CI
/// without them, an error under CI.
pub fn available(test: &str) -> Result<bool> {
    crate::needs_env(
        test,
        "CL_TEST_IMAGES",
        "the images: docker/build.sh, then CL_TEST_IMAGES=1; .ci/run does both",
    )
}

/// `<registry>/<name>:<tag>` as build.sh names it (CL_REGISTRY, CL_TAG).
pub fn image(name: &str) -> String {
    let registry = std::env::var("CL_REGISTRY").unwrap_or_else(|_| "localhost".into());
    let tag = std::env::var("CL_TAG").unwrap_or_else(|_| "latest".into());
    let registry = registry.trim_end_matches('/');
    if registry.is_empty() {
        format!("{name}:{tag}")
    } else {
        format!("{registry}/{name}:{tag}")
    }
}

/// The container tool with `args`, configured by docker/env.sh.
pub fn tool(args: &[&str]) -> Result<Output> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#". "$0" && exec "$CL_CONTAINER_TOOL" "$@""#)
        .arg(docker_dir().join("env.sh"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running the container tool {args:?}"))?;
    Ok(out)
}

/// `tool`, failing unless it succeeds; its stdout.
pub fn tool_ok(args: &[&str]) -> Result<String> {
    let out = tool(args)?;
    ensure!(
        out.status.success(),
        "{args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A running `docker/demo.sh` fabric under a name of its own, brought down (every
/// container and network by its ID) when dropped.
pub struct Demo {
    pub name: String,
    pub env: BTreeMap<String, String>,
    dir: TempDir,
}

impl Demo {
    /// `demo.sh up`, or `None` (skip) as `available` says.
    pub fn up(test: &str) -> Result<Option<Demo>> {
        if !available(test)? {
            return Ok(None);
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cl-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = TempDir::new("cl-demo")?;
        let mut demo = Demo {
            name,
            env: BTreeMap::new(),
            dir,
        };
        let out = demo.script("up")?;
        ensure!(
            out.status.success(),
            "demo.sh up: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(demo.state().join("env")).context("demo env")?;
        demo.env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Some(demo))
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn script(&self, cmd: &str) -> Result<Output> {
        Command::new(docker_dir().join("demo.sh"))
            .arg(cmd)
            .env("CL_DEMO_NAME", &self.name)
            .env("CL_DEMO_DIR", self.state())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("demo.sh {cmd}"))
    }

    pub fn get(&self, key: &str) -> Result<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("demo env has no {key}"))
    }

    pub fn addr(&self, key: &str) -> Result<SocketAddr> {
        self.get(key)?
            .parse()
            .with_context(|| format!("demo env {key}"))
    }

    /// The container IDs `up` recorded, and its networks' IDs.
    pub fn recorded(&self) -> Result<Vec<(String, String)>> {
        let ids = std::fs::read_to_string(self.state().join("ids"))?;
        Ok(ids
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// `demo.sh down`, checked: afterwards none of the recorded IDs exists.
    pub fn down(mut self) -> Result<()> {
        let recorded = self.recorded()?;
        self.down_inner()?;
        for (kind, id) in recorded {
            let args: Vec<&str> = match kind.as_str() {
                "container" => vec!["container", "exists", &id],
                _ => vec!["network", "exists", &id],
            };
            ensure!(
                !tool(&args)?.status.success(),
                "{kind} {id} still exists after demo.sh down"
            );
        }
        self.name.clear();
        Ok(())
    }

    fn down_inner(&mut self) -> Result<()> {
        let out = self.script("down")?;
        ensure!(
            out.status.success(),
            "demo.sh down: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            let _ = self.down_inner();
        }
    }
}
