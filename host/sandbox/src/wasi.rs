//! The deterministic WASI 0.2 a plugin may import.
//!
//! A component built with `std`, or by another language's toolchain (componentize-py, jco),
//! imports WASI interfaces even when its transform never needs them. weir satisfies them so
//! that such plugins run, but in a way that keeps every call a function of its message:
//! - both clocks read the message's data time, and never advance during a call; waiting on a
//!   clock traps (there is no time to wait for);
//! - random bytes (secure and insecure alike) come from a generator seeded with the message's
//!   seed, so the same message always draws the same bytes;
//! - no environment, arguments, preopened directories, network or name lookup; stdin is empty;
//! - stdout and stderr are captured, up to `CAPTURED_OUTPUT_BYTES` each, and logged with the
//!   message's dedup key once the call ends.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::CallState;

/// How much a plugin may write to each of stdout and stderr per message; a write past it
/// fails (deterministically), and the plugin decides what that means.
const CAPTURED_OUTPUT_BYTES: usize = 64 * 1024;

/// The WASI version whose clock functions are replaced, as wasmtime-wasi names it.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// The WASI 0.2 interfaces weir answers (wasmtime-wasi's `p2` linker), as `package/name`.
const INTERFACES: [&str; 27] = [
    "cli/environment",
    "cli/exit",
    "cli/stdin",
    "cli/stdout",
    "cli/stderr",
    "cli/terminal-input",
    "cli/terminal-output",
    "cli/terminal-stdin",
    "cli/terminal-stdout",
    "cli/terminal-stderr",
    "clocks/monotonic-clock",
    "clocks/wall-clock",
    "filesystem/types",
    "filesystem/preopens",
    "io/error",
    "io/poll",
    "io/streams",
    "random/random",
    "random/insecure",
    "random/insecure-seed",
    "sockets/network",
    "sockets/instance-network",
    "sockets/udp",
    "sockets/udp-create-socket",
    "sockets/tcp",
    "sockets/tcp-create-socket",
    "sockets/ip-name-lookup",
];

/// Whether weir provides an import of this name: a WASI 0.2 interface it answers, at any
/// 0.2 patch version. A name only shaped like one (`wasi:evil/backdoor@0.2.0`) is not.
pub fn provides(import: &str) -> bool {
    let Some((interface, version)) = import
        .strip_prefix("wasi:")
        .and_then(|rest| rest.split_once('@'))
    else {
        return false;
    };
    version.starts_with("0.2.") && INTERFACES.contains(&interface)
}

/// Adds the deterministic WASI to a linker.
pub fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    // Waiting on a clock would block the host thread in real time, outside the reach of
    // fuel and the epoch deadline; and data time does not pass during a call anyway.
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |_, (_,): (u64,)| -> wasmtime::Result<(Resource<DynPollable>,)> { Err(no_waiting()) },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |_, (_,): (u64,)| -> wasmtime::Result<(Resource<DynPollable>,)> { Err(no_waiting()) },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn no_waiting() -> wasmtime::Error {
    wasmtime::Error::msg(
        "the plugin waited on a clock (a sleep or a timeout): weir plugins run on data time, which does not pass during a call",
    )
}

/// What a call's WASI is derived from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs {
    pub data_time_unix_ns: u64,
    pub seed: u64,
}

impl Inputs {
    pub fn of(input: &super::TransformInput) -> Inputs {
        Inputs {
            data_time_unix_ns: input.data_time_unix_ns,
            seed: input.seed,
        }
    }
}

/// One call's WASI state, built on the plugin's first WASI call: plugins that do not
/// import WASI never pay for it.
pub struct State {
    inputs: Inputs,
    built: Option<Built>,
    /// The source as a call began, saved by `checkpoint`.
    checkpoint: Option<Source>,
}

struct Built {
    ctx: WasiCtx,
    table: ResourceTable,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    /// What the clocks and generators read, shared with them so that `rewind` can reset it.
    source: Arc<Mutex<Source>>,
}

impl State {
    pub fn new(inputs: Inputs) -> State {
        State {
            inputs,
            built: None,
            checkpoint: None,
        }
    }

    /// Remembers where the clocks and generators stand as a call begins (an instance may
    /// already have drawn random bytes while it started).
    pub fn checkpoint(&mut self) {
        self.checkpoint = self.built.as_ref().map(|built| lock(&built.source).clone());
    }

    /// Whether the plugin drew random bytes since the last `rewind` (or `checkpoint`).
    pub fn drew_randomness(&self) -> bool {
        let Some(built) = &self.built else {
            return false;
        };
        let draws_then = self.checkpoint.as_ref().map_or(0, |source| source.draws);
        lock(&built.source).draws != draws_then
    }

    /// Puts the clocks and generators back where they stood at the checkpoint, so that a
    /// second call in the same instance sees exactly what the first saw.
    pub fn rewind(&mut self) {
        if let Some(built) = &self.built {
            *lock(&built.source) = self
                .checkpoint
                .clone()
                .unwrap_or_else(|| Source::new(self.inputs));
        }
    }

    /// Logs what the plugin wrote to stdout and stderr during the call, if anything.
    pub fn log_output(&self, dedup_key: &str) {
        let Some(built) = &self.built else { return };
        for (stream, pipe) in [("stdout", &built.stdout), ("stderr", &built.stderr)] {
            let bytes = pipe.contents();
            let text = String::from_utf8_lossy(&bytes);
            for line in text.lines() {
                // What a plugin prints may carry a bare CR or escape sequences: escaped, it
                // can neither forge a log line nor drive the operator's terminal.
                let line = weir_core::text::escaped(line, CAPTURED_OUTPUT_BYTES);
                tracing::info!(target: "weir::plugin", dedup_key, stream, "{line}");
            }
        }
    }

    fn build(inputs: Inputs) -> Built {
        let stdout = MemoryOutputPipe::new(CAPTURED_OUTPUT_BYTES);
        let stderr = MemoryOutputPipe::new(CAPTURED_OUTPUT_BYTES);
        let source = Arc::new(Mutex::new(Source::new(inputs)));
        let clock = DataTimeClock(source.clone());
        // The builder's defaults already deny the network, name lookup, files (no
        // preopens), environment and arguments; clocks and randomness are replaced here.
        let ctx = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(clock.clone())
            .monotonic_clock(clock)
            .secure_random(SeededRandom {
                source: source.clone(),
                purpose: Purpose::Secure,
            })
            .insecure_random(SeededRandom {
                source: source.clone(),
                purpose: Purpose::Insecure,
            })
            .insecure_random_seed(u128::from(inputs.seed))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Built {
            ctx,
            table: ResourceTable::new(),
            stdout,
            stderr,
            source,
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let State { inputs, built, .. } = &mut self.wasi;
        let built = built.get_or_insert_with(|| State::build(*inputs));
        WasiCtxView {
            ctx: &mut built.ctx,
            table: &mut built.table,
        }
    }
}

/// The data time and the two byte streams of one call.
#[derive(Clone)]
struct Source {
    data_time_unix_ns: u64,
    secure: SeededBytes,
    insecure: SeededBytes,
    /// How many times random bytes were drawn.
    draws: u64,
}

impl Source {
    fn new(inputs: Inputs) -> Source {
        Source {
            data_time_unix_ns: inputs.data_time_unix_ns,
            secure: SeededBytes::new(inputs.seed, b"secure"),
            insecure: SeededBytes::new(inputs.seed, b"insecure"),
            draws: 0,
        }
    }
}

// A poisoned lock only means a panic elsewhere mid-draw; the source is still usable.
fn lock(source: &Mutex<Source>) -> std::sync::MutexGuard<'_, Source> {
    source
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Both WASI clocks: the message's data time, standing still.
#[derive(Clone)]
struct DataTimeClock(Arc<Mutex<Source>>);

impl HostWallClock for DataTimeClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(lock(&self.0).data_time_unix_ns)
    }
}

impl HostMonotonicClock for DataTimeClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        lock(&self.0).data_time_unix_ns
    }
}

#[derive(Clone, Copy)]
enum Purpose {
    Secure,
    Insecure,
}

/// `wasi:random/random` or `wasi:random/insecure`, drawing from the call's source.
struct SeededRandom {
    source: Arc<Mutex<Source>>,
    purpose: Purpose,
}

impl rand_core::TryRng for SeededRandom {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut bytes = [0; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut bytes = [0; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        let mut source = lock(&self.source);
        source.draws += 1;
        let bytes = match self.purpose {
            Purpose::Secure => &mut source.secure,
            Purpose::Insecure => &mut source.insecure,
        };
        bytes.fill(dst);
        Ok(())
    }
}

/// A byte stream determined by the message's seed: sha256 in counter mode over the seed and
/// a purpose label (so secure and insecure randomness differ).
#[derive(Clone)]
struct SeededBytes {
    key: [u8; 16],
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl SeededBytes {
    fn new(seed: u64, purpose: &[u8]) -> SeededBytes {
        let digest = Sha256::new()
            .chain_update(seed.to_le_bytes())
            .chain_update(purpose)
            .finalize();
        SeededBytes {
            key: digest[..16].try_into().expect("sha256 has 32 bytes"),
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }

    fn fill(&mut self, dst: &mut [u8]) {
        for byte in dst {
            if self.used == self.block.len() {
                self.block = Sha256::new()
                    .chain_update(self.key)
                    .chain_update(self.counter.to_le_bytes())
                    .finalize()
                    .into();
                self.counter += 1;
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_wasi_interfaces_weir_answers_are_provided() {
        assert!(provides("wasi:cli/stdout@0.2.3"));
        assert!(provides("wasi:random/random@0.2.0"));
        assert!(
            !provides("wasi:evil/backdoor@0.2.0"),
            "shaped like WASI, but unknown"
        );
        assert!(!provides("wasi:cli/stdout@0.3.0"));
        assert!(!provides("wasi:cli/stdout"));
        assert!(!provides("acme:clock/now@0.2.0"));
    }

    #[test]
    fn seeded_bytes_depend_on_the_seed_and_purpose_only() {
        let draw = |seed, purpose: &[u8]| {
            let mut bytes = vec![0; 100];
            SeededBytes::new(seed, purpose).fill(&mut bytes);
            bytes
        };
        assert_eq!(draw(7, b"secure"), draw(7, b"secure"));
        assert_ne!(draw(7, b"secure"), draw(8, b"secure"));
        assert_ne!(draw(7, b"secure"), draw(7, b"insecure"));
        let mut in_pieces = SeededBytes::new(7, b"secure");
        let mut pieces = vec![0; 100];
        let (head, tail) = pieces.split_at_mut(33);
        in_pieces.fill(head);
        in_pieces.fill(tail);
        assert_eq!(pieces, draw(7, b"secure"));
    }

    #[test]
    fn only_wasi_0_2_is_provided() {
        assert!(provides("wasi:clocks/wall-clock@0.2.9"));
        assert!(provides("wasi:cli/stdout@0.2.0"));
        assert!(!provides("wasi:clocks/wall-clock@0.3.0"));
        assert!(!provides("acme:sneaky/clock"));
    }
}
