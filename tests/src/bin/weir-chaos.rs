//! The chaos run, any size: `weir-chaos [--messages M] [--host-kills K]
//! [--server-restarts S] [--seed N]`. Defaults: 10 000 messages, 10 host kills, 2 server
//! restarts, a seed from the clock. The last line is the verdict; the exit code is 1 unless
//! every output is stored exactly once and nothing is missing.
//!
//! The full size: `weir-chaos --messages 100000 --host-kills 100 --server-restarts 5`.
//!
//! `weir-chaos --matrix [--messages M]` runs the fault matrix instead (see
//! `weir_tests::matrix`; M defaults to 300 per cell): a line per cell, then the verdict.

use std::time::{SystemTime, UNIX_EPOCH};

use weir_tests::chaos::{self, ChaosPlan};
use weir_tests::matrix;

#[tokio::main]
async fn main() {
    let mut plan = ChaosPlan {
        messages: 10_000,
        host_kills: 10,
        server_restarts: 2,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    let mut matrix = false;
    let mut messages_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--matrix" {
            matrix = true;
            continue;
        }
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        let Some(value) = value else {
            eprintln!("weir-chaos: {flag} needs a number");
            std::process::exit(2);
        };
        match flag.as_str() {
            "--messages" => {
                plan.messages = value as usize;
                messages_given = true;
            }
            "--host-kills" => plan.host_kills = value as usize,
            "--server-restarts" => plan.server_restarts = value as usize,
            "--seed" => plan.seed = value,
            other => {
                eprintln!(
                    "weir-chaos: unknown flag {other:?}; flags: --messages, --host-kills, --server-restarts, --seed, --matrix"
                );
                std::process::exit(2);
            }
        }
    }
    if matrix {
        let messages = if messages_given { plan.messages } else { 300 };
        run_matrix(messages).await;
        return;
    }
    println!("weir-chaos: {plan:?}");
    let report = chaos::run(plan).await;
    println!("{}", report.line());
    if !report.verdict.is_exact() {
        std::process::exit(1);
    }
}

async fn run_matrix(messages: usize) {
    let cells = matrix::cells();
    println!(
        "weir-chaos: fault matrix, {} cells, {messages} messages each",
        cells.len()
    );
    let mut passed = 0;
    for cell in &cells {
        let report = matrix::run_cell(*cell, messages).await;
        println!("{}", report.line());
        passed += usize::from(report.passed());
    }
    let exact = passed == cells.len();
    println!(
        "verdict: {} cells={}/{} messages_per_cell={messages}",
        if exact { "EXACTLY-ONCE" } else { "FAILED" },
        passed,
        cells.len()
    );
    if !exact {
        std::process::exit(1);
    }
}
