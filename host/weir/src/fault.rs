//! Fault points: named places of the message path where a test may strike. `point(name)`
//! runs the hook installed with [`install`], if any, and does nothing otherwise.
//!
//! The `weir` binary installs none, so no environment variable can make it abort. The test
//! suite's `weir-faulty` binary (tests/src/bin/weir-faulty.rs) is the same command line with
//! a hook that reads `WEIR_FAULT`, to abort (as `kill -9` would) or pause at a point while a
//! test kills or stops weir or the server in that exact window.
//!
//! The points, in path order: `fetched` (a batch in hand, nothing looked up), `executed`
//! (plugin outcomes in memory, nothing committed), `committed` (the batch durably
//! committed, nothing published), `published` (outputs acknowledged by JetStream, inputs
//! not acked), `acked` (inputs acked, outbox not cleared).

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

/// What runs at each fault point: given the point's name, a future the path awaits.
pub type Hook = Box<dyn Fn(&'static str) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs the hook every fault point runs, for the life of the process. False if one was
/// installed already (the first stays).
pub fn install(hook: Hook) -> bool {
    HOOK.set(hook).is_ok()
}

/// Marks a named point of the message path.
pub(crate) async fn point(name: &'static str) {
    if let Some(hook) = HOOK.get() {
        hook(name).await;
    }
}
