//! The chaos run, any size: `weir-chaos [--messages M] [--host-kills K]
//! [--server-restarts S] [--seed N]`. Defaults: 10 000 messages, 10 host kills, 2 server
//! restarts, a seed from the clock. The last line is the verdict; the exit code is 1 unless
//! every output is stored exactly once and nothing is missing.
//!
//! The full size: `weir-chaos --messages 100000 --host-kills 100 --server-restarts 5`.
//!
//! `weir-chaos --matrix [--messages M]` runs the fault matrix instead (see
//! `weir_tests::matrix`; M defaults to 300 per cell): a line per cell, then the verdict.
//!
//! `weir-chaos --cluster [--runs R] [--messages M] [--faults F] [--seed N]` runs three hosts
//! with six partitions on a 3-node cluster under F faults of every kind (see
//! `weir_tests::cluster_chaos`; defaults: 1 run, 4 000 messages, 8 faults): a verdict line
//! per run (seeds N, N+1, …), each with its slowest failover, then the overall verdict.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_tests::chaos::{self, ChaosPlan};
use weir_tests::cluster_chaos::{self, ClusterChaosPlan};
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
    let mut cluster = false;
    let (mut runs, mut faults) = (1, 8);
    let mut messages_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--matrix" => {
                matrix = true;
                continue;
            }
            "--cluster" => {
                cluster = true;
                continue;
            }
            _ => {}
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
            "--runs" => runs = value.max(1) as usize,
            "--faults" => faults = value as usize,
            other => {
                eprintln!(
                    "weir-chaos: unknown flag {other:?}; flags: --messages, --host-kills, --server-restarts, --seed, --matrix, --cluster, --runs, --faults"
                );
                std::process::exit(2);
            }
        }
    }
    if cluster {
        let messages = if messages_given { plan.messages } else { 4000 };
        run_cluster(runs, messages, faults, plan.seed).await;
        return;
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

async fn run_cluster(runs: usize, messages: usize, faults: usize, seed: u64) {
    println!(
        "weir-chaos: cluster, {runs} run(s) of {messages} messages and {faults} faults, 3 hosts, 6 partitions, lease TTL {} s",
        cluster_chaos::TTL_SECS
    );
    let (mut passed, mut slowest) = (0, Duration::ZERO);
    for run in 0..runs {
        let plan = ClusterChaosPlan {
            messages,
            faults,
            seed: seed.wrapping_add(run as u64),
        };
        let report = cluster_chaos::run(plan).await;
        for stop in &report.unclean_stops {
            println!("unclean stop: {stop}");
        }
        println!("{}", report.line());
        passed += usize::from(report.passed());
        slowest = slowest.max(report.slowest_failover().unwrap_or_default());
    }
    let exact = passed == runs;
    println!(
        "verdict: {} runs={passed}/{runs} slowest_failover={:.1}s (target {} s)",
        if exact { "EXACTLY-ONCE" } else { "FAILED" },
        slowest.as_secs_f64(),
        cluster_chaos::TTL_SECS + 2
    );
    if !exact {
        std::process::exit(1);
    }
}
