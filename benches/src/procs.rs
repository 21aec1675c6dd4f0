//! Child processes of the harness (gateways, control planes, baseline proxies): started
//! with their output in a log file, measured through /proc (CPU time and RSS of the
//! whole process tree, since nginx runs its workers as children of a master), and
//! stopped on drop: SIGTERM to its process group (each child leads one of its own),
//! then SIGKILL to whatever of the group is left, orphaned workers included. Signals go
//! to the group, never to a raw PID that may have been reaped and reused; nothing is
//! ever killed by name.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long a process gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// One child process and its log file.
pub struct Managed {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Managed {
    /// Starts `cmd` with stdin closed and stdout/stderr appended to `log`. The
    /// caller's `CL_*` variables are removed: the flags decide everything.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Managed> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CL_") {
                cmd.env_remove(k);
            }
        }
        // Its own process group, so that drop can signal it and its workers together.
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Managed {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Lines the process wrote to its log.
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// At most about `n` lines of the log: the first half and the last half.
    pub fn log_excerpt(&self, n: usize) -> String {
        let lines = self.log_lines();
        let half = (n / 2).max(1);
        if lines.len() <= n {
            return lines.join("\n");
        }
        let (head, tail) = (&lines[..half], &lines[lines.len() - half..]);
        format!("{}\n  [...]\n{}", head.join("\n"), tail.join("\n"))
    }

    /// User + system CPU seconds of the process tree.
    pub fn cpu_seconds(&self) -> Option<f64> {
        tree(self.pid()).iter().map(|p| cpu_seconds(*p)).sum()
    }

    /// Resident set size of the process tree, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        tree(self.pid()).iter().map(|p| rss_kib(*p)).sum()
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // The group's ID is the child's PID; Linux does not reuse a PID while a group
        // of that ID has members, so this reaches only the child's own processes.
        let group = Pid::from_raw(self.pid() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let end = Instant::now() + TERM_GRACE;
        while Instant::now() < end {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Whatever is left: a master that ignored TERM, orphaned workers.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pid` and all its descendants (from /proc/PID/task/TID/children).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                for c in children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok())
                {
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
        i += 1;
    }
    out
}

pub use tests::procs::cpu_seconds;

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Raises this process's open-file soft limit to at least `want` (up to the hard limit;
/// as root, the hard limit too). Children inherit it. Returns the soft limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let target = want.min(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        target
    } else {
        soft
    }
}
