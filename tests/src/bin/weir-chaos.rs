//! The chaos run, any size: `weir-chaos [--messages M] [--host-kills K]
//! [--server-restarts S] [--seed N]`. Defaults: 10 000 messages, 10 host kills, 2 server
//! restarts, a seed from the clock. The last line is the verdict; the exit code is 1 unless
//! every output is stored exactly once and nothing is missing.
//!
//! The full size: `weir-chaos --messages 100000 --host-kills 100 --server-restarts 5`.

use std::time::{SystemTime, UNIX_EPOCH};

use weir_tests::chaos::{self, ChaosPlan};

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
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        let Some(value) = value else {
            eprintln!("weir-chaos: {flag} needs a number");
            std::process::exit(2);
        };
        match flag.as_str() {
            "--messages" => plan.messages = value as usize,
            "--host-kills" => plan.host_kills = value as usize,
            "--server-restarts" => plan.server_restarts = value as usize,
            "--seed" => plan.seed = value,
            other => {
                eprintln!(
                    "weir-chaos: unknown flag {other:?}; flags: --messages, --host-kills, --server-restarts, --seed"
                );
                std::process::exit(2);
            }
        }
    }
    println!("weir-chaos: {plan:?}");
    let report = chaos::run(plan).await;
    println!("{}", report.line());
    if !report.verdict.is_exact() {
        std::process::exit(1);
    }
}
