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
//! | 6 GOAWAY | server | 4 bytes: the last stream id it will process (stream id 0) |
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

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Notify};

use crate::copy::{self, Counters, End, Failure};
use crate::tunnel::lock;

const HEADER: usize = 8;
/// Largest DATA payload: with its header a frame is 64 KiB, four full TLS records.
pub const MAX_DATA: usize = 64 * 1024 - HEADER;
const MAX_OPEN: usize = 16 * 1024;
const MAX_REPLY: usize = 16 * 1024;
const _: () = assert!(MAX_OPEN <= MAX_DATA && MAX_REPLY <= MAX_DATA);
/// Bytes a sender may have outstanding per stream; part of the protocol (both sides
/// use it). 4 MiB, as our h2 stream window: 1 and 2 MiB carried one stream 10-20 %
/// slower (benches/README.md).
pub const STREAM_WINDOW: usize = 4 * 1024 * 1024;
/// Credit is returned once this much has been written locally.
const CREDIT_AT: usize = STREAM_WINDOW / 4;
/// Bytes a sender may have outstanding on one connection, all streams together; part
/// of the protocol. 16 MiB, as our h2 connection window (and ztunnel's): four streams
/// stalled on their local sockets can hold all of it, as in h2, but unlike a reader
/// that stops reading, that holds up only data, never control frames.
pub const CONN_WINDOW: usize = 16 * 1024 * 1024;
/// Connection credit is returned once this much has left the receiver's hands.
const CONN_CREDIT_AT: usize = CONN_WINDOW / 4;
/// Most streams a server accepts at once on one connection (as our h2 server).
pub const MAX_STREAMS: usize = 1000;

/// Most bytes of control frames the reader may have waiting for the writer.
const CTRL_MAX: usize = 1024 * 1024;

/// Queued data is appended to the last queue entry while that is smaller than this.
const COALESCE: usize = 16 * 1024;

const DATA: u8 = 0;
const OPEN: u8 = 1;
const REPLY: u8 = 2;
const FIN: u8 = 3;
const RST: u8 = 4;
const CREDIT: u8 = 5;
const GOAWAY: u8 = 6;

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
}

fn header(kind: u8, len: usize, id: u32) -> [u8; HEADER] {
    let l = (len as u32).to_be_bytes();
    let i = id.to_be_bytes();
    [kind, l[1], l[2], l[3], i[0], i[1], i[2], i[3]]
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The connection's write side. Once a send holds it, its frames are on the wire or
/// kept: a send whose task is cancelled (a stream reset or drained while TLS took part
/// of its frame, or before it wrote anything) leaves the rest in `unsent`, which the
/// next send writes first, so frames are never cut short or lost on the wire.
struct Out {
    w: Writer,
    unsent: BytesMut,
}

/// The parts of one send; on drop, whatever was not written is kept in `unsent`.
struct Unsent<'a, 'b> {
    parts: Parts<'a>,
    unsent: &'b mut BytesMut,
}

impl Drop for Unsent<'_, '_> {
    fn drop(&mut self) {
        while self.parts.has_remaining() {
            let chunk = self.parts.chunk();
            let n = chunk.len();
            self.unsent.extend_from_slice(chunk);
            self.parts.advance(n);
        }
    }
}

/// Connection credit taken for a frame not yet handed to the writer: returned if
/// dropped before `commit` (the frame was never sent).
struct Held<'a> {
    conn: &'a Conn,
    n: usize,
}

impl Held<'_> {
    fn commit(mut self) {
        self.n = 0;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            self.conn.return_credit(self.n);
        }
    }
}

enum Reply {
    Status(u16, String),
    Unprocessed,
}

/// One connection, shared by its reader (the driver task) and its streams.
struct Conn {
    server: bool,
    writer: tokio::sync::Mutex<Out>,
    /// Frames the reader must send (CREDIT, RST); it never waits for the writer.
    ctrl: Mutex<BytesMut>,
    ctrl_ready: Notify,
    table: Mutex<Table>,
    /// Connection credit: DATA bytes this side may still send, all streams together.
    send_credit: AtomicUsize,
    /// Connection credit came back, or the connection ended.
    credit_wake: Notify,
    /// DATA bytes the remote may still send on the connection.
    recv_window: AtomicUsize,
    /// Received bytes that left our hands and are not yet returned as credit.
    recv_unacked: AtomicUsize,
    dead: AtomicBool,
    /// GOAWAY received: no new streams.
    going_away: AtomicBool,
    /// Client: no `Client` handle is left, so no new streams; the connection ends
    /// gracefully once its last stream has.
    unused: AtomicBool,
    /// A stream left the table (for a draining server).
    left: Notify,
}

#[derive(Default)]
struct Table {
    map: HashMap<u32, Arc<Slot>>,
    /// Client: the next id to use. Server: the highest id opened.
    next: u32,
    /// Server: GOAWAY sent. (A client knows it by `Conn::going_away`.)
    goaway: bool,
}

/// One stream's state, shared by the connection's reader and the stream's task.
struct Slot {
    id: u32,
    rx: Mutex<Rx>,
    /// Bytes this side may still send.
    credit: AtomicUsize,
    /// Credit arrived, or the stream was reset: the sending half looks again.
    tx_wake: Notify,
    /// Data, FIN or a reset arrived for the receiving half.
    rx_wake: Notify,
    /// The receiving half has ended (FIN written locally).
    rx_done: Notify,
}

#[derive(Default)]
struct Rx {
    /// Data the local socket did not take at once; small frames are appended to the
    /// last entry, so that an entry costs at least `COALESCE` bytes of data.
    queue: VecDeque<BytesMut>,
    queued: usize,
    /// The stream's task is writing an entry it took from the queue.
    writing: bool,
    local: Option<Arc<TcpStream>>,
    down: Option<IntCounter>,
    fin: bool,
    /// This side's FIN has been sent: with `fin`, the stream is complete on the wire.
    fin_sent: bool,
    reset: bool,
    local_failed: bool,
    /// Bytes the remote may still send before it needs credit.
    window: usize,
    /// Written locally and not yet returned as credit.
    unacked: usize,
    reply: Option<oneshot::Sender<Reply>>,
    /// A REPLY arrived (client side).
    replied: bool,
}

impl Slot {
    fn new(id: u32, reply: Option<oneshot::Sender<Reply>>) -> Arc<Slot> {
        Arc::new(Slot {
            id,
            rx: Mutex::new(Rx {
                window: STREAM_WINDOW,
                reply,
                ..Rx::default()
            }),
            credit: AtomicUsize::new(STREAM_WINDOW),
            tx_wake: Notify::new(),
            rx_wake: Notify::new(),
            rx_done: Notify::new(),
        })
    }

    fn reset(&self) {
        let mut rx = lock(&self.rx);
        rx.reset = true;
        rx.reply = None;
        drop(rx);
        self.rx_wake.notify_one();
        self.tx_wake.notify_one();
    }
}

impl Conn {
    fn new(writer: Writer, server: bool) -> Arc<Conn> {
        Arc::new(Conn {
            server,
            writer: tokio::sync::Mutex::new(Out {
                w: writer,
                unsent: BytesMut::new(),
            }),
            ctrl: Mutex::new(BytesMut::new()),
            ctrl_ready: Notify::new(),
            table: Mutex::new(Table {
                next: if server { 0 } else { 1 },
                ..Table::default()
            }),
            send_credit: AtomicUsize::new(CONN_WINDOW),
            credit_wake: Notify::new(),
            recv_window: AtomicUsize::new(CONN_WINDOW),
            recv_unacked: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            going_away: AtomicBool::new(false),
            unused: AtomicBool::new(false),
            left: Notify::new(),
        })
    }

    fn push_ctrl(&self, kind: u8, id: u32, payload: &[u8]) {
        let mut c = lock(&self.ctrl);
        c.put_slice(&header(kind, payload.len(), id));
        c.put_slice(payload);
        drop(c);
        self.ctrl_ready.notify_one();
    }

    /// Writes `parts` as one write (the frames stay whole), ahead of it any waiting
    /// control frames, and flushes. `credit`: connection credit taken for the DATA in
    /// `parts`, returned if the send is cancelled before the writer is held (after
    /// that, the frame goes out whatever happens to this task).
    async fn send(&self, parts: &[&[u8]], credit: usize) -> Result<(), Error> {
        let held = Held {
            conn: self,
            n: credit,
        };
        if self.dead.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let mut out = self.writer.lock().await;
        held.commit();
        self.send_locked(&mut out, parts).await
    }

    /// `send`, with the writer already held. `Error::Closed`: nothing was written.
    async fn send_locked(&self, out: &mut Out, parts: &[&[u8]]) -> Result<(), Error> {
        if self.dead.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let Out { w, unsent } = out;
        let ctrl = std::mem::take(&mut *lock(&self.ctrl));
        let result = async move {
            if unsent.is_empty() {
                let mut rest = Unsent {
                    parts: Parts::new(&ctrl, parts),
                    unsent,
                };
                w.write_all_buf(&mut rest.parts).await?;
            } else {
                // What a cancelled send left (the rest of a frame) goes first; this
                // send's frames join it, so that they too are kept if this one is
                // cancelled (rare: a copy only after a cancellation).
                unsent.extend_from_slice(&ctrl);
                for p in parts {
                    unsent.extend_from_slice(p);
                }
                w.write_all_buf(unsent).await?;
            }
            w.flush().await
        }
        .await;
        if let Err(e) = result {
            self.dead.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
        Ok(())
    }

    /// With `flush`, writes what is waiting (a cancelled send's rest, control frames);
    /// with `shutdown`, then close_notify and FIN. Bounded to 1 s: a stream's task may
    /// hold the writer, stuck on a remote that stopped reading.
    async fn finish(&self, flush: bool, shutdown: bool) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut out = self.writer.lock().await;
            if flush && self.send_locked(&mut out, &[]).await.is_err() {
                return;
            }
            if shutdown {
                let _ = out.w.shutdown().await;
            }
        })
        .await;
    }

    fn remove(&self, id: u32) {
        let mut t = lock(&self.table);
        t.map.remove(&id);
        drop(t);
        self.left.notify_one();
        if self.unused.load(Ordering::Relaxed) {
            // Perhaps the last stream of an unused client connection: see `drive`.
            self.ctrl_ready.notify_one();
        }
    }

    fn slot(&self, id: u32) -> Option<Arc<Slot>> {
        lock(&self.table).map.get(&id).cloned()
    }

    /// Ends the connection: every stream is reset, every waiter woken.
    fn close(&self) {
        self.dead.store(true, Ordering::Relaxed);
        let slots: Vec<_> = {
            let mut t = lock(&self.table);
            t.map.drain().map(|(_, s)| s).collect()
        };
        for s in slots {
            let complete = {
                let rx = lock(&s.rx);
                rx.fin && rx.fin_sent
            };
            // A stream whose both ends crossed the wire only has local writing left.
            if complete {
                s.rx_wake.notify_one();
            } else {
                s.reset();
            }
        }
        self.ctrl_ready.notify_one();
        self.credit_wake.notify_waiters();
        self.left.notify_one();
    }

    /// Returns written bytes as credit when enough have gathered.
    fn credit(&self, slot: &Slot, rx: &mut Rx) {
        if rx.unacked >= CREDIT_AT {
            let n = rx.unacked;
            rx.unacked = 0;
            rx.window += n;
            self.push_ctrl(CREDIT, slot.id, &(n as u32).to_be_bytes());
        }
    }

    /// Received bytes that left our hands (written locally, or dropped with their
    /// stream) go back to the remote as connection credit once enough have gathered.
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        if self.recv_unacked.fetch_add(n, Ordering::Relaxed) + n >= CONN_CREDIT_AT {
            let u = self.recv_unacked.swap(0, Ordering::Relaxed);
            if u > 0 {
                // Widened before the remote can learn of it.
                self.recv_window.fetch_add(u, Ordering::Relaxed);
                self.push_ctrl(CREDIT, 0, &(u as u32).to_be_bytes());
            }
        }
    }

    /// Takes up to `want` bytes of connection credit: what there is, 0 if none.
    fn take_credit(&self, want: usize) -> usize {
        match self
            .send_credit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c > 0).then(|| c - c.min(want))
            }) {
            Ok(c) => c.min(want),
            Err(_) => 0,
        }
    }

    /// Gives connection credit back (unused, or returned by the remote). Whoever waits
    /// for credit found less than `MAX_DATA`, so only a return onto less than that
    /// needs to wake anyone.
    fn return_credit(&self, n: usize) -> usize {
        let before = self.send_credit.fetch_add(n, Ordering::Relaxed);
        if before < MAX_DATA && n > 0 {
            self.credit_wake.notify_waiters();
        }
        before
    }

    /// Takes exactly `n` (at most `MAX_DATA`) bytes of connection credit, waiting for
    /// them; false if the connection ended or received GOAWAY first.
    async fn take_credit_exact(&self, n: usize) -> bool {
        loop {
            let wake = self.credit_wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let took = self
                .send_credit
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    (c >= n).then(|| c - n)
                });
            if took.is_ok() {
                return true;
            }
            if self.dead.load(Ordering::Relaxed) || self.going_away.load(Ordering::Relaxed) {
                return false;
            }
            wake.await;
        }
    }

    /// A DATA frame: written to the local socket at once when it takes it and nothing
    /// is queued before it, else queued for the stream's task.
    fn on_data(&self, id: u32, mut data: &[u8]) -> Result<(), Error> {
        // Only this (the reader) takes from the window, so it cannot shrink meanwhile.
        if data.len() > self.recv_window.load(Ordering::Relaxed) {
            return Err(Error::Protocol("DATA beyond the connection window"));
        }
        self.recv_window.fetch_sub(data.len(), Ordering::Relaxed);
        let Some(slot) = self.slot(id) else {
            // The stream ended here; the remote learns it from our FIN or RST.
            self.release(data.len());
            return Ok(());
        };
        let mut rx = lock(&slot.rx);
        if data.len() > rx.window {
            return Err(Error::Protocol("DATA beyond the stream window"));
        }
        if rx.fin {
            return Err(Error::Protocol("DATA after FIN"));
        }
        rx.window -= data.len();
        if rx.reset || rx.local_failed {
            self.release(data.len());
            return Ok(());
        }
        if rx.queue.is_empty() && !rx.writing {
            if let Some(local) = &rx.local {
                let n = match local.try_write(data) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(_) => {
                        rx.local_failed = true;
                        drop(rx);
                        self.release(data.len());
                        slot.rx_wake.notify_one();
                        return Ok(());
                    }
                };
                if let Some(c) = &rx.down {
                    c.inc_by(n as u64);
                }
                rx.unacked += n;
                self.credit(&slot, &mut rx);
                self.release(n);
                if n == data.len() {
                    return Ok(());
                }
                data = &data[n..];
            }
        }
        // The one copy besides TLS's, only for what the socket did not take.
        rx.queued += data.len();
        match rx.queue.back_mut() {
            Some(back) if back.len() < COALESCE => back.extend_from_slice(data),
            _ => rx.queue.push_back(BytesMut::from(data)),
        }
        drop(rx);
        slot.rx_wake.notify_one();
        Ok(())
    }

    fn handle(
        self: &Arc<Self>,
        kind: u8,
        id: u32,
        payload: &[u8],
        on_open: &OnOpen<'_>,
    ) -> Result<(), Error> {
        let need = |ok: bool, what: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Protocol(what))
            }
        };
        match kind {
            DATA => {
                need(!payload.is_empty(), "empty DATA")?;
                self.on_data(id, payload)
            }
            OPEN => {
                need(self.server, "OPEN to a client")?;
                need(payload.len() <= MAX_OPEN, "OPEN too long")?;
                let mut t = lock(&self.table);
                need(id > t.next, "OPEN with a stream id not above the last")?;
                if t.goaway {
                    // Draining: the client learned from GOAWAY that this one was not
                    // processed.
                    return Ok(());
                }
                t.next = id;
                if t.map.len() >= MAX_STREAMS {
                    drop(t);
                    // Refused unprocessed (status 0): the client may open it elsewhere.
                    // Its early data, if any, is dropped as for any unknown stream.
                    if lock(&self.ctrl).len() > CTRL_MAX {
                        return Err(Error::Protocol("peer does not read its answers"));
                    }
                    self.push_ctrl(REPLY, id, &0u16.to_be_bytes());
                    return Ok(());
                }
                let slot = Slot::new(id, None);
                t.map.insert(id, slot.clone());
                drop(t);
                if let Some(open) = on_open {
                    let incoming = Incoming {
                        stream: Some(Stream {
                            conn: self.clone(),
                            slot,
                            ended: false,
                        }),
                        auth: Bytes::copy_from_slice(payload),
                    };
                    open(incoming);
                }
                Ok(())
            }
            REPLY => {
                need(!self.server, "REPLY to a server")?;
                need(
                    payload.len() >= 2 && payload.len() <= MAX_REPLY,
                    "bad REPLY",
                )?;
                if let Some(slot) = self.slot(id) {
                    let status = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                    let tx = {
                        let mut rx = lock(&slot.rx);
                        need(!rx.replied, "second REPLY")?;
                        rx.replied = true;
                        rx.reply.take()
                    };
                    if status != 200 {
                        self.remove(id);
                    }
                    if let Some(tx) = tx {
                        let _ = tx.send(if status == 0 {
                            Reply::Unprocessed
                        } else {
                            Reply::Status(status, reason)
                        });
                    }
                }
                Ok(())
            }
            FIN => {
                need(payload.is_empty(), "FIN with a payload")?;
                if let Some(slot) = self.slot(id) {
                    let mut rx = lock(&slot.rx);
                    need(!rx.fin, "second FIN")?;
                    rx.fin = true;
                    drop(rx);
                    slot.rx_wake.notify_one();
                }
                Ok(())
            }
            RST => {
                need(payload.is_empty(), "RST with a payload")?;
                if let Some(slot) = self.slot(id) {
                    slot.reset();
                }
                Ok(())
            }
            CREDIT => {
                need(payload.len() == 4, "bad CREDIT")?;
                let n = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if id == 0 {
                    let before = self.return_credit(n as usize);
                    return need(
                        before + n as usize <= CONN_WINDOW,
                        "CREDIT beyond the connection window",
                    );
                }
                if let Some(slot) = self.slot(id) {
                    let before = slot.credit.fetch_add(n as usize, Ordering::Relaxed);
                    need(
                        before + n as usize <= STREAM_WINDOW,
                        "CREDIT beyond the window",
                    )?;
                    slot.tx_wake.notify_one();
                }
                Ok(())
            }
            GOAWAY => {
                need(!self.server && id == 0 && payload.len() == 4, "bad GOAWAY")?;
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                // No new streams; those up to `last` go on. An OPEN waiting for credit
                // gives up.
                self.going_away.store(true, Ordering::Relaxed);
                self.credit_wake.notify_waiters();
                let unprocessed: Vec<_> = {
                    let mut t = lock(&self.table);
                    let ids: Vec<u32> = t.map.keys().copied().filter(|i| *i > last).collect();
                    ids.iter().filter_map(|i| t.map.remove(i)).collect()
                };
                for s in unprocessed {
                    if let Some(tx) = lock(&s.rx).reply.take() {
                        let _ = tx.send(Reply::Unprocessed);
                    }
                    s.reset();
                }
                Ok(())
            }
            _ => Err(Error::Protocol("unknown frame type")),
        }
    }
}

type OnOpen<'a> = Option<&'a (dyn Fn(Incoming) + Send + Sync)>;

/// The reader's buffer, allocated and zeroed once per connection and reused: a DATA
/// frame is written to its stream's socket straight from here. Each read is bounded
/// to finish the current frame and take at most the next header, so that what is
/// left after the complete frames is at most a header (moved to the front), never
/// part of a payload. (A fresh buffer per read would cost a `memset`: tokio-rustls
/// zeroes the part of a read buffer it does not know to be initialised.)
struct FrameBuf {
    buf: Vec<u8>,
    /// Where the window starts (`copy::DATA_PHASE` modulo 4096).
    start: usize,
    filled: usize,
}

const FRAME_BUF: usize = HEADER + MAX_DATA + HEADER;

impl FrameBuf {
    fn new() -> FrameBuf {
        let buf = vec![0u8; FRAME_BUF + copy::PAGE];
        let start = copy::phase_offset(buf.as_ptr());
        FrameBuf {
            buf,
            start,
            filled: 0,
        }
    }

    fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + FRAME_BUF]
    }
}

/// The payload length in a frame header.
fn frame_len(h: &[u8]) -> usize {
    u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize
}

/// Runs a connection: reads and dispatches frames, and sends the reader's control
/// frames, until the connection ends. A server stops taking streams when `stop` turns
/// true (GOAWAY) and ends once its last stream has.
async fn drive<R: AsyncRead + Unpin>(
    conn: Arc<Conn>,
    mut rd: R,
    on_open: OnOpen<'_>,
    stop: Option<watch::Receiver<bool>>,
) -> Result<(), Error> {
    let ctrl_writer = {
        let conn = conn.clone();
        async move {
            loop {
                conn.ctrl_ready.notified().await;
                if conn.dead.load(Ordering::Relaxed) {
                    return;
                }
                if conn.unused.load(Ordering::Relaxed) && lock(&conn.table).map.is_empty() {
                    // A client connection nobody can open streams on (dropped from the
                    // pool: an older certificate, GOAWAY) and with no stream left: close
                    // our side (close_notify and FIN). The server closes its side on
                    // that, and the reader ends at its end of file. Bounded: a remote
                    // that stopped reading may never take the close_notify.
                    // What is left to write (a cancelled send's rest, the last
                    // stream's RST) goes out first.
                    conn.finish(true, true).await;
                    return std::future::pending().await;
                }
                if lock(&conn.ctrl).is_empty() {
                    continue;
                }
                if conn.send(&[], 0).await.is_err() {
                    conn.close();
                    return;
                }
            }
        }
    };
    let reader = async {
        let mut fb = FrameBuf::new();
        let mut draining = false;
        let mut stopped = std::pin::pin!(async move {
            match stop {
                Some(mut s) => crate::app::stopped(&mut s).await,
                None => std::future::pending().await,
            }
        });
        loop {
            let filled = fb.filled;
            let w = fb.window();
            let mut pos = 0;
            while filled - pos >= HEADER {
                let h = &w[pos..pos + HEADER];
                let (kind, len) = (h[0], frame_len(h));
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if len > MAX_DATA {
                    return Err(Error::Protocol("frame too long"));
                }
                if filled - pos < HEADER + len {
                    break;
                }
                conn.handle(kind, id, &w[pos + HEADER..pos + HEADER + len], &on_open)?;
                pos += HEADER + len;
            }
            w.copy_within(pos..filled, 0);
            let filled = filled - pos;
            // Finish this frame and take the next header; or complete the header.
            let want = if filled >= HEADER {
                2 * HEADER + frame_len(&w[..HEADER]) - filled
            } else {
                HEADER - filled
            };
            fb.filled = filled;
            let n = tokio::select! {
                n = rd.read(&mut fb.window()[filled..filled + want]) => n?,
                _ = &mut stopped, if !draining => {
                    draining = true;
                    let last = {
                        let mut t = lock(&conn.table);
                        t.goaway = true;
                        t.next
                    };
                    conn.push_ctrl(GOAWAY, 0, &last.to_be_bytes());
                    continue;
                }
                _ = all_left(&conn), if draining => return Ok(()),
            };
            fb.filled += n;
            if n == 0 {
                return if fb.filled == 0 {
                    Ok(())
                } else {
                    Err(Error::Protocol("connection ended inside a frame"))
                };
            }
        }
    };
    let result = tokio::select! {
        r = reader => r,
        _ = ctrl_writer => Err(Error::Closed),
    };
    // What is still waiting (a draining server's GOAWAY, a cancelled send's rest) goes
    // out first. (A writer held by a stream's task has nothing of its own waiting.)
    let pending = !lock(&conn.ctrl).is_empty()
        || conn
            .writer
            .try_lock()
            .is_ok_and(|out| !out.unsent.is_empty());
    if pending {
        conn.finish(true, false).await;
    }
    conn.close();
    // Let the remote see the end (close_notify) rather than only a dropped socket.
    conn.finish(false, true).await;
    result
}

/// Returns once the connection has no streams.
async fn all_left(conn: &Conn) {
    while !lock(&conn.table).map.is_empty() {
        conn.left.notified().await;
    }
}

/// The client side of a connection: opens streams. Once every clone is dropped, the
/// connection takes no new streams and ends gracefully after its last one.
#[derive(Clone)]
pub struct Client {
    conn: Arc<Handle>,
}

/// The connection, marked unused when the last `Client` clone goes.
struct Handle(Arc<Conn>);

impl std::ops::Deref for Handle {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.0
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.unused.store(true, Ordering::Relaxed);
        self.0.ctrl_ready.notify_one();
    }
}

impl Client {
    /// Takes a connection that negotiated `clusterlink-mux/1`. The returned future
    /// drives it and must be spawned; it ends when the connection does.
    pub fn new<T>(
        io: T,
    ) -> (
        Client,
        impl std::future::Future<Output = Result<(), Error>> + Send,
    )
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let conn = Conn::new(Box::new(wr), false);
        let driver = drive(conn.clone(), rd, None, None);
        let conn = Arc::new(Handle(conn));
        (Client { conn }, driver)
    }

    /// True once the connection has ended or is going away: no new streams on it.
    pub fn is_dead(&self) -> bool {
        self.conn.dead.load(Ordering::Relaxed) || self.conn.going_away.load(Ordering::Relaxed)
    }

    /// True while less than a frame's worth of connection credit is left: the remote
    /// holds data of this connection's streams that its local sockets have not taken,
    /// and a new stream's data would wait behind it.
    pub fn congested(&self) -> bool {
        self.conn.send_credit.load(Ordering::Relaxed) < MAX_DATA
    }

    /// Opens a stream carrying `auth` (the Authorization value) with `early` (what the
    /// client sent already, at most `MAX_DATA`) right behind it. `timeout` bounds all of
    /// it: the wait for connection credit for `early`, the write, and the answer. A
    /// connection that cannot take an OPEN in that time (its credit held by streams
    /// stalled at the remote, or a remote that stopped reading) takes no new streams.
    pub async fn open(
        &self,
        auth: &str,
        early: &Bytes,
        timeout: Duration,
    ) -> Result<Stream, OpenError> {
        if auth.len() > MAX_OPEN || early.len() > MAX_DATA {
            return Err(OpenError::Refused {
                status: 400,
                reason: "request too large".into(),
            });
        }
        if self.is_dead() {
            return Err(OpenError::Unprocessed("connection closing"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let conn: &Conn = &self.conn;
        // Connection credit for the first bytes, given back unless they are sent.
        let mut held = Held { conn, n: 0 };
        if !early.is_empty() {
            match tokio::time::timeout_at(deadline, conn.take_credit_exact(early.len())).await {
                Ok(true) => held.n = early.len(),
                Ok(false) => return Err(OpenError::Unprocessed("connection closing")),
                Err(_) => {
                    conn.going_away.store(true, Ordering::Relaxed);
                    return Err(OpenError::Unprocessed("no connection credit in time"));
                }
            }
        }
        let Ok(mut out) = tokio::time::timeout_at(deadline, conn.writer.lock()).await else {
            // Another stream's write has held the connection all this time.
            conn.going_away.store(true, Ordering::Relaxed);
            return Err(OpenError::Unprocessed("connection not writable in time"));
        };
        // The id is taken with the writer held, so that OPENs reach the wire in the
        // order of their ids (the server requires it).
        let (tx, rx) = oneshot::channel();
        let slot = {
            let mut t = lock(&conn.table);
            // `dead` and `going_away` are set before the table is cleared of the
            // streams they end, so a stream added here is either refused or cleared.
            if self.is_dead() {
                return Err(OpenError::Unprocessed("connection closing"));
            }
            let id = t.next;
            if id > u32::MAX - 2 {
                conn.going_away.store(true, Ordering::Relaxed);
                return Err(OpenError::Unprocessed("stream ids used up"));
            }
            t.next += 2;
            let slot = Slot::new(id, Some(tx));
            t.map.insert(id, slot.clone());
            slot
        };
        let mut stream = Stream {
            conn: self.conn.0.clone(),
            slot,
            ended: false,
        };
        let id = stream.slot.id;
        stream.slot.credit.fetch_sub(early.len(), Ordering::Relaxed);
        let open = header(OPEN, auth.len(), id);
        let data = header(DATA, early.len(), id);
        let parts: &[&[u8]] = if early.is_empty() {
            &[&open, auth.as_bytes()]
        } else {
            &[&open, auth.as_bytes(), &data, early]
        };
        // From here on the frames go out whatever happens to this task.
        held.commit();
        match tokio::time::timeout_at(deadline, conn.send_locked(&mut out, parts)).await {
            Ok(Ok(())) => {}
            // Nothing was written: the connection had already ended.
            Ok(Err(Error::Closed)) => {
                stream.ended = true;
                return Err(OpenError::Unprocessed("connection closed"));
            }
            Ok(Err(_)) => return Err(OpenError::Lost),
            // Written in part; the rest goes out first with the next send, and the
            // stream's drop resets it.
            Err(_) => {
                conn.going_away.store(true, Ordering::Relaxed);
                return Err(OpenError::Timeout);
            }
        }
        drop(out);
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Reply::Status(200, _))) => Ok(stream),
            Ok(Ok(Reply::Status(status, reason))) => {
                stream.ended = true;
                Err(OpenError::Refused { status, reason })
            }
            Ok(Ok(Reply::Unprocessed)) => {
                stream.ended = true;
                Err(OpenError::Unprocessed("GOAWAY or stream limit"))
            }
            Ok(Err(_)) => Err(OpenError::Lost),
            Err(_) => Err(OpenError::Timeout),
        }
    }
}

/// Serves a connection that negotiated `clusterlink-mux/1` until it ends: each OPEN is
/// handed to `on_open` (which should spawn a task to answer it). When `stop` turns true
/// the server sends GOAWAY and ends once its streams have.
pub async fn serve<T>(
    io: T,
    on_open: impl Fn(Incoming) + Send + Sync,
    stop: watch::Receiver<bool>,
) -> Result<(), Error>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let conn = Conn::new(Box::new(wr), true);
    drive(conn, rd, Some(&on_open), Some(stop)).await
}

/// An opened stream waiting for the server's answer; dropped unanswered, it is reset
/// (`Stream`'s drop).
pub struct Incoming {
    stream: Option<Stream>,
    auth: Bytes,
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

/// One stream, established (or, inside `Incoming`, being answered).
pub struct Stream {
    conn: Arc<Conn>,
    slot: Arc<Slot>,
    /// Ended in a way both sides know (both FINs, a refusal, a reset sent or
    /// received); otherwise dropping it resets it.
    ended: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        let id = self.slot.id;
        let (was_reset, queued) = {
            let mut rx = lock(&self.slot.rx);
            let was_reset = rx.reset;
            // From here on the reader drops data for it instead of queueing.
            rx.reset = true;
            rx.queue.clear();
            (was_reset, std::mem::take(&mut rx.queued))
        };
        if !self.ended && !was_reset {
            self.conn.push_ctrl(RST, id, &[]);
        }
        self.conn.remove(id);
        // Unwritten data no longer counts against the connection.
        self.conn.release(queued);
    }
}

/// Up to 5 slices written as one (vectored) write; rustls seals them into records
/// without gathering them first.
struct Parts<'a> {
    parts: [&'a [u8]; 5],
    n: usize,
    i: usize,
}

impl<'a> Parts<'a> {
    fn new(first: &'a [u8], rest: &[&'a [u8]]) -> Parts<'a> {
        let mut parts: [&[u8]; 5] = [&[]; 5];
        parts[0] = first;
        let n = 1 + rest.len().min(4);
        parts[1..n].copy_from_slice(&rest[..n - 1]);
        Parts { parts, n, i: 0 }
    }
}

impl Buf for Parts<'_> {
    fn remaining(&self) -> usize {
        self.parts[self.i..self.n].iter().map(|p| p.len()).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.parts[self.i..self.n]
            .iter()
            .find(|p| !p.is_empty())
            .copied()
            .unwrap_or(&[])
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 && self.i < self.n {
            let p = &mut self.parts[self.i];
            if cnt >= p.len() {
                cnt -= p.len();
                self.i += 1;
            } else {
                *p = &p[cnt..];
                cnt = 0;
            }
        }
        while self.i < self.n && self.parts[self.i].is_empty() {
            self.i += 1;
        }
    }

    fn chunks_vectored<'b>(&'b self, dst: &mut [io::IoSlice<'b>]) -> usize {
        let mut k = 0;
        for p in self.parts[self.i..self.n].iter().filter(|p| !p.is_empty()) {
            if k == dst.len() {
                break;
            }
            dst[k] = io::IoSlice::new(p);
            k += 1;
        }
        k
    }
}

/// Relays `tcp` <-> `stream` until both directions end or either side resets. From
/// here on the connection's reader writes received data straight into `tcp`.
pub async fn splice(tcp: TcpStream, mut stream: Stream, counters: &Counters) -> End {
    let tcp = Arc::new(tcp);
    {
        let mut rx = lock(&stream.slot.rx);
        rx.local = Some(tcp.clone());
        rx.down = Some(counters.down.clone());
    }
    // Data that arrived before (the client's first bytes at the server).
    stream.slot.rx_wake.notify_one();
    let result = tokio::try_join!(up(&stream, &tcp, &counters.up), down(&stream, &tcp));
    {
        let mut rx = lock(&stream.slot.rx);
        rx.local = None;
        rx.down = None;
    }
    match result {
        Ok(_) => {
            stream.ended = true;
            End::Eof
        }
        // Dropping the stream resets it at the remote.
        Err(Failure::Local) => End::LocalReset,
        Err(Failure::Remote) => {
            copy::reset_on_drop(&tcp);
            End::RemoteReset
        }
    }
}

/// Reads what the local socket has (at most `want` bytes). Like tokio's `poll_read`,
/// a short read of an interactive sender clears the socket's readiness, so that the
/// next turn waits for the next message instead of spending a read on WouldBlock; a
/// streaming sender keeps it and is read again at once.
fn read_some(
    tcp: &TcpStream,
    buf: &mut BytesMut,
    want: usize,
    streaming: bool,
) -> io::Result<usize> {
    let mut short = None;
    let read = tcp.try_io(Interest::READABLE, || {
        let n = tcp.try_read_buf(&mut (&mut *buf).limit(want))?;
        if !streaming && n > 0 && n < want {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => read,
    }
}

/// Local socket -> DATA frames, written into TLS by this task.
async fn up(stream: &Stream, tcp: &TcpStream, counter: &IntCounter) -> Result<(), Failure> {
    let slot = &stream.slot;
    let id = slot.id;
    let mut last = 0;
    loop {
        if lock(&slot.rx).reset {
            return Err(Failure::Remote);
        }
        let credit = slot.credit.load(Ordering::Relaxed);
        if credit == 0 {
            // A local reset still ends the stream while it waits for credit.
            tokio::select! {
                _ = slot.tx_wake.notified() => {}
                _ = tcp.ready(Interest::ERROR) => return Err(Failure::Local),
            }
            continue;
        }
        tokio::select! {
            r = tcp.readable() => if r.is_err() {
                return Err(Failure::Local);
            },
            _ = slot.tx_wake.notified() => continue,
        }
        let conn = &stream.conn;
        let want = conn.take_credit(credit.min(MAX_DATA));
        if want == 0 {
            if conn.dead.load(Ordering::Relaxed) {
                return Err(Failure::Remote);
            }
            // All of the connection's credit is out (other streams' data waits for
            // slow sockets at the remote): wait for some, or for this stream's reset.
            let wake = conn.credit_wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if conn.send_credit.load(Ordering::Relaxed) == 0 {
                tokio::select! {
                    _ = wake => {}
                    _ = slot.tx_wake.notified() => {}
                    _ = tcp.ready(Interest::ERROR) => return Err(Failure::Local),
                }
            }
            continue;
        }
        let mut buf = copy::phased_buf_with(want);
        let read = read_some(tcp, &mut buf, want, last >= copy::STREAMING_READ);
        // What this read did not use goes back at once.
        conn.return_credit(want - read.as_ref().map_or(0, |n| *n));
        match read {
            Ok(0) => {
                stream
                    .conn
                    .send(&[&header(FIN, 0, id)], 0)
                    .await
                    .map_err(|_| Failure::Remote)?;
                lock(&slot.rx).fin_sent = true;
                return after_fin(slot, tcp).await;
            }
            Ok(n) => {
                last = n;
                slot.credit.fetch_sub(n, Ordering::Relaxed);
                counter.inc_by(n as u64);
                stream
                    .conn
                    .send(&[&header(DATA, n, id), &buf], n)
                    .await
                    .map_err(|_| Failure::Remote)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Failure::Local),
        }
    }
}

/// The sending half after the local FIN, until the receiving half ends: a reset of
/// either side still ends the stream at once.
async fn after_fin(slot: &Slot, tcp: &TcpStream) -> Result<(), Failure> {
    loop {
        tokio::select! {
            _ = slot.rx_done.notified() => return Ok(()),
            // After a FIN the socket stays readable (end of file); only an error (RST)
            // wakes this.
            _ = tcp.ready(Interest::ERROR) => return Err(Failure::Local),
            _ = slot.tx_wake.notified() => if lock(&slot.rx).reset {
                return Err(Failure::Remote);
            },
        }
    }
}

/// Queued DATA -> the local socket, for what the reader could not write at once; then
/// the remote's FIN.
async fn down(stream: &Stream, tcp: &TcpStream) -> Result<(), Failure> {
    let (slot, conn) = (&stream.slot, &stream.conn);
    loop {
        // Some(Some(data)): write it; Some(None): FIN; None: wait.
        let next = {
            let mut rx = lock(&slot.rx);
            if rx.reset {
                return Err(Failure::Remote);
            }
            if rx.local_failed {
                return Err(Failure::Local);
            }
            match rx.queue.pop_front() {
                Some(b) => {
                    rx.writing = true;
                    Some(Some(b))
                }
                None if rx.fin => Some(None),
                None => None,
            }
        };
        let Some(next) = next else {
            slot.rx_wake.notified().await;
            continue;
        };
        let Some(mut data) = next else {
            let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
            slot.rx_done.notify_one();
            return Ok(());
        };
        let n = loop {
            tokio::select! {
                r = tcp.writable() => if r.is_err() {
                    return Err(Failure::Local);
                },
                _ = slot.rx_wake.notified() => {
                    if lock(&slot.rx).reset {
                        return Err(Failure::Remote);
                    }
                    continue;
                }
            }
            match tcp.try_write(&data) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(Failure::Local),
            }
        };
        data.advance(n);
        let mut rx = lock(&slot.rx);
        rx.writing = false;
        if !data.is_empty() {
            rx.queue.push_front(data);
        }
        rx.queued = rx.queued.saturating_sub(n);
        conn.release(n);
        if let Some(c) = &rx.down {
            c.inc_by(n as u64);
        }
        rx.unacked += n;
        conn.credit(slot, &mut rx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use anyhow::{bail, ensure, Context as _};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use crate::copy::tests::{counters, payload, reset, tcp_pair};

    const T: Duration = Duration::from_secs(10);

    /// A server on one end of a loopback connection, splicing each stream whose token
    /// is "ok" to a new connection to `target` (refusing others with 403), and a client
    /// on the other end.
    async fn mux_pair(
        target: std::net::SocketAddr,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<(Client, JoinHandle<Result<(), Error>>)> {
        let (c, s) = tcp_pair().await?;
        let on_open = move |incoming: Incoming| {
            tokio::spawn(async move {
                if incoming.authorization() != Some("Bearer ok") {
                    return incoming.refuse(403, "bad token").await;
                }
                let (Ok(tcp), Ok(counters)) = (TcpStream::connect(target).await, counters()) else {
                    return incoming.refuse(502, "no target").await;
                };
                if let Ok(stream) = incoming.accept().await {
                    splice(tcp, stream, &counters).await;
                }
            });
        };
        let server = tokio::spawn(serve(s, on_open, stop));
        let (client, driver) = Client::new(c);
        tokio::spawn(driver);
        Ok((client, server))
    }

    /// An echo target: every connection gets back what it sends, then a FIN.
    async fn echo() -> anyhow::Result<std::net::SocketAddr> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Ok(addr)
    }

    /// Opens a stream with `token` and splices it to a new loopback connection; returns
    /// the application's end of it.
    async fn open_local(client: &Client, token: &str) -> anyhow::Result<TcpStream> {
        let stream = client
            .open(&format!("Bearer {token}"), &Bytes::new(), T)
            .await?;
        let (app, gw) = tcp_pair().await?;
        let counters = counters()?;
        tokio::spawn(async move { splice(gw, stream, &counters).await });
        Ok(app)
    }

    /// Several windows of data each way through a stream whose reader is slow: the
    /// receiving side queues what the socket does not take, credit paces the sender,
    /// every byte arrives once and in order, and half-close carries the end.
    #[tokio::test]
    async fn carries_many_windows_to_a_slow_reader_and_half_closes() -> anyhow::Result<()> {
        let (_stop_tx, stop) = watch::channel(false);
        let (client, _server) = mux_pair(echo().await?, stop).await?;
        let app = open_local(&client, "ok").await?;
        let data = payload(5 * STREAM_WINDOW + 12345, 1);
        let (mut r, mut w) = app.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await?;
            w.shutdown().await?;
            anyhow::Ok(w)
        });
        let mut back = Vec::new();
        let mut buf = vec![0u8; 8 * 1024];
        timeout(T, async {
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    return anyhow::Ok(());
                }
                back.extend_from_slice(&buf[..n]);
                // Slower than the sender, so that both gateways' queues fill.
                if back.len() % (256 * 1024) < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
        .await
        .context("the echo did not end")??;
        timeout(T, writer).await???;
        ensure!(
            back.len() == data.len(),
            "{} of {} bytes back",
            back.len(),
            data.len()
        );
        ensure!(back == data[..], "the echo differs from what was sent");
        Ok(())
    }

    #[tokio::test]
    async fn refusal_reaches_the_client_with_status_and_reason() -> anyhow::Result<()> {
        let (_stop_tx, stop) = watch::channel(false);
        let (client, _server) = mux_pair(echo().await?, stop).await?;
        match client.open("Bearer nope", &Bytes::new(), T).await {
            Err(OpenError::Refused { status, reason }) => {
                ensure!(status == 403 && reason == "bad token", "{status} {reason}")
            }
            Err(e) => bail!("unexpected error: {e}"),
            Ok(_) => bail!("a refused stream opened"),
        }
        // The connection still carries other streams.
        let mut app = open_local(&client, "ok").await?;
        app.write_all(b"ping").await?;
        let mut got = [0u8; 4];
        timeout(T, app.read_exact(&mut got)).await??;
        ensure!(&got == b"ping");
        Ok(())
    }

    /// A target that resets its connection resets the client's, not a clean end.
    #[tokio::test]
    async fn a_reset_travels_as_a_reset() -> anyhow::Result<()> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let target = l.local_addr()?;
        tokio::spawn(async move {
            if let Ok((mut tcp, _)) = l.accept().await {
                let mut b = [0u8; 1];
                let _ = tcp.read_exact(&mut b).await;
                let _ = reset(tcp);
            }
        });
        let (_stop_tx, stop) = watch::channel(false);
        let (client, _server) = mux_pair(target, stop).await?;
        let mut app = open_local(&client, "ok").await?;
        app.write_all(b"x").await?;
        let mut buf = [0u8; 16];
        match timeout(T, app.read(&mut buf)).await? {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            other => bail!("expected a reset, got {other:?}"),
        }
    }

    /// On stop the server sends GOAWAY: the client opens nothing more on it, the open
    /// stream goes on to its end, and then the server ends.
    #[tokio::test]
    async fn goaway_drains_the_connection() -> anyhow::Result<()> {
        let (stop_tx, stop) = watch::channel(false);
        let (client, server) = mux_pair(echo().await?, stop).await?;
        let mut app = open_local(&client, "ok").await?;
        stop_tx.send(true)?;
        timeout(T, async {
            while !client.is_dead() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .context("no GOAWAY")?;
        match client.open("Bearer ok", &Bytes::new(), T).await {
            Err(OpenError::Unprocessed(_)) => {}
            Err(e) => bail!("unexpected error: {e}"),
            Ok(_) => bail!("a stream opened after GOAWAY"),
        }
        app.write_all(b"still here").await?;
        app.shutdown().await?;
        let mut back = Vec::new();
        timeout(T, app.read_to_end(&mut back)).await??;
        ensure!(back == b"still here", "{back:?}");
        timeout(T, server).await???;
        Ok(())
    }

    /// A client connection whose every handle is dropped (as the pool drops one of an
    /// older certificate) keeps carrying its open stream, then ends gracefully: the
    /// server sees the end and finishes without an error.
    #[tokio::test]
    async fn a_dropped_client_ends_the_connection_after_its_last_stream() -> anyhow::Result<()> {
        let (_stop_tx, stop) = watch::channel(false);
        let (client, server) = mux_pair(echo().await?, stop).await?;
        let mut app = open_local(&client, "ok").await?;
        drop(client);
        app.write_all(b"still here").await?;
        let mut got = [0u8; 10];
        timeout(T, app.read_exact(&mut got)).await??;
        ensure!(&got == b"still here");
        ensure!(
            !server.is_finished(),
            "the connection ended under its stream"
        );
        app.shutdown().await?;
        let mut rest = Vec::new();
        timeout(T, app.read_to_end(&mut rest)).await??;
        ensure!(rest.is_empty(), "{rest:?}");
        timeout(T, server)
            .await
            .context("the connection stayed open")???;
        Ok(())
    }

    /// Beyond `MAX_STREAMS` an OPEN is refused as not processed (status 0), so that
    /// the client may open it on another connection; the ones before stay open.
    #[tokio::test]
    async fn opens_beyond_the_stream_limit_are_refused_unprocessed() -> anyhow::Result<()> {
        let (mut c, s) = tcp_pair().await?;
        let (_stop_tx, stop) = watch::channel(false);
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        tokio::spawn(serve(s, move |i| lock(&keep).push(i), stop));
        let mut opens = Vec::new();
        for k in 0..=MAX_STREAMS as u32 {
            opens.extend_from_slice(&header(OPEN, 9, 2 * k + 1));
            opens.extend_from_slice(b"Bearer ok");
        }
        c.write_all(&opens).await?;
        let mut got = [0u8; HEADER + 2];
        timeout(T, c.read_exact(&mut got)).await??;
        let last = 2 * MAX_STREAMS as u32 + 1;
        ensure!(
            got[..HEADER] == header(REPLY, 2, last) && got[HEADER..] == [0, 0],
            "got {got:?}"
        );
        ensure!(
            lock(&held).len() == MAX_STREAMS,
            "{} held",
            lock(&held).len()
        );
        Ok(())
    }

    /// A target that holds every connection whose first byte is `S` without ever
    /// reading it, and echoes the others.
    async fn stall_or_echo() -> anyhow::Result<std::net::SocketAddr> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            let mut stalled = Vec::new();
            while let Ok((mut tcp, _)) = l.accept().await {
                let mut first = [0u8; 1];
                if tcp.read_exact(&mut first).await.is_err() {
                    continue;
                }
                if first[0] == b'S' {
                    stalled.push(tcp);
                    continue;
                }
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    if w.write_all(&first).await.is_ok() {
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                    let _ = w.shutdown().await;
                });
            }
        });
        Ok(addr)
    }

    type Stalled = Vec<(tokio::net::tcp::OwnedReadHalf, JoinHandle<()>)>;

    /// Opens 8 streams whose target never reads and writes into them until they have
    /// taken all of the connection's credit. (With 5, each stream could stall on its
    /// own 4 MiB window first: up to 1 MiB of it may be written at the server and not
    /// yet credited back.)
    async fn stall(client: &Client) -> anyhow::Result<Stalled> {
        let mut stalled = Vec::new();
        for _ in 0..8 {
            let app = open_local(client, "ok").await?;
            let (r, mut w) = app.into_split();
            let writer = tokio::spawn(async move {
                let chunk = vec![b'S'; 256 * 1024];
                while w.write_all(&chunk).await.is_ok() {}
            });
            stalled.push((r, writer));
        }
        let conn = &client.conn;
        timeout(T, async {
            while conn.send_credit.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .context("the stalled streams did not take all of the connection's credit")?;
        Ok(stalled)
    }

    /// Resets the stalled streams' local ends (RST: the kernel drops what it holds).
    async fn reset_all(stalled: Stalled) {
        for (r, writer) in stalled {
            copy::reset_on_drop(r.as_ref());
            writer.abort();
            let _ = writer.await;
        }
    }

    /// Streams stalled at the remote take all of the connection's credit; the remote
    /// still reads control frames (a new stream opens, resets arrive). An OPEN with
    /// first bytes waits for credit without holding back a later OPEN, whose id is
    /// higher: the ids still reach the server in order. Once the stalled streams are
    /// reset, the data they left queued comes back as credit and both streams flow.
    #[tokio::test]
    async fn stalled_streams_hold_data_not_control_frames() -> anyhow::Result<()> {
        let (_stop_tx, stop) = watch::channel(false);
        let (client, server) = mux_pair(stall_or_echo().await?, stop).await?;
        let stalled = stall(&client).await?;
        ensure!(client.congested(), "not reported as congested");
        let waiting = {
            let client = client.clone();
            tokio::spawn(
                async move { client.open("Bearer ok", &Bytes::from_static(b"x"), T).await },
            )
        };
        // Before, a reader holding 16 MiB stopped reading: this OPEN got no answer.
        let mut app = open_local(&client, "ok").await?;
        app.write_all(b"ping").await?;
        ensure!(
            !waiting.is_finished(),
            "the OPEN with data did not wait for credit"
        );
        reset_all(stalled).await;
        let mut got = [0u8; 4];
        timeout(T, app.read_exact(&mut got))
            .await
            .context("no connection credit came back")??;
        ensure!(&got == b"ping");
        let stream = timeout(T, waiting).await???;
        let (mut early_app, gw) = tcp_pair().await?;
        let counters = counters()?;
        tokio::spawn(async move { splice(gw, stream, &counters).await });
        let mut x = [0u8; 1];
        timeout(T, early_app.read_exact(&mut x)).await??;
        ensure!(&x == b"x");
        ensure!(!server.is_finished(), "the server closed the connection");
        Ok(())
    }

    /// A DATA send cancelled while it waits for the writer (its stream was reset)
    /// gives its connection credit back: nothing of it was sent.
    #[tokio::test]
    async fn a_send_cancelled_before_it_writes_gives_its_credit_back() -> anyhow::Result<()> {
        let (c, _s) = tcp_pair().await?;
        let (client, driver) = Client::new(c);
        tokio::spawn(driver);
        let conn = &client.conn;
        let n = conn.take_credit(1000);
        ensure!(n == 1000 && conn.send_credit.load(Ordering::Relaxed) == CONN_WINDOW - n);
        let busy = conn.writer.lock().await;
        let (head, data) = (header(DATA, n, 1), vec![1u8; n]);
        let parts: [&[u8]; 2] = [&head, &data];
        ensure!(
            timeout(Duration::from_millis(50), conn.send(&parts, n))
                .await
                .is_err(),
            "the send did not wait for the writer"
        );
        drop(busy);
        ensure!(conn.send_credit.load(Ordering::Relaxed) == CONN_WINDOW);
        Ok(())
    }

    /// An OPEN whose first bytes get no connection credit in time is not processed
    /// (the client may retry it elsewhere), and the connection takes no new streams.
    #[tokio::test]
    async fn an_open_without_credit_in_time_is_not_processed() -> anyhow::Result<()> {
        let (_stop_tx, stop) = watch::channel(false);
        let (client, _server) = mux_pair(stall_or_echo().await?, stop).await?;
        let stalled = stall(&client).await?;
        let early = Bytes::from_static(b"x");
        match client
            .open("Bearer ok", &early, Duration::from_millis(300))
            .await
        {
            Err(OpenError::Unprocessed(_)) => {}
            Err(e) => bail!("unexpected error: {e}"),
            Ok(_) => bail!("an OPEN with data went out without connection credit"),
        }
        ensure!(client.is_dead(), "the connection still takes new streams");
        reset_all(stalled).await;
        Ok(())
    }

    /// Frames that break the protocol close the connection with an error, whatever
    /// they are; the server neither panics nor waits.
    #[tokio::test]
    async fn protocol_errors_close_the_connection() -> anyhow::Result<()> {
        let open = |id: u32| {
            let mut f = header(OPEN, 9, id).to_vec();
            f.extend_from_slice(b"Bearer ok");
            f
        };
        let mut beyond_window = open(1);
        let chunk = vec![7u8; MAX_DATA];
        for _ in 0..=STREAM_WINDOW / MAX_DATA {
            beyond_window.extend_from_slice(&header(DATA, MAX_DATA, 1));
            beyond_window.extend_from_slice(&chunk);
        }
        let mut data_after_fin = open(1);
        data_after_fin.extend_from_slice(&header(FIN, 0, 1));
        data_after_fin.extend_from_slice(&header(DATA, 1, 1));
        data_after_fin.push(0);
        let mut id_not_increasing = open(3);
        id_not_increasing.extend_from_slice(&open(3));
        // Four streams with their whole window each fill the connection's window; one
        // byte more on a fifth is beyond it.
        let mut beyond_conn_window = Vec::new();
        for k in 0..5u32 {
            let id = 2 * k + 1;
            beyond_conn_window.extend_from_slice(&open(id));
            let mut left = if k < 4 { STREAM_WINDOW } else { 1 };
            while left > 0 {
                let n = left.min(MAX_DATA);
                beyond_conn_window.extend_from_slice(&header(DATA, n, id));
                beyond_conn_window.extend_from_slice(&chunk[..n]);
                left -= n;
            }
        }
        let credit = |id: u32, n: u32| -> Vec<u8> {
            header(CREDIT, 4, id)
                .iter()
                .chain(&n.to_be_bytes())
                .copied()
                .collect()
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unknown frame type", header(9, 0, 1).to_vec()),
            ("frame too long", header(DATA, 0xff_ffff, 1).to_vec()),
            ("DATA beyond the stream window", beyond_window),
            ("DATA after FIN", data_after_fin),
            (
                "OPEN with a stream id not above the last",
                id_not_increasing,
            ),
            (
                "REPLY to a server",
                header(REPLY, 2, 1)
                    .iter()
                    .chain(&[0, 200])
                    .copied()
                    .collect(),
            ),
            (
                "bad CREDIT",
                header(CREDIT, 3, 1)
                    .iter()
                    .chain(&[0, 0, 1])
                    .copied()
                    .collect(),
            ),
            ("DATA beyond the connection window", beyond_conn_window),
            ("CREDIT beyond the connection window", credit(0, 1)),
        ];
        for (want, bytes) in cases {
            let (mut c, s) = tcp_pair().await?;
            let (_stop_tx, stop) = watch::channel(false);
            // Streams are held unanswered, so that their data stays queued.
            let held = Arc::new(Mutex::new(Vec::new()));
            let keep = held.clone();
            let server = tokio::spawn(serve(s, move |i| lock(&keep).push(i), stop));
            c.write_all(&bytes).await?;
            match timeout(T, server).await.context(want)?? {
                Err(Error::Protocol(got)) => ensure!(got == want, "{want}: got {got}"),
                other => bail!("{want}: {other:?}"),
            }
            let mut rest = Vec::new();
            let closed = timeout(T, c.read_to_end(&mut rest)).await.context(want)?;
            ensure!(
                closed.is_ok() || closed.is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset),
                "{want}: the connection stayed open"
            );
        }
        Ok(())
    }
}
