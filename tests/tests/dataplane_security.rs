//! Gateway security: certificates from another CA, a name that is not the peer
//! dialed, and forged, expired or foreign tokens are all refused; refusals close only
//! their own connection.

use std::time::Duration;

use anyhow::{ensure, Result};
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// A client whose connection the gateway refuses sees it closed or reset, never served.
async fn refused_through_import(pair: &Pair) -> Result<()> {
    ensure!(
        refused(pair.import, T).await,
        "connection through the import was served"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let other = Fabric::new("other-fabric")?;
    // A client certificate from another fabric, presented to B.
    let stranger = other.issue(PEER_A)?;
    let r = tls_connect(
        pair.b().gateway_addr,
        &pair.fabric.ca_pem,
        &stranger,
        PEER_B,
        &[b"http/1.1"],
    )
    .await;
    let refused = match r {
        Err(_) => true,
        // TLS 1.3: the server's refusal of the client certificate arrives after the
        // client finished its side of the handshake.
        Ok(mut s) => {
            let _ = s
                .write_all(connect_head(Some(&token_for(PEER_A, 60, 1))).as_bytes())
                .await;
            closed_by_peer(&mut s, T).await
        }
    };
    ensure!(refused, "B accepted a client certificate from another CA");
    // A server certificate from another fabric: our client refuses it.
    let r = tls_connect(
        pair.b().gateway_addr,
        &other.ca_pem,
        &other.issue(PEER_A)?,
        PEER_B,
        &[],
    )
    .await;
    ensure!(
        r.is_err(),
        "a client trusting another CA accepted B's certificate"
    );

    // A moves to another fabric: A and B refuse each other, and A's client is reset.
    let a_other = other.issue(PEER_A)?;
    pair.files_a.replace(&other.ca_pem, &a_other)?;
    let admin = pair.a().admin_addr;
    eventually("A reloads its certificates", T, || async move {
        let m = http_get(admin, "/metrics").await.ok()?.1;
        (metric(
            &m,
            "clusterlink_certificate_reloads_total",
            &["result=\"ok\""],
        ) >= 1.0)
            .then_some(())
    })
    .await?;
    refused_through_import(&pair).await?;
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"error\""]
        ) >= 1.0,
        "{m}"
    );
    let m = metrics_of(pair.b()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_gateway_rejected_total",
            &["reason=\"tls_handshake\""]
        ) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabric_certificate_with_the_wrong_name_is_refused() -> Result<()> {
    // B holds a valid fabric certificate, but for "peer-x"; A dials "peer-b".
    let pair = Pair::start(Options {
        cert_name_b: Some("peer-x".into()),
        ..Default::default()
    })
    .await?;
    refused_through_import(&pair).await?;
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"error\""]
        ) >= 1.0,
        "{m}"
    );
    ensure!(
        metric(
            &m,
            "clusterlink_tunnel_handshakes_total",
            &["side=\"client\"", "result=\"ok\""]
        ) == 0.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_refused() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let expired = pair.fabric.issue_with(PEER_A, Some((2020, 1, 1)))?;
    let r = tls_connect(
        pair.b().gateway_addr,
        &pair.fabric.ca_pem,
        &expired,
        PEER_B,
        &[],
    )
    .await;
    let refused = match r {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s
                .write_all(connect_head(Some(&token_for(PEER_A, 60, 1))).as_bytes())
                .await;
            closed_by_peer(&mut s, T).await
        }
    };
    ensure!(refused, "B accepted an expired client certificate");
    Ok(())
}

/// Raw HTTP/1.1 CONNECTs to B with A's valid certificate and various tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_foreign_tokens_are_refused() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let cert_a = pair.fabric.issue(PEER_A)?;
    let claims = |aud: &str, exp: u64, name: &str, epoch: u64| fabric::token::Claims {
        iss: PEER_B.into(),
        aud: aud.into(),
        export_namespace: NS.into(),
        export_name: name.into(),
        exp,
        epoch,
    };
    let now = fabric::clock::unix_secs();
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("missing", None, 400),
        (
            "forged",
            Some(fabric::token::mint(
                b"not-the-key-not-the-key-not-the!",
                &claims(PEER_A, now + 60, SERVICE, 1),
            )),
            403,
        ),
        (
            "expired",
            Some(fabric::token::mint(
                TOKEN_KEY,
                &claims(PEER_A, now - 1, SERVICE, 1),
            )),
            403,
        ),
        (
            "issued to another peer",
            Some(token_for("peer-c", 60, 1)),
            403,
        ),
        ("older policy epoch", Some(token_for(PEER_A, 60, 0)), 403),
        (
            "issued by another peer with the same key",
            Some(token_by("peer-c", PEER_A, 60, 1)),
            403,
        ),
        ("garbage", Some("a.b.c".into()), 403),
        (
            "unknown export",
            Some(fabric::token::mint(
                TOKEN_KEY,
                &claims(PEER_A, now + 60, "nope", 1),
            )),
            404,
        ),
    ];
    for (what, token, want) in cases {
        let mut s = tls_connect(
            pair.b().gateway_addr,
            &pair.fabric.ca_pem,
            &cert_a,
            PEER_B,
            &[b"http/1.1"],
        )
        .await?;
        let (status, body) = h1_request(&mut s, &connect_head(token.as_deref())).await?;
        ensure!(status == want, "{what}: got {status} {body:?}, want {want}");
    }
    // A valid token still works: the refusals broke nothing.
    let mut s = tls_connect(
        pair.b().gateway_addr,
        &pair.fabric.ca_pem,
        &cert_a,
        PEER_B,
        &[b"http/1.1"],
    )
    .await?;
    let (status, _) = h1_request(&mut s, &connect_head(Some(&token_for(PEER_A, 60, 1)))).await?;
    ensure!(status == 200, "valid token refused: {status}");
    s.write_all(b"through").await?;
    let mut b = [0u8; 7];
    tokio::time::timeout(T, s.read_exact(&mut b)).await??;
    ensure!(&b == b"through");
    let m = metrics_of(pair.b()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_authorization_denials_total",
            &["direction=\"inbound\""]
        ) >= 7.0,
        "{m}"
    );
    Ok(())
}

/// A forged token from A's control plane: B refuses, A reports it and retries once
/// with a fresh answer, then resets the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_token_is_reported_and_the_client_reset() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    pair.cp_a
        .set_egress(|_| controlplane_api::v1::EgressResponse {
            allowed: true,
            peer: PEER_B.into(),
            access_token: token_for(PEER_A, 60, 0), // an epoch B no longer accepts
            expires_unix_ms: ((fabric::clock::unix_secs() + 60) * 1000) as i64,
            reusable: true,
            ..Default::default()
        });
    ensure!(refused(pair.import, T).await, "client not reset");
    ensure!(
        pair.cp_a.egress_calls() == 2,
        "expected one retry, got {} calls",
        pair.cp_a.egress_calls()
    );
    ensure!(
        pair.cp_a.rejected_tokens().len() == 1,
        "rejected token not reported"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_denial_resets_the_client() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    pair.cp_a
        .set_egress(|_| controlplane_api::v1::EgressResponse {
            allowed: false,
            reason: "denied by policy".into(),
            ..Default::default()
        });
    ensure!(refused(pair.import, T).await, "client not reset");
    let m = metrics_of(pair.a()).await?;
    ensure!(
        metric(
            &m,
            "clusterlink_authorization_denials_total",
            &["direction=\"outbound\"", "reason=\"policy\""]
        ) == 1.0,
        "{m}"
    );
    Ok(())
}

/// Peer-request bodies have the same limits on both HTTP versions: a declared length
/// over the limit is refused at once (413) and a body that does not arrive gets 408
/// within the handshake timeout (2 s here); an HTTP/1.1 connection then closes, as it
/// cannot carry another request. Before, HTTP/1.1 waited for the declared 100 GB
/// forever, and h2 answered 408 only after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_request_bodies_are_bounded_on_both_http_versions() -> Result<()> {
    let pair = Pair::start(Options::default()).await?;
    let cert_a = pair.fabric.issue(PEER_A)?;
    let gw = pair.b().gateway_addr;
    let cases = [("99999999999", 413), ("100", 408)];
    for (len, want) in cases {
        let mut s = tls_connect(gw, &pair.fabric.ca_pem, &cert_a, PEER_B, &[b"http/1.1"]).await?;
        let t = std::time::Instant::now();
        let (status, body) = h1_request(
            &mut s,
            &format!("POST /authz HTTP/1.1\r\nHost: {PEER_B}\r\nContent-Length: {len}\r\n\r\nab"),
        )
        .await?;
        let took = t.elapsed();
        ensure!(
            status == want,
            "HTTP/1.1, Content-Length {len}: {status} {body:?}"
        );
        if want == 413 {
            ensure!(took < Duration::from_secs(1), "413 only after {took:?}");
        }
        ensure!(
            closed_by_peer(&mut s, Duration::from_secs(5)).await,
            "HTTP/1.1 connection left open after {want}"
        );
    }
    let tls = tls_connect(gw, &pair.fabric.ca_pem, &cert_a, PEER_B, &[b"h2"]).await?;
    let (client, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(conn);
    for (len, want) in cases {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://{PEER_B}/authz"))
            .header("content-length", len)
            .body(())?;
        let (resp, mut send) = client.clone().ready().await?.send_request(req, false)?;
        send.send_data(bytes::Bytes::from_static(b"ab"), false)?;
        let t = std::time::Instant::now();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp).await??;
        let took = t.elapsed();
        ensure!(
            resp.status() == want,
            "h2, content-length {len}: {}",
            resp.status()
        );
        if want == 413 {
            ensure!(took < Duration::from_secs(1), "413 only after {took:?}");
        }
    }
    let m = metrics_of(pair.b()).await?;
    for (reason, n) in [("body", 2.0), ("body_timeout", 2.0)] {
        let got = metric(
            &m,
            "clusterlink_gateway_rejected_total",
            &[&format!("reason=\"{reason}\"")],
        );
        ensure!(got == n, "rejected {reason}: {got}, want {n}\n{m}");
    }
    Ok(())
}

/// Refusals tell the remote peer the category, not this side's internals: no peer
/// names from token claims, no export host or port, no error texts. Before, a token
/// issued to another peer was answered with both peers' names, and an unreachable
/// export with its internal address and the OS error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_tell_the_remote_no_internal_detail() -> Result<()> {
    // The export's target is a port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let pair = Pair::start_with_target(Options::default(), closed).await?;
    let cert_a = pair.fabric.issue(PEER_A)?;
    let cases = [
        ("issued to another peer", token_for("peer-c", 60, 1), 403),
        ("older policy epoch", token_for(PEER_A, 60, 0), 403),
        ("valid, target down", token_for(PEER_A, 60, 1), 502),
    ];
    let internal = [
        "peer-c".to_owned(),
        PEER_A.to_owned(),
        closed.to_string(),
        closed.port().to_string(),
        "refused".to_owned(),
        "epoch 0".to_owned(),
    ];
    for (what, token, want) in cases {
        let mut s = tls_connect(
            pair.b().gateway_addr,
            &pair.fabric.ca_pem,
            &cert_a,
            PEER_B,
            &[b"http/1.1"],
        )
        .await?;
        let (status, body) = h1_request(&mut s, &connect_head(Some(&token))).await?;
        ensure!(status == want, "{what}: {status} {body:?}, want {want}");
        ensure!(!body.is_empty(), "{what}: no reason at all");
        for secret in &internal {
            ensure!(
                !body.contains(secret.as_str()),
                "{what}: the refusal tells the remote {secret:?}: {body:?}"
            );
        }
    }
    Ok(())
}

/// Admission on the gateway port. A valid fabric certificate that matches no Peer
/// (a stranger) gets `GET /healthz` only, from a rate-limited pool; no tunnel, no
/// `/authz`, no mux connection. A known peer is bounded in connections, concurrent
/// streams and peer requests per second, and reaching its bounds does not affect
/// another peer. Connections with no stream are closed after the idle timeout (GOAWAY
/// first), and the importing side's pool recovers from that. Before, a stranger could
/// tunnel with any token it held, hold idle connections and send requests without
/// bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_bounds_each_peer_and_strangers_get_healthz_only() -> Result<()> {
    const PEER_C: &str = "peer-c";
    let pair = Pair::start(Options {
        config_b: Some(|c| {
            c.max_connections_per_peer = 3;
            c.max_streams_per_peer = 4;
            c.peer_requests_per_sec = 5;
            c.idle_timeout = 1.0;
        }),
        ..Default::default()
    })
    .await?;
    pair.cp_b.update_snapshot(|s| {
        s.version += 1;
        s.peers.push(controlplane_api::v1::Peer {
            name: PEER_C.into(),
            gateways: vec![],
            protocol: 0,
        });
    });
    let gw = pair.b().gateway_addr;
    let ca = pair.fabric.ca_pem.clone();
    let (stranger, cert_c, cert_a) = (
        pair.fabric.issue("peer-x")?,
        pair.fabric.issue(PEER_C)?,
        pair.fabric.issue(PEER_A)?,
    );
    let healthz = format!("GET /healthz HTTP/1.1\r\nHost: {PEER_B}\r\n\r\n");
    let authz = format!("POST /authz HTTP/1.1\r\nHost: {PEER_B}\r\nContent-Length: 2\r\n\r\n{{}}");
    // B learns of peer C: its /authz reaches the (fake) control plane, which has no
    // route for it (404), instead of being refused by admission (403).
    eventually("B knows peer C", T, || {
        let (ca, cert_c, authz) = (ca.clone(), cert_c.clone(), authz.clone());
        async move {
            let mut s = tls_connect(gw, &ca, &cert_c, PEER_B, &[b"http/1.1"])
                .await
                .ok()?;
            let (status, _) = h1_request(&mut s, &authz).await.ok()?;
            (status == 404).then_some(())
        }
    })
    .await?;

    // The stranger: /healthz yes; /authz, CONNECT and mux no.
    let mut s = tls_connect(gw, &ca, &stranger, PEER_B, &[b"http/1.1"]).await?;
    let (status, _) = h1_request(&mut s, &healthz).await?;
    ensure!(status == 200, "stranger's /healthz: {status}");
    for (what, head) in [
        ("/authz", authz.clone()),
        ("CONNECT", connect_head(Some(&token_for("peer-x", 60, 1)))),
    ] {
        let mut s = tls_connect(gw, &ca, &stranger, PEER_B, &[b"http/1.1"]).await?;
        let (status, body) = h1_request(&mut s, &head).await?;
        ensure!(status == 403, "stranger's {what}: {status} {body:?}");
    }
    let mut m = tls_connect(gw, &ca, &stranger, PEER_B, &[fabric::wire::ALPN_MUX]).await?;
    ensure!(
        closed_by_peer(&mut m, Duration::from_secs(5)).await,
        "a stranger's mux connection was kept"
    );
    // Its /healthz are rate-limited (all strangers together).
    let mut limited = false;
    for _ in 0..40 {
        let (status, _) = h1_request(&mut s, &healthz).await?;
        if status == 429 {
            limited = true;
            break;
        }
        ensure!(status == 200, "stranger's /healthz: {status}");
    }
    ensure!(limited, "40 /healthz from a stranger at once, none refused");

    // Peer C at its bounds: connections, streams, requests.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls_connect(gw, &ca, &cert_c, PEER_B, &[b"h2"]).await?);
    }
    let mut fourth = tls_connect(gw, &ca, &cert_c, PEER_B, &[b"h2"]).await?;
    ensure!(
        closed_by_peer(&mut fourth, Duration::from_secs(5)).await,
        "a fourth connection from peer C was kept"
    );
    let (h2c, conn) = h2::client::handshake(held.remove(0)).await?;
    tokio::spawn(conn);
    let connect = || {
        http::Request::builder()
            .method("CONNECT")
            .uri(format!("{PEER_B}:443"))
            .header(
                "authorization",
                format!("Bearer {}", token_for(PEER_C, 60, 1)),
            )
            .body(())
    };
    let mut streams = Vec::new();
    for i in 0..5 {
        let (resp, send) = h2c.clone().ready().await?.send_request(connect()?, false)?;
        let resp = tokio::time::timeout(T, resp).await??;
        let want = if i < 4 { 200 } else { 503 };
        ensure!(
            resp.status() == want,
            "peer C's stream {i}: {}",
            resp.status()
        );
        if i < 4 {
            streams.push((resp.into_body(), send));
        }
    }
    let get = || {
        http::Request::builder()
            .uri(format!("https://{PEER_B}/healthz"))
            .body(())
    };
    let mut limited = false;
    for _ in 0..30 {
        let (resp, _) = h2c.clone().ready().await?.send_request(get()?, true)?;
        match tokio::time::timeout(T, resp).await??.status().as_u16() {
            429 => {
                limited = true;
                break;
            }
            200 => {}
            other => anyhow::bail!("peer C's /healthz: {other}"),
        }
    }
    ensure!(limited, "30 /healthz from peer C at once, none refused");

    // Meanwhile peer A is served: its tunnels and its requests.
    let back = echo_round_trip(pair.import, b"from A while C is at its bounds").await?;
    ensure!(back == b"from A while C is at its bounds");
    let mut s = tls_connect(gw, &ca, &cert_a, PEER_B, &[b"http/1.1"]).await?;
    let (status, _) = h1_request(&mut s, &healthz).await?;
    ensure!(
        status == 200,
        "peer A's /healthz while C is limited: {status}"
    );

    // Idle: a mux and an h2 connection with no stream are closed after about 1 s;
    // peer C's h2 connection with streams open is not.
    let idle_h2 = tls_connect(gw, &ca, &cert_a, PEER_B, &[b"h2"]).await?;
    let (_idle_h2c, idle_conn) = h2::client::handshake(idle_h2).await?;
    let idle_conn = tokio::spawn(idle_conn);
    let mux_tls = tls_connect(gw, &ca, &cert_a, PEER_B, &[fabric::wire::ALPN_MUX]).await?;
    let (mux, driver) = dataplane::mux::Client::new(mux_tls);
    let driver = tokio::spawn(driver);
    let t = std::time::Instant::now();
    let _ = tokio::time::timeout(T, idle_conn)
        .await
        .map_err(|_| anyhow::anyhow!("an idle h2 connection was kept"))?;
    // The driver ends with the connection (an error or not: it was closed under it).
    let _ = tokio::time::timeout(T, driver)
        .await
        .map_err(|_| anyhow::anyhow!("an idle mux connection was kept"))??;
    ensure!(mux.is_dead(), "mux client not told to go away");
    ensure!(
        t.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        t.elapsed()
    );
    // Peer C's connection, quiet all that time but with streams open, still carries.
    let (recv, send) = &mut streams[0];
    send.send_data(bytes::Bytes::from_static(b"still here"), false)?;
    let mut got = Vec::new();
    while got.len() < 10 {
        match tokio::time::timeout(T, recv.data()).await? {
            Some(chunk) => got.extend_from_slice(&chunk?),
            None => anyhow::bail!("peer C's stream ended"),
        }
    }
    ensure!(got == b"still here", "{got:?}");
    // A's own pooled connection went idle too; A's next connection gets a new one.
    let back = echo_round_trip(pair.import, b"after the idle close").await?;
    ensure!(back == b"after the idle close");

    let m = metrics_of(pair.b()).await?;
    for reason in [
        "unknown_peer",
        "connection_limit",
        "stream_limit",
        "rate_limited",
    ] {
        let n = metric(
            &m,
            "clusterlink_gateway_rejected_total",
            &[&format!("reason=\"{reason}\"")],
        );
        ensure!(n >= 1.0, "rejected {reason}: {n}\n{m}");
    }
    // Counted once the gateway's side of each connection has finished closing.
    let b = pair.b();
    eventually("idle closes counted", T, || async move {
        let m = metrics_of(b).await.ok()?;
        ["mux", "h2"]
            .iter()
            .all(|p| {
                metric(
                    &m,
                    "clusterlink_gateway_idle_closed_total",
                    &[&format!("protocol=\"{p}\"")],
                ) >= 1.0
            })
            .then_some(())
    })
    .await?;
    Ok(())
}
