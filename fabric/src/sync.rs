//! Two small concurrency helpers every process uses: a lock that survives poisoning,
//! and waiting for a stop signal on a `watch` channel. Nothing here blocks.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

/// Locks a mutex whose short critical sections cannot leave it inconsistent, so a
/// poisoned lock (a panic elsewhere while it was held) is still usable.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resolves once `rx` holds true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
