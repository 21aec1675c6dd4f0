//! The admin port (plain HTTP, loopback by default): `/metrics` (Prometheus text),
//! `/ready` (200 only when certificates are loaded, the first snapshot is applied and
//! every listener is bound, and not draining), `/live`, and `/config_dump` (the flags
//! and the snapshot in force, without secrets). It only reads what it reports.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use fabric::admin::{reply, serve_http};
use fabric::identity::Material;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::outbound::Imports;
use crate::snapshot::Store;

/// What the admin port reports.
pub struct State {
    /// The flags, as `/config_dump` shows them.
    pub config: serde_json::Value,
    pub metrics: Arc<Metrics>,
    pub store: Arc<Store>,
    pub tls: watch::Receiver<Arc<Material>>,
    pub imports: Arc<Imports>,
    /// Set by `app`: the first snapshot is applied, every listener bound, not draining.
    pub ready: AtomicBool,
}

pub async fn serve(listener: TcpListener, state: Arc<State>, stop: watch::Receiver<bool>) {
    // The admin port outlives the drain so /ready can be watched turning false; it
    // stops only when the app is torn down.
    serve_http(listener, stop, move |req| handle(req, state.clone())).await
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.encode(),
        ),
        "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" => {
            if state.ready.load(Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        "/config_dump" => {
            let snap = state.store.load();
            let material = state.tls.borrow().clone();
            let dump = serde_json::json!({
                "config": &state.config,
                "identity": material.identity,
                "certificate_generation": material.generation,
                "certificate_not_after": material.not_after,
                "snapshot": &*snap,
                "import_listeners": state.imports.addrs(),
            });
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&dump).unwrap_or_default(),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}
