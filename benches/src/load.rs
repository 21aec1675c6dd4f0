//! The client load: bulk throughput, ping-pong latency, the new-connection rate and
//! idle connections.
//! Everything is bounded: each scenario runs for its duration plus a fixed grace period
//! at most, and each connection attempt has its own timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Concurrent workers in the connection-rate scenario.
pub const CONN_WORKERS: usize = 8;
/// Connections of the multi-stream bulk scenario.
pub const BULK_STREAMS: usize = 8;
/// Request and response size in the connection-rate scenario.
pub const MESSAGE: usize = 64;
/// Size of each write in the bulk scenario.
const BULK_WRITE: usize = 256 * 1024;
/// How long past its duration a scenario may take (draining, the sink's answer).
const GRACE: Duration = Duration::from_secs(30);
/// Bound on one connect + echo (connection-rate scenario, start-up checks).
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Bulk {
    /// Bytes the sink confirmed.
    pub bytes: u64,
    /// From the first write until the sink's confirmation arrived.
    pub secs: f64,
}

impl Bulk {
    pub fn gbit_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 * 8.0 / self.secs / 1e9
        } else {
            0.0
        }
    }
}

/// `streams` connections to the sink, each writing as fast as it can for `duration`,
/// then half-closing and waiting for the sink to confirm how many bytes it read.
/// Throughput counts every byte confirmed, over the time until the last confirmation.
pub async fn bulk(addr: SocketAddr, duration: Duration, streams: usize) -> Result<Bulk> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams.max(1) {
        tasks.spawn(bulk_one(addr, duration));
    }
    let mut bytes = 0;
    // On the first failure the JoinSet is dropped, which aborts the other streams, so
    // that none of them writes into the next scenario.
    while let Some(done) = tasks.join_next().await {
        bytes += done.context("a bulk stream panicked")??;
    }
    Ok(Bulk {
        bytes,
        secs: start.elapsed().as_secs_f64(),
    })
}

async fn bulk_one(addr: SocketAddr, duration: Duration) -> Result<u64> {
    tokio::time::timeout(duration + GRACE, bulk_inner(addr, duration))
        .await
        .map_err(|_| anyhow!("bulk transfer did not finish within {:?}", duration + GRACE))?
}

async fn bulk_inner(addr: SocketAddr, duration: Duration) -> Result<u64> {
    let mut s = tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    let buf: Vec<u8> = (0..BULK_WRITE).map(|i| (i % 251) as u8).collect();
    let deadline = Instant::now() + duration;
    let mut written: u64 = 0;
    while Instant::now() < deadline {
        s.write_all(&buf).await.context("bulk write")?;
        written += buf.len() as u64;
    }
    s.shutdown()
        .await
        .context("half-close after the bulk write")?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .await
        .context("reading the sink's byte count")?;
    let bytes = u64::from_le_bytes(count);
    if bytes != written {
        bail!("the sink read {bytes} bytes of the {written} written");
    }
    Ok(bytes)
}

/// Latencies in µs, sorted, with nearest-rank percentiles.
pub struct Latencies(pub Vec<u32>);

impl Latencies {
    /// Nearest-rank percentile in µs, `q` in (0, 1].
    pub fn percentile_us(&self, q: f64) -> Option<f64> {
        let n = self.0.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.0.get(rank - 1).map(|v| f64::from(*v))
    }
}

/// 64-byte ping-pong on one established connection to the echo server for
/// `duration`: write 64 B, read the 64 B echo, again. Blocking sockets on a thread of
/// their own, so that no scheduler hop of the load generator lands in the numbers.
pub async fn ping_pong(addr: SocketAddr, duration: Duration) -> Result<Latencies> {
    tokio::task::spawn_blocking(move || ping_pong_blocking(addr, duration))
        .await
        .context("the ping-pong thread panicked")?
}

fn ping_pong_blocking(addr: SocketAddr, duration: Duration) -> Result<Latencies> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, OP_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(OP_TIMEOUT))?;
    s.set_write_timeout(Some(OP_TIMEOUT))?;
    let mut msg = [0u8; MESSAGE];
    let mut back = [0u8; MESSAGE];
    let mut lat = Vec::with_capacity(256 * 1024);
    // A short warm-up outside the measurement (first stream on the tunnel, caches).
    let warm = Instant::now() + Duration::from_millis(200);
    let deadline = warm + duration;
    let mut seq: u8 = 0;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        seq = seq.wrapping_add(1);
        msg.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u8) ^ seq);
        s.write_all(&msg).context("ping write")?;
        s.read_exact(&mut back).context("pong read")?;
        let rtt = now.elapsed();
        if back != msg {
            bail!("the echo returned different bytes");
        }
        if now >= warm {
            lat.push(u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX));
        }
    }
    lat.sort_unstable();
    Ok(Latencies(lat))
}

/// Opens `n` connections to the echo server, 64 at a time, each carrying one 64 B
/// echo (so the whole path, tunnel stream included, is set up) and then held open
/// and idle. Returns them; dropping them closes them.
pub async fn idle_connections(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    const AT_ONCE: usize = 64;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .context("semaphore closed")?;
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(OP_TIMEOUT, one_conn(addr, &[0x3c; MESSAGE])).await;
            drop(permit);
            r.map_err(|_| anyhow!("connect + echo timed out"))?
        }));
    }
    let mut out = Vec::with_capacity(n);
    for (i, t) in tasks.into_iter().enumerate() {
        let s = t
            .await
            .context("an idle-connection task panicked")?
            .with_context(|| format!("idle connection {} of {n}", i + 1))?;
        out.push(s);
    }
    Ok(out)
}

/// One 64-byte echo on a fresh connection.
pub async fn echo_once(addr: SocketAddr) -> Result<()> {
    one_conn(addr, &[0x5a; MESSAGE]).await.map(drop)
}

pub struct Rate {
    /// Successful connect + 64 B echo + close cycles.
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    /// Connect + write + echoed read, per successful cycle.
    pub latencies: Latencies,
}

impl Rate {
    pub fn conns_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }
}

#[derive(Default)]
struct Worker {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

/// `CONN_WORKERS` workers each loop {connect, write 64 B, read the 64 B echo, close}
/// until `duration` has passed.
pub async fn conn_rate(addr: SocketAddr, duration: Duration) -> Result<Rate> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..CONN_WORKERS)
        .map(|i| tokio::spawn(conn_worker(addr, deadline, i as u8)))
        .collect();
    let mut all = Worker::default();
    for w in workers {
        let w = tokio::time::timeout_at((deadline + GRACE).into(), w)
            .await
            .map_err(|_| anyhow!("a connection worker did not stop in time"))?
            .context("a connection worker panicked")?;
        all.latencies_us.extend(w.latencies_us);
        all.errors += w.errors;
        if all.first_error.is_none() {
            all.first_error = w.first_error;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    Ok(Rate {
        ok: all.latencies_us.len() as u64,
        errors: all.errors,
        first_error: all.first_error,
        secs,
        latencies: Latencies(all.latencies_us),
    })
}

async fn conn_worker(addr: SocketAddr, deadline: Instant, id: u8) -> Worker {
    let mut w = Worker {
        latencies_us: Vec::with_capacity(64 * 1024),
        ..Default::default()
    };
    let mut msg = [0u8; MESSAGE];
    let mut seq: u8 = 0;
    while Instant::now() < deadline {
        // Distinct bytes per attempt, so that a stale or misrouted echo is caught.
        seq = seq.wrapping_add(1);
        msg.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u8) ^ id.wrapping_mul(31) ^ seq);
        let t0 = Instant::now();
        let outcome = tokio::time::timeout(OP_TIMEOUT, one_conn(addr, &msg)).await;
        let elapsed = t0.elapsed();
        match outcome {
            Ok(Ok(stream)) => {
                w.latencies_us
                    .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
                // Closed outside the measured time.
                drop(stream);
            }
            Ok(Err(e)) => {
                w.errors += 1;
                w.first_error.get_or_insert_with(|| format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(_) => {
                w.errors += 1;
                w.first_error.get_or_insert_with(|| {
                    format!("connect + echo timed out after {OP_TIMEOUT:?}")
                });
            }
        }
    }
    w
}

async fn one_conn(addr: SocketAddr, msg: &[u8; MESSAGE]) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    s.set_nodelay(true)?;
    s.write_all(msg).await.context("write")?;
    let mut back = [0u8; MESSAGE];
    s.read_exact(&mut back).await.context("read the echo")?;
    if &back != msg {
        bail!("the echo returned different bytes");
    }
    Ok(s)
}
