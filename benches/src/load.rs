//! The client load: bulk throughput on one stream, and the new-connection rate.
//! Everything is bounded: each scenario runs for its duration plus a fixed grace period
//! at most, and each connection attempt has its own timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Concurrent workers in the connection-rate scenario.
pub const CONN_WORKERS: usize = 8;
/// Request and response size in the connection-rate scenario.
pub const MESSAGE: usize = 64;
/// Size of each write in the bulk scenario.
const BULK_WRITE: usize = 256 * 1024;
/// How long past its duration a scenario may take (draining, the sink's answer).
const GRACE: Duration = Duration::from_secs(30);
/// Bound on one connect + echo in the connection-rate scenario.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// One connection to the sink; writes as fast as possible for `duration`, then
/// half-closes and waits for the sink to confirm how many bytes it read.
pub async fn bulk(addr: SocketAddr, duration: Duration) -> Result<Bulk> {
    tokio::time::timeout(duration + GRACE, bulk_inner(addr, duration))
        .await
        .map_err(|_| anyhow!("bulk transfer did not finish within {:?}", duration + GRACE))?
}

async fn bulk_inner(addr: SocketAddr, duration: Duration) -> Result<Bulk> {
    let mut s = tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    let buf: Vec<u8> = (0..BULK_WRITE).map(|i| (i % 251) as u8).collect();
    let start = Instant::now();
    let deadline = start + duration;
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
    let secs = start.elapsed().as_secs_f64();
    let bytes = u64::from_le_bytes(count);
    if bytes != written {
        bail!("the sink read {bytes} bytes of the {written} written");
    }
    Ok(Bulk { bytes, secs })
}

pub struct Rate {
    /// Successful connect + 64 B echo + close cycles.
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    /// Connect + write + echoed read, per successful cycle, sorted.
    pub latencies_us: Vec<u32>,
}

impl Rate {
    pub fn conns_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Nearest-rank percentile in µs, `q` in (0, 1].
    pub fn percentile_us(&self, q: f64) -> Option<f64> {
        let n = self.latencies_us.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.latencies_us.get(rank - 1).map(|v| f64::from(*v))
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
        latencies_us: all.latencies_us,
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
