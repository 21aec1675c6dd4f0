//! The drain's bookkeeping: counts in-flight tunnelled connections, tells when none
//! is left, and force-closes the rest when the drain times out. It decides nothing
//! about when to drain; `app` does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::copy::End;

/// Counts in-flight tunnelled connections for the drain, and force-closes the ones
/// left when the drain times out.
pub struct Tracker {
    count: AtomicUsize,
    idle: Notify,
    force: watch::Sender<bool>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            count: AtomicUsize::new(0),
            idle: Notify::new(),
            force: watch::channel(false).0,
        }
    }
}

pub struct TrackGuard(Arc<Tracker>);

impl Tracker {
    pub fn track(self: &Arc<Self>) -> TrackGuard {
        self.count.fetch_add(1, Ordering::Relaxed);
        TrackGuard(self.clone())
    }

    /// Runs a relay until it ends or the drain force-closes it.
    pub async fn run(&self, relay: impl std::future::Future<Output = End>) -> End {
        let mut force = self.force.subscribe();
        tokio::select! {
            end = relay => end,
            _ = fabric::sync::stopped(&mut force) => End::Drained,
        }
    }

    /// Force-closes every tracked relay still running (the drain timed out).
    pub fn force_close(&self) {
        self.force.send_replace(true);
    }

    pub fn active(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Resolves once no tracked connection is left.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
