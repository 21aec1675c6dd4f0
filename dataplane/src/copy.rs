//! The copy loop: relays one tunnelled TCP connection in both directions at once, in
//! one task. End of stream is carried as half-close (FIN <-> END_STREAM, or a TCP
//! shutdown of the write side), resets as resets (RST <-> RST_STREAM). Bytes are counted
//! through pre-resolved counters. Reads go into a fresh `BytesMut` that is frozen and
//! handed to h2 as `Bytes`, so the only copy left is the one TLS makes when it encrypts.
//! A buffer is allocated only once the socket is readable, so idle connections hold none.

use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::future::poll_fn;
use h2::{Reason, RecvStream, SendStream};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Size of one read from a socket. Large reads mean fewer syscalls and full 16 KiB TLS
/// records; see benches/README.md for the measurement behind the number.
pub const READ_SIZE: usize = 64 * 1024;

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with end of stream.
    Eof,
    /// The local TCP peer reset its connection; the tunnel side was reset too.
    LocalReset,
    /// The tunnel side was reset or failed; the local TCP connection was reset too.
    RemoteReset,
    /// Still open when the drain timed out; closed by the gateway.
    Drained,
}

impl End {
    pub fn reason(self) -> &'static str {
        match self {
            End::Eof => "eof",
            End::LocalReset => "local_reset",
            End::RemoteReset => "remote_reset",
            End::Drained => "drained",
        }
    }
}

/// Byte counters for the two flows, seen from the local TCP socket: `up` counts bytes
/// read from it, `down` bytes written to it.
#[derive(Clone)]
pub struct Counters {
    pub up: IntCounter,
    pub down: IntCounter,
}

/// Makes the kernel answer with RST when the socket is dropped.
pub fn reset_on_drop(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

enum Failure {
    Local,
    Remote,
}

/// Relays `tcp` <-> one HTTP/2 stream until both directions end or either side resets.
pub async fn splice_h2(
    mut tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    counters: &Counters,
) -> End {
    let result = {
        let (r, w) = tcp.split();
        tokio::try_join!(
            tcp_to_h2(r, send, &counters.up),
            h2_to_tcp(recv, w, &counters.down)
        )
    };
    match result {
        Ok(_) => End::Eof,
        Err(Failure::Local) => End::LocalReset,
        Err(Failure::Remote) => {
            reset_on_drop(&tcp);
            End::RemoteReset
        }
    }
}

async fn tcp_to_h2(
    r: ReadHalf<'_>,
    mut send: SendStream<Bytes>,
    counter: &IntCounter,
) -> Result<(), Failure> {
    loop {
        tokio::select! {
            ready = r.readable() => if ready.is_err() {
                send.send_reset(Reason::CANCEL);
                return Err(Failure::Local);
            },
            // The remote reset the stream while the local side is idle.
            _ = poll_fn(|cx| send.poll_reset(cx)) => return Err(Failure::Remote),
        }
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        match r.try_read_buf(&mut buf) {
            Ok(0) => {
                // FIN from the local side: END_STREAM, keep receiving.
                return send
                    .send_data(Bytes::new(), true)
                    .map_err(|_| Failure::Remote);
            }
            Ok(n) => {
                counter.inc_by(n as u64);
                send_all(&mut send, buf.freeze()).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                send.send_reset(Reason::CANCEL);
                return Err(Failure::Local);
            }
        }
    }
}

/// Sends `data` as flow control allows, splitting without copying.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), Failure> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(cap)) => cap,
            _ => return Err(Failure::Remote),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, false).map_err(|_| Failure::Remote)?;
    }
    Ok(())
}

async fn h2_to_tcp(
    mut recv: RecvStream,
    mut w: WriteHalf<'_>,
    counter: &IntCounter,
) -> Result<(), Failure> {
    loop {
        match recv.data().await {
            Some(Ok(data)) => {
                let n = data.len();
                if w.write_all(&data).await.is_err() {
                    // The local side is gone: tell the remote to stop sending.
                    return Err(Failure::Local);
                }
                counter.inc_by(n as u64);
                let _ = recv.flow_control().release_capacity(n);
            }
            Some(Err(_)) => return Err(Failure::Remote),
            None => {
                // END_STREAM from the remote: FIN to the local side, keep sending.
                let _ = w.shutdown().await;
                return Ok(());
            }
        }
    }
}

/// Relays `tcp` <-> `other` (an HTTP/1.1 CONNECT tunnel: a TLS stream or an upgraded
/// hyper connection) until both directions end or either side fails.
pub async fn splice_io<T>(mut tcp: TcpStream, other: T, counters: &Counters) -> End
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut or, mut ow) = tokio::io::split(other);
    let result = {
        let (r, w) = tcp.split();
        tokio::try_join!(
            tcp_to_io(r, &mut ow, &counters.up),
            io_to_tcp(&mut or, w, &counters.down)
        )
    };
    match result {
        Ok(_) => End::Eof,
        Err(Failure::Local) => End::LocalReset,
        Err(Failure::Remote) => {
            reset_on_drop(&tcp);
            End::RemoteReset
        }
    }
}

async fn tcp_to_io<W: AsyncWrite + Unpin>(
    r: ReadHalf<'_>,
    w: &mut W,
    counter: &IntCounter,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; READ_SIZE];
    let mut r = r;
    loop {
        match r.read(&mut buf).await {
            Ok(0) => {
                w.shutdown().await.map_err(|_| Failure::Remote)?;
                return Ok(());
            }
            Ok(n) => {
                counter.inc_by(n as u64);
                w.write_all(&buf[..n]).await.map_err(|_| Failure::Remote)?;
                w.flush().await.map_err(|_| Failure::Remote)?;
            }
            Err(_) => return Err(Failure::Local),
        }
    }
}

async fn io_to_tcp<R: AsyncRead + Unpin>(
    r: &mut R,
    mut w: WriteHalf<'_>,
    counter: &IntCounter,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => {
                let _ = w.shutdown().await;
                return Ok(());
            }
            Ok(n) => {
                w.write_all(&buf[..n]).await.map_err(|_| Failure::Local)?;
                counter.inc_by(n as u64);
            }
            // A TLS stream that ends without close_notify is how most peers end a
            // tunnel after the last byte; treat it as end of stream.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let _ = w.shutdown().await;
                return Ok(());
            }
            Err(_) => return Err(Failure::Remote),
        }
    }
}
