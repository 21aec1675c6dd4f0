//! The cl-dataplane binary itself: flags parse, `--version` answers, and a start
//! without certificates fails with the file named, instead of running half set up.
//! (Also makes `cargo test --workspace` build the binary that the process-level
//! end-to-end tests in tests/ start.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cl-dataplane");

#[test]
fn version_and_help() -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new(BIN).arg("--version").output()?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.starts_with("cl-dataplane "));
    let out = Command::new(BIN).arg("--help").output()?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.contains("--gateway-addr"));
    Ok(())
}

#[test]
fn bad_flags_and_missing_files_fail_clearly() -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new(BIN).arg("--no-such-flag").output()?;
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args([
            "--ca-file",
            "/nonexistent/ca.pem",
            "--cert-file",
            "/nonexistent/cert.pem",
        ])
        .args([
            "--key-file",
            "/nonexistent/key.pem",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .args(["--gateway-addr", "127.0.0.1:0"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    Ok(())
}
