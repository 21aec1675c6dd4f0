//! The admin port (plain HTTP, loopback by default): `/metrics` (Prometheus text),
//! `/ready` (200 only when certificates are loaded, the first snapshot is applied and
//! every listener is bound, and not draining), `/live`, and `/config_dump` (the flags
//! and the snapshot in force, without secrets).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    // The admin port outlives the drain so /ready can be watched turning false; it
    // stops only when the app is torn down.
    serve_http(listener, stop, move |req| handle(req, shared.clone())).await
}

/// A small plain HTTP/1.1 server for admin endpoints: one task per connection, a
/// header read timeout, until `stop` turns true. Shared with the control plane.
pub async fn serve_http<F, Fut>(listener: TcpListener, mut stop: watch::Receiver<bool>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::app::stopped(&mut stop) => return,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(handler);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// A complete response with a content type.
pub fn reply(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.encode(),
        ),
        "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" => {
            if shared.ready.load(Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        "/config_dump" => {
            let snap = shared.store.load();
            let material = shared.tls.borrow().clone();
            let dump = serde_json::json!({
                "config": &*shared.config,
                "identity": material.identity,
                "certificate_generation": material.generation,
                "certificate_not_after": material.not_after,
                "snapshot": &*snap,
                "import_listeners": shared.imports.addrs(),
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
