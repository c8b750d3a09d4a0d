//! weir's resident memory is bounded by what the README states: `sandbox.threads` instances
//! at their memory limit, plus a fixed overhead; and it returns to its idle level when a
//! plugin that fills its memory stops. (Its own test binary, so that no other test's
//! allocations blur the measurement.)

use weir_core::plugin::{Call, TransformInput};
use weir_sandbox::{LimitsConfig, Sandbox, SandboxConfig};

/// The plugin's memory limit, and what its start function dirties just under it.
const MEMORY_LIMIT: usize = 64 << 20;
const DIRTIED: usize = 62 << 20;
const THREADS: usize = 2;
/// What the host may use beside the plugins' memories while they run: the inputs and
/// outcomes of the calls, the threads' stacks and the pool's warm slots.
const OVERHEAD: u64 = 48 << 20;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

fn resident_bytes() -> u64 {
    status_kib("VmRSS:") << 10
}

/// The most this process has had resident since `reset_peak`.
fn peak_resident_bytes() -> u64 {
    status_kib("VmHWM:") << 10
}

fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("Linux 4.0+ resets the peak RSS");
}

/// A component whose start function grows its memory to `DIRTIED` bytes and writes all of
/// it, and whose transform writes all of it again eight times over, within its fuel.
fn memory_filler() -> Vec<u8> {
    let body = "(local $round i32)
      (loop $again
        (memory.fill (i32.const 0) (local.get $round) (i32.mul (memory.size) (i32.const 65536)))
        (local.set $round (i32.add (local.get $round) (i32.const 1)))
        (br_if $again (i32.lt_u (local.get $round) (i32.const 8))))";
    let text = weir_tests::wat::transformer_text(body, "");
    let start = format!(
        r#"(memory (export "memory") 1)
    (func $dirty
      (drop (memory.grow (i32.const {grow})))
      (memory.fill (i32.const 0) (i32.const 171) (i32.const {DIRTIED})))
    (start $dirty)"#,
        grow = DIRTIED / 65536 - 1
    );
    weir_tests::wat::assemble(&text.replacen(r#"(memory (export "memory") 1)"#, &start, 1))
}

#[test]
fn resident_memory_is_bounded_by_threads_times_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("filler.wasm");
    std::fs::write(&path, memory_filler()).unwrap();
    let settings = SandboxConfig {
        threads: THREADS,
        compile_cache: false,
        ..SandboxConfig::default()
    };
    let limits = LimitsConfig {
        memory_bytes: MEMORY_LIMIT,
        ..LimitsConfig::default()
    };
    let sandbox = Sandbox::new(
        &settings,
        MEMORY_LIMIT,
        weir_sandbox::Compiler::InThisProcess,
    )
    .unwrap();
    let filler = sandbox.load(&path, &limits).expect("the filler loads");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(THREADS)
        .enable_all()
        .build()
        .unwrap();
    let inputs = |round: u64| -> Vec<Call> {
        (0..64)
            .map(|i| TransformInput {
                subject: "in".into(),
                headers: vec![],
                payload: b"fill".to_vec(),
                stream_sequence: round * 64 + i,
                data_time_unix_ns: 0,
                dedup_key: format!("k{round}-{i}"),
                seed: i,
            })
            .map(Call::stateless)
            .collect()
    };
    // Warm up: the first calls fault in the engine's code and the pool's first slots.
    runtime.block_on(filler.run_all(inputs(0))).unwrap();
    let idle = resident_bytes();
    reset_peak();
    for round in 1..=4 {
        let outcomes = runtime.block_on(filler.run_all(inputs(round))).unwrap();
        assert_eq!(outcomes.len(), 64);
    }
    let peak = peak_resident_bytes();
    let after = resident_bytes();
    let bound = (THREADS * MEMORY_LIMIT) as u64 + OVERHEAD;
    println!(
        "idle {} MiB, peak {} MiB (bound: idle + {} MiB), after {} MiB",
        idle >> 20,
        peak >> 20,
        bound >> 20,
        after >> 20
    );
    assert!(
        peak <= idle + bound,
        "256 calls that each dirtied {} MiB took resident memory from {} MiB to {} MiB, past \
         idle + threads x memory limit + overhead = {} MiB",
        DIRTIED >> 20,
        idle >> 20,
        peak >> 20,
        (idle + bound) >> 20
    );
    assert!(
        after <= idle + (16 << 20),
        "resident memory stayed at {} MiB after the calls, {} MiB above idle",
        after >> 20,
        (after - idle) >> 20
    );
}
