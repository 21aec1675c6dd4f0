//! `clusterlink-mux/1`: the lean tunnel multiplexer our own gateways speak to each
//! other, chosen by ALPN ahead of h2 (peers that do not offer it get h2 or HTTP/1.1
//! CONNECT as before). It carries exactly what a CONNECT stream carries - the bearer
//! token, the answer's status and reason, data, half-close and reset - with the
//! per-message path of a plain relay: the task that reads a socket writes the other
//! side. A stream's task reads its local socket and writes the frame into TLS itself
//! (no connection task in between), and the connection's reader writes a received
//! frame straight into the stream's local socket when it takes it at once, waking the
//! stream's task only when the socket is full. h2 cost two task hops and the h2 crate's
//! shared stream store per message (benches/README.md); this is why it exists.
//!
//! Frames: an 8-byte header - type (1 byte), payload length (3 bytes, big-endian),
//! stream id (4 bytes, big-endian) - then the payload.
//!
//! | type | dir | payload |
//! |---|---|---|
//! | 0 DATA | both | bytes, 1 ..= `MAX_DATA` |
//! | 1 OPEN | client | the `Authorization` value ("Bearer <token>"), at most 16 KiB |
//! | 2 REPLY | server | status (2 bytes) and a UTF-8 reason; not 200 ends the stream; 0: refused before processing (stream limit), safe to open elsewhere |
//! | 3 FIN | both | none: the sender's direction ends |
//! | 4 RST | both | none: the stream is aborted both ways |
//! | 5 CREDIT | both | 4 bytes: the receiver wrote that many more bytes of the stream locally; on stream 0, of the connection (written, or dropped with their stream) |
//! | 6 GOAWAY | server | 4 bytes: the last stream id it will process (stream id 0); sent on a drain, or after the connection's idle timeout with no stream |
//! | 7 PING | client | 8 bytes, any (stream id 0); version 2 (`clusterlink-mux/2`) only |
//! | 8 PONG | server | the PING's 8 bytes, answered at once by the reader (stream id 0) |
//!
//! Version 2 is version 1 plus PING/PONG. A client sends PING with an OPEN on a
//! connection it has heard nothing on for `QUIET`, and then holds the stream's first
//! bytes until the answer: if nothing at all arrives within `PING_TIMEOUT`, the
//! connection is taken for black-holed (a partition sends no reset), retired, and the
//! stream reported `Unresponsive` with none of its bytes sent, so that it can be
//! opened elsewhere instead of waiting for TCP's timeout.
//!
//! Flow control: a sender may have `STREAM_WINDOW` bytes of DATA per stream, and
//! `CONN_WINDOW` bytes on the connection (all streams together), not yet returned by
//! CREDIT; a receiver returns stream credit as it writes to the local socket, and
//! connection credit for whatever leaves its hands (written, or dropped with a reset
//! stream). The connection window bounds what a connection can make the receiver
//! hold, so its reader never has to stop reading: control frames (OPEN, REPLY, RST,
//! CREDIT) are never held behind data for local sockets that do not take it.
//! Stream ids are chosen by the client, increasing. Anything else - an unknown type, a
//! wrong length, data beyond the window or after FIN - is a protocol error and closes
//! the connection (every stream on it is reset). Nothing here panics on input.

use std::io;

mod client;
mod conn;
mod frame;
mod reader;
mod server;
mod stream;
#[cfg(test)]
mod tests;

pub use client::Client;
pub use reader::Ending;
pub use server::{serve, Incoming};
pub use stream::{splice, Stream};

/// Largest DATA payload: with its header a frame is 64 KiB, four full TLS records.
pub const MAX_DATA: usize = 64 * 1024 - frame::HEADER;
/// Bytes a sender may have outstanding per stream; part of the protocol (both sides
/// use it). 4 MiB, as our h2 stream window: 1 and 2 MiB carried one stream 10-20 %
/// slower (benches/README.md).
pub const STREAM_WINDOW: usize = 4 * 1024 * 1024;
/// Bytes a sender may have outstanding on one connection, all streams together; part
/// of the protocol. 16 MiB, as our h2 connection window (and ztunnel's): four streams
/// stalled on their local sockets can hold all of it, as in h2, but unlike a reader
/// that stops reading, that holds up only data, never control frames.
pub const CONN_WINDOW: usize = 16 * 1024 * 1024;
/// Most streams a server accepts at once on one connection (as our h2 server).
pub const MAX_STREAMS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed")]
    Closed,
}

/// Why `Client::open` did not give a stream.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("refused: {status} {reason}")]
    Refused { status: u16, reason: String },
    /// Nothing of the stream was processed (the connection was already closing, or
    /// GOAWAY named an earlier stream): safe to retry, even with early data.
    #[error("not processed: {0}")]
    Unprocessed(&'static str),
    /// The connection ended before the answer; the remote may have processed it.
    #[error("connection lost before the answer")]
    Lost,
    #[error("no answer in time")]
    Timeout,
    /// Nothing arrived on the connection within `PING_TIMEOUT` of a PING, and none of
    /// the stream's bytes were sent: retired; safe to open elsewhere.
    #[error("no answer to PING: connection unresponsive")]
    Unresponsive,
}

/// A client connection heard nothing on for this long gets a PING with its next OPEN.
pub const QUIET: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a PING may go unanswered (with nothing else arriving either).
pub const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
