//! Opening one stream on a pooled connection: an OPEN over `clusterlink-mux/1`, a
//! CONNECT request over h2, with the client's first bytes right behind it, and which
//! failures may be retried on another connection without sending those bytes twice.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fabric::wire::PROTOCOLS_HEADER;
use h2::RecvStream;
use http::{Method, Request, StatusCode};

use super::pool::{Link, Pooled, StreamLease};
use super::{connect_h1, Dialer, Error, Tunnel};
use crate::mux;
use crate::snapshot::Peer;

impl Dialer {
    /// A stream on a pooled `clusterlink-mux/1` connection; `Ok(None)`: that
    /// connection went away before processing it, try another.
    async fn open_mux(
        &self,
        pooled: &Pooled,
        client: &mux::Client,
        gw: &str,
        token: &str,
        early: &Bytes,
        last_attempt: bool,
    ) -> Result<Option<Tunnel>, Error> {
        pooled.active.fetch_add(1, Ordering::Relaxed);
        let lease = StreamLease(pooled.active.clone());
        let auth = format!("Bearer {token}");
        let gateway = || gw.to_owned();
        match client.open(&auth, early, self.response_timeout).await {
            Ok(stream) => Ok(Some(Tunnel::Mux { stream, lease })),
            Err(mux::OpenError::Refused { status, reason }) => Err(Error::Refused {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                reason,
                authoritative: true,
            }),
            Err(mux::OpenError::Unprocessed(why)) => {
                pooled.dead.store(true, Ordering::Relaxed);
                if last_attempt {
                    return Err(Error::Gateway {
                        gateway: gateway(),
                        reason: format!("stream not processed: {why}"),
                    });
                }
                Ok(None)
            }
            Err(e @ mux::OpenError::Lost) => {
                pooled.dead.store(true, Ordering::Relaxed);
                if !early.is_empty() {
                    return Err(Error::Interrupted {
                        gateway: gateway(),
                        reason: e.to_string(),
                    });
                }
                if last_attempt {
                    return Err(Error::Gateway {
                        gateway: gateway(),
                        reason: e.to_string(),
                    });
                }
                Ok(None)
            }
            Err(mux::OpenError::Unresponsive) => {
                // Black-holed, with none of the stream's bytes sent: this gateway
                // failed (the next one, or another source, is tried).
                pooled.dead.store(true, Ordering::Relaxed);
                Err(Error::Gateway {
                    gateway: gateway(),
                    reason: "connection unresponsive (no answer to PING)".into(),
                })
            }
            Err(mux::OpenError::Timeout) => {
                // The remote may be slowly connecting to the target with the client's
                // first bytes: do not try them on another gateway.
                let (gateway, reason) = (gateway(), "no answer to OPEN".into());
                Err(if early.is_empty() {
                    Error::Gateway { gateway, reason }
                } else {
                    Error::Interrupted { gateway, reason }
                })
            }
        }
    }

    pub(super) async fn open_h2(
        &self,
        peer: &Peer,
        gw: &str,
        token: &str,
        early: &Bytes,
    ) -> Result<Tunnel, Error> {
        // One retry covers a pooled connection that went away (GOAWAY) under us.
        for attempt in 0..2 {
            let pooled = match self.pooled(peer, gw).await? {
                Ok(p) => p,
                Err(tls) => {
                    return connect_h1(tls, peer, gw, token, early, self.response_timeout).await
                }
            };
            let send = match &pooled.link {
                Link::H2(send) => send.clone(),
                Link::Mux(client) => {
                    match self
                        .open_mux(&pooled, client, gw, token, early, attempt == 1)
                        .await?
                    {
                        Some(t) => return Ok(t),
                        None => continue,
                    }
                }
            };
            pooled.active.fetch_add(1, Ordering::Relaxed);
            let lease = StreamLease(pooled.active.clone());
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{}:443", peer.name))
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .body(())
                .map_err(|e| Error::Gateway {
                    gateway: gw.to_owned(),
                    reason: format!("request: {e}"),
                })?;
            let sent = match send.ready().await {
                Ok(mut s) => s
                    .send_request(req, false)
                    .and_then(|(response, mut stream)| {
                        // Queued behind the request and sent as soon as the connection
                        // window allows (usually in the same write). h2 buffers it and
                        // asks for the capacity itself; `early` is at most
                        // copy::EARLY_MAX bytes.
                        if !early.is_empty() {
                            stream.send_data(early.clone(), false)?;
                        }
                        Ok((response, stream))
                    }),
                Err(e) => Err(e),
            };
            let (response, stream) = match sent {
                Ok(x) => x,
                Err(e) => {
                    pooled.dead.store(true, Ordering::Relaxed);
                    if attempt == 0 {
                        continue;
                    }
                    return Err(Error::Gateway {
                        gateway: gw.to_owned(),
                        reason: format!("h2 stream: {e}"),
                    });
                }
            };
            let response = match tokio::time::timeout(self.response_timeout, response).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if e.is_go_away() || e.is_io() => {
                    pooled.dead.store(true, Ordering::Relaxed);
                    // With the client's bytes on their way, retry only a stream the
                    // remote says it did not process (GOAWAY, graceful, naming an
                    // earlier last stream); it may have reached the target otherwise.
                    let unprocessed =
                        e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR);
                    if !early.is_empty() && !unprocessed {
                        return Err(Error::Interrupted {
                            gateway: gw.to_owned(),
                            reason: format!("h2 CONNECT: {e}"),
                        });
                    }
                    if attempt == 0 {
                        continue;
                    }
                    return Err(Error::Gateway {
                        gateway: gw.to_owned(),
                        reason: format!("h2 CONNECT: {e}"),
                    });
                }
                Ok(Err(e)) => {
                    return Err(Error::Refused {
                        status: StatusCode::BAD_GATEWAY,
                        reason: format!("h2 CONNECT: {e}"),
                        authoritative: false,
                    })
                }
                Err(_) => {
                    let (gateway, reason) = (gw.to_owned(), "no answer to CONNECT".into());
                    // The remote may be slowly connecting to the target with the
                    // client's first bytes: do not try them on another gateway.
                    return Err(if early.is_empty() {
                        Error::Gateway { gateway, reason }
                    } else {
                        Error::Interrupted { gateway, reason }
                    });
                }
            };
            let status = response.status();
            let authoritative = response.headers().contains_key(PROTOCOLS_HEADER);
            let mut recv = response.into_body();
            if status == StatusCode::OK {
                return Ok(Tunnel::H2 {
                    send: stream,
                    recv,
                    lease,
                });
            }
            let reason = read_reason(&mut recv).await;
            return Err(Error::Refused {
                status,
                reason,
                authoritative,
            });
        }
        Err(Error::Gateway {
            gateway: gw.to_owned(),
            reason: "pooled connection lost twice".into(),
        })
    }
}

/// Reads up to 1 KiB of a refusal's body, for the log.
async fn read_reason(recv: &mut RecvStream) -> String {
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(d)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(d.len());
            out.extend_from_slice(&d[..d.len().min(1024 - out.len().min(1024))]);
            if out.len() >= 1024 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
    String::from_utf8_lossy(&out).into_owned()
}
