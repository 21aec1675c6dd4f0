use super::*;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use tokio::io::{DuplexStream, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const TIMEOUT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

pub(crate) fn counters() -> anyhow::Result<Counters> {
    Ok(Counters {
        up: IntCounter::new("test_up_bytes", "bytes read from the local socket")?,
        down: IntCounter::new("test_down_bytes", "bytes written to the local socket")?,
    })
}

/// Deterministic, non-repeating-looking bytes; a different seed per direction so a
/// mixed-up or reordered flow cannot compare equal.
pub(crate) fn payload(len: usize, seed: u32) -> Bytes {
    let mut x = 0x9e37_79b9u32 ^ seed.wrapping_mul(0x85eb_ca6b);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// A connected loopback pair: (local peer, socket to splice).
pub(crate) async fn tcp_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (peer, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    Ok((peer?, accepted?.0))
}

/// Closes `tcp` with an RST instead of a FIN.
pub(crate) fn reset(tcp: TcpStream) -> anyhow::Result<()> {
    socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO))?;
    drop(tcp);
    Ok(())
}

/// Reads until the socket fails; EOF is an error for the test.
async fn read_until_error(tcp: &mut TcpStream) -> anyhow::Result<io::Error> {
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) => bail!("local peer read EOF instead of an error"),
            Ok(_) => continue,
            Err(e) => return Ok(e),
        }
    }
}

/// Reads to EOF; returns the bytes and the largest single read.
async fn read_to_end_max<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; READ_SIZE];
    let mut max = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((out, max));
        }
        max = max.max(n);
        out.extend_from_slice(&buf[..n]);
    }
}

fn spawn_io<T>(tcp: TcpStream, other: T, counters: &Counters) -> JoinHandle<End>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let counters = counters.clone();
    tokio::spawn(async move { splice_io(tcp, other, &counters).await })
}

fn spawn_h2(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    counters: &Counters,
) -> JoinHandle<End> {
    let counters = counters.clone();
    tokio::spawn(async move { splice_h2(tcp, send, recv, &counters).await })
}

/// One CONNECT stream over an in-memory HTTP/2 connection.
struct H2Stream {
    /// Server end: spliced with the local socket.
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Client end: the far end of the tunnel, driven by the test.
    far_send: SendStream<Bytes>,
    far_recv: RecvStream,
    /// Keeps the client connection from going away early.
    _client: h2::client::SendRequest<Bytes>,
}

async fn h2_stream(window: Option<u32>) -> anyhow::Result<H2Stream> {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let mut server = h2::server::Builder::new();
    let mut client = h2::client::Builder::new();
    // As the gateways do: a DATA frame can carry a whole read.
    server.max_frame_size(crate::h2conf::MAX_FRAME);
    client.max_frame_size(crate::h2conf::MAX_FRAME);
    if let Some(window) = window {
        server.initial_window_size(window);
        client.initial_window_size(window);
    }

    let (accepted_tx, accepted_rx) = oneshot::channel();
    tokio::spawn(async move {
        let Ok(mut conn) = server.handshake::<_, Bytes>(server_io).await else {
            return;
        };
        let mut accepted_tx = Some(accepted_tx);
        // Keep polling accept(): it is what drives the server connection.
        while let Some(Ok(accepted)) = conn.accept().await {
            if let Some(tx) = accepted_tx.take() {
                let _ = tx.send(accepted);
            }
        }
    });

    let (client_req, conn) = client.handshake::<_, Bytes>(client_io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client_req = client_req.ready().await?;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("peer:443")
        .body(())?;
    let (response, far_send) = client_req.send_request(req, false)?;

    let (request, mut respond) = accepted_rx.await.context("server accepted no stream")?;
    ensure!(request.method() == http::Method::CONNECT);
    let resp = http::Response::builder()
        .status(http::StatusCode::OK)
        .body(())?;
    let send = respond.send_response(resp, false)?;

    let response = response.await?;
    ensure!(response.status() == http::StatusCode::OK);
    Ok(H2Stream {
        send,
        recv: request.into_body(),
        far_send,
        far_recv: response.into_body(),
        _client: client_req,
    })
}

/// Sends `data` as flow control allows, then END_STREAM if `end`.
async fn far_send(send: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> anyhow::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(cap) => cap?,
            None => bail!("stream closed while sending"),
        };
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, false)?;
    }
    if end {
        send.send_data(Bytes::new(), true)?;
    }
    Ok(())
}

/// Reads to END_STREAM; returns the bytes and the largest DATA chunk.
async fn far_read_to_end(recv: &mut RecvStream) -> anyhow::Result<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut max = 0;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        max = max.max(chunk.len());
        out.extend_from_slice(&chunk);
        recv.flow_control().release_capacity(chunk.len())?;
    }
    Ok((out, max))
}

/// Reads exactly `n` bytes (END_STREAM before that is an error).
async fn far_read_exact(recv: &mut RecvStream, n: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = recv
            .data()
            .await
            .ok_or_else(|| anyhow!("END_STREAM after {} of {n} bytes", out.len()))??;
        out.extend_from_slice(&chunk);
        recv.flow_control().release_capacity(chunk.len())?;
    }
    ensure!(out.len() == n, "read {} bytes, wanted {n}", out.len());
    Ok(out)
}

/// Reads until the stream fails; returns the reset reason.
async fn far_expect_reset(recv: &mut RecvStream) -> anyhow::Result<h2::Reason> {
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
            Some(Err(e)) => {
                return e
                    .reason()
                    .ok_or_else(|| anyhow!("stream failed without a reason: {e}"))
            }
            None => bail!("END_STREAM instead of a reset"),
        }
    }
}

/// A tunnel stream whose reads fail with ConnectionReset once `fail` fires.
struct FailingIo {
    inner: DuplexStream,
    fail: oneshot::Receiver<()>,
    failed: bool,
}

impl AsyncRead for FailingIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.failed && Pin::new(&mut this.fail).poll(cx).is_ready() {
            this.failed = true;
        }
        if this.failed {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FailingIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ---- splice_io ----

/// `len` bytes each way at once through a `duplex(buf)` tunnel; returns the largest
/// single read the far end saw.
async fn io_both_ways(buf: usize, len: usize) -> anyhow::Result<usize> {
    let c = counters()?;
    let (mut peer, tcp) = tcp_pair().await?;
    let (near, far) = tokio::io::duplex(buf);
    let splice = spawn_io(tcp, near, &c);

    let up = payload(len, 1);
    let down = payload(len, 2);
    let (mut far_r, mut far_w) = tokio::io::split(far);
    let (mut peer_r, mut peer_w) = peer.split();
    let (peer_sent, far_sent, far_got, peer_got) = tokio::join!(
        async {
            peer_w.write_all(&up).await?;
            peer_w.shutdown().await
        },
        async {
            far_w.write_all(&down).await?;
            far_w.shutdown().await
        },
        read_to_end_max(&mut far_r),
        read_to_end_max(&mut peer_r),
    );
    peer_sent?;
    far_sent?;
    let (far_got, far_max) = far_got?;
    let (peer_got, _) = peer_got?;

    assert!(
        far_got[..] == up[..],
        "up: got {} bytes, sent {}",
        far_got.len(),
        len
    );
    assert!(
        peer_got[..] == down[..],
        "down: got {} bytes, sent {}",
        peer_got.len(),
        len
    );
    assert_eq!(splice.await?, End::Eof);
    assert_eq!(c.up.get(), len as u64);
    assert_eq!(c.down.get(), len as u64);
    Ok(far_max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_duplex_1mib_each_way() -> anyhow::Result<()> {
    timeout(TIMEOUT, io_both_ways(64 * 1024, MIB)).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_short_writes() -> anyhow::Result<()> {
    let far_max = timeout(TIMEOUT, io_both_ways(64, 256 * 1024)).await??;
    // The 64-byte pipe really did force short reads and writes.
    assert!(far_max <= 64, "far end read {far_max} bytes at once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_local_half_close() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let (near, mut far) = tokio::io::duplex(4096);
        let splice = spawn_io(tcp, near, &c);
        let up = payload(100_000, 3);
        let down1 = payload(50_000, 4);
        let down2 = payload(70_000, 5);

        // Down flows while the local peer sends and then shuts down its write side.
        let (mut peer_r, mut peer_w) = peer.split();
        let (mut far_r, mut far_w) = tokio::io::split(&mut far);
        let mut got_down = vec![0u8; down1.len()];
        let (sent, far_got, far_sent, peer_got) = tokio::join!(
            async {
                peer_w.write_all(&up).await?;
                peer_w.shutdown().await
            },
            read_to_end_max(&mut far_r),
            far_w.write_all(&down1),
            peer_r.read_exact(&mut got_down),
        );
        sent?;
        far_sent?;
        peer_got?;
        let (far_got, _) = far_got?;
        // The far end saw EOF (read_to_end returned) after exactly the bytes sent.
        assert!(far_got[..] == up[..], "up: got {} bytes", far_got.len());
        assert!(got_down[..] == down1[..]);
        assert!(!splice.is_finished(), "splice ended on a half-close");

        // Down still flows after the half-close.
        let (far_sent, peer_got) = tokio::join!(
            async {
                far_w.write_all(&down2).await?;
                far_w.shutdown().await
            },
            read_to_end_max(&mut peer_r),
        );
        far_sent?;
        let (peer_got, _) = peer_got?;
        assert!(
            peer_got[..] == down2[..],
            "down: got {} bytes",
            peer_got.len()
        );

        assert_eq!(splice.await?, End::Eof);
        assert_eq!(c.up.get(), up.len() as u64);
        assert_eq!(c.down.get(), (down1.len() + down2.len()) as u64);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_remote_half_close() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let (near, mut far) = tokio::io::duplex(4096);
        let splice = spawn_io(tcp, near, &c);
        let down = payload(100_000, 6);
        let up1 = payload(50_000, 7);
        let up2 = payload(70_000, 8);

        let (mut peer_r, mut peer_w) = peer.split();
        let (mut far_r, mut far_w) = tokio::io::split(&mut far);
        let mut got_up = vec![0u8; up1.len()];
        let (sent, peer_got, peer_sent, far_got) = tokio::join!(
            async {
                far_w.write_all(&down).await?;
                far_w.shutdown().await
            },
            read_to_end_max(&mut peer_r),
            peer_w.write_all(&up1),
            far_r.read_exact(&mut got_up),
        );
        sent?;
        peer_sent?;
        far_got?;
        let (peer_got, _) = peer_got?;
        // The local peer read EOF after exactly the bytes sent.
        assert!(
            peer_got[..] == down[..],
            "down: got {} bytes",
            peer_got.len()
        );
        assert!(got_up[..] == up1[..]);
        assert!(!splice.is_finished(), "splice ended on a half-close");

        // The local peer can still send after reading EOF.
        let (peer_sent, far_got) = tokio::join!(
            async {
                peer_w.write_all(&up2).await?;
                peer_w.shutdown().await
            },
            read_to_end_max(&mut far_r),
        );
        peer_sent?;
        let (far_got, _) = far_got?;
        assert!(far_got[..] == up2[..], "up: got {} bytes", far_got.len());

        assert_eq!(splice.await?, End::Eof);
        assert_eq!(c.up.get(), (up1.len() + up2.len()) as u64);
        assert_eq!(c.down.get(), down.len() as u64);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_local_reset() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let (near, mut far) = tokio::io::duplex(4096);
        let splice = spawn_io(tcp, near, &c);

        peer.write_all(b"hello").await?;
        let mut got = [0u8; 5];
        far.read_exact(&mut got).await?;
        assert_eq!(&got, b"hello");

        reset(peer)?;
        assert_eq!(splice.await?, End::LocalReset);
        // The tunnel stream was dropped: the far end sees it closed.
        let (rest, _) = read_to_end_max(&mut far).await?;
        assert!(rest.is_empty());
        let err = far
            .write_all(b"x")
            .await
            .err()
            .context("write to a dead tunnel")?;
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(c.up.get(), 5);
        assert_eq!(c.down.get(), 0);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_remote_reset() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let (near, mut far) = tokio::io::duplex(4096);
        let (fail, fail_rx) = oneshot::channel();
        let other = FailingIo {
            inner: near,
            fail: fail_rx,
            failed: false,
        };
        let splice = spawn_io(tcp, other, &c);

        far.write_all(b"ping").await?;
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await?;
        assert_eq!(&got, b"ping");

        fail.send(())
            .map_err(|()| anyhow!("splice dropped the tunnel"))?;
        assert_eq!(splice.await?, End::RemoteReset);
        let err = read_until_error(&mut peer).await?;
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(c.up.get(), 0);
        assert_eq!(c.down.get(), 4);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_remote_write_failure() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let (near, far) = tokio::io::duplex(4096);
        let splice = spawn_io(tcp, near, &c);

        // The far end vanishes: the local peer sees EOF ...
        drop(far);
        let (got, _) = read_to_end_max(&mut peer).await?;
        assert!(got.is_empty());
        assert!(
            !splice.is_finished(),
            "splice ended before the local side did"
        );
        // ... and what it sends next cannot be delivered: the splice gives up.
        peer.write_all(b"lost").await?;
        assert_eq!(splice.await?, End::RemoteReset);
        assert_eq!(c.up.get(), 4);
        Ok(())
    })
    .await?
}

// ---- splice_h2 ----

/// `len` bytes each way at once through an h2 stream; returns the largest DATA
/// chunk the far end received.
async fn h2_both_ways(window: Option<u32>, len: usize) -> anyhow::Result<usize> {
    let c = counters()?;
    let (mut peer, tcp) = tcp_pair().await?;
    let mut s = h2_stream(window).await?;
    let splice = spawn_h2(tcp, s.send, s.recv, &c);

    let up = payload(len, 11);
    let down = payload(len, 12);
    let (mut peer_r, mut peer_w) = peer.split();
    let (peer_sent, far_sent, far_got, peer_got) = tokio::join!(
        async {
            peer_w.write_all(&up).await?;
            peer_w.shutdown().await
        },
        far_send(&mut s.far_send, down.clone(), true),
        far_read_to_end(&mut s.far_recv),
        read_to_end_max(&mut peer_r),
    );
    peer_sent?;
    far_sent?;
    let (far_got, far_max) = far_got?;
    let (peer_got, _) = peer_got?;

    assert!(
        far_got[..] == up[..],
        "up: got {} bytes, sent {}",
        far_got.len(),
        len
    );
    assert!(
        peer_got[..] == down[..],
        "down: got {} bytes, sent {}",
        peer_got.len(),
        len
    );
    assert_eq!(splice.await?, End::Eof);
    assert_eq!(c.up.get(), len as u64);
    assert_eq!(c.down.get(), len as u64);
    Ok(far_max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_duplex_1mib_each_way() -> anyhow::Result<()> {
    timeout(TIMEOUT, h2_both_ways(None, MIB)).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_frames_fill_whole_tls_records() -> anyhow::Result<()> {
    let far_max = timeout(TIMEOUT, h2_both_ways(None, 4 * MIB)).await??;
    // A frame (9-byte header and data) is at most four full 16 KiB TLS records,
    // and a streaming sender's reads are big enough to come close.
    assert!(
        far_max <= H2_READ,
        "far end got a {far_max}-byte DATA frame"
    );
    assert!(
        far_max > 32 * 1024,
        "largest DATA frame only {far_max} bytes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_small_window() -> anyhow::Result<()> {
    let far_max = timeout(TIMEOUT, h2_both_ways(Some(1024), 256 * 1024)).await??;
    // Each 64 KiB read was split by send_all into window-sized pieces.
    assert!(far_max <= 1024, "far end got a {far_max}-byte DATA frame");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_local_half_close() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let mut s = h2_stream(Some(4096)).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);
        let up = payload(100_000, 13);
        let down1 = payload(50_000, 14);
        let down2 = payload(70_000, 15);

        let (mut peer_r, mut peer_w) = peer.split();
        let mut got_down = vec![0u8; down1.len()];
        let (sent, far_got, far_sent, peer_got) = tokio::join!(
            async {
                peer_w.write_all(&up).await?;
                peer_w.shutdown().await
            },
            far_read_to_end(&mut s.far_recv),
            far_send(&mut s.far_send, down1.clone(), false),
            peer_r.read_exact(&mut got_down),
        );
        sent?;
        far_sent?;
        peer_got?;
        let (far_got, _) = far_got?;
        // far_read_to_end returns only on END_STREAM.
        assert!(far_got[..] == up[..], "up: got {} bytes", far_got.len());
        assert!(s.far_recv.is_end_stream());
        assert!(got_down[..] == down1[..]);
        assert!(!splice.is_finished(), "splice ended on a half-close");

        let (far_sent, peer_got) = tokio::join!(
            far_send(&mut s.far_send, down2.clone(), true),
            read_to_end_max(&mut peer_r),
        );
        far_sent?;
        let (peer_got, _) = peer_got?;
        assert!(
            peer_got[..] == down2[..],
            "down: got {} bytes",
            peer_got.len()
        );

        assert_eq!(splice.await?, End::Eof);
        assert_eq!(c.up.get(), up.len() as u64);
        assert_eq!(c.down.get(), (down1.len() + down2.len()) as u64);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_remote_half_close() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let mut s = h2_stream(Some(4096)).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);
        let down = payload(100_000, 16);
        let up1 = payload(50_000, 17);
        let up2 = payload(70_000, 18);

        let (mut peer_r, mut peer_w) = peer.split();
        let (sent, peer_got, peer_sent, far_got) = tokio::join!(
            far_send(&mut s.far_send, down.clone(), true),
            read_to_end_max(&mut peer_r),
            peer_w.write_all(&up1),
            far_read_exact(&mut s.far_recv, up1.len()),
        );
        sent?;
        peer_sent?;
        let (peer_got, _) = peer_got?;
        let far_got = far_got?;
        // END_STREAM reached the local peer as EOF after exactly the bytes sent.
        assert!(
            peer_got[..] == down[..],
            "down: got {} bytes",
            peer_got.len()
        );
        assert!(far_got[..] == up1[..]);
        assert!(!splice.is_finished(), "splice ended on a half-close");

        let (peer_sent, far_got) = tokio::join!(
            async {
                peer_w.write_all(&up2).await?;
                peer_w.shutdown().await
            },
            far_read_to_end(&mut s.far_recv),
        );
        peer_sent?;
        let (far_got, _) = far_got?;
        assert!(far_got[..] == up2[..], "up: got {} bytes", far_got.len());

        assert_eq!(splice.await?, End::Eof);
        assert_eq!(c.up.get(), (up1.len() + up2.len()) as u64);
        assert_eq!(c.down.get(), down.len() as u64);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_local_reset() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let mut s = h2_stream(None).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);

        peer.write_all(b"hello").await?;
        assert_eq!(far_read_exact(&mut s.far_recv, 5).await?, b"hello");

        reset(peer)?;
        assert_eq!(splice.await?, End::LocalReset);
        assert_eq!(far_expect_reset(&mut s.far_recv).await?, h2::Reason::CANCEL);
        let reason = poll_fn(|cx| s.far_send.poll_reset(cx)).await?;
        assert_eq!(reason, h2::Reason::CANCEL);
        assert_eq!(c.up.get(), 5);
        assert_eq!(c.down.get(), 0);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_local_reset_after_remote_end() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let mut s = h2_stream(None).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);

        far_send(&mut s.far_send, Bytes::from_static(b"bye"), true).await?;
        let (got, _) = read_to_end_max(&mut peer).await?;
        assert_eq!(got, b"bye");

        reset(peer)?;
        assert_eq!(splice.await?, End::LocalReset);
        assert_eq!(far_expect_reset(&mut s.far_recv).await?, h2::Reason::CANCEL);
        assert_eq!(c.up.get(), 0);
        assert_eq!(c.down.get(), 3);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_remote_reset() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let mut s = h2_stream(None).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);

        far_send(&mut s.far_send, Bytes::from_static(b"ping"), false).await?;
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await?;
        assert_eq!(&got, b"ping");

        s.far_send.send_reset(h2::Reason::CANCEL);
        assert_eq!(splice.await?, End::RemoteReset);
        let err = read_until_error(&mut peer).await?;
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(c.up.get(), 0);
        assert_eq!(c.down.get(), 4);
        Ok(())
    })
    .await?
}

#[test]
fn read_buffers_start_past_a_page_boundary() {
    for _ in 0..16 {
        let b = phased_buf();
        assert_eq!(b.as_ptr() as usize % PAGE, DATA_PHASE);
        assert!(b.capacity() >= READ_SIZE);
        assert!(b.is_empty());
    }
    let whole = vec![0u8; READ_SIZE + PAGE];
    let off = phase_offset(whole.as_ptr());
    assert!(off + READ_SIZE <= whole.len());
    assert_eq!(whole[off..].as_ptr() as usize % PAGE, DATA_PHASE);
}

/// The remote resets the stream while the local client reads nothing, so the copy
/// loop is blocked writing to it: the reset must still end the splice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_remote_reset_while_the_local_side_does_not_read() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (peer, tcp) = tcp_pair().await?;
        socket2::SockRef::from(&peer).set_recv_buffer_size(4096)?;
        socket2::SockRef::from(&tcp).set_send_buffer_size(4096)?;
        let mut s = h2_stream(None).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);
        // Send until flow control stalls: the copy loop stops releasing window once
        // its write to the local socket blocks.
        let chunk = Bytes::from(vec![7u8; 16 * 1024]);
        loop {
            let sent = far_send(&mut s.far_send, chunk.clone(), false);
            match tokio::time::timeout(Duration::from_millis(500), sent).await {
                Ok(r) => r?,
                Err(_) => break,
            }
        }
        s.far_send.send_reset(h2::Reason::CANCEL);
        assert_eq!(splice.await?, End::RemoteReset);
        drop(peer);
        Ok(())
    })
    .await?
}

/// A client that sends FIN and then RST while the remote sends nothing: the stream
/// is reset at once, not when the remote next sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_local_reset_after_local_fin() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let mut s = h2_stream(None).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);

        peer.write_all(b"last").await?;
        peer.shutdown().await?;
        let (got, _) = far_read_to_end(&mut s.far_recv).await?;
        assert_eq!(got, b"last");

        reset(peer)?;
        assert_eq!(splice.await?, End::LocalReset);
        let reason = poll_fn(|cx| s.far_send.poll_reset(cx)).await?;
        assert_eq!(reason, h2::Reason::CANCEL);
        assert_eq!(c.up.get(), 4);
        assert_eq!(c.down.get(), 0);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_remote_reset_after_local_fin() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let mut s = h2_stream(None).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);

        peer.write_all(b"last").await?;
        peer.shutdown().await?;
        let (got, _) = far_read_to_end(&mut s.far_recv).await?;
        assert_eq!(got, b"last");

        s.far_send.send_reset(h2::Reason::CANCEL);
        assert_eq!(splice.await?, End::RemoteReset);
        let err = read_until_error(&mut peer).await?;
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(c.up.get(), 4);
        assert_eq!(c.down.get(), 0);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_remote_reset_after_remote_end() -> anyhow::Result<()> {
    timeout(TIMEOUT, async {
        let c = counters()?;
        let (mut peer, tcp) = tcp_pair().await?;
        let mut s = h2_stream(None).await?;
        let splice = spawn_h2(tcp, s.send, s.recv, &c);

        // Only the up direction is left, and it is idle: the reset must still be seen.
        far_send(&mut s.far_send, Bytes::from_static(b"done"), true).await?;
        let (got, _) = read_to_end_max(&mut peer).await?;
        assert_eq!(got, b"done");
        assert!(!splice.is_finished(), "splice ended on a half-close");

        s.far_send.send_reset(h2::Reason::CANCEL);
        assert_eq!(splice.await?, End::RemoteReset);
        // The local peer already read FIN, so the RST shows up on its writes.
        let err = loop {
            if let Err(e) = peer.write_all(b"x").await {
                break e;
            }
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "unexpected error {err}"
        );
        assert_eq!(c.up.get(), 0);
        assert_eq!(c.down.get(), 4);
        Ok(())
    })
    .await?
}
