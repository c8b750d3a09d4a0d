//! Test-only fault injection: with the `fault-injection` feature, `WEIR_FAULT=<point>[:<n>]`
//! aborts the process (no cleanup, like `kill -9`) the n-th time (by default the first)
//! execution reaches the named point of the message path. Without the feature, `point`
//! is an empty inline function: release builds carry nothing of it.
//!
//! The points, in path order: `fetched` (a batch in hand, nothing looked up), `executed`
//! (plugin outcomes in memory, nothing committed), `committed` (the batch durably
//! committed, nothing published), `published` (outputs acknowledged by JetStream, inputs
//! not acked), `acked` (inputs acked, outbox not cleared).

/// Marks a named point of the message path.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static REACHED: AtomicU64 = AtomicU64::new(0);
    let target = TARGET.get_or_init(|| {
        let spec = std::env::var("WEIR_FAULT").ok()?;
        let (point, nth) = match spec.split_once(':') {
            Some((point, nth)) => (point.to_owned(), nth.parse().ok()?),
            None => (spec, 1),
        };
        Some((point, nth))
    });
    if let Some((point, nth)) = target
        && point == name
        && REACHED.fetch_add(1, Ordering::SeqCst) + 1 == *nth
    {
        eprintln!("weir: WEIR_FAULT: aborting at {name}");
        std::process::abort();
    }
}

/// Marks a named point of the message path (fault injection is compiled out).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
