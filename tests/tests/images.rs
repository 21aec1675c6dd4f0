//! The container images of docker/build.sh, inspected as a registry or a kubelet would
//! see them: the entrypoint the rendered Deployments rely on (args only, no command),
//! the non-root user, the OCI labels, and a root filesystem holding exactly one
//! statically linked binary that runs there as that user.

use std::path::Path;

use anyhow::{bail, ensure, Context as _, Result};
use tests::containers::{available, image, tool, tool_ok, IMAGES};

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    ensure!(
        elf.len() >= 64 && &elf[..4] == b"\x7fELF",
        "not an ELF file"
    );
    ensure!(
        elf[4] == 2 && elf[5] == 1,
        "not a little-endian 64-bit ELF file"
    );
    let u16_at = |o: usize| -> Result<u16> {
        let b = elf.get(o..o + 2).context("truncated ELF")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 8).context("truncated ELF")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    let phoff = usize::try_from(u64_at(0x20)?)?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = elf.get(at..at + 4).context("truncated program headers")?;
        // PT_INTERP
        if u32::from_le_bytes([p_type[0], p_type[1], p_type[2], p_type[3]]) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Every regular file and symlink under `root`, relative to it.
fn files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ty = e.file_type()?;
        if ty.is_dir() {
            files(root, &e.path(), out)?;
        } else {
            out.push(e.path().strip_prefix(root)?.display().to_string());
        }
    }
    Ok(())
}

#[test]
fn each_image_is_one_static_binary_run_as_a_non_root_user() -> Result<()> {
    if !available("each_image_is_one_static_binary_run_as_a_non_root_user")? {
        return Ok(());
    }
    for name in IMAGES {
        let img = image(name);
        let inspect: serde_json::Value =
            serde_json::from_str(&tool_ok(&["image", "inspect", &img])?)
                .with_context(|| format!("inspect {img}"))?;
        let cfg = &inspect[0]["Config"];
        assert_eq!(
            cfg["Entrypoint"],
            serde_json::json!([format!("/usr/local/bin/{name}")]),
            "{img}: entrypoint"
        );
        assert!(
            cfg["Cmd"].is_null() || cfg["Cmd"] == serde_json::json!([]),
            "{img}: no default arguments, got {}",
            cfg["Cmd"]
        );
        assert_eq!(cfg["User"], "65532:65532", "{img}: user");
        let labels = &cfg["Labels"];
        let label = |k: &str| labels[format!("org.opencontainers.image.{k}")].as_str();
        assert_eq!(label("title"), Some(name), "{img}: title label");
        assert_eq!(
            label("version"),
            Some(env!("CARGO_PKG_VERSION")),
            "{img}: version label"
        );
        assert_eq!(
            label("licenses"),
            Some("Apache-2.0"),
            "{img}: licenses label"
        );
        for k in ["source", "revision", "created", "description"] {
            let v = label(k).unwrap_or("");
            assert!(!v.is_empty() && v != "unknown", "{img}: label {k} is {v:?}");
        }
        assert_eq!(inspect[0]["Os"], "linux", "{img}: os");

        // The root filesystem: one file, the binary, static, not writable.
        let mount = tool_ok(&["image", "mount", &img])?;
        let checked = (|| -> Result<()> {
            let root = Path::new(&mount);
            let mut found = Vec::new();
            files(root, root, &mut found)?;
            let want = format!("usr/local/bin/{name}");
            ensure!(
                found == [want.clone()],
                "{img}: files {found:?}, want [{want}]"
            );
            let bin = root.join(&want);
            let elf = std::fs::read(&bin)?;
            ensure!(
                !has_interpreter(&elf)?,
                "{img}: {want} is dynamically linked"
            );
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&bin)?.permissions().mode() & 0o777;
            ensure!(mode == 0o555, "{img}: {want} mode {mode:o}, want 555");
            Ok(())
        })();
        tool_ok(&["image", "unmount", &img])?;
        checked?;

        // And it runs there, as that user, with nothing else in the image.
        let out = tool(&["run", "--rm", "--network", "none", &img, "--version"])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains(env!("CARGO_PKG_VERSION")) {
            bail!(
                "{img} --version: {} {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}
