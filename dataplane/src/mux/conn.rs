//! One connection's shared state and credit: the writer, the control-frame queue,
//! the stream table and each stream's receive side, and the handling of a received
//! frame. It never reads the connection (reader.rs does), and `handle` never waits:
//! what cannot go out or into a local socket at once is queued.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use super::frame::{
    header, Parts, CREDIT, DATA, FIN, GOAWAY, MAX_OPEN, MAX_REPLY, OPEN, PING, PING_LEN, PONG,
    REPLY, RST,
};
use super::server::Incoming;
use super::stream::Stream;
use super::{Error, CONN_WINDOW, MAX_DATA, MAX_STREAMS, STREAM_WINDOW};
use fabric::sync::lock;

/// Credit is returned once this much has been written locally.
const CREDIT_AT: usize = STREAM_WINDOW / 4;
/// Connection credit is returned once this much has left the receiver's hands.
const CONN_CREDIT_AT: usize = CONN_WINDOW / 4;

/// Most bytes of control frames the reader may have waiting for the writer.
const CTRL_MAX: usize = 1024 * 1024;

/// Queued data is appended to the last queue entry while that is smaller than this.
const COALESCE: usize = 16 * 1024;

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The connection's write side. Once a send holds it, its frames are on the wire or
/// kept: a send whose task is cancelled (a stream reset or drained while TLS took part
/// of its frame, or before it wrote anything) leaves the rest in `unsent`, which the
/// next send writes first, so frames are never cut short or lost on the wire.
pub(super) struct Out {
    w: Writer,
    pub(super) unsent: BytesMut,
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
pub(super) struct Held<'a> {
    pub(super) conn: &'a Conn,
    pub(super) n: usize,
}

impl Held<'_> {
    pub(super) fn commit(mut self) {
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

pub(super) enum Reply {
    Status(u16, String),
    Unprocessed,
}

/// One connection, shared by its reader (the driver task) and its streams.
pub(super) struct Conn {
    server: bool,
    pub(super) writer: tokio::sync::Mutex<Out>,
    /// Frames the reader must send (CREDIT, RST); it never waits for the writer.
    pub(super) ctrl: Mutex<BytesMut>,
    pub(super) ctrl_ready: Notify,
    pub(super) table: Mutex<Table>,
    /// Connection credit: DATA bytes this side may still send, all streams together.
    pub(super) send_credit: AtomicUsize,
    /// Connection credit came back, or the connection ended.
    pub(super) credit_wake: Notify,
    /// DATA bytes the remote may still send on the connection.
    recv_window: AtomicUsize,
    /// Received bytes that left our hands and are not yet returned as credit.
    recv_unacked: AtomicUsize,
    pub(super) dead: AtomicBool,
    /// GOAWAY received: no new streams.
    pub(super) going_away: AtomicBool,
    /// Client: no `Client` handle is left, so no new streams; the connection ends
    /// gracefully once its last stream has.
    pub(super) unused: AtomicBool,
    /// A stream left the table (for a draining server).
    pub(super) left: Notify,
    /// Client of version 2: may send PING.
    pub(super) ping: bool,
    /// When the connection was made; `heard_ms` counts from here.
    born: std::time::Instant,
    /// When something last arrived (milliseconds since `born`); kept by the reader of
    /// a `ping` connection only.
    heard_ms: AtomicU64,
}

#[derive(Default)]
pub(super) struct Table {
    pub(super) map: HashMap<u32, Arc<Slot>>,
    /// Client: the next id to use. Server: the highest id opened.
    pub(super) next: u32,
    /// Server: GOAWAY sent. (A client knows it by `Conn::going_away`.)
    pub(super) goaway: bool,
}

/// One stream's state, shared by the connection's reader and the stream's task.
pub(super) struct Slot {
    pub(super) id: u32,
    pub(super) rx: Mutex<Rx>,
    /// Bytes this side may still send.
    pub(super) credit: AtomicUsize,
    /// Credit arrived, or the stream was reset: the sending half looks again.
    pub(super) tx_wake: Notify,
    /// Data, FIN or a reset arrived for the receiving half.
    pub(super) rx_wake: Notify,
    /// The receiving half has ended (FIN written locally).
    pub(super) rx_done: Notify,
}

#[derive(Default)]
pub(super) struct Rx {
    /// Data the local socket did not take at once; small frames are appended to the
    /// last entry, so that an entry costs at least `COALESCE` bytes of data.
    pub(super) queue: VecDeque<BytesMut>,
    pub(super) queued: usize,
    /// The stream's task is writing an entry it took from the queue.
    pub(super) writing: bool,
    pub(super) local: Option<Arc<TcpStream>>,
    pub(super) down: Option<IntCounter>,
    pub(super) fin: bool,
    /// This side's FIN has been sent: with `fin`, the stream is complete on the wire.
    pub(super) fin_sent: bool,
    pub(super) reset: bool,
    pub(super) local_failed: bool,
    /// Bytes the remote may still send before it needs credit.
    window: usize,
    /// Written locally and not yet returned as credit.
    pub(super) unacked: usize,
    reply: Option<oneshot::Sender<Reply>>,
    /// A REPLY arrived (client side).
    replied: bool,
}

impl Slot {
    pub(super) fn new(id: u32, reply: Option<oneshot::Sender<Reply>>) -> Arc<Slot> {
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
    pub(super) fn new(writer: Writer, server: bool, ping: bool) -> Arc<Conn> {
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
            ping,
            born: std::time::Instant::now(),
            heard_ms: AtomicU64::new(0),
        })
    }

    /// Milliseconds since the connection was made.
    pub(super) fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Something arrived (the reader, on every read of a `ping` connection).
    pub(super) fn heard_now(&self) {
        self.heard_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether something arrived at `ms` (from `now_ms`) or later.
    pub(super) fn heard_since(&self, ms: u64) -> bool {
        self.heard_ms.load(Ordering::Relaxed) >= ms
    }

    /// How long nothing has arrived (since the connection was made, at first: its
    /// handshake just proved it alive).
    pub(super) fn quiet_for(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.heard_ms.load(Ordering::Relaxed)),
        )
    }

    pub(super) fn push_ctrl(&self, kind: u8, id: u32, payload: &[u8]) {
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
    pub(super) async fn send(&self, parts: &[&[u8]], credit: usize) -> Result<(), Error> {
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
    pub(super) async fn send_locked(&self, out: &mut Out, parts: &[&[u8]]) -> Result<(), Error> {
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
    pub(super) async fn finish(&self, flush: bool, shutdown: bool) {
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

    pub(super) fn remove(&self, id: u32) {
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
    pub(super) fn close(&self) {
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
    pub(super) fn credit(&self, slot: &Slot, rx: &mut Rx) {
        if rx.unacked >= CREDIT_AT {
            let n = rx.unacked;
            rx.unacked = 0;
            rx.window += n;
            self.push_ctrl(CREDIT, slot.id, &(n as u32).to_be_bytes());
        }
    }

    /// Received bytes that left our hands (written locally, or dropped with their
    /// stream) go back to the remote as connection credit once enough have gathered.
    pub(super) fn release(&self, n: usize) {
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
    pub(super) fn take_credit(&self, want: usize) -> usize {
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
    pub(super) fn return_credit(&self, n: usize) -> usize {
        let before = self.send_credit.fetch_add(n, Ordering::Relaxed);
        if before < MAX_DATA && n > 0 {
            self.credit_wake.notify_waiters();
        }
        before
    }

    /// Takes exactly `n` (at most `MAX_DATA`) bytes of connection credit, waiting for
    /// them; false if the connection ended or received GOAWAY first.
    pub(super) async fn take_credit_exact(&self, n: usize) -> bool {
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

    pub(super) fn handle(
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
            PING => {
                need(
                    self.server && id == 0 && payload.len() == PING_LEN,
                    "bad PING",
                )?;
                if lock(&self.ctrl).len() > CTRL_MAX {
                    return Err(Error::Protocol("peer does not read its answers"));
                }
                self.push_ctrl(PONG, 0, payload);
                Ok(())
            }
            PONG => {
                // What it proves (the connection carries), the read already recorded.
                need(
                    !self.server && id == 0 && payload.len() == PING_LEN,
                    "bad PONG",
                )
            }
            _ => Err(Error::Protocol("unknown frame type")),
        }
    }
}

pub(super) type OnOpen<'a> = Option<&'a (dyn Fn(Incoming) + Send + Sync)>;
