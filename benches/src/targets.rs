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

/// Both target servers and the runtime they run on: in this process, or in a child
/// process of their own (`cl-bench --serve-targets`), so that their sockets count
/// against that process's open-file limit rather than the load generator's.
pub struct Targets {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    rt: Option<Runtime>,
    child: Option<std::process::Child>,
}

impl Targets {
    /// Starts the targets in a child process running `exe --serve-targets`, which
    /// prints `echo=ADDR sink=ADDR` and serves until its stdin closes.
    pub fn spawn(exe: &std::path::Path) -> Result<Self> {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        let mut child = Command::new(exe)
            .arg("--serve-targets")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the target process")?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| std::io::BufReader::new(out).read_line(&mut line));
        let parsed = (|| {
            let mut echo = None;
            let mut sink = None;
            for part in line.split_whitespace() {
                match part.split_once('=') {
                    Some(("echo", a)) => echo = a.parse().ok(),
                    Some(("sink", a)) => sink = a.parse().ok(),
                    _ => {}
                }
            }
            Some((echo?, sink?))
        })();
        match (read, parsed) {
            (Some(Ok(_)), Some((echo, sink))) => Ok(Targets {
                echo,
                sink,
                rt: None,
                child: Some(child),
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("the target process did not report its addresses (got {line:?})")
            }
        }
    }

    /// The child's side of `spawn`: serve until stdin closes (the parent exited).
    pub fn serve_until_stdin_closes(threads: usize) -> Result<()> {
        use std::io::{Read as _, Write as _};
        let t = Targets::start(threads)?;
        println!("echo={} sink={}", t.echo, t.sink);
        std::io::stdout().flush()?;
        let mut sink = [0u8; 64];
        while std::io::stdin()
            .read(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
        Ok(())
    }

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
            child: None,
        })
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        // Safe from any context, unlike dropping a runtime inside another one.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
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
