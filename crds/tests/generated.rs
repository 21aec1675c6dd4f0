//! `deploy/crds/` holds exactly what the types generate: this fails after a change
//! to `crds/src/lib.rs` until `cargo run -p crds --bin crdgen` is run.

use std::path::PathBuf;

#[test]
fn deploy_crds_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let files = crds::crd_files();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    let mut generated: Vec<String> = files.iter().map(|(f, _)| f.clone()).collect();
    generated.sort();
    assert_eq!(on_disk, generated, "files in deploy/crds/ (run crdgen)");
    for (file, text) in files {
        let old = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(
            old == text,
            "deploy/crds/{file} differs from what crds/src/lib.rs generates: run `cargo run -p crds --bin crdgen`"
        );
    }
}
