//! The copy loop: relays one tunnelled TCP connection in both directions at once, in
//! one task. End of stream is carried as half-close (FIN <-> END_STREAM, or a TCP
//! shutdown of the write side), resets as resets (RST <-> RST_STREAM). Bytes are counted
//! through pre-resolved counters. Reads go into a fresh `BytesMut` that is frozen and
//! handed to h2 as `Bytes`, so the only copy left is the one TLS makes when it encrypts.
//! A buffer is allocated only once the socket is readable, so idle connections hold none.

use std::io::{self, Read as _};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use futures_util::future::poll_fn;
use h2::{Reason, RecvStream, SendStream};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::io::poll_read_buf;

/// Size of one read from a socket. Large reads mean fewer syscalls and full 16 KiB TLS
/// records. 256 KiB reads made no clear difference (benches/README.md, levers tried).
pub const READ_SIZE: usize = 64 * 1024;

/// A read at least this large means the local side streams: the copy loop then reads
/// again without waiting for the next readiness event, while smaller reads
/// (request/response traffic) wait for it instead of spending a read on WouldBlock.
/// Measured (benches/README.md): clearing the readiness after every short read cost
/// 5-15 % of single-stream throughput, as each read then waited for epoll; with this
/// split, bulk is as before and ping-pong saves its read per message.
pub(crate) const STREAMING_READ: usize = 4 * 1024;

/// Most bytes read from a socket into one h2 DATA frame: with the frame's 9-byte
/// header the frame is exactly 64 KiB, four full 16 KiB TLS records, and rustls takes
/// it whole (its send buffer limit is 64 KiB), unless another frame (a WINDOW_UPDATE)
/// is queued ahead of it. A bigger read made rustls take 64 KiB, write that, and then
/// seal the frame's tail as a fifth, short record with its own `writev` at A and its
/// own `recvfrom`, decryption and allocation at B.
const H2_READ: usize = 4 * 16 * 1024 - 9;
const _: () = assert!(H2_READ <= READ_SIZE);

/// Where read data starts, modulo 4096, in the buffers this module reads into.
///
/// rustls copies each record's plaintext from our buffer into a fresh allocation, 5
/// bytes (the record header) or 14 (header and an h2 frame header) past its start,
/// which the allocator places on a 4 KiB boundary. With our data also on a boundary,
/// destination and source are 5 or 14 bytes apart modulo 4096, and on AMD Zen 3 with
/// glibc's `rep movsb` memcpy such copies run about 30 times slower
/// (../shared/reference/perf-notes.md, section 5): 18 % of both gateways' CPU in a bulk
/// h2 profile. Starting our data 64 bytes past a boundary puts them 4046 or 4036 bytes
/// apart instead, outside the slow window (1 to 47).
const DATA_PHASE: usize = 64;
pub(crate) const PAGE: usize = 4096;

/// How far past `at` data must start to sit at `DATA_PHASE` modulo `PAGE`.
pub(crate) fn phase_offset(at: *const u8) -> usize {
    (DATA_PHASE + PAGE - (at as usize % PAGE)) % PAGE
}

/// An empty buffer of at least `READ_SIZE` bytes of capacity whose data starts at
/// `DATA_PHASE` modulo `PAGE`: one allocation, and `advance` only moves its start.
fn phased_buf() -> BytesMut {
    phased_buf_with(READ_SIZE)
}

/// An empty buffer of at least `cap` bytes of capacity whose data starts at
/// `DATA_PHASE` modulo `PAGE`.
pub(crate) fn phased_buf_with(cap: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(cap + PAGE);
    let off = phase_offset(buf.as_ptr());
    buf.put_bytes(0, off);
    buf.advance(off);
    buf
}

/// Most bytes read from a client before its tunnel exists (`read_early`). Small: the
/// exporting gateway holds them, unreleased from the pooled connection's shared flow
/// control window, while it dials the target (1,000 streams in set-up hold 4 MiB of the
/// 16 MiB window). A request head or a TLS ClientHello fits.
pub const EARLY_MAX: usize = 4 * 1024;

/// What the local side has already sent, read without waiting: empty when nothing has
/// arrived yet (or only a FIN, which the copy loop reads later). Bypasses tokio's
/// readiness, which a socket accepted a moment ago has not been told yet (and does not
/// clear it: the copy loop's first read may then find nothing, once).
pub fn read_early(tcp: &TcpStream) -> io::Result<Bytes> {
    let mut buf = [0u8; EARLY_MAX];
    let sock = socket2::SockRef::from(tcp);
    match (&*sock).read(&mut buf) {
        Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(Bytes::new())
        }
        Err(e) => Err(e),
    }
}

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
    /// A new configuration removed its peer or its export: reset at both ends.
    Revoked,
}

impl End {
    pub fn reason(self) -> &'static str {
        match self {
            End::Eof => "eof",
            End::LocalReset => "local_reset",
            End::RemoteReset => "remote_reset",
            End::Drained => "drained",
            End::Revoked => "revoked",
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

/// Which side of a relay failed.
pub(crate) enum Failure {
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
    // Set while the receiving half is not waiting in `recv.data()` (it has ended, or it
    // is blocked writing to a slow local side): only then does the sending half watch
    // for a reset of the stream, since a waiting `recv.data()` sees a reset itself.
    let watch_reset = AtomicBool::new(false);
    // Set when the receiving half has ended (END_STREAM from the remote): the sending
    // half, if the local side has sent its FIN, then stops watching for its reset.
    let down_done = Notify::new();
    let result = {
        let (r, w) = tcp.split();
        tokio::try_join!(
            tcp_to_h2(r, send, &counters.up, &watch_reset, &down_done),
            h2_to_tcp(recv, w, &counters.down, &watch_reset, &down_done)
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
    mut r: ReadHalf<'_>,
    mut send: SendStream<Bytes>,
    counter: &IntCounter,
    watch_reset: &AtomicBool,
    down_done: &Notify,
) -> Result<(), Failure> {
    // Size of the last read: tells a streaming sender from an interactive one.
    let mut last = 0;
    loop {
        tokio::select! {
            ready = r.readable() => if ready.is_err() {
                send.send_reset(Reason::CANCEL);
                return Err(Failure::Local);
            },
            // The remote reset the stream while the local side is idle and the
            // receiving half is not waiting for data. Not watched otherwise: h2 wakes
            // the watcher on every capacity change, a task wake-up per frame sent.
            _ = poll_fn(|cx| if watch_reset.load(Ordering::Relaxed) {
                send.poll_reset(cx)
            } else {
                std::task::Poll::Pending
            }) => return Err(Failure::Remote),
        }
        let mut buf = phased_buf();
        let read = if last >= STREAMING_READ {
            // Streaming: more has probably arrived while the last read was sent on, so
            // read again at once (the readiness is kept until a read finds nothing).
            r.try_read_buf(&mut (&mut buf).limit(H2_READ))
        } else {
            // Interactive: one poll of the read, with the readiness just reported. It
            // reads at once, and a short read clears the readiness (tokio's poll_read
            // does), so the next turn waits in `readable()` instead of spending a read
            // on WouldBlock: one syscall less per message, on the latency path.
            poll_fn(|cx| {
                match poll_read_buf(Pin::new(&mut r), cx, &mut (&mut buf).limit(H2_READ)) {
                    Poll::Pending => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
                    Poll::Ready(res) => Poll::Ready(res),
                }
            })
            .await
        };
        match read {
            Ok(0) => {
                // FIN from the local side: END_STREAM, keep receiving.
                send.send_data(Bytes::new(), true)
                    .map_err(|_| Failure::Remote)?;
                return after_local_fin(&r, &mut send, watch_reset, down_done).await;
            }
            Ok(n) => {
                last = n;
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

/// The sending half after the local FIN, until the receiving half ends: a reset of the
/// local socket (a client that sends FIN and then RST) resets the stream at once,
/// instead of when the remote next sends; a reset of the stream while the receiving
/// half is blocked on a slow local side is noticed too.
async fn after_local_fin(
    r: &ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    watch_reset: &AtomicBool,
    down_done: &Notify,
) -> Result<(), Failure> {
    tokio::select! {
        _ = down_done.notified() => Ok(()),
        // After a FIN the socket stays readable (end of file); only an error (RST)
        // wakes this.
        _ = r.ready(Interest::ERROR) => {
            send.send_reset(Reason::CANCEL);
            Err(Failure::Local)
        }
        _ = poll_fn(|cx| if watch_reset.load(Ordering::Relaxed) {
            send.poll_reset(cx)
        } else {
            Poll::Pending
        }) => Err(Failure::Remote),
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

/// Asks the sending half (polled by the same task) to watch for a stream reset, and
/// makes the task poll it again so that it starts at once.
async fn start_watching(watch_reset: &AtomicBool) {
    watch_reset.store(true, Ordering::Relaxed);
    poll_fn(|cx| {
        cx.waker().wake_by_ref();
        std::task::Poll::Ready(())
    })
    .await;
}

async fn h2_to_tcp(
    mut recv: RecvStream,
    mut w: WriteHalf<'_>,
    counter: &IntCounter,
    watch_reset: &AtomicBool,
    down_done: &Notify,
) -> Result<(), Failure> {
    loop {
        match recv.data().await {
            // The END_STREAM of a peer that half-closes comes as an empty DATA frame:
            // nothing to write (a zero-length send is still a syscall).
            Some(Ok(data)) if data.is_empty() => {}
            Some(Ok(data)) => {
                let n = data.len();
                // Usually the socket takes it all at once.
                let done = match w.try_write(&data) {
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(_) => return Err(Failure::Local),
                };
                if done < n {
                    // The local side is slow, and `recv` is not polled while we wait
                    // for it: let the sending half notice a reset meanwhile.
                    start_watching(watch_reset).await;
                    let written = w.write_all(&data[done..]).await;
                    watch_reset.store(false, Ordering::Relaxed);
                    if written.is_err() {
                        // The local side is gone: tell the remote to stop sending.
                        return Err(Failure::Local);
                    }
                }
                counter.inc_by(n as u64);
                let _ = recv.flow_control().release_capacity(n);
            }
            Some(Err(_)) => return Err(Failure::Remote),
            None => {
                // END_STREAM from the remote: FIN to the local side, keep sending.
                let _ = w.shutdown().await;
                start_watching(watch_reset).await;
                down_done.notify_one();
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
    let mut whole = vec![0u8; READ_SIZE + PAGE];
    let off = phase_offset(whole.as_ptr());
    let buf = &mut whole[off..off + READ_SIZE];
    let mut r = r;
    loop {
        match r.read(buf).await {
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

#[cfg(test)]
pub(crate) mod tests;
