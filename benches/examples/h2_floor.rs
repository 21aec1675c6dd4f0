//! The h2 crate's own cost per request/response round trip, without TLS, sockets or
//! a second process: 64-byte ping-pong on one CONNECT stream between an h2 client
//! and server joined by an in-memory pipe, on one single-threaded tokio runtime (as
//! a gateway worker is), against the same ping-pong over the bare pipe. Each side
//! moves data as the gateway's copy loop does (`reserve_capacity`, `poll_capacity`,
//! `send_data`; `data`, `release_capacity`), with a task per stream and one per
//! connection. The difference per round trip is what h2 adds for four messages
//! (one send and one receive on each side), the floor under the h2-mode ping-pong
//! gap that benches/README.md measures between gateways.
//!
//! `cargo run --release -p benches --example h2_floor [round trips]`

use std::future::poll_fn;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use nix::sys::resource::{getrusage, UsageWho};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const MESSAGE: usize = 64;
const PIPE: usize = 1 << 20;

fn cpu() -> anyhow::Result<Duration> {
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    Ok(t(u.user_time()) + t(u.system_time()))
}

async fn send(send: &mut SendStream<Bytes>, data: Bytes) -> anyhow::Result<()> {
    send.reserve_capacity(data.len());
    match poll_fn(|cx| send.poll_capacity(cx)).await {
        Some(Ok(cap)) if cap >= data.len() => {}
        other => bail!("no capacity: {other:?}"),
    }
    send.send_data(data, false)?;
    Ok(())
}

async fn recv(recv: &mut RecvStream) -> anyhow::Result<Bytes> {
    let data = recv.data().await.context("stream ended")??;
    recv.flow_control().release_capacity(data.len())?;
    Ok(data)
}

async fn round_trip(
    out: &mut SendStream<Bytes>,
    body: &mut RecvStream,
    message: &Bytes,
) -> anyhow::Result<()> {
    send(out, message.clone()).await?;
    let got = recv(body).await?;
    anyhow::ensure!(got.len() == MESSAGE, "echo of {} bytes", got.len());
    Ok(())
}

/// The far side over h2: accepts one CONNECT stream and echoes it, the stream in
/// this task and the connection in a task of its own, as in the gateway.
async fn h2_echo(io: DuplexStream) -> anyhow::Result<()> {
    let mut conn = h2::server::handshake(io).await?;
    let (req, mut respond) = conn.accept().await.context("no stream")??;
    tokio::spawn(async move { while let Some(Ok(_)) = conn.accept().await {} });
    let mut body = req.into_body();
    let mut out = respond.send_response(http::Response::new(()), false)?;
    loop {
        let data = recv(&mut body).await?;
        send(&mut out, data).await?;
    }
}

/// The far side over the bare pipe: echoes it.
async fn pipe_echo(mut io: DuplexStream) -> anyhow::Result<()> {
    let mut buf = [0u8; MESSAGE];
    loop {
        io.read_exact(&mut buf).await?;
        io.write_all(&buf).await?;
    }
}

/// Round trips over h2: (wall, CPU) for `n` of them.
async fn over_h2(n: usize) -> anyhow::Result<(Duration, Duration)> {
    let (client_io, server_io) = tokio::io::duplex(PIPE);
    tokio::spawn(h2_echo(server_io));
    let (client, conn) = h2::client::handshake(client_io).await?;
    tokio::spawn(conn);
    let mut client = client.ready().await?;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("peer:443")
        .body(())?;
    let (response, mut out) = client.send_request(req, false)?;
    let mut body = response.await?.into_body();
    let message = Bytes::from(vec![7u8; MESSAGE]);
    for _ in 0..n / 10 {
        round_trip(&mut out, &mut body, &message).await?;
    }
    let (wall, cpu0) = (Instant::now(), cpu()?);
    for _ in 0..n {
        round_trip(&mut out, &mut body, &message).await?;
    }
    Ok((wall.elapsed(), cpu()? - cpu0))
}

/// Round trips over the bare pipe, a task per side.
async fn over_pipe(n: usize) -> anyhow::Result<(Duration, Duration)> {
    let (mut client, server) = tokio::io::duplex(PIPE);
    tokio::spawn(pipe_echo(server));
    let message = [7u8; MESSAGE];
    let mut buf = [0u8; MESSAGE];
    for _ in 0..n / 10 {
        client.write_all(&message).await?;
        client.read_exact(&mut buf).await?;
    }
    let (wall, cpu0) = (Instant::now(), cpu()?);
    for _ in 0..n {
        client.write_all(&message).await?;
        client.read_exact(&mut buf).await?;
    }
    Ok((wall.elapsed(), cpu()? - cpu0))
}

fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().context("round trips: a number")?,
        None => 200_000,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let (pipe_wall, pipe_cpu) = rt.block_on(over_pipe(n))?;
    let (h2_wall, h2_cpu) = rt.block_on(over_h2(n))?;
    println!("{n} round trips of {MESSAGE} bytes, one thread:");
    println!(
        "bare pipe: {:.2} us per round trip ({:.2} us CPU)",
        per(pipe_wall),
        per(pipe_cpu)
    );
    println!(
        "h2:        {:.2} us per round trip ({:.2} us CPU)",
        per(h2_wall),
        per(h2_cpu)
    );
    println!(
        "h2 adds    {:.2} us CPU per round trip (4 messages: a send and a receive on each side)",
        per(h2_cpu) - per(pipe_cpu)
    );
    Ok(())
}
