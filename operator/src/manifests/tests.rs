use std::collections::BTreeMap;

use clap::Parser as _;
use crds::{DataplaneType, IngressSpec, IngressType, InstanceSpec, LogLevel};
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::*;

type R = Result<(), Box<dyn std::error::Error>>;

fn spec() -> Result<InstanceSpec, serde_json::Error> {
    // As the API server defaults an empty Instance.
    serde_json::from_value(serde_json::json!({}))
}

fn certs() -> Result<Certificates, Box<dyn std::error::Error>> {
    let ca = fabric::certs::fabric_ca("f", fabric::certs::KeyType::EcdsaP256)?;
    let peer = fabric::certs::peer(
        &ca.chain,
        &ca.key,
        "peer-a",
        fabric::certs::KeyType::EcdsaP256,
    )?;
    Ok(Certificates {
        fabric_ca: ca.chain,
        peer_chain: peer.chain,
        peer_key: peer.key,
        site: fabric::certs::site()?,
    })
}

fn container(d: &Deployment) -> Result<&Container, &'static str> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .ok_or("no container")
}

#[test]
fn an_empty_instance_gives_clusterlinks_defaults() -> R {
    let spec = spec()?;
    let opts = Options::default();
    let cp = controlplane_deployment(&spec, &opts);
    let dp = dataplane_deployment(&spec, &opts);
    assert_eq!(
        container(&cp)?.image.as_deref(),
        Some("cl-controlplane:latest")
    );
    assert_eq!(
        container(&dp)?.image.as_deref(),
        Some("cl-dataplane:latest")
    );
    assert_eq!(container(&dp)?.name, "dataplane");
    assert_eq!(dp.spec.as_ref().and_then(|s| s.replicas), Some(1));
    assert_eq!(cp.metadata.namespace.as_deref(), Some("clusterlink-system"));
    let args = container(&cp)?.args.clone().unwrap_or_default();
    assert_eq!(args[..4], ["--platform", "k8s", "--log-level", "info"]);
    assert!(
        gateway_service(&spec, &opts).is_none(),
        "ingress none: no Service"
    );
    assert_eq!(
        cluster_role(&spec, &opts).metadata.name.as_deref(),
        Some("clusterlink-system:cl-controlplane")
    );
    Ok(())
}

#[test]
fn registry_tag_replicas_and_log_level_follow_the_instance() -> R {
    let mut spec = spec()?;
    spec.container_registry = "quay.com/".into();
    spec.tag = "v0.0.1".into();
    spec.dataplane.type_ = DataplaneType::Go;
    spec.dataplane.replicas = 2;
    spec.log_level = LogLevel::Warning;
    spec.namespace = "team-a".into();
    spec.peer_labels = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
    let opts = Options {
        controlplane_replicas: 3,
        ..Options::default()
    };
    let cp = controlplane_deployment(&spec, &opts);
    let dp = dataplane_deployment(&spec, &opts);
    assert_eq!(
        container(&cp)?.image.as_deref(),
        Some("quay.com/cl-controlplane:v0.0.1")
    );
    assert_eq!(
        container(&dp)?.image.as_deref(),
        Some("quay.com/cl-dataplane:v0.0.1")
    );
    assert_eq!(dp.spec.as_ref().and_then(|s| s.replicas), Some(2));
    assert_eq!(cp.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let args = container(&cp)?.args.clone().unwrap_or_default();
    assert!(
        args.windows(2).any(|w| w == ["--log-level", "warn"]),
        "{args:?}"
    );
    assert!(
        args.windows(2).any(|w| w == ["--peer-label", "env=prod"]),
        "{args:?}"
    );
    assert_eq!(
        cluster_role(&spec, &opts).metadata.name.as_deref(),
        Some("team-a:cl-controlplane")
    );
    let binding = cluster_role_binding(&spec, &opts);
    let subject = binding
        .subjects
        .as_ref()
        .and_then(|s| s.first())
        .ok_or("no subject")?;
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("cl-controlplane", Some("team-a"))
    );
    Ok(())
}

/// The arguments are the binaries' own flags: they parse with cl-controlplane's and
/// cl-dataplane's command lines, to the values the pod needs.
#[test]
fn the_arguments_parse_as_the_binaries_flags() -> R {
    let mut spec = spec()?;
    spec.peer_labels = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
    let cp = controlplane::Config::try_parse_from(
        std::iter::once("cl-controlplane".to_owned()).chain(controlplane_args(&spec)),
    )?;
    assert_eq!(cp.platform, controlplane::app::Platform::K8s);
    assert_eq!(cp.grpc_addr.port(), GRPC_PORT as u16);
    assert!(cp.grpc_addr.ip().is_unspecified());
    let site = cp.site_paths().ok_or("no site TLS")?;
    assert_eq!(
        site.cert.to_str(),
        Some(fabric::site::CONTROLPLANE_CERT_PATH)
    );
    assert_eq!(cp.peer_labels, ["env=prod"]);
    assert_eq!(cp.cert_file.to_str(), Some("/etc/ssl/certs/clink/cert.pem"));

    let dp = dataplane::Config::try_parse_from(
        std::iter::once("cl-dataplane".to_owned()).chain(dataplane_args(&spec)),
    )?;
    assert_eq!(
        dp.controlplane_host.as_deref(),
        Some("cl-controlplane:4444")
    );
    let site = dp.site_paths().ok_or("no site TLS")?;
    assert_eq!(site.cert.to_str(), Some(fabric::site::DATAPLANE_CERT_PATH));
    assert_eq!(dp.gateway_addr.port(), GATEWAY_PORT as u16);
    assert_eq!(dp.admin_addr.port(), DATAPLANE_ADMIN_PORT as u16);
    Ok(())
}

#[test]
fn the_gateway_service_follows_the_ingress() -> R {
    let mut spec = spec()?;
    let opts = Options::default();
    spec.ingress = IngressSpec {
        type_: IngressType::LoadBalancer,
        port: 0,
        annotations: BTreeMap::from([("cloud/lb".to_owned(), "internal".to_owned())]),
    };
    let s = gateway_service(&spec, &opts).ok_or("no Service")?;
    let ss = s.spec.as_ref().ok_or("no spec")?;
    assert_eq!(ss.type_.as_deref(), Some("LoadBalancer"));
    let port = ss.ports.as_ref().and_then(|p| p.first()).ok_or("no port")?;
    assert_eq!((port.port, port.node_port), (443, None));
    assert_eq!(port.target_port, Some(IntOrString::Int(GATEWAY_PORT)));
    assert_eq!(
        s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("cloud/lb"))
            .map(String::as_str),
        Some("internal")
    );

    spec.ingress = IngressSpec {
        type_: IngressType::NodePort,
        port: 30444,
        annotations: BTreeMap::new(),
    };
    let s = gateway_service(&spec, &opts).ok_or("no Service")?;
    let ss = s.spec.as_ref().ok_or("no spec")?;
    assert_eq!(ss.type_.as_deref(), Some("NodePort"));
    let port = ss.ports.as_ref().and_then(|p| p.first()).ok_or("no port")?;
    assert_eq!((port.port, port.node_port), (443, Some(30444)));
    assert!(s.metadata.annotations.is_none());
    Ok(())
}

/// DNS SANs, is a CA, server auth, client auth.
type Profile = (Vec<String>, bool, bool, bool);

fn san_and_usage(pem: &str) -> Result<Profile, Box<dyn std::error::Error>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())?;
    let c = p.parse_x509()?;
    let mut sans = Vec::new();
    let (mut server, mut client) = (false, false);
    for ext in c.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(s) => {
                for n in &s.general_names {
                    if let GeneralName::DNSName(d) = n {
                        sans.push((*d).to_owned());
                    }
                }
            }
            ParsedExtension::ExtendedKeyUsage(e) => {
                server = e.server_auth;
                client = e.client_auth;
            }
            _ => {}
        }
    }
    Ok((sans, c.is_ca(), server, client))
}

#[test]
fn the_secrets_hold_the_certificates_under_clusterlinks_keys() -> R {
    let spec = spec()?;
    let certs = certs()?;
    let secrets = secrets(&spec, &Options::default(), &certs);
    let get = |name: &str, key: &str| -> Result<String, Box<dyn std::error::Error>> {
        let s = secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .ok_or(format!("no Secret {name}"))?;
        let v = s
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or(format!("{name} has no {key}"))?;
        Ok(String::from_utf8(v.0.clone())?)
    };
    let (_, ca, _, _) = san_and_usage(&get("cl-ca", "ca")?)?;
    assert!(ca, "cl-ca holds a CA");
    assert_eq!(
        san_and_usage(&get("cl-controlplane", "cert")?)?,
        (vec!["cl-controlplane".to_owned()], false, true, false)
    );
    assert_eq!(
        san_and_usage(&get("cl-dataplane", "cert")?)?,
        (vec!["cl-dataplane".to_owned()], false, false, true)
    );
    assert!(get("cl-controlplane", "key")?.contains("PRIVATE KEY"));
    assert_eq!(get("cl-peer", "cert.pem")?, certs.peer_chain);
    assert_eq!(get("cl-peer", "ca.pem")?, certs.fabric_ca);
    assert_eq!(get("cl-peer", "key.pem")?, certs.peer_key);
    assert_eq!(san_and_usage(&get("cl-peer", "cert.pem")?)?.0, ["peer-a"]);
    Ok(())
}

#[test]
fn the_rendered_yaml_is_clusterlinks_order_with_kinds() -> R {
    let spec = serde_json::from_value::<InstanceSpec>(
        serde_json::json!({"ingress": {"type": "NodePort", "port": 30443}}),
    )?;
    let certs = certs()?;
    let opts = Options {
        certificates_hash: Some(certs.hash()),
        ..Options::default()
    };
    let yaml = render(&spec, &opts, &certs)?;
    let kinds: Vec<String> = yaml
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            let v: serde_json::Value = serde_yaml_ng::from_str(d)?;
            Ok(format!(
                "{}/{}",
                v["kind"].as_str().unwrap_or("?"),
                v["metadata"]["name"].as_str().unwrap_or("?")
            ))
        })
        .collect::<Result<_, serde_yaml_ng::Error>>()?;
    assert_eq!(
        kinds,
        [
            "Namespace/clusterlink-system",
            "Secret/cl-ca",
            "Secret/cl-controlplane",
            "Secret/cl-dataplane",
            "Secret/cl-peer",
            "Deployment/cl-controlplane",
            "Deployment/cl-dataplane",
            "Service/cl-controlplane",
            "Service/clusterlink",
            "ServiceAccount/cl-controlplane",
            "ServiceAccount/cl-dataplane",
            "ClusterRole/clusterlink-system:cl-controlplane",
            "ClusterRoleBinding/clusterlink-system:cl-controlplane",
            "Role/cl-controlplane",
            "RoleBinding/cl-controlplane",
        ]
    );
    assert!(
        yaml.contains(&certs.hash()),
        "the pod templates carry the certificates' hash"
    );
    Ok(())
}

#[test]
fn new_certificates_change_the_hash() -> R {
    let (a, b) = (certs()?, certs()?);
    assert_ne!(a.hash(), b.hash());
    assert_eq!(a.hash(), a.hash());
    Ok(())
}

#[test]
fn the_operator_runs_in_its_namespace_with_its_own_image() -> R {
    let mut spec = spec()?;
    spec.container_registry = "quay.com".into();
    spec.tag = "v3".into();
    let opts = Options::default();
    let d = operator_deployment(&spec, &opts);
    assert_eq!(d.metadata.namespace.as_deref(), Some(OPERATOR_NAMESPACE));
    let c = container(&d)?;
    assert_eq!(c.image.as_deref(), Some("quay.com/cl-operator:v3"));
    assert!(
        c.volume_mounts.is_none(),
        "the operator mounts no certificates"
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.as_deref()),
        Some("/readyz")
    );
    // It can grant what the control plane's roles grant only by holding it.
    let held = operator_cluster_role(&spec, &opts)
        .rules
        .unwrap_or_default();
    for r in cluster_role(&spec, &opts)
        .rules
        .unwrap_or_default()
        .into_iter()
        .chain(role(&spec, &opts).rules.unwrap_or_default())
    {
        assert!(held.contains(&r), "the operator lacks {r:?}");
    }
    Ok(())
}
