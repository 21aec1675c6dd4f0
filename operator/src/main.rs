//! cl-operator: reconciles ClusterLink `Instance` objects into a peer's deployment
//! (see `operator::controller`). Kubeconfig from `KUBECONFIG`, `~/.kube/config` or the
//! pod's service account. With `--leader-elect`, only the holder of the Lease
//! `cl-operator` in `--namespace` reconciles, and a replica that loses it exits (its
//! pod restarts and waits for the lease again), so two never act at once.
//! Admin port: `/metrics`, `/healthz` (the process runs), `/readyz` (reconciling or
//! standing by as a follower).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use crds::Instance;
use futures_util::StreamExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::runtime::{watcher, Controller};
use operator::controller::{self, Ctx, LABEL_INSTANCE};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

#[derive(Debug, Parser)]
#[command(
    name = "cl-operator",
    version,
    about = "ClusterLink operator: Instance -> deployment"
)]
struct Config {
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(long, env = "CL_OPERATOR_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    admin_addr: SocketAddr,
    /// The operator's namespace (where its Lease lives).
    #[arg(long, env = "CL_NAMESPACE", default_value = "clusterlink-operator")]
    namespace: String,
    /// This replica's name (Lease holder); defaults to the host name.
    #[arg(long, env = "CL_POD_NAME")]
    identity: Option<String>,
    /// Take the Lease `cl-operator` before reconciling (for more than one replica).
    #[arg(long, env = "CL_LEADER_ELECT")]
    leader_elect: bool,
    #[arg(long, env = "CL_LEASE_DURATION_SECS", default_value_t = 15)]
    lease_duration_secs: u64,
    /// Log level or filter.
    #[arg(long, env = "CL_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    leading: IntGauge,
}

fn metrics() -> anyhow::Result<Metrics> {
    let registry = Registry::new();
    let reconciles = IntCounterVec::new(
        Opts::new(
            "clusterlink_operator_reconciles_total",
            "Instance reconciles by result",
        ),
        &["result"],
    )?;
    let leading = IntGauge::new(
        "clusterlink_operator_leading",
        "1 while this replica reconciles (holds the Lease, or runs without election)",
    )?;
    registry.register(Box::new(reconciles.clone()))?;
    registry.register(Box::new(leading.clone()))?;
    Ok(Metrics {
        registry,
        reconciles,
        leading,
    })
}

async fn admin(
    req: Request<Incoming>,
    m: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    use fabric::admin::reply;
    Ok(match req.uri().path() {
        "/metrics" => {
            let mut out = Vec::new();
            let enc = prometheus::TextEncoder::new();
            let _ = prometheus::Encoder::encode(&enc, &m.registry.gather(), &mut out);
            reply(StatusCode::OK, "text/plain; version=0.0.4", out)
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if ready.load(Ordering::Relaxed) => {
            reply(StatusCode::OK, "text/plain", "ready\n")
        }
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

async fn run(config: Config) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let m = Arc::new(metrics()?);
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot bind the admin port on {}", config.admin_addr))?;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    {
        let (m, ready) = (m.clone(), ready.clone());
        tokio::spawn(fabric::admin::serve_http(listener, stop_rx, move |req| {
            admin(req, m.clone(), ready.clone())
        }));
    }

    let mut lost = None;
    if config.leader_elect {
        let identity = config.identity.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "cl-operator".into())
        });
        let duration = config.lease_duration_secs.max(2);
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "cl-operator")
            .with_namespace(&config.namespace)
            .with_identity(&identity)
            .with_field_manager("cl-operator-lease")
            .with_duration(duration)
            .with_grace((duration / 3).max(1))
            .build()
            .await
            .context("leader election")?;
        let (mut leading, _task) = manager.watch().await;
        // A follower is ready: it stands by.
        ready.store(true, Ordering::Relaxed);
        tracing::info!(identity = %identity, "waiting for the Lease cl-operator");
        leading
            .wait_for(|l| *l)
            .await
            .context("leader election stopped")?;
        tracing::info!(identity = %identity, "leading");
        lost = Some(async move {
            let _ = leading.wait_for(|l| !*l).await;
        });
    }
    m.leading.set(1);
    ready.store(true, Ordering::Relaxed);

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let instances: Api<Instance> = Api::all(client.clone());
    let controller = Controller::new(instances, watcher::Config::default());
    let store = controller.store();
    let owned = || watcher::Config::default().labels(LABEL_INSTANCE);
    let controller = controller
        .watches(Api::<Deployment>::all(client.clone()), owned(), |d| {
            controller::instance_of(&d.metadata)
        })
        .watches(Api::<Service>::all(client.clone()), owned(), |s| {
            controller::instance_of(&s.metadata)
        })
        .reconcile_all_on(tokio_stream::wrappers::ReceiverStream::new(rx))
        .shutdown_on_signal();
    let ctx = Arc::new(Ctx {
        client,
        instances: store,
        reconcile_all: tx,
    });
    let reconciles = m.reconciles.clone();
    let work = controller
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(move |r| {
            let result = if r.is_ok() { "ok" } else { "error" };
            reconciles.with_label_values(&[result]).inc();
            async {}
        });
    match lost {
        Some(lost) => tokio::select! {
            () = work => {}
            () = lost => anyhow::bail!("lost the Lease cl-operator; exiting so that only the new leader acts"),
        },
        None => work.await,
    }
    tracing::info!("cl-operator stopped");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let config = Config::try_parse().unwrap_or_else(|e| e.exit());
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("Error: --log-level {:?}: {e}", config.log_level);
            return std::process::ExitCode::FAILURE;
        }
    };
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
