//! The cl-controlplane binary itself: flags parse, `--version` answers, and bad
//! input at start-up fails with the reason. (Also makes `cargo test --workspace` build
//! the binary that the process-level end-to-end tests in tests/ start.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cl-controlplane");

#[test]
fn version_and_help() -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new(BIN).arg("--version").output()?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.starts_with("cl-controlplane "));
    let out = Command::new(BIN).arg("--help").output()?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.contains("--resources-dir"));
    Ok(())
}

#[test]
fn bad_input_fails_clearly() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("cl-cp-bin-{}", std::process::id()));
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .arg("--resources-dir")
            .arg(&dir)
            .args([
                "--ca-file",
                "/nonexistent/ca.pem",
                "--cert-file",
                "/nonexistent/cert.pem",
            ])
            .args(["--key-file", "/nonexistent/key.pem"])
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(extra)
            .output()
    };
    let out = run(&[])?;
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)?.contains("/nonexistent/ca.pem"));
    let out = run(&["--peer-label", "novalue"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)?.contains("novalue"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
