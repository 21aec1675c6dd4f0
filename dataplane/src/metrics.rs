//! The gateway's Prometheus metrics, in a registry the app owns. Every name starts with
//! `clusterlink_`; labels are bounded (direction, service, peer, reason, result), and a
//! client address is never a label.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// Opened connections by direction (inbound/outbound) and service (ns/name).
    pub conns_opened: IntCounterVec,
    /// Closed connections by direction, service and reason.
    pub conns_closed: IntCounterVec,
    pub conns_active: IntGaugeVec,
    /// Bytes by direction, service and flow (to_target / from_target).
    pub bytes: IntCounterVec,
    /// TLS handshakes by side (client/server) and result.
    pub handshakes: IntCounterVec,
    /// Authorization denials by direction and reason.
    pub denials: IntCounterVec,
    /// Connection setup latency (accept until the tunnel carries bytes), by direction.
    pub setup_seconds: HistogramVec,
    /// Connections, streams and requests on the gateway port refused, by reason (bad
    /// input, unknown peer, over a limit).
    pub rejected: IntCounterVec,
    /// Gateway connections closed after their idle timeout, by protocol (mux, h2).
    pub idle_closed: IntCounterVec,
    /// Established tunnels closed because a new configuration no longer allows them.
    pub revoked: IntCounterVec,
    /// 1 while the configuration stream to the control plane is up.
    pub cp_connected: IntGauge,
    pub cp_reconnects: IntCounter,
    pub snapshot_version: IntGauge,
    /// Snapshot items refused by validation, by kind.
    pub snapshot_rejected: IntCounterVec,
    pub cert_reloads: IntCounterVec,
    pub cert_not_after: IntGauge,
    /// Pooled HTTP/2 tunnels currently open.
    pub tunnels_open: IntGauge,
    /// Egress authorization round-trip time to the local control plane.
    pub egress_authz_seconds: Histogram,
    /// Egress decisions by where they came from: the control plane, the data plane's
    /// cache of its answers, or the last-known-good answer while it is away.
    pub egress_decisions: IntCounterVec,
    /// Outbound connections moved to another source before the client saw a byte,
    /// by why (unreachable, refused).
    pub failovers: IntCounterVec,
    /// Tunnels tried per outbound connection (1: no failover or token retry).
    pub connect_attempts: Histogram,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are static and unique, so registration cannot collide.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable!()),
    )
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let latency_buckets = vec![
            0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5,
        ];
        Metrics {
            conns_opened: counter_vec(
                &r,
                "clusterlink_connections_opened_total",
                "Connections opened",
                &["direction", "service"],
            ),
            conns_closed: counter_vec(
                &r,
                "clusterlink_connections_closed_total",
                "Connections closed, by reason",
                &["direction", "service", "reason"],
            ),
            conns_active: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("clusterlink_connections_active", "Connections open now"),
                    &["direction", "service"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            bytes: counter_vec(
                &r,
                "clusterlink_bytes_total",
                "Bytes relayed",
                &["direction", "service", "flow"],
            ),
            handshakes: counter_vec(
                &r,
                "clusterlink_tunnel_handshakes_total",
                "mTLS handshakes on tunnels",
                &["side", "result"],
            ),
            denials: counter_vec(
                &r,
                "clusterlink_authorization_denials_total",
                "Connections refused by authorization",
                &["direction", "reason"],
            ),
            setup_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "clusterlink_connection_setup_seconds",
                        "Time from accept until the tunnel is established",
                    )
                    .buckets(latency_buckets.clone()),
                    &["direction"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            rejected: counter_vec(
                &r,
                "clusterlink_gateway_rejected_total",
                "Gateway connections, streams or requests refused: bad input, unknown peer, over a limit",
                &["reason"],
            ),
            idle_closed: counter_vec(
                &r,
                "clusterlink_gateway_idle_closed_total",
                "Gateway connections closed (GOAWAY) after their idle timeout with no stream",
                &["protocol"],
            ),
            revoked: counter_vec(
                &r,
                "clusterlink_revoked_streams_total",
                "Established inbound tunnels reset because a new configuration removed their peer or export",
                &["reason"],
            ),
            cp_connected: reg(
                &r,
                IntGauge::new(
                    "clusterlink_controlplane_connected",
                    "1 while the configuration stream is up",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            cp_reconnects: reg(
                &r,
                IntCounter::new(
                    "clusterlink_controlplane_reconnects_total",
                    "Configuration stream (re)connection attempts",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            snapshot_version: reg(
                &r,
                IntGauge::new(
                    "clusterlink_snapshot_version",
                    "Version of the configuration snapshot in force",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            snapshot_rejected: counter_vec(
                &r,
                "clusterlink_snapshot_rejected_items_total",
                "Snapshot items refused by validation",
                &["kind"],
            ),
            cert_reloads: counter_vec(
                &r,
                "clusterlink_certificate_reloads_total",
                "Certificate reloads by result",
                &["result"],
            ),
            cert_not_after: reg(
                &r,
                IntGauge::new(
                    "clusterlink_certificate_not_after_seconds",
                    "Expiry of the peer certificate in force (Unix seconds)",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            egress_decisions: counter_vec(
                &r,
                "clusterlink_egress_decisions_total",
                "Egress decisions by source (controlplane, cache, last_good)",
                &["source"],
            ),
            failovers: counter_vec(
                &r,
                "clusterlink_failover_total",
                "Outbound connections moved to another source before the client saw a byte",
                &["reason"],
            ),
            connect_attempts: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "clusterlink_connect_attempts",
                        "Tunnels tried per outbound connection",
                    )
                    .buckets(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            tunnels_open: reg(
                &r,
                IntGauge::new(
                    "clusterlink_tunnels_open",
                    "Pooled tunnels (clusterlink-mux/1 or HTTP/2) open",
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            egress_authz_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "clusterlink_egress_authorization_seconds",
                        "Egress authorization call to the local control plane",
                    )
                    .buckets(latency_buckets),
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            registry: r,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-connection metric handles, resolved once at accept so the copy loop only does
/// atomic adds. Records the close reason and the active gauge on drop.
pub struct ConnGuard {
    pub to_target: IntCounter,
    pub from_target: IntCounter,
    active: IntGauge,
    closed: IntCounterVec,
    direction: &'static str,
    service: String,
    reason: &'static str,
}

impl ConnGuard {
    pub fn new(m: &Metrics, direction: &'static str, service: &str) -> Self {
        m.conns_opened
            .with_label_values(&[direction, service])
            .inc();
        let active = m.conns_active.with_label_values(&[direction, service]);
        active.inc();
        ConnGuard {
            to_target: m
                .bytes
                .with_label_values(&[direction, service, "to_target"]),
            from_target: m
                .bytes
                .with_label_values(&[direction, service, "from_target"]),
            active,
            closed: m.conns_closed.clone(),
            direction,
            service: service.to_owned(),
            reason: "error",
        }
    }

    /// The reason recorded when the guard drops.
    pub fn set_reason(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.active.dec();
        self.closed
            .with_label_values(&[self.direction, &self.service, self.reason])
            .inc();
    }
}
