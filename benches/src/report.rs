//! Results, the target verdicts and the markdown report.

use std::fmt::Write as _;
use std::time::Duration;

use crate::load::{BULK_STREAMS, CONN_WORKERS, MESSAGE};
use crate::{Kind, Plan, Scenario};

/// RSS of both gateways before and while the idle connections were open.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    pub connections: usize,
    pub a_before_kib: u64,
    pub a_kib: u64,
    pub b_before_kib: u64,
    pub b_kib: u64,
}

impl Memory {
    /// RSS with the connections open, per connection (the target's measure).
    pub fn a_per_conn(&self) -> f64 {
        self.a_kib as f64 / self.connections.max(1) as f64
    }
    pub fn b_per_conn(&self) -> f64 {
        self.b_kib as f64 / self.connections.max(1) as f64
    }
    /// What the connections added, per connection.
    pub fn a_added_per_conn(&self) -> f64 {
        self.a_kib.saturating_sub(self.a_before_kib) as f64 / self.connections.max(1) as f64
    }
    pub fn b_added_per_conn(&self) -> f64 {
        self.b_kib.saturating_sub(self.b_before_kib) as f64 / self.connections.max(1) as f64
    }
}

/// One run of one configuration; `None` where a scenario failed.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub gbps1: Option<f64>,
    pub gbps8: Option<f64>,
    /// CPU time of gateways A and B together per GB carried, on one stream.
    pub cpu_s_per_gb: Option<f64>,
    pub rtt_p50_us: Option<f64>,
    pub rtt_p99_us: Option<f64>,
    pub conns_per_s: Option<f64>,
    pub setup_p50_us: Option<f64>,
    pub setup_p99_us: Option<f64>,
    /// CPU time of gateways A and B together per connection cycle.
    pub cpu_us_per_conn: Option<f64>,
    pub conn_ok: u64,
    pub conn_errors: u64,
    pub memory: Option<Memory>,
}

pub struct ConfigResult {
    pub kind: Kind,
    pub samples: Vec<Sample>,
    /// Why the configuration did not run at all.
    pub skipped: Option<String>,
    /// Runs or scenarios that failed outright.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub gateway_log_lines: usize,
}

/// Longest note in the report (the full text is on stderr).
const NOTE_MAX: usize = 400;

/// Failed connection cycles tolerated before a configuration counts as failing.
const MAX_ERROR_RATE: f64 = 0.01;

impl ConfigResult {
    pub fn new(kind: Kind) -> Self {
        ConfigResult {
            kind,
            samples: Vec::new(),
            skipped: None,
            failures: Vec::new(),
            notes: Vec::new(),
            gateway_log_lines: 0,
        }
    }

    /// Every run carried traffic in every scenario, with at most 1 % of the
    /// connection cycles failing.
    pub fn carried_traffic(&self, scenarios: &[Scenario]) -> bool {
        let ran = |s: Scenario| scenarios.contains(&s);
        self.failures.is_empty()
            && !self.samples.is_empty()
            && self.samples.iter().all(|s| {
                let attempts = s.conn_ok + s.conn_errors;
                (!ran(Scenario::Bulk1) || s.gbps1.is_some_and(|g| g > 0.0))
                    && (!ran(Scenario::Bulk8) || s.gbps8.is_some_and(|g| g > 0.0))
                    && (!ran(Scenario::PingPong) || s.rtt_p50_us.is_some())
                    && (!ran(Scenario::ConnRate)
                        || (s.conn_ok > 0
                            && (s.conn_errors as f64) <= MAX_ERROR_RATE * attempts as f64))
                    && (!ran(Scenario::Memory)
                        || !self.kind.measures_memory()
                        || s.memory.is_some())
            })
    }

    pub fn stat(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<Stat> {
        Stat::of(self.samples.iter().filter_map(f).collect())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
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

/// The scenarios of the main table: header, decimals, higher is better, the value.
pub struct Metric {
    pub header: &'static str,
    pub short: &'static str,
    pub decimals: usize,
    pub higher_is_better: bool,
    pub get: fn(&Sample) -> Option<f64>,
}

pub const METRICS: [Metric; 9] = [
    Metric {
        header: "throughput, 1 stream (Gbit/s)",
        short: "1 stream, Gbit/s",
        decimals: 2,
        higher_is_better: true,
        get: |s| s.gbps1,
    },
    Metric {
        header: "throughput, 8 streams (Gbit/s)",
        short: "8 streams, Gbit/s",
        decimals: 2,
        higher_is_better: true,
        get: |s| s.gbps8,
    },
    Metric {
        header: "ping-pong p50 (µs)",
        short: "ping-pong p50, µs",
        decimals: 0,
        higher_is_better: false,
        get: |s| s.rtt_p50_us,
    },
    Metric {
        header: "ping-pong p99 (µs)",
        short: "ping-pong p99, µs",
        decimals: 0,
        higher_is_better: false,
        get: |s| s.rtt_p99_us,
    },
    Metric {
        header: "new conns/s",
        short: "new connections/s",
        decimals: 0,
        higher_is_better: true,
        get: |s| s.conns_per_s,
    },
    Metric {
        header: "setup p50 (µs)",
        short: "setup p50, µs",
        decimals: 0,
        higher_is_better: false,
        get: |s| s.setup_p50_us,
    },
    Metric {
        header: "setup p99 (µs)",
        short: "setup p99, µs",
        decimals: 0,
        higher_is_better: false,
        get: |s| s.setup_p99_us,
    },
    Metric {
        header: "CPU-s/GB (A+B)",
        short: "CPU-s per GB, A+B",
        decimals: 2,
        higher_is_better: false,
        get: |s| s.cpu_s_per_gb,
    },
    Metric {
        header: "CPU µs/conn (A+B)",
        short: "CPU µs per connection, A+B",
        decimals: 0,
        higher_is_better: false,
        get: |s| s.cpu_us_per_conn,
    },
];

/// One performance target and how it came out.
pub struct Verdict {
    pub target: String,
    pub ours: String,
    pub reference: String,
    pub ratio: String,
    pub met: Option<bool>,
}

/// The best mTLS baseline for a metric: (configuration, median).
fn best_mtls(results: &[ConfigResult], m: &Metric) -> Option<(Kind, f64)> {
    results
        .iter()
        .filter(|r| r.kind.is_mtls_baseline())
        .filter_map(|r| Some((r.kind, r.stat(m.get)?.median)))
        .reduce(|best, x| {
            let better = if m.higher_is_better {
                x.1 > best.1
            } else {
                x.1 < best.1
            };
            if better {
                x
            } else {
                best
            }
        })
}

/// Memory target: at most this many KiB of RSS per idle tunnelled connection, per gateway.
pub const MEMORY_KIB_PER_CONN: f64 = 20.0;
/// ... with this many idle tunnelled connections open.
pub const MEMORY_CONNECTIONS: usize = 10_000;

/// The targets of issue 5 / perf-notes.md, for ours (the default mode).
pub fn verdicts(results: &[ConfigResult], scenarios: &[Scenario]) -> Vec<Verdict> {
    // Ours is judged only if every run carried traffic; a reference counts with the
    // medians of the runs it completed, so that one failed run of the strongest
    // baseline does not make the targets easier.
    let ours = results
        .iter()
        .find(|r| r.kind == Kind::Ours && r.carried_traffic(scenarios));
    let plain = results.iter().find(|r| r.kind == Kind::HaproxyPlain);
    let mut out = Vec::new();
    // (metric index, factor, against plain HAProxy instead of the best mTLS baseline)
    let rules: [(usize, f64, bool); 8] = [
        (0, 1.3, false),
        (0, 1.0, true),
        (1, 1.3, false),
        (4, 5.0, false),
        (4, 1.0, true),
        (2, 0.85, false),
        (3, 1.0, false),
        (7, 0.75, false),
    ];
    for (i, factor, vs_plain) in rules {
        let m = &METRICS[i];
        let op = if m.higher_is_better { "≥" } else { "≤" };
        let against = if vs_plain {
            "plain HAProxy"
        } else {
            "the best mTLS baseline"
        };
        let target = format!("{}: {op} {factor}× {against}", m.short);
        let ours_v = ours.and_then(|r| r.stat(m.get)).map(|s| s.median);
        let reference = if vs_plain {
            plain.and_then(|r| Some((r.kind, r.stat(m.get)?.median)))
        } else {
            best_mtls(results, m)
        };
        let fmt = |v: f64| format!("{v:.d$}", d = m.decimals);
        let (ratio, met) = match (ours_v, reference) {
            (Some(o), Some((_, r))) if r > 0.0 => {
                let ratio = o / r;
                let met = if m.higher_is_better {
                    ratio >= factor
                } else {
                    ratio <= factor
                };
                (format!("{ratio:.2}×"), Some(met))
            }
            _ => ("—".into(), None),
        };
        out.push(Verdict {
            target,
            ours: ours_v.map_or("—".into(), fmt),
            reference: reference.map_or_else(
                || "not measured (configuration skipped or failed)".into(),
                |(k, v)| format!("{} {}", k.name(), fmt(v)),
            ),
            ratio,
            met,
        });
    }
    // Memory: the larger of the two gateways' RSS per connection, judged at the
    // target's 10,000 connections only (with fewer, the base RSS dominates).
    let mem = ours.and_then(|r| {
        r.stat(|s| {
            s.memory
                .as_ref()
                .map(|m| m.a_per_conn().max(m.b_per_conn()))
        })
    });
    let held = ours
        .and_then(|r| r.samples.iter().find_map(|s| s.memory.as_ref()))
        .map_or(0, |m| m.connections);
    let at_scale = held >= MEMORY_CONNECTIONS;
    out.push(Verdict {
        target: format!(
            "memory: ≤ {MEMORY_KIB_PER_CONN} KiB RSS per idle tunnelled connection per gateway \
             at {MEMORY_CONNECTIONS} connections"
        ),
        ours: mem.map_or("—".into(), |m| format!("{:.1} KiB", m.median)),
        reference: if at_scale || mem.is_none() {
            "absolute".into()
        } else {
            format!("absolute; measured with {held} connections only")
        },
        ratio: "—".into(),
        met: mem
            .filter(|_| at_scale)
            .map(|m| m.median <= MEMORY_KIB_PER_CONN),
    });
    out
}

/// The whole report: header, results, memory, targets, notes.
pub fn render(plan: &Plan, results: &[ConfigResult], wall: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# cl-bench results\n");
    let _ = writeln!(
        out,
        "{} · {} s per scenario · {} run{} per configuration · {:.0} s wall time · {}\n",
        date_utc(),
        plan.duration.as_secs(),
        plan.runs,
        if plan.runs == 1 { "" } else { "s" },
        wall.as_secs_f64(),
        machine()
    );
    if let Some(load) = &plan.load_before {
        let _ = writeln!(
            out,
            "1-minute load average before the run: {load} (anything above 0 is other work \
             sharing the cores).\n"
        );
    }
    if !plan.dataplane_args.is_empty() {
        let _ = writeln!(
            out,
            "Our data planes ran with the extra arguments `{}`.\n",
            plan.dataplane_args.join(" ")
        );
    }
    if !plan.tool_notes.is_empty() {
        let _ = writeln!(out, "Baseline tools: {}.\n", plan.tool_notes.join("; "));
    }

    let _ = writeln!(out, "## Results (median (min–max) over the runs)\n");
    let mut header = "| configuration |".to_owned();
    let mut rule = "|---|".to_owned();
    for m in &METRICS {
        let _ = write!(header, " {} |", m.header);
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for r in results {
        let name = if let Some(reason) = &r.skipped {
            let _ = writeln!(
                out,
                "| {} | skipped: {} |{}",
                r.kind.name(),
                reason,
                " |".repeat(METRICS.len() - 1)
            );
            continue;
        } else if r.carried_traffic(&plan.scenarios) {
            r.kind.name().to_owned()
        } else {
            format!("{} **FAILED**", r.kind.name())
        };
        let mut row = format!("| {name} |");
        for m in &METRICS {
            let _ = write!(row, " {} |", cell(r.stat(m.get), m.decimals));
        }
        let _ = writeln!(out, "{row}");
    }

    let mem_rows: Vec<_> = results
        .iter()
        .filter(|r| r.samples.iter().any(|s| s.memory.is_some()))
        .collect();
    if !mem_rows.is_empty() {
        let _ = writeln!(
            out,
            "\n## Memory with {} idle tunnelled connections\n",
            plan.idle_connections
        );
        let _ = writeln!(
            out,
            "| configuration | A RSS before (MiB) | A RSS with them (MiB) | A KiB/conn | A added KiB/conn \
             | B RSS before (MiB) | B RSS with them (MiB) | B KiB/conn | B added KiB/conn |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in mem_rows {
            let st = |f: fn(&Memory) -> f64| r.stat(|s| s.memory.as_ref().map(f));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.kind.name(),
                cell(st(|m| m.a_before_kib as f64 / 1024.0), 1),
                cell(st(|m| m.a_kib as f64 / 1024.0), 1),
                cell(st(Memory::a_per_conn), 1),
                cell(st(Memory::a_added_per_conn), 1),
                cell(st(|m| m.b_before_kib as f64 / 1024.0), 1),
                cell(st(|m| m.b_kib as f64 / 1024.0), 1),
                cell(st(Memory::b_per_conn), 1),
                cell(st(Memory::b_added_per_conn), 1),
            );
        }
    }

    let _ = writeln!(
        out,
        "\n## Targets (ours, medians, ratios within this run)\n"
    );
    let _ = writeln!(out, "| target | ours | reference | ratio | met? |");
    let _ = writeln!(out, "|---|---:|---|---:|---|");
    for v in verdicts(results, &plan.scenarios) {
        let met = match v.met {
            Some(true) => "**met**",
            Some(false) => "**not met**",
            None => "not evaluated",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            v.target, v.ours, v.reference, v.ratio, met
        );
    }

    let _ = writeln!(
        out,
        "\nTopology: client -> gateway A (plain TCP in) -> mTLS (ECDSA P-256, TLS 1.3, client \
         certificate required) -> gateway B -> target, all on 127.0.0.1. Throughput: the client \
         writes for the duration on 1 or {BULK_STREAMS} connections, the sink confirms the byte \
         count. Ping-pong: {MESSAGE} B request and echo, one after the other, on one established \
         connection. New connections: {CONN_WORKERS} workers loop connect, write {MESSAGE} B, \
         read the echo, close; setup is connect until the echo is read. CPU: user+system time \
         of both gateways' process trees (our control planes excluded) during the 1-stream \
         transfer or the connection scenario."
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

/// Today's date in UTC (the date part of the control plane's RFC 3339 clock).
fn date_utc() -> String {
    fabric::clock::now_rfc3339().chars().take(10).collect()
}
