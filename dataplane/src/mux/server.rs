//! The server side: `serve` runs a connection and hands each OPEN over as an
//! `Incoming` to answer. It never decides whether a stream is allowed: `on_open` does.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::conn::Conn;
use super::frame::{header, MAX_REPLY, REPLY};
use super::reader::{drive, Ending};
use super::stream::Stream;
use super::Error;

/// Serves a connection that negotiated `clusterlink-mux/1` until it ends: each OPEN is
/// handed to `on_open` (which should spawn a task to answer it). When `stop` turns true,
/// or the connection has had no stream for `idle`, the server sends GOAWAY and ends
/// once its streams have.
pub async fn serve<T>(
    io: T,
    on_open: impl Fn(Incoming) + Send + Sync,
    stop: watch::Receiver<bool>,
    idle: Option<Duration>,
) -> Result<Ending, Error>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let conn = Conn::new(Box::new(wr), true, false);
    drive(conn, rd, Some(&on_open), Some(stop), idle).await
}

/// An opened stream waiting for the server's answer; dropped unanswered, it is reset
/// (`Stream`'s drop).
pub struct Incoming {
    pub(super) stream: Option<Stream>,
    pub(super) auth: Bytes,
}

impl Incoming {
    /// The OPEN's Authorization value, if it is text.
    pub fn authorization(&self) -> Option<&str> {
        std::str::from_utf8(&self.auth).ok()
    }

    /// Answers 200: the stream is established.
    pub async fn accept(mut self) -> Result<Stream, Error> {
        let stream = self.stream.take().ok_or(Error::Closed)?;
        let reply = header(REPLY, 2, stream.slot.id);
        stream
            .conn
            .send(&[&reply, &200u16.to_be_bytes()], 0)
            .await?;
        Ok(stream)
    }

    /// Answers with a refusal; the stream ends.
    pub async fn refuse(mut self, status: u16, reason: &str) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        let mut reason = reason.as_bytes();
        reason = &reason[..reason.len().min(MAX_REPLY - 2)];
        let reply = header(REPLY, 2 + reason.len(), stream.slot.id);
        let _ = stream
            .conn
            .send(&[&reply, &status.to_be_bytes(), reason], 0)
            .await;
        stream.ended = true;
    }
}
