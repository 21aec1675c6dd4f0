//! Results and the markdown table.

use std::fmt::Write as _;

use crate::load::{CONN_WORKERS, MESSAGE};
use crate::{Kind, Plan};

/// One run of one configuration; `None` where a scenario failed.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub gbps: Option<f64>,
    /// CPU time of gateways A and B together per GB carried (ours only).
    pub cpu_s_per_gb: Option<f64>,
    pub conns_per_s: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// CPU time of gateways A and B together per connection (ours only).
    pub cpu_us_per_conn: Option<f64>,
    pub conn_ok: u64,
    pub conn_errors: u64,
}

pub struct ConfigResult {
    pub kind: Kind,
    pub samples: Vec<Sample>,
    /// Runs or scenarios that failed outright.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub gateway_log_lines: usize,
}

/// Longest note in the table's notes (the full text is on stderr).
const NOTE_MAX: usize = 400;

/// Failed connection cycles tolerated before a configuration counts as failing.
const MAX_ERROR_RATE: f64 = 0.01;

impl ConfigResult {
    pub fn new(kind: Kind) -> Self {
        ConfigResult {
            kind,
            samples: Vec::new(),
            failures: Vec::new(),
            notes: Vec::new(),
            gateway_log_lines: 0,
        }
    }

    /// Every run carried bulk traffic and echoed connections, with at most 1 % of the
    /// connection cycles failing.
    pub fn carried_traffic(&self) -> bool {
        self.failures.is_empty()
            && !self.samples.is_empty()
            && self.samples.iter().all(|s| {
                let attempts = s.conn_ok + s.conn_errors;
                s.gbps.is_some_and(|g| g > 0.0)
                    && s.conn_ok > 0
                    && (s.conn_errors as f64) <= MAX_ERROR_RATE * attempts as f64
            })
    }

    fn stat(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<Stat> {
        Stat::of(self.samples.iter().filter_map(f).collect())
    }
}

#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Option<Stat> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    fn cell(&self, decimals: usize) -> String {
        if self.n > 1 {
            format!(
                "{:.d$} ({:.d$}–{:.d$})",
                self.median,
                self.min,
                self.max,
                d = decimals
            )
        } else {
            format!("{:.d$}", self.median, d = decimals)
        }
    }
}

fn cell(s: Option<Stat>, decimals: usize) -> String {
    s.map_or_else(|| "—".into(), |s| s.cell(decimals))
}

fn ratio(ours: Option<Stat>, direct: Option<Stat>) -> String {
    match (ours, direct) {
        (Some(o), Some(d)) if d.median > 0.0 => format!("{:.2}×", o.median / d.median),
        _ => "—".into(),
    }
}

/// The results as markdown: a header line about the machine, the table, the notes.
pub fn render(plan: &Plan, results: &[ConfigResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# cl-bench results\n");
    let _ = writeln!(
        out,
        "{} · {} s per scenario · {} run{} per configuration · {}\n",
        date_utc(),
        plan.duration.as_secs(),
        plan.runs,
        if plan.runs == 1 { "" } else { "s" },
        machine()
    );
    if let Some(load) = &plan.load_before {
        let _ = writeln!(
            out,
            "1-minute load average before the run: {load} (anything above 0 is other work \
             sharing the cores).\n"
        );
    }
    let _ = writeln!(
        out,
        "| configuration | throughput, 1 stream (Gbit/s) | ×direct | gateway CPU-s/GB (A+B) \
         | new conns/s ({CONN_WORKERS} workers) | ×direct | setup+RTT p50 (µs) | ×direct \
         | setup+RTT p99 (µs) | ×direct | gateway CPU µs/conn (A+B) |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let direct = results.iter().find(|r| r.kind == Kind::Direct);
    let dstat = |f: fn(&Sample) -> Option<f64>| direct.and_then(|d| d.stat(f));
    for r in results {
        let gbps = r.stat(|s| s.gbps);
        let conns = r.stat(|s| s.conns_per_s);
        let p50 = r.stat(|s| s.p50_us);
        let p99 = r.stat(|s| s.p99_us);
        let is_direct = r.kind == Kind::Direct;
        let vs = |o: Option<Stat>, d: Option<Stat>| {
            if is_direct {
                "—".to_owned()
            } else {
                ratio(o, d)
            }
        };
        let name = if r.carried_traffic() {
            r.kind.name().to_owned()
        } else {
            format!("{} **FAILED**", r.kind.name())
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(gbps, 2),
            vs(gbps, dstat(|s| s.gbps)),
            cell(r.stat(|s| s.cpu_s_per_gb), 2),
            cell(conns, 0),
            vs(conns, dstat(|s| s.conns_per_s)),
            cell(p50, 0),
            vs(p50, dstat(|s| s.p50_us)),
            cell(p99, 0),
            vs(p99, dstat(|s| s.p99_us)),
            cell(r.stat(|s| s.cpu_us_per_conn), 0),
        );
    }
    let _ = writeln!(
        out,
        "\nCells: median (min–max) over the runs; ×direct: median of the configuration / \
         median of direct (higher is better for throughput and conns/s, lower is better for \
         latency). New connections: each worker loops connect, write {MESSAGE} B, read the \
         {MESSAGE} B echo, close; setup+RTT is connect until the echo is read. Gateway CPU: \
         user+system time of both gateway processes during the scenario. Topology: client -> \
         gateway A import (TCP) -> mTLS (ECDSA P-256, TLS 1.3) -> gateway B -> target, all on \
         127.0.0.1. Baselines (stunnel, HAProxy, nginx) are not in this harness yet."
    );
    let mut notes = Vec::new();
    for r in results {
        for f in &r.failures {
            notes.push(format!("{}: FAILED {f}", r.kind.name()));
        }
        for n in &r.notes {
            notes.push(format!("{}: {n}", r.kind.name()));
        }
        if r.gateway_log_lines > 0 {
            notes.push(format!(
                "{}: the gateways logged {} warning/error lines",
                r.kind.name(),
                r.gateway_log_lines
            ));
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n");
        for n in notes {
            let mut n = n.split_whitespace().collect::<Vec<_>>().join(" ");
            if n.chars().count() > NOTE_MAX {
                n = n.chars().take(NOTE_MAX).collect::<String>() + " […]";
            }
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mut s = format!("{cpus} CPUs ({model}), Linux {kernel}");

    if let Some(rev) = git_revision() {
        let _ = write!(s, " · commit {rev}");
    }
    s
}

/// The 1-minute load average: other work on the machine skews every number.
pub fn load_average() -> Option<String> {
    let l = std::fs::read_to_string("/proc/loadavg").ok()?;
    l.split_whitespace().next().map(str::to_owned)
}

fn git_revision() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("git")
        .args(["-C", dir, "rev-parse", "--short", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let rev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dirty = std::process::Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .is_some_and(|o| o.status.success() && !o.stdout.is_empty());
    Some(if dirty {
        format!("{rev} (modified)")
    } else {
        rev
    })
}

/// Today's date in UTC, from the Unix clock (days-to-civil, proleptic Gregorian).
fn date_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
