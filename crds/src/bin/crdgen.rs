//! Writes the ClusterLink CRDs generated from `crds/src/lib.rs` into `deploy/crds/`
//! (or the directory given), replacing what is there. `--check` writes nothing and
//! exits 1 when the files differ from what the types generate.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut check = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!("usage: crdgen [--check] [DIR]  (default DIR: deploy/crds)");
                return ExitCode::SUCCESS;
            }
            _ => dir = PathBuf::from(arg),
        }
    }
    let mut stale = Vec::new();
    for (file, text) in crds::crd_files() {
        let path = dir.join(&file);
        let same = std::fs::read_to_string(&path).is_ok_and(|old| old == text);
        if same {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
            eprintln!("crdgen: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    if stale.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "crdgen: out of date (run `cargo run -p crds --bin crdgen`): {}",
        stale.join(", ")
    );
    ExitCode::FAILURE
}
