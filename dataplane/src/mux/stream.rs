//! One established stream and its relay to a local socket: the sending half (local
//! socket -> DATA) and the queued receiving half (-> local socket). It never touches
//! another stream's state, only its own slot and the connection's shared credit.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use prometheus::IntCounter;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::conn::{Conn, Slot};
use super::frame::{header, DATA, FIN, RST};
use super::MAX_DATA;
use crate::copy::{self, Counters, End, Failure};
use fabric::sync::lock;

/// One stream, established (or, inside `Incoming`, being answered).
pub struct Stream {
    pub(super) conn: Arc<Conn>,
    pub(super) slot: Arc<Slot>,
    /// Ended in a way both sides know (both FINs, a refusal, a reset sent or
    /// received); otherwise dropping it resets it.
    pub(super) ended: bool,
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
