//! Load balancing over an import's sources (spec 3.8): the per-request [`Cursor`] that
//! egress authorization (3.7 step 4) walks source by source, and the per-import
//! round-robin [`Counters`] shared by every request handled by this replica.
//! Reproduces ClusterLink's selection order exactly, because the e2e
//! `TestLoadBalancing*` scenarios observe it. Never looks at peers, policies or
//! Kubernetes: the caller decides whether a picked source failed or must be delayed.
//!
//! How spec 3.8 is read (checked against ClusterLink's `loadbalancer.go`):
//! - Every `select` first moves the current index (if any) into `failed`; a source
//!   marked with [`Cursor::delay`] is therefore counted as failed from the next `select`
//!   on, and it also sits in the `delayed` FIFO to be retried once `|failed| == n`.
//! - Round-robin and static do NOT skip indexes in `failed`/`delayed`: they simply walk
//!   forward (`(current + 1) mod n`, resp. `current + 1`). No skipping is needed: before
//!   the delayed phase the indexes visited by one request form one contiguous cyclic run
//!   starting at its first pick, all in `failed`, so the next one forward is always
//!   fresh while `|failed| < n` (and static's `current + 1` stays below `n`).
//! - Only random skips: a fresh uniform start on *every* step-3 `select` (Go draws
//!   `rand.Intn` per call, not once per request), then forward to the first index not
//!   in `failed`.
//! - The round-robin counter is a `u32` incremented (wrapping, like Go's `atomic.Uint32`)
//!   on every step-3 `select` of a round-robin cursor, failovers included, but not in
//!   the delayed phase; the first pick of a request is `counter mod n`.
//! - `is_delayed` is `|failed| == n`, exactly Go's `IsDelayed`.
//! - `n == 0` falls through step 2 like Go: `tried out all 0 sources`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::resources::LbScheme;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Every source failed (or was delayed and then failed); the caller wraps this as
    /// `cannot select import source: ...` and answers 500.
    #[error("tried out all {0} sources")]
    Exhausted(usize),
}

/// A round-robin counter of one import. Pre-incremented, so a fresh import's first
/// connection goes to source index `1 mod n`.
pub type Counter = AtomicU32;

/// Round-robin counters of all imports, keyed by `namespace/name`, created at 0 on the
/// first round-robin request.
#[derive(Debug, Default)]
pub struct Counters {
    by_import: Mutex<HashMap<String, Arc<Counter>>>,
}

impl Counters {
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared counter of `import` (`namespace/name`), created at 0 if missing.
    pub fn counter(&self, import: &str) -> Arc<Counter> {
        // The map is only ever inserted into or removed from, so a panic elsewhere
        // while holding the lock cannot leave it inconsistent.
        let mut by_import = self
            .by_import
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(by_import.entry(import.to_owned()).or_default())
    }

    /// A cursor for one request to `import` over its `n` sources. Only round-robin
    /// uses the shared counter; like ClusterLink, other schemes neither create nor
    /// advance it (they get a private one).
    pub fn cursor(&self, import: &str, scheme: LbScheme, n: usize) -> Cursor {
        let counter = match scheme {
            LbScheme::RoundRobin => self.counter(import),
            LbScheme::Random | LbScheme::Static => Arc::default(),
        };
        Cursor::new(scheme, n, counter)
    }

    /// Drops the counter of a deleted import; a re-created import starts again at 0.
    /// Requests in flight keep the old counter until they finish.
    pub fn forget(&self, import: &str) {
        self.by_import
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(import);
    }
}

/// The selection state of one request (one connection to an import listener).
#[derive(Debug)]
pub struct Cursor {
    scheme: LbScheme,
    n: usize,
    counter: Arc<Counter>,
    current: Option<usize>,
    failed: HashSet<usize>,
    delayed: VecDeque<usize>,
}

impl Cursor {
    pub fn new(scheme: LbScheme, n: usize, counter: Arc<Counter>) -> Self {
        Self {
            scheme,
            n,
            counter,
            current: None,
            failed: HashSet::new(),
            delayed: VecDeque::new(),
        }
    }

    /// The index returned by the last successful `select`.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// The next source index to try; the previous one (if any) counts as failed.
    pub fn select(&mut self) -> Result<usize, Error> {
        if let Some(current) = self.current {
            self.failed.insert(current);
        }

        if self.failed.len() == self.n {
            // Delayed phase: retry the unreachable sources in the order they were
            // deferred. `current` is left alone on exhaustion, as in Go.
            let index = self.delayed.pop_front().ok_or(Error::Exhausted(self.n))?;
            self.current = Some(index);
            return Ok(index);
        }

        let index = match self.scheme {
            LbScheme::RoundRobin => {
                // Advanced on every pick, failovers included: with source 0 broken this
                // makes successive connections alternate 1, 2, 1, 2 (spec 3.8).
                let c = self.counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
                match self.current {
                    None => c as usize % self.n,
                    Some(current) => (current + 1) % self.n,
                }
            }
            LbScheme::Static => self.current.map_or(0, |current| current + 1),
            LbScheme::Random => self.first_not_failed_from(rand::random_range(0..self.n))?,
        };
        self.current = Some(index);
        Ok(index)
    }

    /// Defers the current source (its peer is unreachable) until every other source
    /// failed. Go appends unconditionally; here a call without a current source, a
    /// repeated call for the same source, or a call in the delayed phase (which would
    /// make Go retry the same source forever) is ignored. The egress caller never does
    /// any of these, so the observable order is unchanged.
    pub fn delay(&mut self) {
        if self.is_delayed() {
            return;
        }
        if let Some(current) = self.current {
            if !self.delayed.contains(&current) {
                self.delayed.push_back(current);
            }
        }
    }

    /// True once every source is in `failed`: delayed sources are being retried, so
    /// the caller must use unreachable peers instead of deferring them again.
    pub fn is_delayed(&self) -> bool {
        self.failed.len() == self.n
    }

    /// Random scheme: from `start`, forward cyclically to the first index not failed.
    fn first_not_failed_from(&self, start: usize) -> Result<usize, Error> {
        (0..self.n)
            .map(|step| (start + step) % self.n)
            .find(|index| !self.failed.contains(index))
            .ok_or(Error::Exhausted(self.n))
    }
}

#[cfg(test)]
mod tests;
