//! The cl-operator binary itself: `--version` and `--help` answer, the arguments its
//! rendered Deployment passes are its own flags, and a start without a cluster fails
//! naming the API. (Also makes `cargo test --workspace` build the binary that the
//! Kubernetes end-to-end tests in tests/ start.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cl-operator");

type R = Result<(), Box<dyn std::error::Error>>;

#[test]
fn version_and_help() -> R {
    let out = Command::new(BIN).arg("--version").output()?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.starts_with("cl-operator "));
    let out = Command::new(BIN).arg("--help").output()?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.contains("--leader-elect"));
    Ok(())
}

#[test]
fn the_rendered_arguments_are_its_flags() -> R {
    let spec: crds::InstanceSpec = serde_json::from_value(serde_json::json!({}))?;
    // An unknown flag fails parsing before --help is reached.
    let out = Command::new(BIN)
        .args(operator::manifests::operator_args(&spec))
        .arg("--help")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn bad_flags_and_no_cluster_fail_clearly() -> R {
    let out = Command::new(BIN).arg("--no-such-flag").output()?;
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args(["--log-level", "[bad", "--admin-addr", "127.0.0.1:0"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)?.contains("--log-level"));
    let dir = std::env::temp_dir().join(format!("cl-operator-bin-{}", std::process::id()));
    let out = Command::new(BIN)
        .env("KUBECONFIG", dir.join("missing-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(["--admin-addr", "127.0.0.1:0"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("connecting to the Kubernetes API"), "{err}");
    Ok(())
}
