//! The objects of one ClusterLink deployment in its namespace, as k8s-openapi values.
//! Pure functions of an `InstanceSpec` (and, for the Secrets, the certificates): no
//! I/O, so that every caller (the CLI's renderer, the operator, tests) gets the same
//! objects.
//!
//! Differences from ClusterLink, on purpose:
//! - Each plane has its own ServiceAccount; the data plane's mounts no API token
//!   (it never talks to the API).
//! - RBAC is split: a ClusterRole `<namespace>:cl-controlplane` for what lives in
//!   every namespace (ClusterLink resources, Services, Pods, Events), and a Role in
//!   the ClusterLink namespace for Secrets and Leases (ClusterLink grants Secrets in
//!   every namespace). EndpointSlices are not granted: merge mode is not implemented.
//! - Both planes mount the peer certificate (`cl-peer`): our data plane terminates
//!   the peer mTLS itself from files, where ClusterLink's Envoy got it over xDS.
//! - Pods run as non-root with a read-only root filesystem, no capabilities and
//!   resource requests; the pod template carries a hash of the certificates, so new
//!   Secrets roll the pods (ClusterLink never updates its Secrets).
//! - The data plane type `go` uses the same image as `envoy`: there is one data plane.

use std::collections::BTreeMap;

use crds::{IngressType, InstanceSpec, LogLevel};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    Namespace, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

pub const CONTROLPLANE: &str = "cl-controlplane";
pub const DATAPLANE: &str = "cl-dataplane";
/// The gateway Service remote peers list in their Peer resources.
pub const GATEWAY_SERVICE: &str = "clusterlink";

pub const GRPC_PORT: i32 = 4444;
pub const GATEWAY_PORT: i32 = 4443;
pub const DATAPLANE_ADMIN_PORT: i32 = 4445;
pub const CONTROLPLANE_ADMIN_PORT: i32 = 4446;

/// Secret names and keys (spec §1.7).
pub const SECRET_CA: &str = "cl-ca";
pub const SECRET_CONTROLPLANE: &str = "cl-controlplane";
pub const SECRET_DATAPLANE: &str = "cl-dataplane";
pub const SECRET_PEER: &str = "cl-peer";

/// Labels on everything a deployment makes: what `delete peer` and the operator
/// select by.
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
pub const PART_OF: &str = "clusterlink";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Pod template annotation: hash of the certificates in the Secrets.
pub const ANNOTATION_CERTS: &str = "clusterlink.net/certificates-sha256";

/// Mount points (spec §6.3: ClusterLink's, so its images' conventions hold).
const PEER_DIR: &str = "/etc/ssl/certs/clink";

/// What a deployment needs besides its Instance spec.
#[derive(Debug, Clone)]
pub struct Options {
    /// Control plane replicas (the Instance has no such field; `deploy --start none`
    /// renders `--controlplane-replicas`).
    pub controlplane_replicas: i32,
    /// Who made the objects (`app.kubernetes.io/managed-by`).
    pub managed_by: String,
    /// Hash of the certificates (`certificates_hash`), put on the pod templates.
    pub certificates_hash: Option<String>,
    /// More labels on every object (the operator's: which Instance made it).
    pub labels: BTreeMap<String, String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            controlplane_replicas: 1,
            managed_by: "clusterlink".into(),
            certificates_hash: None,
            labels: BTreeMap::new(),
        }
    }
}

/// The certificates a deployment's Secrets hold: the fabric CA and this peer's chain
/// and key (from `create peer-cert`), and a fresh site (`fabric::certs::site()`).
pub struct Certificates {
    pub fabric_ca: String,
    pub peer_chain: String,
    pub peer_key: String,
    pub site: fabric::certs::Site,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").finish_non_exhaustive()
    }
}

impl Certificates {
    /// A hash of every certificate and key, for the pod templates.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            &self.fabric_ca,
            &self.peer_chain,
            &self.peer_key,
            &self.site.ca,
            &self.site.controlplane.chain,
            &self.site.controlplane.key,
            &self.site.dataplane.chain,
            &self.site.dataplane.key,
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The log level the binaries take for ClusterLink's level names.
pub fn log_filter(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warning => "warn",
        LogLevel::Error | LogLevel::Fatal => "error",
    }
}

/// `<registry>/<name>:<tag>`, or `<name>:<tag>` with no registry.
pub fn image(spec: &InstanceSpec, name: &str) -> String {
    let registry = spec.container_registry.trim_end_matches('/');
    if registry.is_empty() {
        format!("{name}:{}", spec.tag)
    } else {
        format!("{registry}/{name}:{}", spec.tag)
    }
}

/// The ClusterRole and ClusterRoleBinding name: one per ClusterLink namespace.
pub fn cluster_role_name(namespace: &str) -> String {
    format!("{namespace}:{CONTROLPLANE}")
}

fn labels(component: &str, opts: &Options, app: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (LABEL_PART_OF.to_owned(), PART_OF.to_owned()),
        (LABEL_COMPONENT.to_owned(), component.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            opts.managed_by.clone(),
        ),
    ]);
    l.extend(opts.labels.clone());
    if let Some(app) = app {
        l.insert("app".into(), app.into());
    }
    l
}

fn meta(name: &str, namespace: Option<&str>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels),
        ..Default::default()
    }
}

/// The ClusterLink namespace itself (rendered first in `k8s.yaml`).
pub fn namespace(spec: &InstanceSpec, opts: &Options) -> Namespace {
    Namespace {
        metadata: meta(&spec.namespace, None, labels("namespace", opts, None)),
        ..Default::default()
    }
}

fn secret(spec: &InstanceSpec, opts: &Options, name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: meta(
            name,
            Some(&spec.namespace),
            labels("certificates", opts, None),
        ),
        type_: Some("Opaque".into()),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The four certificate Secrets (spec §1.7): `cl-ca`, `cl-controlplane`,
/// `cl-dataplane`, `cl-peer`.
pub fn secrets(spec: &InstanceSpec, opts: &Options, certs: &Certificates) -> Vec<Secret> {
    vec![
        secret(spec, opts, SECRET_CA, &[("ca", &certs.site.ca)]),
        secret(
            spec,
            opts,
            SECRET_CONTROLPLANE,
            &[
                ("cert", &certs.site.controlplane.chain),
                ("key", &certs.site.controlplane.key),
            ],
        ),
        secret(
            spec,
            opts,
            SECRET_DATAPLANE,
            &[
                ("cert", &certs.site.dataplane.chain),
                ("key", &certs.site.dataplane.key),
            ],
        ),
        secret(
            spec,
            opts,
            SECRET_PEER,
            &[
                ("cert.pem", &certs.peer_chain),
                ("key.pem", &certs.peer_key),
                ("ca.pem", &certs.fabric_ca),
            ],
        ),
    ]
}

pub fn service_accounts(spec: &InstanceSpec, opts: &Options) -> Vec<ServiceAccount> {
    vec![
        ServiceAccount {
            metadata: meta(
                CONTROLPLANE,
                Some(&spec.namespace),
                labels("controlplane", opts, None),
            ),
            ..Default::default()
        },
        ServiceAccount {
            metadata: meta(
                DATAPLANE,
                Some(&spec.namespace),
                labels("dataplane", opts, None),
            ),
            automount_service_account_token: Some(false),
            ..Default::default()
        },
    ]
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(own(groups)),
        resources: Some(own(resources)),
        verbs: own(verbs),
        ..Default::default()
    }
}

const READ: &[&str] = &["get", "list", "watch"];

/// What the control plane does in every namespace: read the ClusterLink resources,
/// Services and Pods; write Import specs (target ports) and statuses; manage the
/// import Services; report Events.
pub fn cluster_role(spec: &InstanceSpec, opts: &Options) -> ClusterRole {
    ClusterRole {
        metadata: meta(
            &cluster_role_name(&spec.namespace),
            None,
            labels("rbac", opts, None),
        ),
        rules: Some(vec![
            rule(
                &["clusterlink.net"],
                &[
                    "peers",
                    "exports",
                    "imports",
                    "accesspolicies",
                    "privilegedaccesspolicies",
                ],
                READ,
            ),
            rule(&["clusterlink.net"], &["imports"], &["update", "patch"]),
            rule(
                &["clusterlink.net"],
                &["peers/status", "exports/status", "imports/status"],
                &["get", "update", "patch"],
            ),
            rule(
                &[""],
                &["services"],
                &[
                    "get", "list", "watch", "create", "update", "patch", "delete",
                ],
            ),
            rule(&[""], &["pods"], READ),
            rule(
                &["", "events.k8s.io"],
                &["events"],
                &["create", "update", "patch"],
            ),
        ]),
        ..Default::default()
    }
}

pub fn cluster_role_binding(spec: &InstanceSpec, opts: &Options) -> ClusterRoleBinding {
    let name = cluster_role_name(&spec.namespace);
    ClusterRoleBinding {
        metadata: meta(&name, None, labels("rbac", opts, None)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name,
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: CONTROLPLANE.into(),
            namespace: Some(spec.namespace.clone()),
            ..Default::default()
        }]),
    }
}

/// What the control plane does in the ClusterLink namespace only: the `jwk` Secret
/// and the leader Lease.
pub fn role(spec: &InstanceSpec, opts: &Options) -> Role {
    Role {
        metadata: meta(
            CONTROLPLANE,
            Some(&spec.namespace),
            labels("rbac", opts, None),
        ),
        rules: Some(vec![
            rule(
                &[""],
                &["secrets"],
                &["get", "list", "watch", "create", "update", "patch"],
            ),
            rule(
                &["coordination.k8s.io"],
                &["leases"],
                &["get", "list", "watch", "create", "update", "patch"],
            ),
        ]),
    }
}

pub fn role_binding(spec: &InstanceSpec, opts: &Options) -> RoleBinding {
    RoleBinding {
        metadata: meta(
            CONTROLPLANE,
            Some(&spec.namespace),
            labels("rbac", opts, None),
        ),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: CONTROLPLANE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: CONTROLPLANE.into(),
            namespace: Some(spec.namespace.clone()),
            ..Default::default()
        }]),
    }
}

/// A file of a Secret mounted at `path` (ClusterLink's subPath mounts).
struct File {
    volume: &'static str,
    secret: &'static str,
    key: &'static str,
    path: &'static str,
}

const CP_FILES: &[File] = &[
    File {
        volume: "ca",
        secret: SECRET_CA,
        key: "ca",
        path: fabric::site::CA_PATH,
    },
    File {
        volume: "tls",
        secret: SECRET_CONTROLPLANE,
        key: "cert",
        path: fabric::site::CONTROLPLANE_CERT_PATH,
    },
    File {
        volume: "tls",
        secret: SECRET_CONTROLPLANE,
        key: "key",
        path: fabric::site::CONTROLPLANE_KEY_PATH,
    },
];

const DP_FILES: &[File] = &[
    File {
        volume: "ca",
        secret: SECRET_CA,
        key: "ca",
        path: fabric::site::CA_PATH,
    },
    File {
        volume: "tls",
        secret: SECRET_DATAPLANE,
        key: "cert",
        path: fabric::site::DATAPLANE_CERT_PATH,
    },
    File {
        volume: "tls",
        secret: SECRET_DATAPLANE,
        key: "key",
        path: fabric::site::DATAPLANE_KEY_PATH,
    },
];

/// Volumes and mounts: the site files one by one, and the peer Secret as a
/// directory (so that a rotated peer certificate shows up in the running pod).
fn volumes(files: &[File]) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes: Vec<Volume> = Vec::new();
    let mut mounts = Vec::new();
    for f in files {
        if !volumes.iter().any(|v| v.name == f.volume) {
            volumes.push(Volume {
                name: f.volume.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(f.secret.into()),
                    default_mode: Some(0o400),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        mounts.push(VolumeMount {
            name: f.volume.into(),
            mount_path: f.path.into(),
            sub_path: Some(f.key.into()),
            read_only: Some(true),
            ..Default::default()
        });
    }
    volumes.push(Volume {
        name: "peer-tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(SECRET_PEER.into()),
            default_mode: Some(0o400),
            items: Some(
                ["cert.pem", "key.pem", "ca.pem"]
                    .iter()
                    .map(|k| KeyToPath {
                        key: (*k).into(),
                        path: (*k).into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "peer-tls".into(),
        mount_path: PEER_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    });
    (volumes, mounts)
}

fn peer_args() -> Vec<String> {
    [
        ("--ca-file", "ca.pem"),
        ("--cert-file", "cert.pem"),
        ("--key-file", "key.pem"),
    ]
    .iter()
    .flat_map(|(flag, file)| [(*flag).to_owned(), format!("{PEER_DIR}/{file}")])
    .collect()
}

/// cl-controlplane's arguments in a pod (the namespace and the replica's name come
/// from the environment: `CL_NAMESPACE`, `CL_POD_NAME`).
pub fn controlplane_args(spec: &InstanceSpec) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--platform".into(),
        "k8s".into(),
        "--log-level".into(),
        log_filter(spec.log_level).into(),
        "--grpc-addr".into(),
        format!("0.0.0.0:{GRPC_PORT}"),
        "--admin-addr".into(),
        format!("0.0.0.0:{CONTROLPLANE_ADMIN_PORT}"),
    ];
    a.extend(peer_args());
    for (flag, path) in [
        ("--site-ca-file", fabric::site::CA_PATH),
        ("--site-cert-file", fabric::site::CONTROLPLANE_CERT_PATH),
        ("--site-key-file", fabric::site::CONTROLPLANE_KEY_PATH),
    ] {
        a.extend([flag.to_owned(), path.to_owned()]);
    }
    for (k, v) in &spec.peer_labels {
        a.extend(["--peer-label".to_owned(), format!("{k}={v}")]);
    }
    a
}

/// cl-dataplane's arguments in a pod.
pub fn dataplane_args(spec: &InstanceSpec) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--log-level".into(),
        log_filter(spec.log_level).into(),
        "--controlplane-host".into(),
        format!("{CONTROLPLANE}:{GRPC_PORT}"),
        "--gateway-addr".into(),
        format!("0.0.0.0:{GATEWAY_PORT}"),
        "--admin-addr".into(),
        format!("0.0.0.0:{DATAPLANE_ADMIN_PORT}"),
        "--import-bind".into(),
        "0.0.0.0".into(),
    ];
    a.extend(peer_args());
    for (flag, path) in [
        ("--site-ca-file", fabric::site::CA_PATH),
        ("--site-cert-file", fabric::site::DATAPLANE_CERT_PATH),
        ("--site-key-file", fabric::site::DATAPLANE_KEY_PATH),
    ] {
        a.extend([flag.to_owned(), path.to_owned()]);
    }
    a
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    }
}

fn requests(cpu: &str, memory: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.into())),
            ("memory".to_owned(), Quantity(memory.into())),
        ])),
        ..Default::default()
    }
}

fn hardened() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The non-root user of our images.
pub const IMAGE_USER: i64 = 65532;

struct Plane {
    app: &'static str,
    component: &'static str,
    container: &'static str,
    replicas: i32,
    args: Vec<String>,
    env: Vec<EnvVar>,
    ports: Vec<(&'static str, i32)>,
    admin: &'static str,
    files: &'static [File],
    requests: (&'static str, &'static str),
}

fn deployment(spec: &InstanceSpec, opts: &Options, p: Plane) -> Deployment {
    let selector = BTreeMap::from([("app".to_owned(), p.app.to_owned())]);
    let (volumes, mounts) = volumes(p.files);
    let annotations = opts
        .certificates_hash
        .as_ref()
        .map(|h| BTreeMap::from([(ANNOTATION_CERTS.to_owned(), h.clone())]));
    Deployment {
        metadata: meta(
            p.app,
            Some(&spec.namespace),
            labels(p.component, opts, Some(p.app)),
        ),
        spec: Some(DeploymentSpec {
            replicas: Some(p.replicas.max(1)),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(p.component, opts, Some(p.app))),
                    annotations,
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(p.app.into()),
                    automount_service_account_token: Some(p.app == CONTROLPLANE),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(IMAGE_USER),
                        run_as_group: Some(IMAGE_USER),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![Container {
                        name: p.container.into(),
                        image: Some(image(spec, p.app)),
                        image_pull_policy: Some("IfNotPresent".into()),
                        args: Some(p.args),
                        env: (!p.env.is_empty()).then_some(p.env),
                        ports: Some(
                            p.ports
                                .iter()
                                .map(|(name, port)| ContainerPort {
                                    name: Some((*name).into()),
                                    container_port: *port,
                                    protocol: Some("TCP".into()),
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                        readiness_probe: Some(http_probe("/ready", p.admin, 2)),
                        liveness_probe: Some(Probe {
                            failure_threshold: Some(6),
                            ..http_probe("/live", p.admin, 10)
                        }),
                        resources: Some(requests(p.requests.0, p.requests.1)),
                        security_context: Some(hardened()),
                        volume_mounts: Some(mounts),
                        ..Default::default()
                    }],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn controlplane_deployment(spec: &InstanceSpec, opts: &Options) -> Deployment {
    deployment(
        spec,
        opts,
        Plane {
            app: CONTROLPLANE,
            component: "controlplane",
            container: CONTROLPLANE,
            replicas: opts.controlplane_replicas,
            args: controlplane_args(spec),
            env: vec![
                env_from_field("CL_NAMESPACE", "metadata.namespace"),
                env_from_field("CL_POD_NAME", "metadata.name"),
            ],
            ports: vec![("grpc", GRPC_PORT), ("admin", CONTROLPLANE_ADMIN_PORT)],
            admin: "admin",
            files: CP_FILES,
            requests: ("50m", "64Mi"),
        },
    )
}

pub fn dataplane_deployment(spec: &InstanceSpec, opts: &Options) -> Deployment {
    deployment(
        spec,
        opts,
        Plane {
            app: DATAPLANE,
            component: "dataplane",
            // ClusterLink's container name.
            container: "dataplane",
            replicas: spec.dataplane.replicas,
            args: dataplane_args(spec),
            env: Vec::new(),
            ports: vec![("gateway", GATEWAY_PORT), ("admin", DATAPLANE_ADMIN_PORT)],
            admin: "admin",
            files: DP_FILES,
            requests: ("100m", "64Mi"),
        },
    )
}

fn service_port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Service `cl-controlplane`: where the data planes reach the control plane replicas.
pub fn controlplane_service(spec: &InstanceSpec, opts: &Options) -> Service {
    Service {
        metadata: meta(
            CONTROLPLANE,
            Some(&spec.namespace),
            labels("controlplane", opts, None),
        ),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(BTreeMap::from([(
                "app".to_owned(),
                CONTROLPLANE.to_owned(),
            )])),
            ports: Some(vec![service_port("grpc", GRPC_PORT, GRPC_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The gateway Service `clusterlink` for the ingress type: none for `none`;
/// `NodePort` with the given nodePort (or one the API server picks); `LoadBalancer`
/// on the given port (default 443); with the ingress annotations.
pub fn gateway_service(spec: &InstanceSpec, opts: &Options) -> Option<Service> {
    let ingress = &spec.ingress;
    let (type_, port, node_port) = match ingress.type_ {
        IngressType::None => return None,
        IngressType::NodePort => ("NodePort", 443, (ingress.port != 0).then_some(ingress.port)),
        IngressType::LoadBalancer => (
            "LoadBalancer",
            if ingress.port == 0 { 443 } else { ingress.port },
            None,
        ),
    };
    let mut metadata = meta(
        GATEWAY_SERVICE,
        Some(&spec.namespace),
        labels("gateway", opts, None),
    );
    if !ingress.annotations.is_empty() {
        metadata.annotations = Some(ingress.annotations.clone());
    }
    Some(Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(BTreeMap::from([("app".to_owned(), DATAPLANE.to_owned())])),
            ports: Some(vec![ServicePort {
                node_port,
                ..service_port("https", port, GATEWAY_PORT)
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

// ---------------------------------------------------------------- the operator

/// The operator's own name and namespace (ClusterLink's).
pub const OPERATOR: &str = "cl-operator";
pub const OPERATOR_NAMESPACE: &str = "clusterlink-operator";
pub const OPERATOR_ADMIN_PORT: i32 = 8081;

/// What cl-operator does: reconcile Instances into the objects above. Kubernetes
/// lets it grant the control plane's rights only if it holds them itself, so its
/// role includes those of the control plane's ClusterRole and Role.
pub fn operator_cluster_role(spec: &InstanceSpec, opts: &Options) -> ClusterRole {
    const ALL: &[&str] = &[
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    let mut rules = vec![
        rule(
            &["clusterlink.net"],
            &["instances"],
            &["get", "list", "watch", "update", "patch"],
        ),
        rule(
            &["clusterlink.net"],
            &["instances/status", "instances/finalizers"],
            &["get", "update", "patch"],
        ),
        rule(&["apps"], &["deployments"], ALL),
        rule(&[""], &["services", "serviceaccounts"], ALL),
        rule(&[""], &["secrets"], READ),
        rule(&[""], &["namespaces", "nodes"], READ),
        rule(
            &["rbac.authorization.k8s.io"],
            &[
                "clusterroles",
                "clusterrolebindings",
                "roles",
                "rolebindings",
            ],
            ALL,
        ),
        rule(
            &["coordination.k8s.io"],
            &["leases"],
            &["get", "list", "watch", "create", "update", "patch"],
        ),
    ];
    rules.extend(cluster_role(spec, opts).rules.unwrap_or_default());
    rules.extend(role(spec, opts).rules.unwrap_or_default());
    ClusterRole {
        metadata: meta(OPERATOR, None, labels("operator", opts, None)),
        rules: Some(rules),
        ..Default::default()
    }
}

/// The operator's typed objects besides its Deployment: its namespace,
/// ServiceAccount, ClusterRole and ClusterRoleBinding.
pub struct OperatorRbac {
    pub namespace: Namespace,
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
}

pub fn operator_rbac_objects(spec: &InstanceSpec, opts: &Options) -> OperatorRbac {
    let l = || labels("operator", opts, None);
    OperatorRbac {
        namespace: Namespace {
            metadata: meta(OPERATOR_NAMESPACE, None, l()),
            ..Default::default()
        },
        service_account: ServiceAccount {
            metadata: meta(OPERATOR, Some(OPERATOR_NAMESPACE), l()),
            ..Default::default()
        },
        cluster_role: operator_cluster_role(spec, opts),
        cluster_role_binding: ClusterRoleBinding {
            metadata: meta(OPERATOR, None, l()),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: OPERATOR.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: OPERATOR.into(),
                namespace: Some(OPERATOR_NAMESPACE.into()),
                ..Default::default()
            }]),
        },
    }
}

/// `operator_rbac_objects` as values with apiVersion and kind, in apply order.
pub fn operator_rbac(spec: &InstanceSpec, opts: &Options) -> Result<Vec<serde_json::Value>, Error> {
    let o = operator_rbac_objects(spec, opts);
    Ok(vec![
        value("Namespace", &o.namespace)?,
        value("ServiceAccount", &o.service_account)?,
        value("ClusterRole", &o.cluster_role)?,
        value("ClusterRoleBinding", &o.cluster_role_binding)?,
    ])
}

/// cl-operator's arguments in its pod.
pub fn operator_args(spec: &InstanceSpec) -> Vec<String> {
    vec![
        "--leader-elect".into(),
        "--log-level".into(),
        log_filter(spec.log_level).into(),
        "--admin-addr".into(),
        format!("0.0.0.0:{OPERATOR_ADMIN_PORT}"),
    ]
}

/// Deployment `cl-operator` in `clusterlink-operator` (image from the spec's
/// registry and tag).
pub fn operator_deployment(spec: &InstanceSpec, opts: &Options) -> Deployment {
    let operator_spec = InstanceSpec {
        namespace: OPERATOR_NAMESPACE.into(),
        ..spec.clone()
    };
    let mut d = deployment(
        &operator_spec,
        opts,
        Plane {
            app: OPERATOR,
            component: "operator",
            container: OPERATOR,
            replicas: 1,
            args: operator_args(spec),
            env: vec![
                env_from_field("CL_NAMESPACE", "metadata.namespace"),
                env_from_field("CL_POD_NAME", "metadata.name"),
            ],
            ports: vec![("admin", OPERATOR_ADMIN_PORT)],
            admin: "admin",
            files: &[],
            requests: ("50m", "64Mi"),
        },
    );
    // No certificates: no volumes, and probes on the operator's own paths.
    if let Some(pod) = d.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        pod.volumes = None;
        pod.automount_service_account_token = Some(true);
        if let Some(c) = pod.containers.first_mut() {
            c.volume_mounts = None;
            c.readiness_probe = Some(http_probe("/readyz", "admin", 5));
            c.liveness_probe = Some(Probe {
                failure_threshold: Some(6),
                ..http_probe("/healthz", "admin", 10)
            });
        }
    }
    d
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}

fn value<T: serde::Serialize>(what: &'static str, v: &T) -> Result<serde_json::Value, Error> {
    serde_json::to_value(v).map_err(|source| Error::Serialize { what, source })
}

/// The control plane's identity and rights: both ServiceAccounts, the ClusterRole
/// and Role with their bindings.
pub fn rbac(spec: &InstanceSpec, opts: &Options) -> Result<Vec<serde_json::Value>, Error> {
    let mut out = Vec::new();
    for sa in service_accounts(spec, opts) {
        out.push(value("ServiceAccount", &sa)?);
    }
    out.push(value("ClusterRole", &cluster_role(spec, opts))?);
    out.push(value(
        "ClusterRoleBinding",
        &cluster_role_binding(spec, opts),
    )?);
    out.push(value("Role", &role(spec, opts))?);
    out.push(value("RoleBinding", &role_binding(spec, opts))?);
    Ok(out)
}

/// Everything of a deployment, in ClusterLink's `k8s.yaml` order (Namespace, the
/// Secrets, the Deployments, the Services, RBAC), each with apiVersion and kind.
pub fn all(
    spec: &InstanceSpec,
    opts: &Options,
    certs: &Certificates,
) -> Result<Vec<serde_json::Value>, Error> {
    let mut out = vec![value("Namespace", &namespace(spec, opts))?];
    for s in secrets(spec, opts, certs) {
        out.push(value("Secret", &s)?);
    }
    out.push(value("Deployment", &controlplane_deployment(spec, opts))?);
    out.push(value("Deployment", &dataplane_deployment(spec, opts))?);
    out.push(value("Service", &controlplane_service(spec, opts))?);
    if let Some(s) = gateway_service(spec, opts) {
        out.push(value("Service", &s)?);
    }
    out.extend(rbac(spec, opts)?);
    Ok(out)
}

/// `all` as one multi-document YAML.
pub fn render(spec: &InstanceSpec, opts: &Options, certs: &Certificates) -> Result<String, Error> {
    let mut out = String::new();
    for v in all(spec, opts, certs)? {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&v)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
