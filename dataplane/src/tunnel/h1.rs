//! HTTP/1.1 CONNECT on a TLS connection of its own, as ClusterLink's data planes
//! speak it: the request head, a bounded read of the response head, and the bytes
//! read past it handed back first (`Rewind`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Error, Tunnel};
use crate::snapshot::Peer;

/// Longest response head accepted from a remote gateway.
const MAX_HEAD: usize = 16 * 1024;

/// HTTP/1.1 CONNECT on a dedicated TLS connection, as ClusterLink's data planes speak it.
pub(super) async fn connect_h1(
    mut tls: TlsStream<TcpStream>,
    peer: &Peer,
    gw: &str,
    token: &str,
    early: &Bytes,
    response_timeout: Duration,
) -> Result<Tunnel, Error> {
    let gerr = |reason: String| Error::Gateway {
        gateway: gw.to_owned(),
        reason,
    };
    let head = format!(
        "CONNECT {p}:443 HTTP/1.1\r\nHost: {p}:443\r\nAuthorization: Bearer {token}\r\n\r\n",
        p = peer.name
    );
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| gerr(format!("write CONNECT: {e}")))?;
    tls.flush()
        .await
        .map_err(|e| gerr(format!("write CONNECT: {e}")))?;
    let mut buf = BytesMut::with_capacity(4096);
    let read_head = async {
        loop {
            if buf.len() >= MAX_HEAD {
                return Err(gerr("response head too large".into()));
            }
            let n = tls
                .read_buf(&mut buf)
                .await
                .map_err(|e| gerr(format!("read CONNECT response: {e}")))?;
            if n == 0 {
                return Err(gerr("connection closed before the CONNECT response".into()));
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    return Ok((len, resp.code.unwrap_or(0)));
                }
                Ok(httparse::Status::Partial) => continue,
                Err(e) => return Err(gerr(format!("bad CONNECT response: {e}"))),
            }
        }
    };
    let (len, status) = tokio::time::timeout(response_timeout, read_head)
        .await
        .map_err(|_| gerr("no answer to CONNECT".into()))??;
    if status == 200 {
        if !early.is_empty() {
            let sent = async {
                tls.write_all(early).await?;
                tls.flush().await
            };
            sent.await.map_err(|e| Error::Interrupted {
                gateway: gw.to_owned(),
                reason: format!("write: {e}"),
            })?;
        }
        buf.advance(len);
        return Ok(Tunnel::H1(Box::new(Rewind {
            pre: buf.freeze(),
            inner: tls,
        })));
    }
    let body = String::from_utf8_lossy(&buf[len..buf.len().min(len + 1024)]).into_owned();
    Err(Error::Refused {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        reason: body,
        // There is nothing to fall back to from HTTP/1.1.
        authoritative: true,
    })
}

/// A stream that first yields bytes already read past a response head.
pub struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
