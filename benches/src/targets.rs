//! The target servers behind gateway B (or dialled directly): an echo server for the
//! connection-rate scenario and a sink for the bulk scenario. They run on their own
//! multi-threaded tokio runtime, so they never share a scheduler with the client load.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Size of the sink's and the echo server's reads.
const READ_BUF: usize = 256 * 1024;

/// Both target servers and the runtime they run on.
pub struct Targets {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    rt: Option<Runtime>,
}

impl Targets {
    pub fn start(threads: usize) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("cl-bench-target")
            .enable_all()
            .build()
            .context("building the targets' runtime")?;
        let echo = bind()?;
        let sink = bind()?;
        let echo_addr = echo.local_addr()?;
        let sink_addr = sink.local_addr()?;
        let (echo, sink) = {
            let _in_rt = rt.enter();
            (TcpListener::from_std(echo)?, TcpListener::from_std(sink)?)
        };
        rt.spawn(accept_loop(echo, |s| Box::pin(echo_conn(s))));
        rt.spawn(accept_loop(sink, |s| Box::pin(sink_conn(s))));
        Ok(Targets {
            echo: echo_addr,
            sink: sink_addr,
            rt: Some(rt),
        })
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        // Safe from any context, unlike dropping a runtime inside another one.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn bind() -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a target")?;
    l.set_nonblocking(true)?;
    Ok(l)
}

type ConnFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

async fn accept_loop(listener: TcpListener, handler: fn(TcpStream) -> ConnFuture) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(handler(s));
            }
            // Out of descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// Echoes until the client's FIN, then closes (passive close: no TIME_WAIT here).
async fn echo_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

/// Reads and discards until the client's FIN, then answers with the byte count
/// (8 bytes, little endian) so the client knows everything arrived, and closes.
async fn sink_conn(mut s: TcpStream) {
    let mut buf = vec![0u8; READ_BUF];
    let mut total: u64 = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = s.set_nodelay(true);
    if s.write_all(&total.to_le_bytes()).await.is_ok() {
        let _ = s.shutdown().await;
    }
}
