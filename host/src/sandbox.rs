//! The wasm sandbox: loads plugin components and runs one message in a fresh instance.
//!
//! This is the only module that imports wasmtime. A plugin gets no imports at all (the
//! linker is empty), so it has no clock, randomness, files or network: everything it sees
//! arrives in the message, which keeps transforms deterministic. Each call runs in a new
//! `Store` with a fuel budget (deterministic), an epoch deadline (wall-clock backstop), a
//! memory limit and output limits; a trap poisons only that store.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap,
};

use crate::config::{LimitsConfig, SandboxConfig};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
}

use bindings::exports::weir::transform::transformer::{Message, TransformError};

/// The contract version this host speaks, as it appears in a plugin's export name.
pub const CONTRACT_EXPORT: &str = "weir:transform/transformer@0.1.0";

/// How many used instance slots are decommitted together (the pool holds
/// `POOLED_INSTANCES` of each kind, so this leaves room for the instances that run).
const DECOMMIT_BATCH: usize = 16;

/// How often the epoch advances: the granularity of the wall-clock deadline.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How many instances may be alive at once across all pipelines. Each pipeline runs one
/// message at a time, so this bounds the number of pipelines, with room to spare.
const POOLED_INSTANCES: u32 = 64;

/// One input, as the plugin sees it.
#[derive(Debug, Clone)]
pub struct TransformInput {
    pub subject: String,
    /// Sorted by name, so that the plugin's view does not depend on hash order.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub stream_sequence: u64,
    pub data_time_unix_ns: u64,
    pub dedup_key: String,
    pub seed: u64,
}

impl TransformInput {
    /// The plugin's seed for an input: the first 8 bytes of the dedup key's sha256, so the
    /// same input always gets the same seed.
    pub fn seed_for(dedup_key: &str) -> u64 {
        let digest = Sha256::digest(dedup_key.as_bytes());
        u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
    }
}

/// What one plugin call used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub fuel: u64,
    /// The largest the instance's linear memory grew to, in bytes.
    pub peak_memory_bytes: usize,
    pub elapsed: Duration,
}

/// One output a plugin asked for, before the pipeline maps it onto a real subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginOutput {
    /// Relative to the pipeline's output prefix.
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// Why a plugin call produced no outputs. Every kind is deterministic except `Deadline`,
/// which is a wall-clock backstop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin said the input is invalid.
    InvalidInput,
    /// The plugin said it failed.
    PluginFailed,
    /// The plugin trapped (a panic, an unreachable, a bad memory access).
    Trap,
    /// The plugin ran out of fuel.
    FuelExhausted,
    /// The plugin ran past the wall-clock deadline.
    Deadline,
    /// The plugin asked for more memory than the limit.
    MemoryLimit,
    /// The plugin recursed past the stack limit.
    StackOverflow,
    /// The plugin produced too many outputs or bytes, or an output the host cannot publish.
    OutputRejected,
}

impl FailureKind {
    /// The stable name used in DLQ headers and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::InvalidInput => "invalid-input",
            FailureKind::PluginFailed => "plugin-failed",
            FailureKind::Trap => "trap",
            FailureKind::FuelExhausted => "fuel-exhausted",
            FailureKind::Deadline => "deadline",
            FailureKind::MemoryLimit => "memory-limit",
            FailureKind::StackOverflow => "stack-overflow",
            FailureKind::OutputRejected => "output-rejected",
        }
    }
}

/// The result of running one input through a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Outputs(Vec<PluginOutput>),
    Failed { kind: FailureKind, reason: String },
}

impl Outcome {
    pub fn failed(kind: FailureKind, reason: impl Into<String>) -> Outcome {
        Outcome::Failed {
            kind,
            reason: reason.into(),
        }
    }
}

/// A plugin that cannot be loaded, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read plugin {path:?}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "plugin {path:?} is not a wasm component: {reason} (build it with `cargo build --target wasm32-wasip2`, or scripts/build-plugins.sh)"
    )]
    NotAComponent {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "plugin {path:?} imports {imports}, which weir does not provide: weir plugins may import nothing (no WASI); remove the dependency that needs it"
    )]
    Imports {
        path: std::path::PathBuf,
        imports: String,
    },
    #[error(
        "plugin {path:?} does not export {CONTRACT_EXPORT} (it exports: {exports}): build it against weir's wit/ contract with the weir guest SDK"
    )]
    MissingExport {
        path: std::path::PathBuf,
        exports: String,
    },
    #[error(
        "plugin {path:?} cannot be instantiated within weir's limits: {reason} (a memory larger than limits.memory_bytes, too many tables or instances, or a start-up that traps)"
    )]
    Instantiate {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "plugin {path:?} exports {CONTRACT_EXPORT} with a different shape than this host's contract: {reason}"
    )]
    Mismatch {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// What `weir plugin inspect` reports about a component.
pub struct Inspection {
    pub size: usize,
    pub sha256: String,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// Whether weir can run it, and if not why.
    pub verdict: Result<(), LoadError>,
}

/// The engine all plugins share, and the thread that advances its epoch.
pub struct Sandbox {
    engine: Engine,
    _epoch_ticker: EpochTicker,
}

impl Sandbox {
    /// Builds the engine. `max_memory_bytes` is the largest memory limit of any pipeline:
    /// the pooling allocator sizes its slots to it.
    pub fn new(settings: &SandboxConfig, max_memory_bytes: usize) -> anyhow::Result<Sandbox> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(POOLED_INSTANCES)
            .total_core_instances(POOLED_INSTANCES * 4)
            .total_memories(POOLED_INSTANCES * 2)
            .total_tables(POOLED_INSTANCES * 4)
            .max_memory_size(max_memory_bytes)
            // Return used memory to the OS in batches: each decommit costs a TLB shootdown
            // across cores, which dominated the cost of a fresh instance.
            .decommit_batch_size(DECOMMIT_BATCH);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .max_wasm_stack(settings.max_stack_bytes)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(|e| anyhow::anyhow!("cannot create the wasm engine: {e:#}"))?;
        let epoch_ticker = EpochTicker::start(engine.clone());
        Ok(Sandbox {
            engine,
            _epoch_ticker: epoch_ticker,
        })
    }

    /// Reads and compiles a component file.
    fn read_component(&self, path: &Path) -> Result<(Vec<u8>, Component), LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let component =
            Component::new(&self.engine, &bytes).map_err(|e| LoadError::NotAComponent {
                path: path.to_owned(),
                reason: one_line(&format!("{e:#}")),
            })?;
        Ok((bytes, component))
    }

    /// What a component file is, and whether weir can run it (the verdict is `load`'s).
    pub fn inspect(&self, path: &Path, limits: &LimitsConfig) -> Result<Inspection, LoadError> {
        let (bytes, component) = self.read_component(path)?;
        let component_type = component.component_type();
        Ok(Inspection {
            size: bytes.len(),
            sha256: hex(&Sha256::digest(&bytes)),
            imports: component_type
                .imports(&self.engine)
                .map(|(name, _)| name.to_owned())
                .collect(),
            exports: component_type
                .exports(&self.engine)
                .map(|(name, _)| name.to_owned())
                .collect(),
            verdict: self.load(path, limits).map(|_| ()),
        })
    }

    /// Loads, checks and pre-instantiates a plugin component.
    pub fn load(&self, path: &Path, limits: &LimitsConfig) -> Result<Plugin, LoadError> {
        let (bytes, component) = self.read_component(path)?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let component_type = component.component_type();
        let imports: Vec<String> = component_type
            .imports(&self.engine)
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        if !imports.is_empty() {
            return Err(LoadError::Imports {
                path: path.to_owned(),
                imports: imports.join(", "),
            });
        }
        let exports: Vec<String> = component_type
            .exports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        if !exports.iter().any(|name| name == CONTRACT_EXPORT) {
            let exports = if exports.is_empty() {
                "nothing".to_owned()
            } else {
                exports.join(", ")
            };
            return Err(LoadError::MissingExport {
                path: path.to_owned(),
                exports,
            });
        }
        let linker: Linker<CallState> = Linker::new(&self.engine);
        let pre = linker
            .instantiate_pre(&component)
            .and_then(bindings::PluginPre::new)
            .map_err(|e| LoadError::Mismatch {
                path: path.to_owned(),
                reason: one_line(&format!("{e:#}")),
            })?;
        let plugin = Plugin {
            engine: self.engine.clone(),
            pre,
            sha256,
            limits: limits.clone(),
        };
        // Instantiate once now, so that a component that can never start (a memory larger
        // than the limit, a start function that traps) is refused at load, not per message.
        let mut store = plugin.new_store();
        plugin
            .pre
            .instantiate(&mut store)
            .map_err(|e| LoadError::Instantiate {
                path: path.to_owned(),
                reason: one_line(&format!("{e:#}")),
            })?;
        Ok(plugin)
    }
}

/// A loaded plugin, ready to run messages. Cheap to share between threads.
#[derive(Clone)]
pub struct Plugin {
    engine: Engine,
    pre: bindings::PluginPre<CallState>,
    sha256: String,
    limits: LimitsConfig,
}

impl Plugin {
    /// The hex sha256 of the component file, recorded with every dead letter.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The limits this plugin runs under.
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Runs one input in a fresh instance. Never panics on anything the plugin does: every
    /// misbehaviour becomes an `Outcome::Failed` with the reason.
    pub fn run(&self, input: TransformInput) -> Outcome {
        self.run_measured(input).0
    }

    /// Like `run`, also reporting the fuel, memory and time the call used.
    pub fn run_measured(&self, input: TransformInput) -> (Outcome, Usage) {
        let started = std::time::Instant::now();
        let mut store = self.new_store();
        let outcome = self.call(&mut store, input);
        let usage = Usage {
            fuel: self.limits.fuel - store.get_fuel().unwrap_or(0),
            peak_memory_bytes: store.data().peak_memory_bytes,
            elapsed: started.elapsed(),
        };
        (outcome, usage)
    }

    fn call(&self, store: &mut Store<CallState>, input: TransformInput) -> Outcome {
        let message = Message {
            subject: input.subject,
            headers: input.headers,
            payload: input.payload,
            stream_sequence: input.stream_sequence,
            data_time_unix_ns: input.data_time_unix_ns,
            dedup_key: input.dedup_key,
            seed: input.seed,
        };
        let result = self.pre.instantiate(&mut *store).and_then(|plugin| {
            plugin
                .weir_transform_transformer()
                .call_transform(&mut *store, &message)
        });
        match result {
            Ok(Ok(outputs)) => self.check_output_limits(
                outputs
                    .into_iter()
                    .map(|o| PluginOutput {
                        subject: o.subject,
                        headers: o.headers,
                        payload: o.payload,
                    })
                    .collect(),
            ),
            Ok(Err(TransformError::InvalidInput(reason))) => {
                Outcome::failed(FailureKind::InvalidInput, reason)
            }
            Ok(Err(TransformError::PluginFailed(reason))) => {
                Outcome::failed(FailureKind::PluginFailed, reason)
            }
            Err(error) => {
                let kind = if store.data().memory_denied {
                    FailureKind::MemoryLimit
                } else {
                    match error.downcast_ref::<Trap>() {
                        Some(Trap::OutOfFuel) => FailureKind::FuelExhausted,
                        Some(Trap::Interrupt) => FailureKind::Deadline,
                        Some(Trap::StackOverflow) => FailureKind::StackOverflow,
                        _ => FailureKind::Trap,
                    }
                };
                let reason = match kind {
                    FailureKind::FuelExhausted => {
                        format!("used all {} fuel (limits.fuel)", self.limits.fuel)
                    }
                    FailureKind::Deadline => format!(
                        "ran past the {} ms deadline (limits.deadline_ms)",
                        self.limits.deadline_ms
                    ),
                    FailureKind::MemoryLimit => format!(
                        "asked for more than {} bytes of memory (limits.memory_bytes)",
                        self.limits.memory_bytes
                    ),
                    // A trap's own description; the wasm backtrace adds nothing for the DLQ.
                    _ => match error.downcast_ref::<Trap>() {
                        Some(trap) => trap.to_string(),
                        None => one_line(&format!("{error:#}")),
                    },
                };
                Outcome::failed(kind, reason)
            }
        }
    }

    /// A store for one call, with this plugin's fuel, deadline and memory limit.
    fn new_store(&self) -> Store<CallState> {
        let mut store = Store::new(
            &self.engine,
            CallState {
                memory_limit: self.limits.memory_bytes,
                memory_denied: false,
                peak_memory_bytes: 0,
            },
        );
        store.limiter(|state| state as &mut dyn ResourceLimiter);
        // Fuel cannot fail to be set: fuel consumption is on for this engine.
        store
            .set_fuel(self.limits.fuel)
            .expect("the engine consumes fuel");
        let ticks = self
            .limits
            .deadline_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64);
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        store
    }

    fn check_output_limits(&self, outputs: Vec<PluginOutput>) -> Outcome {
        if outputs.len() > self.limits.max_outputs {
            return Outcome::failed(
                FailureKind::OutputRejected,
                format!(
                    "produced {} outputs, more than {} (limits.max_outputs)",
                    outputs.len(),
                    self.limits.max_outputs
                ),
            );
        }
        let bytes: usize = outputs
            .iter()
            .map(|o| {
                o.subject.len()
                    + o.payload.len()
                    + o.headers
                        .iter()
                        .map(|(n, v)| n.len() + v.len())
                        .sum::<usize>()
            })
            .sum();
        if bytes > self.limits.max_output_bytes {
            return Outcome::failed(
                FailureKind::OutputRejected,
                format!(
                    "produced {bytes} output bytes, more than {} (limits.max_output_bytes)",
                    self.limits.max_output_bytes
                ),
            );
        }
        Outcome::Outputs(outputs)
    }
}

/// Per-call store data: the memory limit, and whether the plugin ran into it (so a trap
/// that follows can be reported as what it is).
struct CallState {
    memory_limit: usize,
    memory_denied: bool,
    peak_memory_bytes: usize,
}

impl ResourceLimiter for CallState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_limit;
        self.memory_denied |= !allowed;
        if allowed {
            self.peak_memory_bytes = self.peak_memory_bytes.max(desired);
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; a plugin that needs more than this is hostile.
        Ok(desired <= 100_000)
    }
}

/// Advances the engine's epoch every `EPOCH_TICK` until dropped.
struct EpochTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                while !thread_stop.load(std::sync::atomic::Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("the OS can start one thread at start-up");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
