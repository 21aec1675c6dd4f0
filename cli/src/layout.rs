//! Where the CLI keeps things (spec 1.5), plus what the local platform adds:
//!
//! ```text
//! <path>/<fabric>/cert.pem, key.pem            fabric CA
//! <path>/<fabric>/<peer>/cert.pem, key.pem     peer chain and key
//! <path>/<fabric>/<peer>/resources/*.yaml      the peer's resources (local platform)
//! <path>/<fabric>/<peer>/token.key             access-token key (0600)
//! <path>/<fabric>/<peer>/run.json              ports of the running peer (while it runs)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub fn fabric_dir(base: &Path, fabric: &str) -> PathBuf {
    base.join(fabric)
}

pub fn peer_dir(base: &Path, fabric: &str, peer: &str) -> PathBuf {
    base.join(fabric).join(peer)
}

pub fn resources_dir(peer_dir: &Path) -> PathBuf {
    peer_dir.join("resources")
}

pub fn run_file(peer_dir: &Path) -> PathBuf {
    peer_dir.join("run.json")
}

/// What `deploy peer --platform local` records while the peer runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub peer: String,
    pub pid: u32,
    pub gateway_port: u16,
    pub dataplane_admin: String,
    pub controlplane_admin: String,
    pub controlplane_grpc: String,
    pub import_bind: String,
}

impl Run {
    pub fn read(peer_dir: &Path) -> Option<Run> {
        let text = std::fs::read_to_string(run_file(peer_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }
}
