//! The connection's reader: reads frames and hands each to `Conn::handle`, sends
//! the reader's control frames, and ends the connection. It never waits for a local
//! socket, so control frames are never held behind data.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use super::conn::{Conn, OnOpen};
use super::frame::{frame_len, FrameBuf, GOAWAY, HEADER, SMALL_BUF};
use super::{Error, MAX_DATA};
use fabric::sync::lock;

/// How long a retired client connection (no handle, no stream, our side closed)
/// waits for the remote's close before it ends anyway.
pub(super) const RETIRED_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How a connection ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The remote closed it (or, for a client, it was retired).
    Closed,
    /// A server stopped (GOAWAY) and its last stream ended.
    Drained,
    /// A server's connection had no stream for its idle timeout (GOAWAY).
    Idle,
}

/// Runs a connection: reads and dispatches frames, and sends the reader's control
/// frames, until the connection ends. A server stops taking streams (GOAWAY) when
/// `stop` turns true or when it has had no stream for `idle`, and ends once its last
/// stream has.
pub(super) async fn drive<R: AsyncRead + Unpin>(
    conn: Arc<Conn>,
    mut rd: R,
    on_open: OnOpen<'_>,
    stop: Option<watch::Receiver<bool>>,
    idle: Option<Duration>,
) -> Result<Ending, Error> {
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
                    // The remote's close ends the reader; one that never closes
                    // (stopped, black-holed, or hostile) does not hold the connection
                    // beyond `RETIRED_CLOSE_WAIT`.
                    tokio::time::sleep(RETIRED_CLOSE_WAIT).await;
                    return;
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
        let mut draining = None;
        let mut stopped = std::pin::pin!(async move {
            match stop {
                Some(mut s) => fabric::sync::stopped(&mut s).await,
                None => std::future::pending().await,
            }
        });
        let mut idle = std::pin::pin!(async {
            match idle {
                Some(d) => idle_for(&conn, d).await,
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
            if filled + want > SMALL_BUF {
                fb.reserve(filled + want);
            } else if fb.is_large() && lock(&conn.table).map.is_empty() {
                fb.shrink();
            }
            let goaway = |why| {
                let last = {
                    let mut t = lock(&conn.table);
                    t.goaway = true;
                    t.next
                };
                conn.push_ctrl(GOAWAY, 0, &last.to_be_bytes());
                Some(why)
            };
            let n = tokio::select! {
                n = rd.read(&mut fb.window()[filled..filled + want]) => n?,
                _ = &mut stopped, if draining.is_none() => {
                    draining = goaway(Ending::Drained);
                    continue;
                }
                _ = &mut idle, if draining.is_none() => {
                    draining = goaway(Ending::Idle);
                    continue;
                }
                _ = all_left(&conn), if draining.is_some() => {
                    return Ok(draining.unwrap_or(Ending::Drained));
                }
            };
            fb.filled += n;
            if n > 0 && conn.ping {
                conn.heard_now();
            }
            if n == 0 {
                return if fb.filled == 0 {
                    Ok(Ending::Closed)
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

/// Returns once the connection has had no stream for `timeout` (checked at the end of
/// each period: idle at most twice as long).
async fn idle_for(conn: &Conn, timeout: Duration) {
    loop {
        all_left(conn).await;
        let opened = lock(&conn.table).next;
        tokio::time::sleep(timeout).await;
        let t = lock(&conn.table);
        if t.map.is_empty() && t.next == opened {
            return;
        }
    }
}

/// Returns once the connection has no streams.
async fn all_left(conn: &Conn) {
    while !lock(&conn.table).map.is_empty() {
        conn.left.notified().await;
    }
}
