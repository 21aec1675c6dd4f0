//! The data plane's module graph is one-way: a module uses only modules of lower
//! layers (the list in `src/lib.rs`'s header), never one beside or above it. This reads
//! every source file's `crate::` paths and fails on the first that points up or
//! sideways, or at a module no layer names.
// A test reading source files, not the data path.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// Bottom to top. Keep in step with the header of `src/lib.rs`.
const LAYERS: &[&[&str]] = &[
    &["metrics", "sockopt", "h2conf", "workers"],
    &["snapshot", "admission"],
    &["copy"],
    &["drain"],
    &["mux"],
    &["tunnel"],
    &["cpclient"],
    &["inbound", "outbound"],
    &["admin"],
    &["app"],
    &["process"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The top-level modules a line names through `crate::a` or `crate::{a, b::c}`.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = part.trim().split("::").next().unwrap_or("").trim();
                if !name.is_empty() {
                    out.push(name.to_owned());
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

#[test]
fn no_module_uses_one_beside_or_above_it() -> Result<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer: HashMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, names)| names.iter().map(move |n| (*n, i)))
        .collect();
    let lib = std::fs::read_to_string(src.join("lib.rs"))?;
    for line in lib.lines() {
        if let Some(m) = line.strip_prefix("pub mod ").or(line.strip_prefix("mod ")) {
            let m = m.trim_end_matches(';');
            if !layer.contains_key(m) {
                bail!("module {m} is in no layer: add it to LAYERS and to lib.rs's header");
            }
        }
    }
    let mut files = Vec::new();
    rust_files(&src, &mut files)?;
    let mut checked = 0;
    for file in files {
        let rel = file.strip_prefix(&src)?;
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("");
        let module = first.trim_end_matches(".rs");
        if matches!(module, "lib" | "main") {
            continue;
        }
        let Some(&own) = layer.get(module) else {
            bail!("{} belongs to no layer", rel.display());
        };
        let text = std::fs::read_to_string(&file)?;
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for used in crate_refs(line) {
                if used == module || matches!(used.as_str(), "start" | "Config" | "Running") {
                    // Itself, or the crate root's re-exports of `app` (above everything
                    // that may name them, which only `process` does).
                    if used != module && own < layer["app"] {
                        bail!("{}:{}: uses crate::{used} (app)", rel.display(), n + 1);
                    }
                    continue;
                }
                let Some(&theirs) = layer.get(used.as_str()) else {
                    bail!("{}:{}: crate::{used} is in no layer", rel.display(), n + 1);
                };
                if theirs >= own {
                    bail!(
                        "{}:{}: {module} (layer {own}) uses {used} (layer {theirs}): a module may use only lower layers",
                        rel.display(),
                        n + 1
                    );
                }
                checked += 1;
            }
        }
    }
    // The walk found the references it is meant to check.
    assert!(checked > 50, "only {checked} crate:: references found");
    Ok(())
}

#[test]
fn references_are_read_in_both_forms() {
    assert_eq!(crate_refs("use crate::copy::{self, End};"), ["copy"]);
    assert_eq!(
        crate_refs("use crate::{admin, cpclient::Error, inbound};"),
        ["admin", "cpclient", "inbound"]
    );
    assert_eq!(
        crate_refs("let w = crate::workers::current(); crate::mux::splice(a)"),
        ["workers", "mux"]
    );
}
