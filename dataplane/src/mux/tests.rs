//! Unit tests of the multiplexer: both ends over loopback TCP (no TLS), some writing
//! raw frames at a server. They reach into `Conn` (its credit, its writer) only for
//! what the public API cannot show.

use super::*;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::frame::{header, CREDIT, DATA, FIN, HEADER, OPEN, REPLY};
use crate::copy;
use crate::copy::tests::{counters, payload, reset, tcp_pair};
use fabric::sync::lock;

const T: Duration = Duration::from_secs(10);

/// A server on one end of a loopback connection, splicing each stream whose token
/// is "ok" to a new connection to `target` (refusing others with 403), and a client
/// on the other end.
async fn mux_pair(
    target: std::net::SocketAddr,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(Client, JoinHandle<Result<Ending, Error>>)> {
    mux_pair_idle(target, stop, None).await
}

/// `mux_pair` with the server's idle timeout.
async fn mux_pair_idle(
    target: std::net::SocketAddr,
    stop: watch::Receiver<bool>,
    idle: Option<Duration>,
) -> anyhow::Result<(Client, JoinHandle<Result<Ending, Error>>)> {
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
    let server = tokio::spawn(serve(s, on_open, stop, idle));
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

/// A retired client connection (every handle dropped, no stream) closes its side and
/// ends within `RETIRED_CLOSE_WAIT` even when the remote never closes its own: before,
/// it waited for the remote's end of file without a deadline.
#[tokio::test]
async fn a_retired_connection_does_not_wait_forever_for_the_remote() -> anyhow::Result<()> {
    let (c, mut remote) = tcp_pair().await?;
    let (client, driver) = Client::new(c);
    let driver = tokio::spawn(driver);
    drop(client);
    // The remote sees our close (FIN after close of our side) but keeps its own open.
    let mut got = Vec::new();
    timeout(T, remote.read_to_end(&mut got))
        .await
        .context("our side never closed")??;
    let started = tokio::time::Instant::now();
    timeout(
        super::reader::RETIRED_CLOSE_WAIT + Duration::from_secs(3),
        driver,
    )
    .await
    .context("the retired connection still waits for the remote")??
    .ok();
    ensure!(
        started.elapsed() <= super::reader::RETIRED_CLOSE_WAIT + Duration::from_secs(2),
        "ended after {:?}",
        started.elapsed()
    );
    drop(remote);
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
    tokio::spawn(serve(s, move |i| lock(&keep).push(i), stop, None));
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
        tokio::spawn(async move { client.open("Bearer ok", &Bytes::from_static(b"x"), T).await })
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
        let server = tokio::spawn(serve(s, move |i| lock(&keep).push(i), stop, None));
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

/// A server connection with no stream for its idle timeout sends GOAWAY and ends; one
/// with a stream open stays, however long the stream is quiet, and its idle time
/// starts when the last stream ends.
#[tokio::test]
async fn an_idle_connection_is_closed_with_goaway_a_busy_one_is_not() -> anyhow::Result<()> {
    let target = echo().await?;
    let (_stop_tx, stop) = watch::channel(false);
    let idle = Duration::from_millis(300);
    let (client, server) = mux_pair_idle(target, stop, Some(idle)).await?;
    let mut stream = open_local(&client, "ok").await?;
    // Quiet but open for several idle periods: the connection stays.
    tokio::time::sleep(idle * 4).await;
    ensure!(!server.is_finished(), "closed with a stream open");
    ensure!(
        !client.is_dead(),
        "client told to go away with a stream open"
    );
    stream.write_all(b"ping").await?;
    let mut got = [0u8; 4];
    timeout(T, stream.read_exact(&mut got)).await??;
    ensure!(&got == b"ping");
    stream.shutdown().await?;
    let mut rest = Vec::new();
    timeout(T, stream.read_to_end(&mut rest)).await??;
    drop(stream);
    let ended = timeout(T, server).await???;
    ensure!(ended == Ending::Idle, "ended {ended:?}");
    timeout(T, async {
        while !client.is_dead() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("client not told (GOAWAY)")?;
    Ok(())
}

/// Version 2: an OPEN on a connection quiet for `QUIET` goes with a PING and without
/// its first bytes; if nothing at all comes back within `PING_TIMEOUT` (a black hole),
/// the stream is `Unresponsive` (none of its bytes sent, so safe to open elsewhere)
/// and the connection takes no new streams. Before, such an OPEN waited for the whole
/// response timeout and its first bytes might have been lost with it.
#[tokio::test]
async fn a_silent_connection_is_found_out_by_ping_with_nothing_sent() -> anyhow::Result<()> {
    let (c, mut s) = tcp_pair().await?;
    let (client, driver) = Client::negotiated(c, true);
    tokio::spawn(driver);
    tokio::time::sleep(QUIET + Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    match client
        .open("Bearer ok", &Bytes::from_static(b"hello"), T)
        .await
    {
        Err(OpenError::Unresponsive) => {}
        Err(e) => bail!("expected Unresponsive, got {e}"),
        Ok(_) => bail!("a stream on a silent connection"),
    }
    ensure!(
        t.elapsed() < PING_TIMEOUT + Duration::from_secs(1),
        "found out after {:?}",
        t.elapsed()
    );
    ensure!(
        client.is_dead(),
        "the silent connection still takes streams"
    );
    // What reached the (silent) remote: a PING and the OPEN, no DATA.
    let mut got = vec![0u8; 4096];
    let n = timeout(T, s.read(&mut got)).await??;
    let mut kinds = Vec::new();
    let mut pos = 0;
    while pos + HEADER <= n {
        let len = u32::from_be_bytes([0, got[pos + 1], got[pos + 2], got[pos + 3]]) as usize;
        kinds.push(got[pos]);
        pos += HEADER + len;
    }
    ensure!(
        kinds == [super::frame::PING, OPEN],
        "frames sent: {kinds:?} ({n} bytes)"
    );
    Ok(())
}

/// Version 2 with a live server: the PING is answered, the stream opens, and the first
/// bytes held for the answer arrive, once.
#[tokio::test]
async fn a_quiet_live_connection_answers_the_ping_and_gets_the_first_bytes() -> anyhow::Result<()> {
    let target = echo().await?;
    let (c, s) = tcp_pair().await?;
    let (_stop_tx, stop) = watch::channel(false);
    let on_open = move |incoming: Incoming| {
        tokio::spawn(async move {
            let (Ok(tcp), Ok(counters)) = (TcpStream::connect(target).await, counters()) else {
                return incoming.refuse(502, "no target").await;
            };
            if let Ok(stream) = incoming.accept().await {
                splice(tcp, stream, &counters).await;
            }
        });
    };
    tokio::spawn(serve(s, on_open, stop, None));
    let (client, driver) = Client::negotiated(c, true);
    tokio::spawn(driver);
    tokio::time::sleep(QUIET + Duration::from_millis(100)).await;
    let stream = client
        .open("Bearer ok", &Bytes::from_static(b"hello"), T)
        .await?;
    let (mut app, gw) = tcp_pair().await?;
    let counters = counters()?;
    tokio::spawn(async move { splice(gw, stream, &counters).await });
    app.shutdown().await?;
    let mut back = Vec::new();
    timeout(T, app.read_to_end(&mut back)).await??;
    ensure!(back == b"hello", "echoed {back:?}");
    ensure!(!client.is_dead());
    Ok(())
}
