//! Test-only fault injection: with the `fault-injection` feature, `WEIR_FAULT=<point>[:<n>]`
//! aborts the process (no cleanup, like `kill -9`) the n-th time (by default the first)
//! execution reaches the named point of the message path. `WEIR_FAULT=<point>:<n>:pause`
//! pauses there instead, for `WEIR_FAULT_PAUSE_MS` (default 3000) milliseconds, after
//! creating the file `WEIR_FAULT_MARKER` names (if set): a test waits for the file, then
//! kills or stops weir or the server while weir holds that exact window open. Without the
//! feature, `point` is an empty inline function: release builds carry nothing of it.
//!
//! The points, in path order: `fetched` (a batch in hand, nothing looked up), `executed`
//! (plugin outcomes in memory, nothing committed), `committed` (the batch durably
//! committed, nothing published), `published` (outputs acknowledged by JetStream, inputs
//! not acked), `acked` (inputs acked, outbox not cleared).

/// Marks a named point of the message path.
#[cfg(feature = "fault-injection")]
pub async fn point(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    struct Fault {
        point: String,
        nth: u64,
        pause: bool,
    }

    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    static REACHED: AtomicU64 = AtomicU64::new(0);
    let fault = FAULT.get_or_init(|| {
        let spec = std::env::var("WEIR_FAULT").ok()?;
        let mut parts = spec.split(':');
        let point = parts.next()?.to_owned();
        let nth = parts.next().map_or(Some(1), |n| n.parse().ok())?;
        let pause = match parts.next() {
            None => false,
            Some("pause") => true,
            Some(other) => {
                eprintln!(
                    "weir: WEIR_FAULT: unknown action {other:?} (use pause or nothing); ignored"
                );
                return None;
            }
        };
        Some(Fault { point, nth, pause })
    });
    let Some(fault) = fault else { return };
    if fault.point != name || REACHED.fetch_add(1, Ordering::SeqCst) + 1 != fault.nth {
        return;
    }
    if !fault.pause {
        eprintln!("weir: WEIR_FAULT: aborting at {name}");
        std::process::abort();
    }
    let pause_ms = std::env::var("WEIR_FAULT_PAUSE_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(3000);
    eprintln!("weir: WEIR_FAULT: pausing {pause_ms} ms at {name}");
    if let Ok(marker) = std::env::var("WEIR_FAULT_MARKER") {
        let _ = std::fs::write(marker, name);
    }
    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    eprintln!("weir: WEIR_FAULT: resuming at {name}");
}

/// Marks a named point of the message path (fault injection is compiled out).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub async fn point(_name: &str) {}
