//! Thread per core: the gateway's connections run on `n` worker threads, each driving
//! its own single-threaded tokio runtime. A connection stays on the worker that
//! accepted it; its streams' tasks and the pooled h2 connection they ride on (the
//! dialer prefers the worker's own, see `tunnel::Dialer`) are driven by the same
//! thread, so handing a message between a client's task and the tunnel's connection
//! task is a local wake-up instead of a futex call and a cross-core hand-off (with
//! one multi-threaded runtime, the two tasks of a message often ran on different
//! threads: ping-pong p50 was 25-50 us above our HTTP/1.1 mode, and is now level with
//! it; see benches/README.md).
//!
//! The first `MAX_ACCEPTORS` workers accept, each on its own duplicate of each
//! listening socket (no SO_REUSEPORT, so no other process can join the port; every
//! accepting worker is woken by each new connection, hence the bound on large hosts,
//! where the others get their connections by hand-over). A worker that accepts a
//! connection while it carries more connections of that port than another worker
//! hands it over (deregistered from its reactor, registered with the other's): on
//! the gateway port at any difference, because a few long-lived pooled connections
//! carry all the traffic between two peers and must not share one core by chance; on
//! import ports at a difference of two or more, because a burst of new connections
//! is otherwise all accepted by the first worker to wake, and a hand-over costs two
//! system calls and a cross-thread wake-up.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start worker thread {index}: {source}")]
    Start {
        index: usize,
        source: std::io::Error,
    },
}

/// Which kind of listener a connection came from; each is balanced on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Gateway,
    Import,
}

impl Port {
    fn index(self) -> usize {
        match self {
            Port::Gateway => 0,
            Port::Import => 1,
        }
    }

    /// How many more connections than the least loaded worker a worker may carry
    /// before it hands new ones over.
    fn slack(self) -> usize {
        match self {
            Port::Gateway => 0,
            Port::Import => 1,
        }
    }
}

/// Workers that accept on each listening socket (see the module comment).
pub const MAX_ACCEPTORS: usize = 4;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker this code runs on; None outside the workers (the control runtime,
/// tests that drive the dialer directly).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// The worker threads of one gateway. They stop when `halt` (given to `start`) turns
/// true or its sender is dropped; tasks still running on them are dropped then.
pub struct Workers {
    handles: Vec<Handle>,
    /// Connections per worker, by `Port::index`.
    load: [Vec<AtomicUsize>; 2],
    /// Closed when every worker thread has ended (each holds a sender).
    exited: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

/// Counts one connection against its worker until dropped.
pub struct LoadGuard {
    workers: Arc<Workers>,
    port: Port,
    index: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.workers.load[self.port.index()][self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `n` (at least one) worker threads named `cl-worker-<i>`.
    pub fn start(n: usize, halt: watch::Receiver<bool>) -> Result<Arc<Workers>, Error> {
        let n = n.max(1);
        let (exit_tx, exit_rx) = mpsc::channel(1);
        let mut handles = Vec::with_capacity(n);
        for index in 0..n {
            let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
            let mut halt = halt.clone();
            let exit_tx = exit_tx.clone();
            let started = std::thread::Builder::new()
                .name(format!("cl-worker-{index}"))
                .spawn(move || {
                    let _exit = exit_tx;
                    INDEX.with(|i| i.set(Some(index)));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(fabric::sync::stopped(&mut halt));
                    // Dropping the runtime drops the tasks left on it (the streams the
                    // drain did not wait for) and closes their sockets.
                    rt.shutdown_timeout(Duration::from_millis(100));
                })
                .map_err(|source| Error::Start { index, source })?;
            let handle = match handle_rx.recv() {
                Ok(Ok(h)) => h,
                Ok(Err(source)) => return Err(Error::Start { index, source }),
                Err(_) => {
                    let source = match started.join() {
                        Ok(()) => std::io::Error::other("the worker thread ended"),
                        Err(_) => std::io::Error::other("the worker thread panicked"),
                    };
                    return Err(Error::Start { index, source });
                }
            };
            handles.push(handle);
        }
        Ok(Arc::new(Workers {
            load: [0, 1].map(|_| handles.iter().map(|_| AtomicUsize::new(0)).collect()),
            handles,
            exited: tokio::sync::Mutex::new(exit_rx),
        }))
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// How many workers accept on each listening socket: workers 0 to this - 1.
    pub fn acceptors(&self) -> usize {
        self.handles.len().min(MAX_ACCEPTORS)
    }

    /// One descriptor of `listener` per accepting worker, in worker order.
    pub fn listener_copies(
        &self,
        listener: &std::net::TcpListener,
    ) -> std::io::Result<Vec<std::net::TcpListener>> {
        (0..self.acceptors())
            .map(|_| listener.try_clone())
            .collect()
    }

    /// Runs `task` on worker `index` (modulo the worker count).
    pub fn spawn_on<F>(&self, index: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index % self.handles.len()].spawn(task)
    }

    /// Counts a connection from `port` against worker `index`.
    pub fn enter(self: &Arc<Self>, port: Port, index: usize) -> LoadGuard {
        let index = index % self.handles.len();
        self.load[port.index()][index].fetch_add(1, Ordering::Relaxed);
        LoadGuard {
            workers: self.clone(),
            port,
            index,
        }
    }

    /// The worker a new connection from `port`, accepted on worker `me`, should run
    /// on: `me`, unless another worker carries fewer connections of that port by more
    /// than the port's slack.
    pub fn placement(&self, port: Port, me: usize) -> usize {
        let load = &self.load[port.index()];
        let mine = load[me % load.len()].load(Ordering::Relaxed);
        load.iter()
            .enumerate()
            .map(|(i, l)| (l.load(Ordering::Relaxed), i))
            .filter(|(l, _)| l + port.slack() < mine)
            .min()
            .map_or(me, |(_, i)| i)
    }

    /// Runs `run` for a connection from `port` accepted on worker `me` (the caller's
    /// worker), on the worker `placement` chooses, with the connection counted against
    /// that worker while it runs.
    pub fn dispatch<F, Fut>(self: &Arc<Self>, port: Port, me: usize, tcp: TcpStream, run: F)
    where
        F: FnOnce(TcpStream, LoadGuard) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let to = self.placement(port, me);
        let load = self.enter(port, to);
        if to == me {
            tokio::spawn(run(tcp, load));
            return;
        }
        // Deregistered from this worker's reactor, registered with the other's.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection over");
                return;
            }
        };
        self.spawn_on(to, async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => run(tcp, load).await,
                Err(e) => tracing::debug!(error = %e, "cannot take a connection over"),
            }
        });
    }

    /// Waits (at most `timeout`) until every worker thread has ended.
    pub async fn wait_exited(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.lock().await;
        tokio::time::timeout(timeout, async { while rx.recv().await.is_some() {} })
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{ensure, Context, Result};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn tasks_run_on_their_worker_and_workers_stop_on_halt() -> Result<()> {
        let (halt, halt_rx) = watch::channel(false);
        let workers = Workers::start(3, halt_rx)?;
        ensure!(workers.len() == 3);
        ensure!(workers.acceptors() == 3);
        ensure!(current().is_none());
        for i in 0..5 {
            let on = workers.spawn_on(i, async { current() }).await?;
            ensure!(on == Some(i % 3), "task {i} ran on {on:?}");
        }
        // A task a worker spawns stays on that worker.
        let on = workers
            .spawn_on(1, async { tokio::spawn(async { current() }).await.ok() })
            .await?;
        ensure!(on == Some(Some(1)), "{on:?}");
        let _ = halt.send(true);
        ensure!(workers.wait_exited(Duration::from_secs(5)).await);
        Ok(())
    }

    #[tokio::test]
    async fn placement_prefers_the_least_loaded_worker() -> Result<()> {
        let (_halt, halt_rx) = watch::channel(false);
        let workers = Workers::start(3, halt_rx)?;
        let g = Port::Gateway;
        ensure!(workers.placement(g, 2) == 2, "equal load: stay");
        let a = workers.enter(g, 2);
        ensure!(workers.placement(g, 2) == 0);
        let b = workers.enter(g, 0);
        ensure!(workers.placement(g, 2) == 1);
        ensure!(workers.placement(g, 0) == 1);
        let c = workers.enter(g, 1);
        ensure!(workers.placement(g, 1) == 1, "equal load: stay");
        // Import ports are counted apart, and tolerate one connection more.
        let i = Port::Import;
        ensure!(workers.placement(i, 0) == 0);
        let d = workers.enter(i, 0);
        ensure!(
            workers.placement(i, 0) == 0,
            "one more than the others: stay"
        );
        let e = workers.enter(i, 0);
        ensure!(workers.placement(i, 0) == 1, "two more: hand over");
        drop((a, b, c, d, e));
        ensure!(workers.placement(g, 1) == 1);
        ensure!(workers.placement(i, 0) == 0);
        Ok(())
    }

    #[tokio::test]
    async fn dispatch_hands_connections_to_the_least_loaded_worker() -> Result<()> {
        let (_halt, halt_rx) = watch::channel(false);
        let workers = Workers::start(2, halt_rx)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let listener = listener.into_std()?;
        // Worker 0 accepts four connections in a row; each reports where it runs,
        // echoes one byte (so the socket works after a hand-over) and stays counted
        // until its client closes.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = workers.clone();
        workers.spawn_on(0, async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            for _ in 0..4 {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                w.dispatch(Port::Import, 0, tcp, move |mut tcp, load| async move {
                    let _ = tx.send(current());
                    let mut b = [0u8; 1];
                    if tcp.read_exact(&mut b).await.is_ok() {
                        let _ = tcp.write_all(&b).await;
                    }
                    let _ = tcp.read(&mut b).await;
                    drop(load);
                });
            }
        });
        let mut clients = Vec::new();
        let mut ran_on = Vec::new();
        for n in 0..4u8 {
            let mut c = TcpStream::connect(addr).await?;
            let on = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await?
                .context("the accepting task ended")?;
            ran_on.push(on.context("ran outside the workers")?);
            c.write_all(&[n]).await?;
            let mut b = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b)).await??;
            ensure!(b[0] == n);
            clients.push(c);
        }
        // Loads (worker 0 / worker 1) before each: 0/0 stay, 1/0 stay (slack one),
        // 2/0 hand over, 2/1 stay.
        ensure!(ran_on == vec![0, 0, 1, 0], "{ran_on:?}");
        Ok(())
    }

    #[tokio::test]
    async fn dropping_the_halt_sender_stops_the_workers() -> Result<()> {
        let (halt, halt_rx) = watch::channel(false);
        let workers = Workers::start(MAX_ACCEPTORS + 2, halt_rx)?;
        ensure!(workers.acceptors() == MAX_ACCEPTORS);
        drop(halt);
        ensure!(workers.wait_exited(Duration::from_secs(5)).await);
        Ok(())
    }
}
