//! Fault points: named places of the message path (`weir_core::ports::Point`) where a test
//! may strike. At each, [`FaultProbe`] runs the hook installed with [`install`], if any,
//! and does nothing otherwise.
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

use weir_core::ports::{Point, Probe};

/// What runs at each fault point: given the point's name, a future the path awaits.
pub type Hook = Box<dyn Fn(&'static str) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs the hook every fault point runs, for the life of the process. False if one was
/// installed already (the first stays).
pub fn install(hook: Hook) -> bool {
    HOOK.set(hook).is_ok()
}

/// The probe every pipeline's message path reports its points to: it runs the hook.
pub struct FaultProbe;

impl Probe for FaultProbe {
    async fn reached(&self, point: Point) {
        if let Some(hook) = HOOK.get() {
            hook(point.as_str()).await;
        }
    }
}
