//! End-to-end with the real control plane: two peers, each a cl-controlplane and a
//! cl-dataplane (started in-process on port 0, exactly as their binaries start
//! them), configured by YAML files in each peer's resources directory.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use tests::site::*;
use tests::*;

const T: Duration = Duration::from_secs(30);

async fn pair() -> Result<(TempDir, Site, Site, SocketAddr)> {
    let (root, _fabric, a, b, import) = pair_with_fabric().await?;
    Ok((root, a, b, import))
}

async fn pair_with_fabric() -> Result<(TempDir, Fabric, Site, Site, SocketAddr)> {
    init_logs();
    let fabric = Fabric::new("e2e-fabric")?;
    let root = TempDir::new("cl-cp-e2e")?;
    let a = Site::start(&fabric, root.path(), "peer-a", &["site=a"]).await?;
    let b = Site::start(&fabric, root.path(), "peer-b", &["site=b"]).await?;
    let echo = start_echo().await?;
    let port = free_port()?;
    b.write("export.yaml", &export_yaml("echo", echo))?;
    b.write("policy.yaml", ALLOW_ALL)?;
    b.write("peers.yaml", &a.peer_yaml())?;
    a.write("peers.yaml", &b.peer_yaml())?;
    a.write("policy.yaml", ALLOW_ALL)?;
    a.write(
        "import.yaml",
        &import_yaml("echo", port, &["peer-b"], "round-robin"),
    )?;
    Ok((root, fabric, a, b, format!("127.0.0.1:{port}").parse()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectivity_and_status() -> Result<()> {
    let (_root, a, b, import) = pair().await?;
    let peer = wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    ensure!(
        peer["status"]["labels"]["site"] == "b",
        "labels from heartbeats: {peer}"
    );
    wait_condition(&b, "/api/exports/default/echo", "ExportValid", "True").await?;
    wait_condition(
        &a,
        "/api/imports/default/echo",
        "ImportTargetPortValid",
        "True",
    )
    .await?;
    let back = eventually("traffic through the import", T, || async {
        echo_round_trip(import, b"hello fabric")
            .await
            .ok()
            .filter(|b| b == b"hello fabric")
    })
    .await?;
    ensure!(back == b"hello fabric");
    let m = http_get(a.cp.admin_addr, "/metrics").await?.1;
    ensure!(
        metric(&m, "clusterlink_peer_reachable", &["peer=\"peer-b\""]) == 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_on_the_exporter_applies_to_the_next_connection() -> Result<()> {
    let (_root, a, b, import) = pair().await?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    eventually("traffic", T, || async {
        echo_round_trip(import, b"x")
            .await
            .ok()
            .filter(|b| b == b"x")
    })
    .await?;
    // B now denies peer-a explicitly: the cached token must not carry a new connection.
    b.write(
        "deny.yaml",
        "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: deny-a\n  namespace: default\nspec:\n  action: deny\n  from:\n  - workloadSelector:\n      matchLabels:\n        peer.clusterlink.net/name: peer-a\n  to:\n  - workloadSelector: {}\n",
    )?;
    // The design bound is 1 s (250 ms scans by default, 50 ms here, then one push to
    // the data plane); the deadline leaves room for a loaded CI machine running many
    // peers at once.
    eventually(
        "denied promptly after the change",
        Duration::from_secs(3),
        || async {
            match echo_round_trip(import, b"x").await {
                Ok(back) if back == b"x" => None,
                _ => Some(()),
            }
        },
    )
    .await
    .map_err(|_| anyhow!("connections still pass after the deny policy"))?;
    // Removing the deny restores access.
    std::fs::remove_file(b.dir.join("deny.yaml"))?;
    eventually("allowed again", T, || async {
        echo_round_trip(import, b"y")
            .await
            .ok()
            .filter(|b| b == b"y")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resource_is_refused_and_the_last_valid_version_stays() -> Result<()> {
    let (_root, a, _b, import) = pair().await?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    eventually("traffic", T, || async {
        echo_round_trip(import, b"x")
            .await
            .ok()
            .filter(|b| b == b"x")
    })
    .await?;
    // A broken edit of the import (unknown lbScheme) and a file that is not YAML.
    a.write(
        "import.yaml",
        &import_yaml("echo", import.port(), &["peer-b"], "fastest"),
    )?;
    a.write("junk.yaml", "kind: [unclosed")?;
    let errors = eventually("errors reported", T, || async {
        let v = a.get("/api/errors").await.ok()?;
        let list = v["errors"].as_array()?.clone();
        (list.len() >= 2).then_some(list)
    })
    .await?;
    let text = serde_json::to_string(&errors)?;
    ensure!(
        text.contains("lbScheme") && text.contains("fastest"),
        "{text}"
    );
    ensure!(text.contains("junk.yaml"), "{text}");
    // What runs did not change.
    ensure!(echo_round_trip(import, b"still").await? == b"still");
    let imp = a.get("/api/imports/default/echo").await?;
    ensure!(imp["spec"]["lbScheme"] == "round-robin", "{imp}");
    Ok(())
}

/// Raw POST /authz to B's gateway: from a fabric certificate that matches no Peer it
/// is refused; from peer-a claiming to be someone else, the claim is ignored and the
/// token names peer-a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_identity_comes_from_the_certificate() -> Result<()> {
    let (_root, fabric, _a, b, _import) = pair_with_fabric().await?;
    // B must know peer-a (and its export) before peer-a asks.
    eventually("B knows peer-a", T, || async {
        b.get("/api/peers/peer-a").await.ok()
    })
    .await?;
    wait_condition(&b, "/api/exports/default/echo", "ExportValid", "True").await?;
    let body = r#"{"ServiceName":"echo","ServiceNamespace":"default","SrcAttributes":{"peer.clusterlink.net/name":"peer-z"}}"#;
    let req = format!(
        "POST /authz HTTP/1.1\r\nHost: peer-b\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let stranger = fabric.issue("peer-c")?;
    let mut s = tls_connect(
        b.dp.gateway_addr,
        &fabric.ca_pem,
        &stranger,
        "peer-b",
        &[b"http/1.1"],
    )
    .await?;
    let (status, text) = h1_request(&mut s, &req).await?;
    ensure!(status == 403, "unknown peer: {status} {text}");

    let peer_a = fabric.issue("peer-a")?;
    // Once B's data plane has the snapshot with Peer peer-a (its gateway admits only
    // identities that match a Peer), moments after the control plane.
    let last = std::sync::Mutex::new(String::new());
    let head = eventually("peer-a's /authz answered 200", T, || async {
        let mut s = tls_connect(
            b.dp.gateway_addr,
            &fabric.ca_pem,
            &peer_a,
            "peer-b",
            &[b"http/1.1"],
        )
        .await
        .ok()?;
        s_write(&mut s, &req).await.ok()?;
        let head = read_head(&mut s).await.ok()?;
        if let Ok(mut l) = last.lock() {
            l.clone_from(&head);
        }
        head.starts_with("HTTP/1.1 200").then_some(head)
    })
    .await
    .map_err(|e| anyhow!("{e}; last answer: {:?}", last.lock().map(|l| l.clone())))?;
    let token = head
        .lines()
        .find_map(|l| l.strip_prefix("x-access-token: "))
        .ok_or_else(|| anyhow!("no token in {head}"))?;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow!("token shape"))?;
    use base64::Engine as _;
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    ensure!(
        claims["aud"] == "peer-a" && claims["iss"] == "peer-b",
        "token audience must be the mTLS identity, its issuer the exporting peer: {claims}"
    );
    // An export that is not valid is never authorized.
    b.write("bad-export.yaml", "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata:\n  name: nohost\n  namespace: default\nspec:\n  port: 80\n")?;
    wait_condition(&b, "/api/exports/default/nohost", "ExportValid", "False").await?;
    let body = r#"{"ServiceName":"nohost","ServiceNamespace":"default","SrcAttributes":null}"#;
    let req = format!(
        "POST /authz HTTP/1.1\r\nHost: peer-b\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tls_connect(
        b.dp.gateway_addr,
        &fabric.ca_pem,
        &peer_a,
        "peer-b",
        &[b"http/1.1"],
    )
    .await?;
    let (status, text) = h1_request(&mut s, &req).await?;
    ensure!(status == 404, "invalid export: {status} {text}");

    // Policy sees the certificate's name, not the claim: B allows only peer-z, and
    // peer-a claiming to be peer-z is refused.
    b.write(
        "policy.yaml",
        "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: allow-all\n  namespace: default\nspec:\n  action: allow\n  from:\n  - workloadSelector:\n      matchLabels:\n        peer.clusterlink.net/name: peer-z\n  to:\n  - workloadSelector: {}\n",
    )?;
    let body = r#"{"ServiceName":"echo","ServiceNamespace":"default","SrcAttributes":{"peer.clusterlink.net/name":"peer-z"}}"#;
    let req = format!(
        "POST /authz HTTP/1.1\r\nHost: peer-b\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (fabric, b, peer_a, req) = (&fabric, &b, &peer_a, &req);
    eventually("the claim to be peer-z refused", T, || async move {
        let mut s = tls_connect(
            b.dp.gateway_addr,
            &fabric.ca_pem,
            peer_a,
            "peer-b",
            &[b"http/1.1"],
        )
        .await
        .ok()?;
        let (status, _) = h1_request(&mut s, req).await.ok()?;
        (status == 403).then_some(())
    })
    .await?;
    Ok(())
}

async fn s_write<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, text: &str) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    s.write_all(text.as_bytes()).await?;
    Ok(())
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(T, s.read(&mut b)).await??;
        ensure!(n > 0, "closed");
        buf.extend_from_slice(&b[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn peer_with_gateways(name: &str, gateways: &[String]) -> String {
    let mut s = format!(
        "apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata:\n  name: {name}\nspec:\n  gateways:\n"
    );
    for g in gateways {
        let (h, p) = g.rsplit_once(':').unwrap_or((g, "0"));
        s.push_str(&format!("  - host: {h}\n    port: {p}\n"));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_gateways_one_bad() -> Result<()> {
    let (_root, a, b, import) = pair().await?;
    let bad = format!("127.0.0.1:{}", free_port()?);
    let good = b.dp.gateway_addr.to_string();
    a.write(
        "peers.yaml",
        &peer_with_gateways("peer-b", &[bad.clone(), good.clone()]),
    )?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    eventually("first access", T, || async {
        echo_round_trip(import, b"1")
            .await
            .ok()
            .filter(|b| b == b"1")
    })
    .await?;
    for i in 0..10 {
        let msg = format!("access {i}");
        ensure!(
            echo_round_trip(import, msg.as_bytes()).await? == msg.as_bytes(),
            "access {i} failed"
        );
    }
    a.write(
        "peers.yaml",
        &peer_with_gateways("peer-b", std::slice::from_ref(&bad)),
    )?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "False").await?;
    a.write("peers.yaml", &peer_with_gateways("peer-b", &[good, bad]))?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    eventually("access again", T, || async {
        echo_round_trip(import, b"2")
            .await
            .ok()
            .filter(|b| b == b"2")
    })
    .await?;
    for i in 0..10 {
        let msg = format!("again {i}");
        ensure!(
            echo_round_trip(import, msg.as_bytes()).await? == msg.as_bytes(),
            "access {i} failed"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_port_conflict_and_delete() -> Result<()> {
    let (_root, a, _b, import) = pair().await?;
    wait_condition(
        &a,
        "/api/imports/default/echo",
        "ImportTargetPortValid",
        "True",
    )
    .await?;
    eventually("traffic", T, || async {
        echo_round_trip(import, b"x")
            .await
            .ok()
            .filter(|b| b == b"x")
    })
    .await?;
    // imp2 asks for the port echo holds.
    a.write(
        "imp2.yaml",
        &import_yaml("imp2", import.port(), &["peer-b"], "round-robin"),
    )?;
    let v = wait_condition(
        &a,
        "/api/imports/default/imp2",
        "ImportTargetPortValid",
        "False",
    )
    .await?;
    ensure!(
        condition(&v, "ImportServiceValid").as_deref() == Some("False"),
        "{v}"
    );
    ensure!(
        v.to_string()
            .contains("already in use by service default/echo"),
        "{v}"
    );
    // Moving imp2 to a free port makes it valid and listening.
    let port2 = free_port()?;
    a.write(
        "imp2.yaml",
        &import_yaml("imp2", port2, &["peer-b"], "round-robin"),
    )?;
    wait_condition(
        &a,
        "/api/imports/default/imp2",
        "ImportServiceValid",
        "True",
    )
    .await?;
    // Deleting echo closes its listener and releases its port.
    std::fs::remove_file(a.dir.join("import.yaml"))?;
    eventually("listener closed", T, || async {
        tokio::net::TcpStream::connect(import)
            .await
            .is_err()
            .then_some(())
    })
    .await?;
    ensure!(
        a.get("/api/imports/default/echo").await.is_err(),
        "deleted import still listed"
    );
    a.write(
        "imp3.yaml",
        &import_yaml("imp3", import.port(), &["peer-b"], "round-robin"),
    )?;
    wait_condition(
        &a,
        "/api/imports/default/imp3",
        "ImportTargetPortValid",
        "True",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_peer_certificates() -> Result<()> {
    let (_root, a, b, import) = pair().await?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    eventually("traffic", T, || async {
        echo_round_trip(import, b"x")
            .await
            .ok()
            .filter(|b| b == b"x")
    })
    .await?;
    // A moves to a new fabric: A no longer trusts B, nor B A.
    let fabric2 = Fabric::new("e2e-fabric-2")?;
    a.files
        .replace(&fabric2.ca_pem, &fabric2.issue("peer-a")?)?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "False").await?;
    ensure!(refused(import, T).await, "connection not refused");
    // B moves too: reachable again, traffic again.
    b.files
        .replace(&fabric2.ca_pem, &fabric2.issue("peer-b")?)?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    eventually("traffic on the new fabric", T, || async {
        echo_round_trip(import, b"y")
            .await
            .ok()
            .filter(|b| b == b"y")
    })
    .await?;
    Ok(())
}

/// A steady stream of new connections pays no round trip between peers: the token
/// from the first POST /authz is reused, while each connection is still authorized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_cached_between_connections() -> Result<()> {
    let (_root, a, _b, import) = pair().await?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    eventually("traffic", T, || async {
        echo_round_trip(import, b"x")
            .await
            .ok()
            .filter(|b| b == b"x")
    })
    .await?;
    let m = http_get(a.cp.admin_addr, "/metrics").await?.1;
    let calls = metric(
        &m,
        "clusterlink_peer_authorization_requests_total",
        &["peer=\"peer-b\"", "result=\"ok\""],
    );
    let hits = metric(&m, "clusterlink_token_cache_hits_total", &[]);
    for i in 0..20 {
        let msg = format!("conn {i}");
        ensure!(echo_round_trip(import, msg.as_bytes()).await? == msg.as_bytes());
    }
    let m = http_get(a.cp.admin_addr, "/metrics").await?.1;
    let calls2 = metric(
        &m,
        "clusterlink_peer_authorization_requests_total",
        &["peer=\"peer-b\"", "result=\"ok\""],
    );
    let hits2 = metric(&m, "clusterlink_token_cache_hits_total", &[]);
    ensure!(
        calls2 == calls,
        "{} POST /authz for 20 connections with a valid cached token",
        calls2 - calls
    );
    // Each connection is still authorized: by the control plane from its token cache,
    // or by the data plane reusing the control plane's answer (nothing changed since).
    let dp = http_get(a.dp.admin_addr, "/metrics").await?.1;
    let reused = metric(
        &dp,
        "clusterlink_egress_decisions_total",
        &["source=\"cache\""],
    );
    ensure!(
        hits2 - hits + reused >= 20.0 && reused > 0.0,
        "20 connections: {} token-cache hits, {reused} reused answers\n{m}\n{dp}",
        hits2 - hits
    );
    Ok(())
}

/// Several data-plane replicas follow one control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dataplane_replicas_share_a_control_plane() -> Result<()> {
    let (_root, a, _b, import) = pair().await?;
    let mut cfg = gateway_config(&a.files, &a.cp.grpc_endpoint);
    cfg.import_bind = "127.0.0.2".parse()?;
    let replica = dataplane::start(cfg).await?;
    wait_ready(&replica).await?;
    wait_condition(&a, "/api/peers/peer-b", "PeerReachable", "True").await?;
    let second: SocketAddr = format!("127.0.0.2:{}", import.port()).parse()?;
    for addr in [import, second] {
        eventually("traffic through each replica", T, || async move {
            echo_round_trip(addr, b"r").await.ok().filter(|b| b == b"r")
        })
        .await?;
    }
    let m = http_get(a.cp.admin_addr, "/metrics").await?.1;
    ensure!(
        metric(&m, "clusterlink_dataplane_subscribers", &[]) == 2.0,
        "{m}"
    );
    Ok(())
}

/// The local platform's default: the data-plane API on a Unix socket that only its
/// owner can use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataplane_follows_a_control_plane_on_a_unix_socket() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    init_logs();
    let fabric = Fabric::new("uds-fabric")?;
    let root = TempDir::new("cl-uds")?;
    let files = PeerFiles::write(
        &root.path().join("peer-a"),
        &fabric.ca_pem,
        &fabric.issue("peer-a")?,
    )?;
    let socket = root.path().join("run").join("cp.sock");
    let cp = controlplane::start(controlplane::Config {
        grpc_addr: "127.0.0.1:0".parse()?,
        grpc_socket: Some(socket.clone()),
        admin_addr: "127.0.0.1:0".parse()?,
        platform: controlplane::app::Platform::Local,
        resources_dir: Some(root.path().join("resources")),
        namespace: "clusterlink-system".into(),
        identity: None,
        lease_duration_secs: 15,
        site_ca_file: None,
        site_cert_file: None,
        site_key_file: None,
        ca_file: files.ca.clone(),
        cert_file: files.cert.clone(),
        key_file: files.key.clone(),
        token_key_file: None,
        peer_labels: vec![],
        scan_interval_ms: 50,
        peer_timeout_ms: 1000,
        log_level: "info".into(),
    })
    .await?;
    ensure!(
        cp.grpc_endpoint == format!("unix:{}", socket.display()),
        "{}",
        cp.grpc_endpoint
    );
    ensure!(
        std::fs::metadata(&socket)?.permissions().mode() & 0o777 == 0o600,
        "socket not 0600"
    );
    let run = socket.parent().ok_or_else(|| anyhow!("no parent"))?;
    ensure!(
        std::fs::metadata(run)?.permissions().mode() & 0o777 == 0o700,
        "socket directory not 0700"
    );
    let dp = dataplane::start(gateway_config(&files, &cp.grpc_endpoint)).await?;
    wait_ready(&dp).await?;
    let m = http_get(cp.admin_addr, "/metrics").await?.1;
    ensure!(
        metric(&m, "clusterlink_dataplane_subscribers", &[]) == 1.0,
        "{m}"
    );
    Ok(())
}
