//! Counters of what a pipeline did, readable while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Inputs received from the consumer (redeliveries included).
    pub received: AtomicU64,
    /// Inputs the plugin ran on.
    pub executed: AtomicU64,
    /// Inputs already committed: the plugin did not run; their stored outputs were
    /// re-published only as far as they were not yet acknowledged.
    pub deduplicated: AtomicU64,
    /// Inputs committed as dead letters.
    pub dead_lettered: AtomicU64,
    /// Messages the server acknowledged (outputs and dead letters, re-publishes included).
    pub published: AtomicU64,
    /// Inputs acknowledged.
    pub acked: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.load(Ordering::Relaxed),
            executed: self.executed.load(Ordering::Relaxed),
            deduplicated: self.deduplicated.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A copy of a pipeline's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub executed: u64,
    pub deduplicated: u64,
    pub dead_lettered: u64,
    pub published: u64,
    pub acked: u64,
}
