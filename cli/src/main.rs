//! clusterlink: the command line. Certificates, running a peer on this machine,
//! resources (apply/delete/get) and the one-command quickstart.

mod certs;
mod deploy;
mod http;
mod k8s;
mod layout;
mod quickstart;
mod resources;

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "clusterlink",
    version,
    about = "ClusterLink: share services between sites through mutually authenticated gateways",
    after_help = "Example (two peers on this machine, traffic, numbers, clean stop):\n  clusterlink quickstart"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a fabric CA or a peer certificate.
    #[command(
        subcommand,
        after_help = "Examples:\n  clusterlink create fabric --name myfabric\n  clusterlink create peer-cert --name peer-a --fabric myfabric"
    )]
    Create(Create),
    /// Run a peer.
    #[command(
        subcommand,
        after_help = "Example:\n  clusterlink deploy peer --name peer-a --fabric myfabric --platform local"
    )]
    Deploy(Deploy),
    /// Add or update resources (Peer, Export, Import, AccessPolicy, PrivilegedAccessPolicy).
    #[command(
        after_help = "Example:\n  clusterlink apply --name peer-a -f peer-b.yaml -f import.yaml"
    )]
    Apply(Files),
    /// Remove resources applied before, or (`delete peer`) a Kubernetes deployment.
    #[command(
        after_help = "Examples:\n  clusterlink delete --name peer-a -f import.yaml\n  clusterlink delete peer --name peer-a"
    )]
    Delete(DeleteArgs),
    /// Show resources and their status.
    #[command(
        after_help = "Examples:\n  clusterlink get peers --name peer-a\n  clusterlink get imports echo --name peer-a -o yaml"
    )]
    Get(Get),
    /// Serve a TCP echo service (every byte read is written back) until SIGTERM or
    /// Ctrl-C: the service of the demos, and a quick end-to-end check of an import.
    #[command(after_help = "Example:\n  clusterlink echo-server --listen 0.0.0.0:9000")]
    EchoServer {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9000")]
        listen: std::net::SocketAddr,
    },
    /// Create two peers on this machine, connect them, send traffic, report, stop.
    #[command(after_help = "Example:\n  clusterlink quickstart")]
    Quickstart {
        /// Leave both peers running until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
}

#[derive(Subcommand)]
enum Create {
    /// Create the fabric CA: <path>/<name>/cert.pem and key.pem.
    #[command(
        after_help = "Example:\n  clusterlink create fabric --name myfabric --path ./fabrics"
    )]
    Fabric {
        /// Fabric name (the CA's common name and its directory).
        #[arg(long, default_value = "default_fabric")]
        name: String,
        /// Base directory.
        #[arg(long, default_value = ".")]
        path: PathBuf,
        #[arg(long, value_enum, default_value = "ecdsa-p256")]
        key_type: certs::KeyType,
    },
    /// Create a peer certificate signed by the fabric CA.
    #[command(
        after_help = "Example:\n  clusterlink create peer-cert --name peer-a --fabric myfabric --path ./fabrics"
    )]
    PeerCert {
        /// Peer name: a DNS name; the certificate's CN and only DNS SAN.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "default_fabric")]
        fabric: String,
        /// Base directory holding <fabric>/.
        #[arg(long, default_value = ".")]
        path: PathBuf,
        /// Where to write cert.pem and key.pem (default <path>/<fabric>/<name>/).
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "ecdsa-p256")]
        key_type: certs::KeyType,
    },
    /// Create a site CA and the control plane / data plane certificates it signs, for
    /// running the two planes of a peer on separate hosts or containers (their gRPC
    /// link is then mutual TLS with these).
    #[command(
        after_help = "Example:\n  clusterlink create site-certs --name peer-a --fabric myfabric --path ./fabrics\n\nThen: cl-controlplane --grpc-addr 0.0.0.0:4444 --site-ca-file site/ca.pem --site-cert-file site/controlplane-cert.pem --site-key-file site/controlplane-key.pem ...\n      cl-dataplane --controlplane-host HOST:4444 --site-ca-file site/ca.pem --site-cert-file site/dataplane-cert.pem --site-key-file site/dataplane-key.pem ..."
    )]
    SiteCerts {
        /// Peer name (the directory the files go into by default).
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "default_fabric")]
        fabric: String,
        /// Base directory holding <fabric>/.
        #[arg(long, default_value = ".")]
        path: PathBuf,
        /// Where to write the files (default <path>/<fabric>/<name>/site/); must not exist.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Platform {
    Local,
    K8s,
}

#[derive(Subcommand)]
enum Deploy {
    /// Run a peer on this machine (--platform local: both planes in the foreground
    /// until Ctrl-C), or render its Kubernetes deployment (--platform k8s --start
    /// none: <path>/<fabric>/<name>/k8s.yaml).
    #[command(
        after_help = "Examples:\n  clusterlink deploy peer --name peer-a --fabric myfabric --path ./fabrics --platform local --peer-label env=dev\n  clusterlink deploy peer --name peer-a --fabric myfabric --platform k8s --start none --ingress NodePort --ingress-port 30443"
    )]
    Peer {
        #[command(flatten)]
        at: PeerAt,
        #[arg(long, value_enum, default_value = "local")]
        platform: Platform,
        /// Peer-facing gateway port (mTLS); 0 picks a free one.
        #[arg(long, default_value_t = 4443)]
        gateway_port: u16,
        /// Data plane admin port P; the control plane's admin port is P+1 and its
        /// gRPC port P-1. 0 picks free ports for all three.
        #[arg(long, default_value_t = 4445)]
        admin_port: u16,
        /// Address import listeners bind to.
        #[arg(long, default_value = "127.0.0.1")]
        import_bind: IpAddr,
        /// Peer label key=value (policy attribute peer.clusterlink.net/labels.<key>).
        #[arg(long = "peer-label", alias = "label")]
        peer_labels: Vec<String>,
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Seconds in-flight connections get when the peer stops.
        #[arg(long, default_value_t = 10.0, value_parser = fabric::clock::parse_flag_secs)]
        drain_timeout: f64,
        #[command(flatten)]
        k8s: K8sFlags,
    },
}

/// `deploy peer --platform k8s` (ClusterLink's flags).
#[derive(Args)]
#[command(next_help_heading = "Kubernetes (--platform k8s)")]
struct K8sFlags {
    /// The ClusterLink namespace.
    #[arg(long, default_value = "clusterlink-system")]
    namespace: String,
    /// all: install the CRDs, the operator and the Secrets into the current
    /// kubectl context, create the Instance and wait for the operator's report;
    /// operator: the same, with the Instance written to cl-instance.yaml instead;
    /// none: render <path>/<fabric>/<name>/k8s.yaml for kubectl apply.
    #[arg(long, value_enum, default_value = "all")]
    start: k8s::Start,
    /// The gateway Service's type.
    #[arg(long, value_enum, default_value = "LoadBalancer")]
    ingress: k8s::Ingress,
    /// LoadBalancer: the Service port. NodePort: the node port (30000-32767); 443
    /// lets the API server pick one.
    #[arg(long, default_value_t = 443)]
    ingress_port: u16,
    /// Annotation key=value on the gateway Service (repeatable).
    #[arg(long = "ingress-annotations")]
    ingress_annotations: Vec<String>,
    /// ClusterLink's data plane choice; both run our cl-dataplane.
    #[arg(long, value_enum, default_value = "envoy")]
    dataplane: k8s::Dataplane,
    #[arg(long, default_value_t = 1)]
    dataplane_replicas: u16,
    #[arg(long, default_value_t = 1)]
    controlplane_replicas: u16,
    /// Image registry prefix: images are <registry>/cl-controlplane:<tag> and so on
    /// ("" for bare names). The default is what docker/build.sh tags locally.
    #[arg(long, default_value = "localhost")]
    container_registry: String,
    #[arg(long, default_value = "latest")]
    tag: String,
    /// --start all: how long to wait for the operator's report, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Args)]
struct PeerAt {
    /// Peer name.
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "default_fabric")]
    fabric: String,
    /// Base directory holding <fabric>/<name>/.
    #[arg(long, default_value = ".")]
    path: PathBuf,
}

impl PeerAt {
    fn dir(&self) -> PathBuf {
        layout::peer_dir(&self.path, &self.fabric, &self.name)
    }
}

#[derive(Args)]
struct DeleteArgs {
    /// `peer`: remove what `deploy peer --platform k8s` installed in the current
    /// kubectl context (never a namespace it did not create, never the CRDs).
    #[arg(value_parser = ["peer"])]
    what: Option<String>,
    #[command(flatten)]
    at: PeerAt,
    /// File, directory of *.yaml, or - for stdin (repeatable).
    #[arg(short = 'f', long = "filename")]
    files: Vec<String>,
    /// With `peer`: the ClusterLink namespace.
    #[arg(long, default_value = "clusterlink-system")]
    namespace: String,
    /// With `peer`: how long to wait for the operator to remove the deployment.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Args)]
struct Files {
    #[command(flatten)]
    at: PeerAt,
    /// File, directory of *.yaml, or - for stdin (repeatable).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
}

#[derive(Args)]
struct Get {
    /// peers, exports, imports, accesspolicies or privilegedaccesspolicies.
    kind: String,
    /// One resource by name.
    #[arg(id = "resource", value_name = "NAME")]
    resource: Option<String>,
    #[command(flatten)]
    at: PeerAt,
    /// Namespace (namespaced kinds; default: all, or "default" with a name).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: resources::Output,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Create(Create::Fabric {
            name,
            path,
            key_type,
        }) => {
            let dir = certs::create_fabric(&path, &name, key_type)?;
            println!(
                "fabric {name}: {}/cert.pem, {}/key.pem",
                dir.display(),
                dir.display()
            );
        }
        Cmd::Create(Create::PeerCert {
            name,
            fabric,
            path,
            output,
            key_type,
        }) => {
            let dir = certs::create_peer_cert(&path, &fabric, &name, output.as_deref(), key_type)?;
            println!(
                "peer {name}: {}/cert.pem, {}/key.pem",
                dir.display(),
                dir.display()
            );
        }
        Cmd::Create(Create::SiteCerts {
            name,
            fabric,
            path,
            output,
        }) => {
            let dir = certs::create_site_certs(&path, &fabric, &name, output.as_deref())?;
            println!(
                "peer {name}: site certificates in {}: {}",
                dir.display(),
                certs::SITE_FILES.join(", ")
            );
        }
        Cmd::Deploy(Deploy::Peer {
            at,
            platform,
            gateway_port,
            admin_port,
            import_bind,
            peer_labels,
            log_level,
            drain_timeout,
            k8s,
        }) => {
            if platform == Platform::K8s {
                let outcome = k8s::deploy(&k8s::Options {
                    base: at.path,
                    fabric: at.fabric,
                    peer: at.name,
                    namespace: k8s.namespace,
                    start: k8s.start,
                    ingress: k8s.ingress,
                    ingress_port: k8s.ingress_port,
                    ingress_annotations: k8s.ingress_annotations,
                    dataplane: k8s.dataplane,
                    dataplane_replicas: k8s.dataplane_replicas,
                    controlplane_replicas: k8s.controlplane_replicas,
                    labels: peer_labels,
                    registry: k8s.container_registry,
                    tag: k8s.tag,
                    log_level,
                    timeout_secs: k8s.timeout,
                })
                .await?;
                match outcome {
                    k8s::Outcome::Rendered(out) => println!(
                        "wrote {} (apply it with: kubectl apply --server-side -f {})",
                        out.display(),
                        out.display()
                    ),
                    k8s::Outcome::Installed(out) => println!(
                        "installed the CRDs, the operator and the Secrets; the Instance is in {} (kubectl apply --server-side -f it)",
                        out.display()
                    ),
                    k8s::Outcome::Started(report) => println!("deployed: {report}"),
                }
                return Ok(());
            }
            deploy::run(deploy::Options {
                base: at.path,
                fabric: at.fabric,
                peer: at.name,
                gateway_port,
                admin_port,
                import_bind,
                labels: peer_labels,
                log_level,
                drain_timeout,
            })
            .await?;
        }
        Cmd::Apply(f) => resources::apply(&f.at.dir(), &f.files)?,
        Cmd::Delete(d) if d.what.is_some() => {
            for line in k8s::delete_peer(&d.namespace, d.timeout).await? {
                println!("deleted {line}");
            }
        }
        Cmd::Delete(d) if d.files.is_empty() => {
            anyhow::bail!(
                "delete: give -f FILE (resources), or `delete peer` (a Kubernetes deployment)"
            )
        }
        Cmd::Delete(d) => resources::delete(&d.at.dir(), &d.files)?,
        Cmd::Get(g) => {
            let out = resources::get(
                &g.at.dir(),
                &g.kind,
                g.resource.as_deref(),
                g.namespace.as_deref(),
                g.output,
            )
            .await?;
            println!("{out}");
        }
        Cmd::Quickstart { keep_running } => quickstart::run(keep_running).await?,
        Cmd::EchoServer { listen } => quickstart::serve_echo(listen).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
