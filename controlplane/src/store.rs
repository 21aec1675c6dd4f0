//! Resource sources. The control plane reads the desired resources through the
//! `Source` trait: a `watch` of complete, validated resource sets. The local source
//! (the embedded default) is a directory of YAML files, one or more documents each,
//! polled for changes; a Kubernetes source slots in behind the same trait later.
//! An invalid document never removes or replaces what was in force: the last valid
//! version of that resource stays, and the error is reported with file and document.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::resources::{self, Key, Resource};

/// One complete desired state.
#[derive(Debug, Default, Clone)]
pub struct Desired {
    pub resources: BTreeMap<Key, Resource>,
    /// Problems found in the last scan, for status and logs.
    pub errors: Vec<SourceError>,
    /// On Kubernetes, the Services of the cluster by (namespace, name); `None` on the
    /// local platform, which has none. An Export without `spec.host` targets its
    /// Service; an Import's Services must not be taken by someone else's.
    pub services: Option<BTreeMap<(String, String), ServiceInfo>>,
    /// On Kubernetes, the ClusterLink namespace (where Peers and system Services live).
    pub namespace: Option<String>,
}

/// What the control plane needs to know of a Kubernetes Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The cluster IP, if it has one (not headless, not ExternalName).
    pub cluster_ip: Option<String>,
    /// The Import that owns it (namespace, name), from the ClusterLink labels.
    pub import_owner: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceError {
    pub file: String,
    pub message: String,
}

/// Where resources come from.
pub trait Source: Send + Sync {
    /// The current desired state, updated on every change.
    fn subscribe(&self) -> watch::Receiver<Arc<Desired>>;
}

/// A directory of YAML files (`*.yaml`, `*.yml`), polled every `interval`.
pub struct DirSource {
    rx: watch::Receiver<Arc<Desired>>,
}

#[derive(Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    /// The resources this file contributes (its last valid version of each).
    resources: Vec<Resource>,
    errors: Vec<String>,
}

impl DirSource {
    /// Scans `dir` once now, then keeps scanning in a background task.
    pub fn start(dir: PathBuf, interval: Duration) -> Self {
        let mut files: BTreeMap<PathBuf, FileState> = BTreeMap::new();
        let first = scan(&dir, &mut files);
        log_errors(&first);
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if tx.is_closed() {
                    return;
                }
                if changed(&dir, &files) {
                    let desired = scan(&dir, &mut files);
                    // Young files are re-read on every tick: publish real changes only.
                    tx.send_if_modified(|current| {
                        if current.resources == desired.resources
                            && current.errors == desired.errors
                        {
                            return false;
                        }
                        log_errors(&desired);
                        *current = Arc::new(desired);
                        true
                    });
                }
            }
        });
        DirSource { rx }
    }
}

impl Source for DirSource {
    fn subscribe(&self) -> watch::Receiver<Arc<Desired>> {
        self.rx.clone()
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml") | Some("yml")
                )
        })
        .collect();
    out.sort();
    out
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// How old a file's mtime must be before its stamp is trusted. File system clocks are
/// coarse (one jiffy on Linux before 6.13, 1-2 s on some file systems), so two writes
/// of the same length within one tick leave the same stamp; a file younger than this
/// is read again on every scan until it settles.
const SETTLE: Duration = Duration::from_secs(2);

/// The stamp of `p` if it can be trusted, else `None` (which forces a read next scan).
fn settled_stamp(p: &Path) -> Option<(SystemTime, u64)> {
    // The clock is read before the stamp: any later write gets a later mtime.
    let now = SystemTime::now();
    stamp(p).filter(|(mtime, _)| now.duration_since(*mtime).is_ok_and(|age| age > SETTLE))
}

fn changed(dir: &Path, files: &BTreeMap<PathBuf, FileState>) -> bool {
    let now = yaml_files(dir);
    now.len() != files.len()
        || now
            .iter()
            .any(|p| files.get(p).is_none_or(|f| f.stamp != stamp(p)))
}

fn read_file(path: &Path, previous: &FileState) -> FileState {
    let stamp = settled_stamp(path);
    let keep_all = |message: String| FileState {
        stamp,
        resources: previous.resources.clone(),
        errors: vec![message],
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return keep_all(format!("cannot read: {e}")),
    };
    let stream = resources::parse_stream(&text);
    if let Some(e) = stream.syntax_error {
        // Not YAML: everything this file contributed before stays in force.
        return keep_all(e.to_string());
    }
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for doc in stream.docs {
        match doc.result {
            Ok(r) => out.push(r),
            Err(e) => {
                errors.push(e.to_string());
                // The last valid version of this resource stays in force.
                if let Some(old) = doc
                    .key
                    .and_then(|k| previous.resources.iter().find(|o| o.key() == k))
                {
                    out.push(old.clone());
                }
            }
        }
    }
    FileState {
        stamp,
        resources: out,
        errors,
    }
}

fn scan(dir: &Path, files: &mut BTreeMap<PathBuf, FileState>) -> Desired {
    let paths = yaml_files(dir);
    let mut next: BTreeMap<PathBuf, FileState> = BTreeMap::new();
    for p in paths {
        let prev = files.remove(&p).unwrap_or_default();
        let state = if prev.stamp.is_some() && prev.stamp == stamp(&p) {
            prev
        } else {
            read_file(&p, &prev)
        };
        next.insert(p, state);
    }
    *files = next;
    let mut desired = Desired::default();
    let mut origin: HashMap<Key, String> = HashMap::new();
    for (path, state) in files.iter() {
        let file = path.display().to_string();
        for e in &state.errors {
            desired.errors.push(SourceError {
                file: file.clone(),
                message: e.clone(),
            });
        }
        for r in &state.resources {
            let key = r.key();
            if let Some(first) = origin.get(&key) {
                desired.errors.push(SourceError {
                    file: file.clone(),
                    message: format!("{key} is also defined in {first}; the first one is used"),
                });
                continue;
            }
            origin.insert(key.clone(), file.clone());
            desired.resources.insert(key, r.clone());
        }
    }
    desired
}

fn log_errors(desired: &Desired) {
    for e in &desired.errors {
        tracing::warn!(file = %e.file, error = %e.message, "resource refused");
    }
}

#[cfg(test)]
mod tests;
