//! Calls to remote gateways (`GET /healthz`, `POST /authz`): HTTP/1.1 over mTLS with
//! this peer's certificate, SNI = the Peer's name, and the remote's identity (first
//! DNS SAN) required to equal that name. With several gateways the request goes to
//! all of them at once and the first success wins. Every call has a deadline.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{select_ok, BoxFuture, FutureExt};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use fabric::identity::Material;

/// Largest response body read from a peer.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("peer {0:?} has no gateways")]
    NoGateways(String),
    #[error("{gateway}: {reason}")]
    Gateway { gateway: String, reason: String },
    #[error("{gateway}: timed out")]
    Timeout { gateway: String },
    #[error("{gateway}: unable to authorize connection ({status}), server returned: {body}")]
    Status {
        gateway: String,
        status: StatusCode,
        body: String,
    },
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone)]
pub struct PeerClient {
    tls: watch::Receiver<Arc<Material>>,
    timeout: Duration,
}

impl PeerClient {
    pub fn new(tls: watch::Receiver<Arc<Material>>, timeout: Duration) -> Self {
        PeerClient { tls, timeout }
    }

    /// Sends the request to every gateway of `peer` at once; the first answer with
    /// status 200 wins. Fails only if every gateway fails.
    pub async fn call(
        &self,
        peer: &str,
        gateways: &[String],
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Response, Error> {
        if gateways.is_empty() {
            return Err(Error::NoGateways(peer.to_owned()));
        }
        let attempts: Vec<BoxFuture<'_, Result<Response, Error>>> = gateways
            .iter()
            .map(|gw| {
                self.one(peer, gw, method.clone(), path, body.clone())
                    .boxed()
            })
            .collect();
        select_ok(attempts).await.map(|(r, _)| r)
    }

    async fn one(
        &self,
        peer: &str,
        gateway: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Response, Error> {
        let gerr = |reason: String| Error::Gateway {
            gateway: gateway.to_owned(),
            reason,
        };
        let work = async {
            let material = self.tls.borrow().clone();
            let tcp = TcpStream::connect(gateway)
                .await
                .map_err(|e| gerr(format!("connect: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let name = rustls_pki_types::ServerName::try_from(peer.to_owned())
                .map_err(|e| gerr(format!("peer name: {e}")))?;
            let tls = TlsConnector::from(material.client_h1.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| gerr(format!("TLS: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| gerr(format!("HTTP: {e}")))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, gateway);
            if !body.is_empty() {
                req = req.header(
                    http::header::CONTENT_TYPE,
                    "application/json; charset=utf-8",
                );
            }
            let req = req
                .body(Full::new(body))
                .map_err(|e| gerr(format!("request: {e}")))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| gerr(format!("HTTP: {e}")))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| gerr(format!("reading the answer: {e}")))?
                .to_bytes();
            if parts.status != StatusCode::OK {
                return Err(Error::Status {
                    gateway: gateway.to_owned(),
                    status: parts.status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| Error::Timeout {
                gateway: gateway.to_owned(),
            })?
    }
}
