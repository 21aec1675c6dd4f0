//! The client side: `Client` opens streams on a connection. It owns only the
//! opening handshake (OPEN, early data, the answer); it never reads the connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::conn::{Conn, Held, Reply, Slot};
use super::frame::{header, DATA, MAX_OPEN, OPEN, PING, PING_LEN};
use super::reader::drive;
use super::stream::Stream;
use super::{Error, OpenError, MAX_DATA};
use fabric::sync::lock;

static EMPTY: Bytes = Bytes::new();

/// The client side of a connection: opens streams. Once every clone is dropped, the
/// connection takes no new streams and ends gracefully after its last one.
#[derive(Clone)]
pub struct Client {
    pub(super) conn: Arc<Handle>,
}

/// The connection, marked unused when the last `Client` clone goes.
pub(super) struct Handle(Arc<Conn>);

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
        Self::negotiated(io, false)
    }

    /// `new`, with `ping` for a connection that negotiated `clusterlink-mux/2`: OPENs
    /// on a quiet connection then go with a PING (module docs).
    pub fn negotiated<T>(
        io: T,
        ping: bool,
    ) -> (
        Client,
        impl std::future::Future<Output = Result<(), Error>> + Send,
    )
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let conn = Conn::new(Box::new(wr), false, ping);
        let conn_ = conn.clone();
        let driver = async move { drive(conn_, rd, None, None, None).await.map(|_| ()) };
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
        // Heard nothing for a while: a PING goes with the OPEN, and the first bytes
        // wait for the answer, so that a black-holed connection is found out with none
        // of them sent.
        let probe = conn.ping && conn.quiet_for() >= super::QUIET;
        let early_now: &Bytes = if probe { &EMPTY } else { early };
        // Connection credit for the first bytes, given back unless they are sent.
        let mut held = Held { conn, n: 0 };
        if !early_now.is_empty() {
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
        stream
            .slot
            .credit
            .fetch_sub(early_now.len(), Ordering::Relaxed);
        let open = header(OPEN, auth.len(), id);
        let data = header(DATA, early_now.len(), id);
        let ping = header(PING, PING_LEN, 0);
        let parts: &[&[u8]] = if probe {
            &[&ping, &[0u8; PING_LEN], &open, auth.as_bytes()]
        } else if early_now.is_empty() {
            &[&open, auth.as_bytes()]
        } else {
            &[&open, auth.as_bytes(), &data, early_now]
        };
        let sent_ms = conn.now_ms();
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
        let mut rx = rx;
        let mut early_reply = None;
        if probe {
            let ping_deadline = tokio::time::Instant::now() + super::PING_TIMEOUT;
            if ping_deadline < deadline {
                match tokio::time::timeout_at(ping_deadline, &mut rx).await {
                    Ok(r) => early_reply = Some(r),
                    Err(_) if !conn.heard_since(sent_ms) => {
                        // Not even the PONG: retired, and this stream opened elsewhere.
                        conn.going_away.store(true, Ordering::Relaxed);
                        return Err(OpenError::Unresponsive);
                    }
                    Err(_) => {}
                }
            }
        }
        let reply = match early_reply {
            Some(r) => Ok(r),
            None => tokio::time::timeout_at(deadline, rx).await,
        };
        if probe && !early.is_empty() && matches!(reply, Ok(Ok(Reply::Status(200, _)))) {
            // The first bytes, held for the answer, go now.
            match tokio::time::timeout_at(deadline, conn.take_credit_exact(early.len())).await {
                Ok(true) => {}
                _ => return Err(OpenError::Lost),
            }
            stream.slot.credit.fetch_sub(early.len(), Ordering::Relaxed);
            let data = header(DATA, early.len(), id);
            if conn.send(&[&data, early], early.len()).await.is_err() {
                return Err(OpenError::Lost);
            }
        }
        match reply {
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
