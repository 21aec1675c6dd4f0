//! `clusterlink deploy peer --platform k8s`: the peer's deployment for a Kubernetes
//! cluster, built by `operator::manifests` (the objects the operator reconciles).
//! With `--start none` it is rendered into `<path>/<fabric>/<peer>/k8s.yaml` (0600:
//! it holds private keys), for `kubectl apply --server-side -f`. A new site CA and
//! site certificates are made in memory on every run; the fabric CA's key is never
//! read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crds::{DataplaneType, IngressSpec, IngressType, InstanceSpec, LogLevel};
use operator::manifests::{self, OPERATOR_NAMESPACE};

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificates folder {0} not found: create it with `clusterlink create peer-cert`")]
    NoPeerDir(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--ingress-port {0}: a NodePort must be in 30000-32767")]
    NodePort(u16),
    #[error("--ingress-port 0: give a port (or leave the default, 443)")]
    ZeroPort,
    #[error("{flag} {value:?}: expected key=value")]
    KeyValue { flag: &'static str, value: String },
    #[error("--log-level {0:?}: expected trace, debug, info, warning, error or fatal")]
    LogLevel(String),
    #[error("no Kubernetes cluster to deploy to (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    NoCluster(String),
    #[error("namespace {0} does not exist: create it, or use the default clusterlink-system (which deploy creates)")]
    NoNamespace(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Apply(#[from] operator::controller::Error),
    #[error("the CRDs were not established within {0} s")]
    CrdsNotEstablished(u64),
    #[error("the operator has not reported on Instance {OPERATOR_NAMESPACE}/{INSTANCE} within {0} s: is cl-operator running? (kubectl -n {OPERATOR_NAMESPACE} get pods)")]
    NoReport(u64),
    #[error("site certificates: {0}")]
    Certs(#[from] fabric::certs::Error),
    #[error(transparent)]
    Render(#[from] manifests::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Start {
    All,
    Operator,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ingress {
    #[value(name = "LoadBalancer", alias = "loadbalancer")]
    LoadBalancer,
    #[value(name = "NodePort", alias = "nodeport")]
    NodePort,
    #[value(name = "none")]
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataplane {
    Envoy,
    Go,
}

/// The flags of `deploy peer --platform k8s` (ClusterLink's).
#[derive(Debug, Clone)]
pub struct Options {
    pub base: PathBuf,
    pub fabric: String,
    pub peer: String,
    pub namespace: String,
    pub start: Start,
    pub ingress: Ingress,
    pub ingress_port: u16,
    pub ingress_annotations: Vec<String>,
    pub dataplane: Dataplane,
    pub dataplane_replicas: u16,
    pub controlplane_replicas: u16,
    pub labels: Vec<String>,
    pub registry: String,
    pub tag: String,
    pub log_level: String,
    /// How long `--start all` waits for the operator's report, in seconds.
    pub timeout_secs: u64,
}

fn key_values(flag: &'static str, items: &[String]) -> Result<BTreeMap<String, String>, Error> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(Error::KeyValue {
                flag,
                value: kv.clone(),
            }),
        })
        .collect()
}

fn log_level(s: &str) -> Result<LogLevel, Error> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "trace" => LogLevel::Trace,
        "debug" => LogLevel::Debug,
        "info" => LogLevel::Info,
        "warn" | "warning" => LogLevel::Warning,
        "error" => LogLevel::Error,
        "fatal" => LogLevel::Fatal,
        _ => return Err(Error::LogLevel(s.to_owned())),
    })
}

/// The Instance spec these flags describe (what `--start all` would create).
pub fn instance_spec(o: &Options) -> Result<InstanceSpec, Error> {
    let type_ = match o.ingress {
        Ingress::LoadBalancer => IngressType::LoadBalancer,
        Ingress::NodePort => IngressType::NodePort,
        Ingress::None => IngressType::None,
    };
    // ClusterLink's default port 443 means "the default" for both types; a NodePort
    // given explicitly must be in the node-port range (checked only for NodePort).
    let port = match (type_, o.ingress_port) {
        (_, 443) => 0,
        (_, 0) => return Err(Error::ZeroPort),
        (IngressType::NodePort, p) if !(30000..=32767).contains(&p) => {
            return Err(Error::NodePort(p))
        }
        (_, p) => i32::from(p),
    };
    Ok(InstanceSpec {
        dataplane: crds::DataplaneSpec {
            type_: match o.dataplane {
                Dataplane::Envoy => DataplaneType::Envoy,
                Dataplane::Go => DataplaneType::Go,
            },
            replicas: i32::from(o.dataplane_replicas.max(1)),
        },
        ingress: IngressSpec {
            type_,
            port,
            annotations: key_values("--ingress-annotations", &o.ingress_annotations)?,
        },
        log_level: log_level(&o.log_level)?,
        container_registry: o.registry.clone(),
        tag: o.tag.clone(),
        namespace: o.namespace.clone(),
        peer_labels: key_values("--label", &o.labels)?,
    })
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `data` to `path` with mode 0600, replacing what was there.
fn write_private(path: &Path, data: &str) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // An existing file keeps its mode through open(); it must not stay readable.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)
}

/// The Instance `deploy` creates (ClusterLink's name and labels).
pub const INSTANCE: &str = "cl-instance";
const FIELD_MANAGER: &str = "clusterlink";

/// What `deploy peer --platform k8s` did.
pub enum Outcome {
    /// `--start none`: the rendered file.
    Rendered(PathBuf),
    /// `--start operator`: installed; the Instance left in this file.
    Installed(PathBuf),
    /// `--start all`: installed, the Instance created, and what the operator said.
    Started(String),
}

/// `deploy peer --platform k8s`.
pub async fn deploy(o: &Options) -> Result<Outcome, Error> {
    let spec = instance_spec(o)?;
    let dir = layout::peer_dir(&o.base, &o.fabric, &o.peer);
    if !dir.is_dir() {
        return Err(Error::NoPeerDir(dir));
    }
    let certs = manifests::Certificates {
        fabric_ca: read(&layout::fabric_dir(&o.base, &o.fabric).join("cert.pem"))?,
        peer_chain: read(&dir.join("cert.pem"))?,
        peer_key: read(&dir.join("key.pem"))?,
        site: fabric::certs::site()?,
    };
    let opts = manifests::Options {
        controlplane_replicas: i32::from(o.controlplane_replicas.max(1)),
        managed_by: "clusterlink".into(),
        certificates_hash: Some(certs.hash()),
        labels: BTreeMap::new(),
    };
    if o.start == Start::None {
        let yaml = manifests::render(&spec, &opts, &certs)?;
        let out = dir.join("k8s.yaml");
        write_private(&out, &yaml)?;
        return Ok(Outcome::Rendered(out));
    }
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::NoCluster(e.to_string()))?;
    install(&client, o, &spec, &opts, &certs).await?;
    let instance = instance(&spec);
    if o.start == Start::Operator {
        let out = dir.join("cl-instance.yaml");
        let yaml = serde_yaml_ng::to_string(&instance).map_err(manifests::Error::from)?;
        write_private(&out, &yaml)?;
        return Ok(Outcome::Installed(out));
    }
    operator::controller::apply_namespaced(&client, OPERATOR_NAMESPACE, &instance, FIELD_MANAGER)
        .await?;
    Ok(Outcome::Started(
        wait_for_operator(&client, o.timeout_secs).await?,
    ))
}

/// ClusterLink's Instance for these flags: `cl-instance` in `clusterlink-operator`.
fn instance(spec: &InstanceSpec) -> crds::Instance {
    let mut i = crds::Instance::new(INSTANCE, spec.clone());
    i.metadata.namespace = Some(OPERATOR_NAMESPACE.into());
    i.metadata.labels = Some(BTreeMap::from(
        [
            ("app.kubernetes.io/name", "instance"),
            ("app.kubernetes.io/instance", INSTANCE),
            ("app.kubernetes.io/part-of", "clusterlink"),
            ("app.kubernetes.io/created-by", "clusterlink"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    ));
    i
}

/// The CRDs (established), the operator (namespace, RBAC, Deployment), the
/// ClusterLink namespace when it is the default one, and the certificate Secrets,
/// all by server-side apply: a second run updates what changed, Secrets included.
async fn install(
    client: &kube::Client,
    o: &Options,
    spec: &InstanceSpec,
    opts: &manifests::Options,
    certs: &manifests::Certificates,
) -> Result<(), Error> {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use operator::controller::{apply_cluster_scoped, apply_namespaced};
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    let default_ns = o.namespace == "clusterlink-system";
    if !default_ns && namespaces.get_opt(&o.namespace).await?.is_none() {
        return Err(Error::NoNamespace(o.namespace.clone()));
    }
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    for crd in crds::crds() {
        apply_cluster_scoped(client, &crd, FIELD_MANAGER).await?;
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    for crd in crds::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let established = crds.get_opt(&name).await?.is_some_and(|c| {
                c.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::CrdsNotEstablished(30));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    let rbac = manifests::operator_rbac_objects(spec, opts);
    create_namespace(client, rbac.namespace).await?;
    apply_namespaced(
        client,
        OPERATOR_NAMESPACE,
        &rbac.service_account,
        FIELD_MANAGER,
    )
    .await?;
    apply_cluster_scoped(client, &rbac.cluster_role, FIELD_MANAGER).await?;
    apply_cluster_scoped(client, &rbac.cluster_role_binding, FIELD_MANAGER).await?;
    apply_namespaced(
        client,
        OPERATOR_NAMESPACE,
        &manifests::operator_deployment(spec, opts),
        FIELD_MANAGER,
    )
    .await?;
    if default_ns {
        create_namespace(client, manifests::namespace(spec, opts)).await?;
    }
    for secret in manifests::secrets(spec, opts, certs) {
        apply_namespaced(client, &o.namespace, &secret, FIELD_MANAGER).await?;
    }
    Ok(())
}

/// Marks a namespace `deploy` made, which `delete peer` may remove; one that was
/// there before is never touched.
pub const LABEL_CREATED: &str = "clusterlink.net/created-by-deploy";

async fn create_namespace(
    client: &kube::Client,
    mut ns: k8s_openapi::api::core::v1::Namespace,
) -> Result<(), Error> {
    use kube::ResourceExt as _;
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    if api.get_opt(&ns.name_any()).await?.is_some() {
        return Ok(());
    }
    ns.labels_mut().insert(LABEL_CREATED.into(), "true".into());
    operator::controller::apply_cluster_scoped(client, &ns, FIELD_MANAGER).await?;
    Ok(())
}

/// `delete peer --platform k8s`: removes exactly what `deploy` made, found by its
/// labels: the Instance it created (waiting, at most `wait_secs`, for the operator
/// to remove the deployment), the objects it applied (the operator, the Secrets,
/// a `--start none` deployment applied from k8s.yaml), and the namespaces it
/// created. CRDs stay: deleting them would delete every user's resources.
pub async fn delete_peer(namespace: &str, wait_secs: u64) -> Result<Vec<String>, Error> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use kube::api::{DeleteParams, ListParams};
    use kube::ResourceExt as _;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::NoCluster(e.to_string()))?;
    let mut removed = Vec::new();
    let instances: kube::Api<crds::Instance> =
        kube::Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let ours = |labels: &BTreeMap<String, String>| {
        labels
            .get("app.kubernetes.io/created-by")
            .map(String::as_str)
            == Some("clusterlink")
    };
    match instances.get_opt(INSTANCE).await {
        Ok(Some(i)) if ours(i.labels()) => {
            instances.delete(INSTANCE, &DeleteParams::default()).await?;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
            while instances.get_opt(INSTANCE).await?.is_some() {
                if tokio::time::Instant::now() > deadline {
                    return Err(Error::NoReport(wait_secs));
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            removed.push(format!("instance {OPERATOR_NAMESPACE}/{INSTANCE}"));
        }
        // No Instance, or no CRD: nothing the operator must clean up.
        Ok(_) | Err(kube::Error::Api(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let selector = format!(
        "{}={},app.kubernetes.io/managed-by={FIELD_MANAGER}",
        manifests::LABEL_PART_OF,
        manifests::PART_OF
    );
    let lp = ListParams::default().labels(&selector);
    let dp = DeleteParams::background();
    let cluster_names = [
        manifests::OPERATOR.to_owned(),
        manifests::cluster_role_name(namespace),
    ];

    macro_rules! delete_in {
        ($t:ty, $kind:literal, $ns:expr) => {{
            let api: kube::Api<$t> = kube::Api::namespaced(client.clone(), $ns);
            for o in api.list(&lp).await? {
                api.delete(&o.name_any(), &dp).await?;
                removed.push(format!("{} {}/{}", $kind, $ns, o.name_any()));
            }
        }};
    }
    macro_rules! delete_cluster {
        ($t:ty, $kind:literal) => {{
            let api: kube::Api<$t> = kube::Api::all(client.clone());
            for o in api.list(&lp).await? {
                // Only this deployment's (another namespace may hold another peer).
                if !cluster_names.contains(&o.name_any()) {
                    continue;
                }
                api.delete(&o.name_any(), &dp).await?;
                removed.push(format!("{} {}", $kind, o.name_any()));
            }
        }};
    }
    for ns in [namespace, OPERATOR_NAMESPACE] {
        delete_in!(Deployment, "deployment", ns);
        delete_in!(Service, "service", ns);
        delete_in!(ServiceAccount, "serviceaccount", ns);
        delete_in!(Role, "role", ns);
        delete_in!(RoleBinding, "rolebinding", ns);
        delete_in!(Secret, "secret", ns);
    }
    delete_cluster!(ClusterRoleBinding, "clusterrolebinding");
    delete_cluster!(ClusterRole, "clusterrole");
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    for ns in namespaces
        .list(&ListParams::default().labels(&format!("{LABEL_CREATED}=true")))
        .await?
    {
        if ns.name_any() != namespace && ns.name_any() != OPERATOR_NAMESPACE {
            continue;
        }
        namespaces.delete(&ns.name_any(), &dp).await?;
        removed.push(format!("namespace {}", ns.name_any()));
    }
    Ok(removed)
}

/// Waits (at most `wait_secs`) for the operator to report on the Instance, printing
/// each change of its conditions; returns the last report.
async fn wait_for_operator(client: &kube::Client, wait_secs: u64) -> Result<String, Error> {
    let api: kube::Api<crds::Instance> = kube::Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
    let mut last = String::new();
    loop {
        let status = api.get_opt(INSTANCE).await?.and_then(|i| i.status);
        let line = status
            .as_ref()
            .map(|s| {
                let c = |part: &crds::ComponentStatus| {
                    part.conditions
                        .get("DeploymentReady")
                        .map(|c| format!("{} ({})", c.status, c.reason))
                };
                (c(&s.controlplane), c(&s.dataplane))
            })
            .and_then(|(cp, dp)| Some(format!("control plane {}, data plane {}", cp?, dp?)));
        if let Some(line) = &line {
            if *line != last {
                println!("operator: {line}");
                last.clone_from(line);
            }
            if line.matches("True (Ready)").count() == 2 {
                return Ok(last);
            }
        }
        if tokio::time::Instant::now() > deadline {
            return match line {
                Some(l) => Ok(format!(
                    "{l}; not ready after {wait_secs} s (the deployment goes on in the cluster)"
                )),
                None => Err(Error::NoReport(wait_secs)),
            };
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
