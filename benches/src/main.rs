//! cl-bench: the benchmark harness. Runs the real `cl-dataplane` binary as gateways A
//! and B on loopback (client -> A's import -> mTLS tunnel -> B -> target) and compares
//! them with the client talking to the target directly. See benches/README.md.

mod gateways;
mod load;
mod report;
mod targets;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;

use crate::gateways::{Certs, Pair};
use crate::report::{ConfigResult, Sample};
use crate::targets::Targets;

/// Benchmark: gateway A -> gateway B throughput and connection rate, against direct.
#[derive(Debug, Parser)]
#[command(name = "cl-bench")]
struct Args {
    /// Quick check: 1 s per scenario and 1 run (unless given explicitly); fails if any
    /// configuration does not carry traffic.
    #[arg(long)]
    smoke: bool,
    /// Seconds per scenario (default 5; 1 with --smoke).
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Runs of every configuration; the table shows median and min–max (default 3;
    /// 1 with --smoke).
    #[arg(long)]
    runs: Option<usize>,
    /// Configurations to run (default: all, in this order).
    #[arg(long = "config", value_enum)]
    configs: Vec<Kind>,
    /// The gateway binary (default: cl-dataplane next to cl-bench).
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// Where to write the markdown table (default: benches/results/latest.md).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Client -> target, no gateway.
    Direct,
    /// Through A and B, one pooled HTTP/2 connection carrying a CONNECT stream per
    /// tunnelled connection (the default).
    OursH2,
    /// Through A and B, HTTP/1.1 CONNECT with one TLS connection per tunnelled
    /// connection (A runs with --force-http1; ClusterLink's model).
    OursHttp1,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::OursH2 => "ours-h2",
            Kind::OursHttp1 => "ours-http1",
        }
    }
}

pub struct Plan {
    pub duration: Duration,
    pub runs: usize,
    pub configs: Vec<Kind>,
    pub load_before: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("cl-bench: FAILED: some configuration did not carry traffic (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cl-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ok(false) when some configuration failed to carry traffic.
fn real_main(args: Args) -> Result<bool> {
    let bin = match args.dataplane {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating cl-bench")?
            .with_file_name("cl-dataplane"),
    };
    if !bin.is_file() {
        bail!(
            "the gateway binary {} does not exist; build it first with \
             `cargo build --release -p dataplane` (cl-bench runs the real cl-dataplane \
             found next to itself, or the one given with --dataplane)",
            bin.display()
        );
    }
    warn_if_stale(&bin);
    if cfg!(debug_assertions) {
        eprintln!(
            "cl-bench: warning: this is an unoptimized build; numbers are meaningless \
             (use cargo run --release -p benches)"
        );
    }
    let plan = Plan {
        load_before: report::load_average(),
        duration: Duration::from_secs(
            args.duration_secs
                .unwrap_or(if args.smoke { 1 } else { 5 })
                .max(1),
        ),
        runs: args.runs.unwrap_or(if args.smoke { 1 } else { 3 }).max(1),
        configs: if args.configs.is_empty() {
            vec![Kind::Direct, Kind::OursH2, Kind::OursHttp1]
        } else {
            let mut c = args.configs.clone();
            c.dedup();
            c
        },
    };
    let out = args
        .out
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results/latest.md"));

    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // The targets run on their own runtime (own threads, own scheduler).
    let targets = Targets::start(threads)?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("cl-bench-client")
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let results = client_rt.block_on(async {
        tokio::select! {
            r = run(&bin, &plan, &targets) => r,
            // Dropping the run future kills the gateways (their guards' Drop).
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    client_rt.shutdown_timeout(Duration::from_secs(1));
    drop(targets);
    let results = results?;

    let markdown = report::render(&plan, &results);
    println!("{markdown}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, &markdown).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("cl-bench: table written to {}", out.display());
    Ok(results.iter().all(ConfigResult::carried_traffic))
}

async fn run(bin: &Path, plan: &Plan, targets: &Targets) -> Result<Vec<ConfigResult>> {
    let certs = Certs::generate()?;
    let mut results: Vec<ConfigResult> =
        plan.configs.iter().map(|k| ConfigResult::new(*k)).collect();
    for run in 1..=plan.runs {
        for result in results.iter_mut() {
            let kind = result.kind;
            eprintln!("cl-bench: run {run}/{}: {}", plan.runs, kind.name());
            match one(bin, &certs, targets, kind, plan.duration, run, result).await {
                Ok(sample) => result.samples.push(sample),
                Err(e) => {
                    eprintln!("cl-bench:   {} run {run} FAILED: {e:#}", kind.name());
                    result.failures.push(format!("run {run}: {e:#}"));
                }
            }
        }
    }
    Ok(results)
}

/// One run of both scenarios for one configuration.
async fn one(
    bin: &Path,
    certs: &Certs,
    targets: &Targets,
    kind: Kind,
    duration: Duration,
    run: usize,
    result: &mut ConfigResult,
) -> Result<Sample> {
    let pair = match kind {
        Kind::Direct => None,
        Kind::OursH2 | Kind::OursHttp1 => {
            let force_http1 = kind == Kind::OursHttp1;
            // One retry: a probed port can be taken by someone else before the gateway binds it.
            let pair = match Pair::start(bin, certs, targets, force_http1).await {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("cl-bench:   gateways did not start ({e:#}); retrying once");
                    Pair::start(bin, certs, targets, force_http1).await?
                }
            };
            Some(pair)
        }
    };
    let (sink, echo) = match &pair {
        Some(p) => (p.sink, p.echo),
        None => (targets.sink, targets.echo),
    };
    let cpu = || {
        pair.as_ref().and_then(|p| {
            Some(gateways::cpu_seconds(p.a.pid())? + gateways::cpu_seconds(p.b.pid())?)
        })
    };
    let mut sample = Sample::default();
    let failed = |what: &str, e: anyhow::Error| {
        eprintln!(
            "cl-bench:   {} run {run}: {what} FAILED: {e:#}",
            kind.name()
        );
        format!("run {run}: {what}: {e:#}")
    };
    let mut errors = Vec::new();

    settle().await;
    let cpu0 = cpu();
    match load::bulk(sink, duration).await {
        Ok(b) => {
            let gbps = b.gbit_per_s();
            eprintln!(
                "cl-bench:   bulk: {:.2} Gbit/s ({} MB in {:.2} s)",
                gbps,
                b.bytes / 1_000_000,
                b.secs
            );
            sample.gbps = Some(gbps);
            if let (Some(c0), Some(c1)) = (cpu0, cpu()) {
                if b.bytes > 0 {
                    sample.cpu_s_per_gb = Some((c1 - c0) / (b.bytes as f64 / 1e9));
                }
            }
        }
        Err(e) => errors.push(failed("bulk", e)),
    }

    settle().await;
    let cpu0 = cpu();
    match load::conn_rate(echo, duration).await {
        Ok(r) => {
            let (p50, p99) = (r.percentile_us(0.50), r.percentile_us(0.99));
            eprintln!(
                "cl-bench:   conns: {:.0}/s, p50 {} µs, p99 {} µs, {} errors{}",
                r.conns_per_s(),
                p50.map_or("-".into(), |v| format!("{v:.0}")),
                p99.map_or("-".into(), |v| format!("{v:.0}")),
                r.errors,
                r.first_error
                    .as_deref()
                    .map_or(String::new(), |e| format!(" (first: {e})"))
            );
            sample.conns_per_s = Some(r.conns_per_s());
            sample.p50_us = p50;
            sample.p99_us = p99;
            sample.conn_ok = r.ok;
            sample.conn_errors = r.errors;
            if let (Some(c0), Some(c1)) = (cpu0, cpu()) {
                if r.ok > 0 {
                    sample.cpu_us_per_conn = Some((c1 - c0) * 1e6 / r.ok as f64);
                }
            }
            if let Some(e) = r.first_error {
                result.notes.push(format!(
                    "{} failed connection cycles of {}; first: {e}",
                    r.errors,
                    r.ok + r.errors
                ));
            }
        }
        Err(e) => errors.push(failed("connection rate", e)),
    }

    if let Some(p) = &pair {
        diagnostics(p, result).await;
    }
    drop(pair);
    result.failures.extend(errors);
    Ok(sample)
}

/// A short pause between scenarios, so the previous one's closing connections and
/// wake-ups do not land in the next measurement.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// What the gateways say about the run: handshakes (1 per run over h2, 1 per
/// connection over HTTP/1.1), denials, and any warnings they logged.
async fn diagnostics(p: &Pair, result: &mut ConfigResult) {
    let (ma, mb) = match (p.a.metrics().await, p.b.metrics().await) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            result
                .notes
                .push(format!("could not read gateway metrics: {e:#}"));
            return;
        }
    };
    // `+ 0.0`: a sum over no samples is -0.0, which would print as "-0".
    let m = |text: &str, name: &str, labels: &[&str]| tests::metric(text, name, labels) + 0.0;
    let hs_client = m(
        &ma,
        "clusterlink_tunnel_handshakes_total",
        &["side=\"client\"", "result=\"ok\""],
    );
    let hs_client_err = m(
        &ma,
        "clusterlink_tunnel_handshakes_total",
        &["side=\"client\"", "result=\"error\""],
    );
    let hs_server = m(
        &mb,
        "clusterlink_tunnel_handshakes_total",
        &["side=\"server\"", "result=\"ok\""],
    );
    let denials = m(&ma, "clusterlink_authorization_denials_total", &[])
        + m(&mb, "clusterlink_authorization_denials_total", &[]);
    let opened = m(
        &ma,
        "clusterlink_connections_opened_total",
        &["direction=\"outbound\""],
    );
    let resets = m(
        &ma,
        "clusterlink_connections_closed_total",
        &["reason=\"remote_reset\""],
    ) + m(
        &mb,
        "clusterlink_connections_closed_total",
        &["reason=\"remote_reset\""],
    );
    eprintln!(
        "cl-bench:   gateways: A opened {opened:.0} outbound connections, {hs_client:.0} client \
         handshakes ok ({hs_client_err:.0} failed); B {hs_server:.0} server handshakes; \
         {denials:.0} denials; {resets:.0} remote resets"
    );
    if denials > 0.0 || hs_client_err > 0.0 {
        result.notes.push(format!(
            "{denials:.0} authorization denials and {hs_client_err:.0} failed client handshakes"
        ));
    }
    for g in [&p.a, &p.b] {
        let lines = g.log_lines();
        if !lines.is_empty() {
            eprintln!(
                "cl-bench:   gateway {} logged {} warning/error lines:",
                g.name,
                lines.len()
            );
            for l in lines.iter().take(5) {
                eprintln!("cl-bench:     {l}");
            }
            result.gateway_log_lines += lines.len();
        }
    }
}

/// Warns when the gateway binary is older than the data plane's sources.
fn warn_if_stale(bin: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane/src");
    let Ok(bin_time) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&src) else {
        return;
    };
    let newer = entries
        .flatten()
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .any(|t| t > bin_time);
    if newer {
        eprintln!(
            "cl-bench: warning: {} is older than {}; rebuild it with \
             `cargo build --release -p dataplane` to measure the current code",
            bin.display(),
            src.display()
        );
    }
}
