//! Hostile plugins do not make the host grow: after many runs of every misbehaviour, the
//! process's resident memory is back near where it was. (Its own test binary, so that no
//! other test's allocations blur the measurement.)

use weir_core::plugin::{Outcome, TransformInput};
use weir_core::policy::OutputPolicy;
use weir_core::ports::PluginRuntime;
use weir_sandbox::Sandbox;
use weir_sandbox::{LimitsConfig, SandboxConfig};
use weir_tests::plugin;

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

#[test]
fn memory_returns_after_hostile_runs() {
    let sandbox = Sandbox::new(
        &SandboxConfig::default(),
        16 << 20,
        weir_sandbox::Compiler::InThisProcess,
    )
    .unwrap();
    let limits = LimitsConfig {
        fuel: 50_000_000,
        memory_bytes: 16 << 20,
        ..LimitsConfig::default()
    };
    let hostile = sandbox.load(&plugin("hostile"), &limits).unwrap();
    // What the pipeline makes of the outcomes: too many or too large outputs are refused.
    let policy = OutputPolicy {
        pipeline: "memory".into(),
        prefix: "out".into(),
        max_outputs: limits.max_outputs,
        max_output_bytes: limits.max_output_bytes,
        max_message_bytes: 1 << 20,
    };
    let behaviours = [
        "grow",
        "grow-within",
        "bloat",
        "flood",
        "recurse",
        "trap",
        "partial",
        "loop",
    ];
    let run_all = || {
        for behaviour in behaviours {
            let input = TransformInput {
                subject: "in".into(),
                headers: vec![],
                payload: behaviour.as_bytes().to_vec(),
                stream_sequence: 1,
                data_time_unix_ns: 0,
                dedup_key: "k".into(),
                seed: 0,
            };
            let outcome = hostile.run(input.clone());
            if behaviour != "grow-within" {
                let judged = policy.judge(&input, &hostile.lineage(), outcome);
                assert!(
                    matches!(judged, Outcome::Failed { .. }),
                    "{behaviour} was not refused"
                );
            }
        }
    };
    // Warm up: the first runs fault in the engine's code and the pool's first slots.
    for _ in 0..3 {
        run_all();
    }
    let before = resident_bytes();
    for _ in 0..30 {
        run_all();
    }
    let after = resident_bytes();
    let grown = after.saturating_sub(before);
    println!(
        "resident memory: {} KiB before, {} KiB after",
        before >> 10,
        after >> 10
    );
    assert!(
        grown < 32 << 20,
        "resident memory grew by {} MiB over 240 hostile runs ({} -> {} MiB)",
        grown >> 20,
        before >> 20,
        after >> 20
    );
}
