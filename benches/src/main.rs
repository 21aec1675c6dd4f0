//! cl-bench: the benchmark harness. Runs our real `cl-controlplane` and `cl-dataplane`
//! binaries as peers A and B on loopback (client -> A's import -> mTLS tunnel -> B ->
//! target), the double hops users would build instead (stunnel, HAProxy, nginx) and the
//! client talking to the target directly, all in the same run. See benches/README.md.

mod baselines;
mod chart;
mod load;
mod ours;
mod procs;
mod report;
mod targets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;

use crate::baselines::{Tool, Tools};
use crate::ours::{Bins, Certs};
use crate::procs::Managed;
use crate::report::{ConfigResult, Memory, Sample};
use crate::targets::Targets;

/// Benchmark: our gateways against stunnel, HAProxy and nginx double hops, and direct.
#[derive(Debug, Parser)]
#[command(name = "cl-bench")]
struct Args {
    /// Quick check for CI: direct and our two modes only (no baselines), 1 s per
    /// scenario, 1 run, 500 idle connections; fails if any configuration does not
    /// carry traffic. Explicit flags override these.
    #[arg(long)]
    smoke: bool,
    /// Seconds per scenario (default 4; 1 with --smoke).
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Runs of every configuration; the table shows median and min–max (default 3;
    /// 1 with --smoke).
    #[arg(long)]
    runs: Option<usize>,
    /// Configurations to run (default: all, in this order; with --smoke: direct,
    /// ours, ours-h2, ours-http1).
    #[arg(long = "config", value_enum)]
    configs: Vec<Kind>,
    /// Idle tunnelled connections held open in the memory scenario (default 10000;
    /// 500 with --smoke).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Do not install missing baseline tools with apt-get; skip their configurations.
    #[arg(long)]
    no_install: bool,
    /// Directory of cl-dataplane and cl-controlplane (default: next to cl-bench).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Extra argument for both of our data planes (repeatable), for trying a lever
    /// without a rebuild, e.g. `--dataplane-arg=--workers=1`.
    #[arg(long = "dataplane-arg", allow_hyphen_values = true)]
    dataplane_args: Vec<String>,
    /// Scenarios to run (repeatable; default: all). For profiling one scenario with a
    /// long --duration-secs; a partial run's table leaves the other columns empty.
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Internal: serve the echo and sink targets (the harness runs itself this way).
    #[arg(long, hide = true)]
    serve_targets: bool,
    /// Where to write the markdown table; the SVG chart goes beside it with the
    /// extension .svg (default: benches/results/latest.md).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Client -> target, no gateway.
    Direct,
    /// Our peers as they run by default: pooled mTLS connections speaking our own
    /// multiplexer (`clusterlink-mux/1`), one stream per tunnelled connection.
    Ours,
    /// Our peers with A tunnelling over pooled HTTP/2 CONNECT instead (--no-mux), as
    /// toward a gateway that does not speak the multiplexer.
    OursH2,
    /// Our peers with HTTP/1.1 CONNECT and one TLS connection per tunnelled
    /// connection (A runs with --force-http1; ClusterLink's model).
    OursHttp1,
    /// stunnel as an mTLS double hop.
    Stunnel,
    /// HAProxy as an mTLS double hop.
    Haproxy,
    /// nginx (stream module) as an mTLS double hop.
    Nginx,
    /// HAProxy as a plain TCP double hop (no TLS): the no-crypto relay bound.
    HaproxyPlain,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Direct,
        Kind::Ours,
        Kind::OursH2,
        Kind::OursHttp1,
        Kind::Stunnel,
        Kind::Haproxy,
        Kind::Nginx,
        Kind::HaproxyPlain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Ours => "ours",
            Kind::OursH2 => "ours-h2",
            Kind::OursHttp1 => "ours-http1",
            Kind::Stunnel => "stunnel",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::HaproxyPlain => "haproxy-plain",
        }
    }

    pub fn tool(self) -> Option<Tool> {
        match self {
            Kind::Direct | Kind::Ours | Kind::OursH2 | Kind::OursHttp1 => None,
            Kind::Stunnel => Some(Tool::Stunnel),
            Kind::Haproxy => Some(Tool::Haproxy),
            Kind::Nginx => Some(Tool::Nginx),
            Kind::HaproxyPlain => Some(Tool::HaproxyPlain),
        }
    }

    /// An mTLS double hop of another tool (the "best mTLS baseline" candidates).
    pub fn is_mtls_baseline(self) -> bool {
        matches!(self, Kind::Stunnel | Kind::Haproxy | Kind::Nginx)
    }

    /// The memory scenario runs for our default mode only: its target is absolute, and
    /// with one TLS connection per tunnelled connection (ours-http1) 10,000 connections
    /// need 20,000 descriptors in gateway A, the whole open-file limit of machines like
    /// this one.
    pub fn measures_memory(self) -> bool {
        self == Kind::Ours
    }

    /// Extra flags for our gateway A (the dialing side) in this configuration.
    pub fn flags_a(self) -> &'static [&'static str] {
        match self {
            Kind::OursH2 => &["--no-mux"],
            Kind::OursHttp1 => &["--force-http1"],
            _ => &[],
        }
    }
}

/// The measurements of one configuration run, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Bulk throughput on one connection (and CPU-s/GB).
    Bulk1,
    /// Bulk throughput on 8 connections.
    Bulk8,
    /// 64 B ping-pong on one established connection.
    PingPong,
    /// New connections per second (and CPU µs per connection).
    ConnRate,
    /// RSS with many idle tunnelled connections (ours only).
    Memory,
}

pub struct Plan {
    /// The scenarios this run measures (all, unless --scenario was given).
    pub scenarios: Vec<Scenario>,
    pub duration: Duration,
    pub runs: usize,
    pub configs: Vec<Kind>,
    pub idle_connections: usize,
    pub load_before: Option<String>,
    /// Tool versions and what the harness did to get them.
    pub tool_notes: Vec<String>,
    /// Extra arguments our data planes ran with (none in a standard run).
    pub dataplane_args: Vec<String>,
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

/// Ok(false) when some configuration that ran failed to carry traffic.
fn real_main(args: Args) -> Result<bool> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    if args.serve_targets {
        Targets::serve_until_stdin_closes(threads)?;
        return Ok(true);
    }
    let dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .context("locating cl-bench")?
            .parent()
            .context("cl-bench has no directory")?
            .to_owned(),
    };
    let bins = Bins {
        dataplane: dir.join("cl-dataplane"),
        controlplane: dir.join("cl-controlplane"),
        dataplane_args: args.dataplane_args.clone(),
    };
    for bin in [&bins.dataplane, &bins.controlplane] {
        if !bin.is_file() {
            bail!(
                "{} does not exist; build it first with `cargo build --release -p dataplane \
                 -p controlplane` (or run benches/run.sh, which builds everything)",
                bin.display()
            );
        }
    }
    warn_if_stale(&bins.dataplane, "dataplane");
    warn_if_stale(&bins.controlplane, "controlplane");
    if cfg!(debug_assertions) {
        eprintln!(
            "cl-bench: warning: this is an unoptimized build; numbers are meaningless \
             (use cargo run --release -p benches)"
        );
    }
    let configs = if !args.configs.is_empty() {
        // Each once, in the standard order.
        Kind::ALL
            .into_iter()
            .filter(|k| args.configs.contains(k))
            .collect()
    } else if args.smoke {
        vec![Kind::Direct, Kind::Ours, Kind::OursH2, Kind::OursHttp1]
    } else {
        Kind::ALL.to_vec()
    };
    let idle_connections = args
        .idle_connections
        .unwrap_or(if args.smoke { 500 } else { 10_000 })
        .max(1);
    // The memory scenario's client sockets live in this process, the target's in its
    // child, and the gateways inherit the limit.
    let want = idle_connections as u64 + 4096;
    let nofile = procs::raise_nofile(want);
    if nofile < want {
        eprintln!(
            "cl-bench: warning: the open-file limit is {nofile}, below the {want} the memory \
             scenario needs"
        );
    }
    let tools = if configs.iter().any(|k| k.tool().is_some()) {
        Tools::ensure(!args.no_install)
    } else {
        Tools::probe_only()
    };
    let mut tool_notes = tools.notes.clone();
    tool_notes.extend(tools.versions());
    let plan = Plan {
        scenarios: if args.scenarios.is_empty() {
            vec![
                Scenario::Bulk1,
                Scenario::Bulk8,
                Scenario::PingPong,
                Scenario::ConnRate,
                Scenario::Memory,
            ]
        } else {
            args.scenarios.clone()
        },
        load_before: report::load_average(),
        duration: Duration::from_secs(
            args.duration_secs
                .unwrap_or(if args.smoke { 1 } else { 4 })
                .max(1),
        ),
        runs: args.runs.unwrap_or(if args.smoke { 1 } else { 3 }).max(1),
        configs,
        idle_connections,
        tool_notes,
        dataplane_args: args.dataplane_args.clone(),
    };
    let out = args
        .out
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results/latest.md"));

    // The targets run in a process of their own (own threads, own scheduler, own
    // open-file limit).
    let targets = Targets::spawn(&std::env::current_exe().context("locating cl-bench")?)?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("cl-bench-client")
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let started = std::time::Instant::now();
    let results = client_rt.block_on(async {
        tokio::select! {
            r = run(&bins, &tools, &plan, &targets) => r,
            // Dropping the run future stops the processes (their guards' Drop).
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    client_rt.shutdown_timeout(Duration::from_secs(1));
    drop(targets);
    let results = results?;
    let wall = started.elapsed();

    let markdown = report::render(&plan, &results, wall);
    println!("{markdown}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, &markdown).with_context(|| format!("writing {}", out.display()))?;
    let svg = out.with_extension("svg");
    chart::write(&svg, &plan, &results).with_context(|| format!("writing {}", svg.display()))?;
    eprintln!(
        "cl-bench: table written to {}, chart to {} ({:.0} s)",
        out.display(),
        svg.display(),
        wall.as_secs_f64()
    );
    Ok(results
        .iter()
        .filter(|r| r.skipped.is_none())
        .all(|r| r.carried_traffic(&plan.scenarios)))
}

async fn run(
    bins: &Bins,
    tools: &Tools,
    plan: &Plan,
    targets: &Targets,
) -> Result<Vec<ConfigResult>> {
    let certs = Certs::generate()?;
    let mut results: Vec<ConfigResult> =
        plan.configs.iter().map(|k| ConfigResult::new(*k)).collect();
    for r in results.iter_mut() {
        if let Some(tool) = r.kind.tool() {
            if let Err(reason) = tools.binary(tool) {
                eprintln!("cl-bench: {}: skipped: {reason}", r.kind.name());
                r.skipped = Some(reason);
            }
        }
    }
    for run in 1..=plan.runs {
        for result in results.iter_mut().filter(|r| r.skipped.is_none()) {
            let kind = result.kind;
            eprintln!("cl-bench: run {run}/{}: {}", plan.runs, kind.name());
            match one(bins, tools, &certs, targets, kind, plan, run, result).await {
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

/// What runs for one configuration: nothing (direct), our two peers, or a baseline pair.
enum Running {
    Direct,
    Ours(Box<ours::Pair>),
    Baseline(Box<baselines::Pair>),
}

impl Running {
    async fn start(
        bins: &Bins,
        tools: &Tools,
        certs: &Certs,
        targets: &Targets,
        kind: Kind,
    ) -> Result<Running> {
        Ok(match kind {
            Kind::Direct => Running::Direct,
            Kind::Ours | Kind::OursH2 | Kind::OursHttp1 => Running::Ours(Box::new(
                ours::Pair::start(bins, certs, targets, kind.flags_a()).await?,
            )),
            _ => {
                let tool = kind.tool().context("a baseline without a tool")?;
                let bin = tools.binary(tool).map_err(|e| anyhow!(e))?;
                Running::Baseline(Box::new(
                    baselines::Pair::start(tool, bin, certs, targets).await?,
                ))
            }
        })
    }

    /// (sink, echo) as the client sees them.
    fn endpoints(&self, targets: &Targets) -> (SocketAddr, SocketAddr) {
        match self {
            Running::Direct => (targets.sink, targets.echo),
            Running::Ours(p) => (p.sink, p.echo),
            Running::Baseline(p) => (p.sink, p.echo),
        }
    }

    /// Gateway A then gateway B (the data path only: not our control planes).
    fn gateways(&self) -> Vec<&Managed> {
        match self {
            Running::Direct => Vec::new(),
            Running::Ours(p) => vec![&p.a.dp, &p.b.dp],
            Running::Baseline(p) => vec![&p.a, &p.b],
        }
    }

    fn cpu(&self) -> Option<f64> {
        let g = self.gateways();
        if g.is_empty() {
            return None;
        }
        g.iter().map(|m| m.cpu_seconds()).sum()
    }
}

/// One run of every scenario for one configuration.
#[allow(clippy::too_many_arguments)]
async fn one(
    bins: &Bins,
    tools: &Tools,
    certs: &Certs,
    targets: &Targets,
    kind: Kind,
    plan: &Plan,
    run: usize,
    result: &mut ConfigResult,
) -> Result<Sample> {
    // One retry: a probed port can be taken by someone else before a gateway binds it.
    let running = match Running::start(bins, tools, certs, targets, kind).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cl-bench:   gateways did not start ({e:#}); retrying once");
            Running::start(bins, tools, certs, targets, kind).await?
        }
    };
    if let Running::Baseline(p) = &running {
        if let Some(check) = &p.mtls_check {
            if run == 1 {
                result.notes.push(format!("mutual TLS checked: {check}"));
            }
        }
    }
    let (sink, echo) = running.endpoints(targets);
    let duration = plan.duration;
    let mut sample = Sample::default();
    let failed = |what: &str, e: anyhow::Error| {
        eprintln!(
            "cl-bench:   {} run {run}: {what} FAILED: {e:#}",
            kind.name()
        );
        format!("run {run}: {what}: {e:#}")
    };
    let mut errors = Vec::new();

    for (streams, scenario) in [(1, Scenario::Bulk1), (load::BULK_STREAMS, Scenario::Bulk8)] {
        if !plan.scenarios.contains(&scenario) {
            continue;
        }
        settle().await;
        let cpu0 = running.cpu();
        match load::bulk(sink, duration, streams).await {
            Ok(b) => {
                let gbps = b.gbit_per_s();
                eprintln!(
                    "cl-bench:   bulk, {streams} stream(s): {gbps:.2} Gbit/s ({} MB in {:.2} s)",
                    b.bytes / 1_000_000,
                    b.secs
                );
                if streams == 1 {
                    sample.gbps1 = Some(gbps);
                    if let (Some(c0), Some(c1)) = (cpu0, running.cpu()) {
                        if b.bytes > 0 {
                            sample.cpu_s_per_gb = Some((c1 - c0) / (b.bytes as f64 / 1e9));
                        }
                    }
                } else {
                    sample.gbps8 = Some(gbps);
                }
            }
            Err(e) => errors.push(failed(&format!("bulk with {streams} streams"), e)),
        }
    }

    if plan.scenarios.contains(&Scenario::PingPong) {
        settle().await;
        match load::ping_pong(echo, duration).await {
            Ok(l) => {
                let (p50, p99) = (l.percentile_us(0.50), l.percentile_us(0.99));
                eprintln!(
                    "cl-bench:   ping-pong: {} round trips, p50 {} µs, p99 {} µs",
                    l.0.len(),
                    fmt_opt(p50),
                    fmt_opt(p99)
                );
                sample.rtt_p50_us = p50;
                sample.rtt_p99_us = p99;
            }
            Err(e) => errors.push(failed("ping-pong", e)),
        }
    }

    if plan.scenarios.contains(&Scenario::ConnRate) {
        settle().await;
        let cpu0 = running.cpu();
        match load::conn_rate(echo, duration).await {
            Ok(r) => {
                let (p50, p99) = (
                    r.latencies.percentile_us(0.50),
                    r.latencies.percentile_us(0.99),
                );
                eprintln!(
                    "cl-bench:   conns: {:.0}/s, setup p50 {} µs, p99 {} µs, {} errors{}",
                    r.conns_per_s(),
                    fmt_opt(p50),
                    fmt_opt(p99),
                    r.errors,
                    r.first_error
                        .as_deref()
                        .map_or(String::new(), |e| format!(" (first: {e})"))
                );
                sample.conns_per_s = Some(r.conns_per_s());
                sample.setup_p50_us = p50;
                sample.setup_p99_us = p99;
                sample.conn_ok = r.ok;
                sample.conn_errors = r.errors;
                if let (Some(c0), Some(c1)) = (cpu0, running.cpu()) {
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
    }

    if kind.measures_memory() && plan.scenarios.contains(&Scenario::Memory) {
        settle().await;
        match memory(&running, echo, plan.idle_connections).await {
            Ok(m) => sample.memory = Some(m),
            Err(e) => errors.push(failed("idle connections", e)),
        }
    }

    if let Running::Ours(p) = &running {
        diagnostics(p, result).await;
    }
    drop(running);
    result.failures.extend(errors);
    Ok(sample)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// RSS of A and B before and while `n` idle tunnelled connections are open.
async fn memory(running: &Running, echo: SocketAddr, n: usize) -> Result<Memory> {
    let g = running.gateways();
    let (Some(a), Some(b)) = (g.first(), g.get(1)) else {
        bail!("no gateways to measure");
    };
    let rss = |m: &Managed| {
        m.rss_kib()
            .with_context(|| format!("reading {}'s RSS", m.name))
    };
    let (a0, b0) = (rss(a)?, rss(b)?);
    let conns = load::idle_connections(echo, n).await?;
    // Let the gateways finish their side of the last setups.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a1, b1) = (rss(a)?, rss(b)?);
    let m = Memory {
        connections: conns.len(),
        a_before_kib: a0,
        a_kib: a1,
        b_before_kib: b0,
        b_kib: b1,
    };
    drop(conns);
    eprintln!(
        "cl-bench:   {} idle connections: A {} KiB ({:.1} KiB/conn), B {} KiB ({:.1} KiB/conn)",
        m.connections,
        a1,
        m.a_per_conn(),
        b1,
        m.b_per_conn()
    );
    Ok(m)
}

/// A short pause between scenarios, so the previous one's closing connections and
/// wake-ups do not land in the next measurement.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// What the gateways say about the run: handshakes (over h2 one per pooled connection:
/// a few per run; over HTTP/1.1 one per connection), denials, and any warnings they
/// logged.
async fn diagnostics(p: &ours::Pair, result: &mut ConfigResult) {
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
    for g in [&p.a.dp, &p.a.cp, &p.b.dp, &p.b.cp] {
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

/// Warns when a component binary is older than its crate's sources.
fn warn_if_stale(bin: &Path, krate: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src");
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
             `cargo build --release -p {krate}` to measure the current code",
            bin.display(),
            src.display()
        );
    }
}
