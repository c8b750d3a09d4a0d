//! The fault matrix: {SIGKILL, SIGTERM} × {weir, nats-server} × {during fetch, during the
//! plugin run, between commit and publish, between publish and ack}. In each cell weir
//! pauses at the named point of the message path (the test-only `WEIR_FAULT=<point>:3:pause`
//! hook), the signal hits its target while that window is held open, the target comes
//! back, and the independent verifier checks every output and dead letter. Every cell runs
//! the same workload. `weir-chaos --matrix` runs it all; the e2e suite runs it by row.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::*;

/// The points of the message path the matrix holds open, in path order: a batch fetched,
/// the plugin has run, the batch is committed, the outputs are published.
pub const POINTS: [&str; 4] = ["fetched", "executed", "committed", "published"];

/// How long weir holds the window open; the fault lands inside it.
const PAUSE: Duration = Duration::from_secs(3);

/// What the signal hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Weir,
    Server,
}

/// The signal: SIGKILL (no cleanup) or SIGTERM (a clean stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Kill,
    Term,
}

impl Signal {
    fn number(self) -> i32 {
        match self {
            Signal::Kill => libc::SIGKILL,
            Signal::Term => libc::SIGTERM,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Kill => "SIGKILL",
            Signal::Term => "SIGTERM",
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub signal: Signal,
    pub target: Target,
    pub point: &'static str,
}

impl Cell {
    pub fn name(&self) -> String {
        let target = match self.target {
            Target::Weir => "weir",
            Target::Server => "nats-server",
        };
        format!("{} {target} at {}", self.signal.name(), self.point)
    }
}

/// Every cell, row by row.
pub fn cells() -> Vec<Cell> {
    let mut cells = Vec::new();
    for signal in [Signal::Kill, Signal::Term] {
        for target in [Target::Weir, Target::Server] {
            for point in POINTS {
                cells.push(Cell {
                    signal,
                    target,
                    point,
                });
            }
        }
    }
    cells
}

/// How one cell went.
pub struct CellReport {
    pub cell: Cell,
    pub verdict: OrdersVerdict,
    /// For SIGTERM of weir: whether it drained and exited 0, as it must.
    pub clean_exit: Option<bool>,
    pub elapsed: Duration,
}

impl CellReport {
    pub fn passed(&self) -> bool {
        self.verdict.is_exact() && self.clean_exit != Some(false)
    }

    pub fn line(&self) -> String {
        format!(
            "cell: {:<34} {} {}{} elapsed={:.1}s",
            self.cell.name(),
            if self.passed() {
                "EXACTLY-ONCE"
            } else {
                "FAILED"
            },
            self.verdict.counts(),
            match self.clean_exit {
                Some(true) => " exit=clean",
                Some(false) => " exit=UNCLEAN",
                None => "",
            },
            self.elapsed.as_secs_f64()
        )
    }
}

/// Runs one cell with `messages` orders (one in 20 malformed).
pub async fn run_cell(cell: Cell, messages: usize) -> CellReport {
    let started = Instant::now();
    let FaultRig {
        mut server,
        js: _,
        dir,
        config,
        payloads,
    } = FaultRig::start(messages).await;
    let log = std::env::var("WEIR_CHAOS_LOG").ok();
    let log = log.as_deref().map(Path::new);
    let marker = dir.path().join("paused");
    let fault = format!("{}:3:pause", cell.point);
    let pause_ms = PAUSE.as_millis().to_string();
    let marker_path = marker.display().to_string();
    let mut weir = spawn_weir_with_env(
        &config,
        log,
        &[
            ("WEIR_FAULT", &fault),
            ("WEIR_FAULT_PAUSE_MS", &pause_ms),
            ("WEIR_FAULT_MARKER", &marker_path),
        ],
    );
    wait_for(
        &format!("weir to pause at {}", cell.point),
        Duration::from_secs(60),
        || async { marker.exists() },
    )
    .await;

    let mut clean_exit = None;
    match cell.target {
        Target::Weir => {
            send_signal(&weir, cell.signal.number());
            let status = wait_for_exit(&mut weir, Duration::from_secs(60)).await;
            if cell.signal == Signal::Term {
                clean_exit = Some(status.success());
            }
            weir = spawn_weir(&config, log, None);
        }
        Target::Server => {
            server.stop_with(cell.signal.number());
            // Down past the end of the pause: weir resumes into a missing server.
            tokio::time::sleep(PAUSE + Duration::from_millis(500)).await;
            server.start_again();
        }
    }

    let js = server.jetstream().await;
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(120)).await;
    let status = terminate(&mut weir);
    if cell.target == Target::Server && !status.success() {
        clean_exit = Some(false);
    }
    CellReport {
        cell,
        verdict: check_orders(&js, &payloads).await,
        clean_exit,
        elapsed: started.elapsed(),
    }
}
