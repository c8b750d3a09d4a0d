//! `weir-faulty`: the `weir` command line with a fault hook installed, for the tests only.
//!
//! `WEIR_FAULT=<point>[:<n>]` aborts the process (no cleanup, like `kill -9`) the n-th time
//! (by default the first) execution reaches the named point of the message path (see
//! `weir::fault`). `WEIR_FAULT=<point>:<n>:pause` pauses there instead, for
//! `WEIR_FAULT_PAUSE_MS` (default 3000) milliseconds, after creating the file
//! `WEIR_FAULT_MARKER` names (if set): a test waits for the file, then kills or stops weir or
//! the server while weir holds that exact window open.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Fault {
    point: String,
    nth: u64,
    pause: bool,
    reached: AtomicU64,
}

fn fault_from_env() -> Option<Fault> {
    let spec = std::env::var("WEIR_FAULT").ok()?;
    let mut parts = spec.split(':');
    let point = parts.next()?.to_owned();
    let nth = parts.next().map_or(Some(1), |n| n.parse().ok())?;
    let pause = match parts.next() {
        None => false,
        Some("pause") => true,
        Some(other) => {
            eprintln!("weir: WEIR_FAULT: unknown action {other:?} (use pause or nothing); ignored");
            return None;
        }
    };
    Some(Fault {
        point,
        nth,
        pause,
        reached: AtomicU64::new(0),
    })
}

fn main() -> std::process::ExitCode {
    if let Some(fault) = fault_from_env() {
        let fault = Arc::new(fault);
        weir::fault::install(Box::new(move |name| {
            let fault = fault.clone();
            Box::pin(async move {
                if fault.point != name
                    || fault.reached.fetch_add(1, Ordering::SeqCst) + 1 != fault.nth
                {
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
            })
        }));
    }
    weir::cli::main()
}
