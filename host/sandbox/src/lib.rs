//! weir-sandbox: the wasm sandbox. It loads plugin components and runs one message in a
//! fresh instance, as weir-core's `PluginRuntime`; `harness` is `weir plugin test`.
//!
//! **Boundary:** the only crate of weir that imports wasmtime and wasmtime-wasi; it never
//! depends on weir-store or weir-nats. A plugin has no clock, randomness, files or
//! network of its own: everything it sees arrives in the message, which keeps transforms
//! deterministic. A plugin that imports WASI 0.2 (one built with `std`, or by another
//! language's toolchain) gets the deterministic WASI of `wasi.rs`; any other import is refused
//! at load. Each call runs in a new `Store` with a fuel budget (deterministic), an epoch
//! deadline (wall-clock backstop), a memory limit and output limits; a trap poisons only that
//! store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig,
    ResourceLimiter, Store, Trap,
};

use weir_core::plugin::{
    Call, CallCost, CallResult, FailureKind, Outcome, PluginOutput, TransformInput, sha256_hex,
};
use weir_core::ports::PluginRuntime;
pub use weir_core::ports::RunError;
use weir_core::record::Lineage;
use weir_core::state::{StateChanges, StateView};

use serde::Deserialize;

mod compile;
mod compile_cache;
pub mod harness;

pub use compile::{Compiler, child_main as compile_child_main};
mod wasi;

mod contract;

use contract::{Refusal, v1, v2};
pub use contract::{V1_EXPORT, V2_EXPORT};

/// The contracts this host runs, as their exports are named, oldest first.
pub const CONTRACT_EXPORTS: [&str; 2] = [V1_EXPORT, V2_EXPORT];

/// How much of each used memory and table slot stays resident between instances: enough
/// for what a typical Rust plugin touches (about 1 MiB), so that a fresh instance is reset
/// in place. It costs up to this much resident memory per warm slot.
const KEEP_RESIDENT: usize = 2 << 20;

/// How often the epoch advances: the granularity of the wall-clock deadline.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How many instances may be alive at once: calls from pipelines are bounded by
/// `sandbox.threads` (at most `MAX_THREADS`), which leaves as many for the instantiation
/// checks at load and direct callers of `Plugin::run`.
const POOLED_INSTANCES: u32 = 2 * MAX_THREADS as u32;

/// What one plugin instance may hold. A component that needs more is refused at load, with
/// its numbers; the pool holds `POOLED_INSTANCES` times each, so that no plugin can use up
/// what another pipeline's instances need (a component of 128 core instances, each with a
/// memory, once took the whole pool and made other pipelines' calls fail). The Python
/// plugin (componentize-py) needs 14 core instances, 1 memory and 2 tables; a Rust one 1,
/// 1 and 1.
const MAX_CORE_INSTANCES_PER_PLUGIN: u32 = 32;
const MAX_MEMORIES_PER_PLUGIN: u32 = 2;
const MAX_TABLES_PER_PLUGIN: u32 = 4;

/// The fewest inputs worth handing to a thread of their own.
const MIN_INPUTS_PER_THREAD: usize = 16;

/// What one plugin call used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub fuel: u64,
    /// The largest the instance's linear memory grew to, in bytes.
    pub peak_memory_bytes: usize,
    pub elapsed: Duration,
}

/// A plugin that cannot be loaded, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "cannot read plugin {path:?}: {source} (set the pipeline's `plugin` to a component file, relative to the configuration file)"
    )]
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
        "plugin {path:?} needs more than weir grants a plugin instance: {reason} (weir grants at most {MAX_CORE_INSTANCES_PER_PLUGIN} core instances, {MAX_MEMORIES_PER_PLUGIN} memories and {MAX_TABLES_PER_PLUGIN} tables)"
    )]
    TooLarge {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "plugin {path:?} is more than weir agrees to compile: {reason} (raise the setting in [sandbox] only for a component you trust)"
    )]
    TooCostly {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "weir could not compile plugin {path:?}: {reason} (a fault of weir's compiler process, not of the plugin: check the weir executable and the memory free)"
    )]
    Compiler {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "plugin {path:?} imports {imports}, which weir does not provide: weir plugins may import only WASI 0.2 (`wasi:*`), which weir makes deterministic; remove the dependency that needs it"
    )]
    Imports {
        path: std::path::PathBuf,
        imports: String,
    },
    #[error(
        "plugin {path:?} does not export {} (the contracts this weir runs; it exports: {exports}): build it against weir's wit/ contract with the weir guest SDK",
        CONTRACT_EXPORTS.join(" or ")
    )]
    MissingExport {
        path: std::path::PathBuf,
        exports: String,
    },
    #[error(
        "plugin {path:?} cannot be instantiated within weir's limits: {reason} (a memory larger than limits.memory_bytes, or a start-up that traps)"
    )]
    Instantiate {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "plugin {path:?} exports {export} with a different shape than this host's contract: {reason}"
    )]
    Mismatch {
        path: std::path::PathBuf,
        export: &'static str,
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

/// A component file, read and compiled.
struct ComponentFile {
    size: usize,
    sha256: String,
    component: Component,
}

/// The engine all plugins share, and the thread that advances its epoch.
pub struct Sandbox {
    engine: Engine,
    /// Where compiled components are kept between runs, if anywhere.
    compile_cache: Option<std::path::PathBuf>,
    settings: SandboxConfig,
    compiler: Compiler,
    /// Components compiled so far, by the sha256 of their file: pipelines that run the same
    /// plugin compile it once (a Python component takes seconds). Each has its own lock, so
    /// that one component's compilation never waits for another's.
    compiled: Mutex<HashMap<String, Arc<Mutex<Option<Component>>>>>,
    threads: Arc<Threads>,
    _epoch_ticker: EpochTicker,
}

impl Sandbox {
    /// Builds the engine. `max_memory_bytes` is the largest memory limit of any pipeline:
    /// the pooling allocator sizes its slots to it. Components are compiled by `compiler`.
    pub fn new(
        settings: &SandboxConfig,
        max_memory_bytes: usize,
        compiler: Compiler,
    ) -> anyhow::Result<Sandbox> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(POOLED_INSTANCES)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_PLUGIN)
            .max_memories_per_component(MAX_MEMORIES_PER_PLUGIN)
            .max_tables_per_component(MAX_TABLES_PER_PLUGIN)
            .total_core_instances(POOLED_INSTANCES * MAX_CORE_INSTANCES_PER_PLUGIN)
            .total_memories(POOLED_INSTANCES * MAX_MEMORIES_PER_PLUGIN)
            .total_tables(POOLED_INSTANCES * MAX_TABLES_PER_PLUGIN)
            .max_memory_size(max_memory_bytes)
            // What an instance dirtied past `KEEP_RESIDENT` goes back to the OS as the
            // instance is dropped (wasmtime's default batch of one). Batching the decommits
            // saved a TLB shootdown per call only for plugins that grow past it, and let
            // memory the limits do not count pile up: a plugin dirtying 62 MiB per call kept
            // 1.8 GB resident, 0.5-1.2 GB of it while idle.
            //
            // Reset the low part of a used slot in place instead of returning it to the OS:
            // with PAGEMAP_SCAN (Linux 6.7+) only the pages the plugin dirtied are restored
            // to the initial image, with no page faults and no TLB shootdowns next time.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = engine_config(settings);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(|e| anyhow::anyhow!("cannot create the wasm engine: {e:#}"))?;
        let epoch_ticker = EpochTicker::start(engine.clone());
        Ok(Sandbox {
            engine,
            settings: settings.clone(),
            compiler,
            compile_cache: settings.compile_cache_dir(),
            compiled: Mutex::default(),
            threads: Arc::new(Threads::new(settings.threads)),
            _epoch_ticker: epoch_ticker,
        })
    }

    /// Reads and compiles a component file (once per distinct content, however many
    /// pipelines load it at once; components of different content compile side by side).
    fn read_component(&self, path: &Path) -> Result<ComponentFile, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let sha256 = sha256_hex(&bytes);
        let slot = self
            .compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(sha256.clone())
            .or_default()
            .clone();
        let mut slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let component = match &*slot {
            Some(component) => component.clone(),
            None => {
                let component = self
                    .compile(path, &sha256, &bytes)
                    .inspect_err(|_| self.forget(&sha256))?;
                *slot = Some(component.clone());
                component
            }
        };
        Ok(ComponentFile {
            size: bytes.len(),
            sha256,
            component,
        })
    }

    /// A component from the compile cache, or measured and compiled by the sandbox's
    /// compiler (and then kept in the cache).
    fn compile(&self, path: &Path, sha256: &str, bytes: &[u8]) -> Result<Component, LoadError> {
        if let Some(dir) = &self.compile_cache
            && let Some(component) = compile_cache::load(&self.engine, dir, sha256)
        {
            return Ok(component);
        }
        let refused = |refusal: compile::Refusal| match refusal {
            compile::Refusal::TooCostly(reason) => LoadError::TooCostly {
                path: path.to_owned(),
                reason,
            },
            compile::Refusal::Invalid(reason) => LoadError::NotAComponent {
                path: path.to_owned(),
                reason: one_line(&reason),
            },
            compile::Refusal::Compiler(reason) => LoadError::Compiler {
                path: path.to_owned(),
                reason: one_line(&reason),
            },
        };
        compile::measure(bytes, &self.settings).map_err(refused)?;
        let serialized = match &self.compiler {
            Compiler::ChildProcess { program, args } => {
                compile::in_child(program, args, &self.settings, bytes).map_err(refused)?
            }
            Compiler::InThisProcess => self
                .engine
                .precompile_component(bytes)
                .map_err(|e| refused(compile::Refusal::Invalid(format!("{e:#}"))))?,
        };
        // SAFETY: deserializing runs the native code in `serialized` as it is: it comes from
        // this engine or from weir's own compiler process, given this engine's settings;
        // wasmtime checks the version and settings it was made with.
        let component =
            unsafe { Component::deserialize(&self.engine, &serialized) }.map_err(|e| {
                let reason = one_line(&format!("{e:#}"));
                // wasmtime checks a component against the pool's per-component limits as it
                // loads it, and says so only in words.
                if reason.contains("in the pooling allocator")
                    || reason.contains("does not fit in pooling allocator requirements")
                {
                    LoadError::TooLarge {
                        path: path.to_owned(),
                        reason,
                    }
                } else {
                    LoadError::NotAComponent {
                        path: path.to_owned(),
                        reason,
                    }
                }
            })?;
        if let Some(dir) = &self.compile_cache {
            compile_cache::store(
                dir,
                &self.engine,
                sha256,
                &serialized,
                self.settings.compile_cache_bytes,
            );
        }
        Ok(component)
    }

    /// What a component file is, and whether weir can run it (the verdict is `load`'s).
    pub fn inspect(&self, path: &Path, limits: &LimitsConfig) -> Result<Inspection, LoadError> {
        let file = self.read_component(path)?;
        let component_type = file.component.component_type();
        Ok(Inspection {
            size: file.size,
            sha256: file.sha256.clone(),
            imports: component_type
                .imports(&self.engine)
                .map(|(name, _)| name.to_owned())
                .collect(),
            exports: component_type
                .exports(&self.engine)
                .map(|(name, _)| name.to_owned())
                .collect(),
            verdict: self.checked(path, file, limits).map(|_| ()),
        })
    }

    /// Loads, checks and pre-instantiates a plugin component.
    pub fn load(&self, path: &Path, limits: &LimitsConfig) -> Result<Plugin, LoadError> {
        let file = self.read_component(path)?;
        self.checked(path, file, limits)
    }

    /// `check`, forgetting the compiled component if it is refused: neither this process nor
    /// the compile cache keeps what weir will not run.
    fn checked(
        &self,
        path: &Path,
        file: ComponentFile,
        limits: &LimitsConfig,
    ) -> Result<Plugin, LoadError> {
        let sha256 = file.sha256.clone();
        self.check(path, file, limits)
            .inspect_err(|_| self.forget(&sha256))
    }

    /// Lets go of the compiled component of `sha256`, which no plugin is to be loaded from
    /// again soon (a reload replaced it): plugins loaded from it keep it until they are
    /// dropped, and loading it again finds it in the compile cache or compiles it.
    pub fn release(&self, sha256: &str) {
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(sha256);
    }

    /// Forgets a component weir refused: its slot in this process (compiled or not) and its
    /// compile cache entry, if it has one.
    fn forget(&self, sha256: &str) {
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(sha256);
        if let Some(dir) = &self.compile_cache {
            compile_cache::forget(&self.engine, dir, sha256);
        }
    }

    /// Checks a compiled component against the contract and limits, and pre-instantiates it.
    fn check(
        &self,
        path: &Path,
        ComponentFile {
            sha256, component, ..
        }: ComponentFile,
        limits: &LimitsConfig,
    ) -> Result<Plugin, LoadError> {
        let component_type = component.component_type();
        let imports: Vec<String> = component_type
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let foreign: Vec<String> = imports
            .iter()
            .filter(|name| !wasi::provides(name) && !contract::provides(name))
            .map(|name| format!("`{name}`"))
            .collect();
        if !foreign.is_empty() {
            return Err(LoadError::Imports {
                path: path.to_owned(),
                imports: foreign.join(", "),
            });
        }
        let exports: Vec<String> = component_type
            .exports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        // The newest contract a component exports is the one it speaks.
        let Some(export) = CONTRACT_EXPORTS
            .into_iter()
            .rev()
            .find(|contract| exports.iter().any(|name| name == contract))
        else {
            let exports = if exports.is_empty() {
                "nothing".to_owned()
            } else {
                exports.join(", ")
            };
            return Err(LoadError::MissingExport {
                path: path.to_owned(),
                exports,
            });
        };
        let mismatch = |e: wasmtime::Error| LoadError::Mismatch {
            path: path.to_owned(),
            export,
            reason: one_line(&format!("{e:#}")),
        };
        let mut linker: Linker<CallState> = Linker::new(&self.engine);
        if imports.iter().any(|name| wasi::provides(name)) {
            wasi::add_to_linker(&mut linker).map_err(mismatch)?;
        }
        let instance_pre = if export == V2_EXPORT {
            v2::Plugin::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| state)
                .map_err(mismatch)?;
            linker
                .instantiate_pre(&component)
                .and_then(v2::PluginPre::new)
                .map(Pre::V2)
        } else {
            linker
                .instantiate_pre(&component)
                .and_then(v1::PluginPre::new)
                .map(Pre::V1)
        };
        let pre = instance_pre.map_err(mismatch)?;
        let plugin = Plugin {
            engine: self.engine.clone(),
            pre,
            sha256,
            limits: limits.clone(),
            threads: self.threads.clone(),
            share: None,
        };
        // Instantiate once now, so that a component that can never start (a memory larger
        // than the limit, a start function that traps) is refused at load, not per message.
        // The export's types are checked apart, after: a mismatch is not a limit.
        let mut store = plugin.new_store(wasi::Inputs::default(), None);
        let instance_pre = match &plugin.pre {
            Pre::V1(pre) => pre.instance_pre(),
            Pre::V2(pre) => pre.instance_pre(),
        };
        let instance =
            instance_pre
                .instantiate(&mut store)
                .map_err(|e| LoadError::Instantiate {
                    path: path.to_owned(),
                    reason: one_line(&format!("{e:#}")),
                })?;
        match &plugin.pre {
            Pre::V1(_) => v1::Plugin::new(&mut store, &instance).map(drop),
            Pre::V2(_) => v2::Plugin::new(&mut store, &instance).map(drop),
        }
        .map_err(mismatch)?;
        Ok(plugin)
    }
}

/// A loaded plugin, ready to run messages. Cheap to share between threads.
#[derive(Clone)]
pub struct Plugin {
    engine: Engine,
    pre: Pre,
    sha256: String,
    limits: LimitsConfig,
    /// The calls that may run at once across all pipelines (`sandbox.threads`).
    threads: Arc<Threads>,
    /// The calls this plugin's pipeline may run at once, if it is held to a share.
    share: Option<Arc<Threads>>,
}

/// A component ready to instantiate, by the contract it speaks.
#[derive(Clone)]
enum Pre {
    /// Returns its outputs; keeps no state.
    V1(v1::PluginPre<CallState>),
    /// Emits its outputs; reads and writes its key's state.
    V2(v2::PluginPre<CallState>),
}

impl Pre {
    fn instantiate(&self, store: &mut Store<CallState>) -> wasmtime::Result<Instance> {
        match self {
            Pre::V1(pre) => pre.instantiate(store).map(Instance::V1),
            Pre::V2(pre) => pre.instantiate(store).map(Instance::V2),
        }
    }
}

impl PluginRuntime for Plugin {
    fn lineage(&self) -> Lineage {
        Lineage {
            sha256: self.sha256.clone(),
            contract: self.contract().to_owned(),
        }
    }

    async fn run_all(&self, calls: Vec<Call>) -> Result<Vec<CallResult>, RunError> {
        Plugin::run_all(self, calls).await
    }
}

/// The plugin calls that may run at once across all pipelines (`sandbox.threads`).
struct Threads {
    count: usize,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Threads {
    fn new(count: usize) -> Threads {
        let count = count.clamp(1, MAX_THREADS);
        Threads {
            count,
            permits: Arc::new(tokio::sync::Semaphore::new(count)),
        }
    }
}

impl Plugin {
    /// Holds this plugin to at most `calls` of the sandbox's threads at once: its
    /// pipeline's share (`weir_core::plugin::thread_share`), so that a slow or hostile
    /// plugin always leaves threads to the other pipelines.
    pub fn with_thread_share(mut self, calls: usize) -> Plugin {
        self.share = Some(Arc::new(Threads::new(calls.min(self.threads.count))));
        self
    }

    /// The hex sha256 of the component file, recorded with every dead letter.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The export of the contract the plugin speaks: `weir:transform/transformer@0.1.0` or
    /// `@0.2.0`.
    pub fn contract(&self) -> &'static str {
        match self.pre {
            Pre::V1(_) => V1_EXPORT,
            Pre::V2(_) => V2_EXPORT,
        }
    }

    /// The limits this plugin runs under.
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Runs one input in a fresh instance. Never panics on anything the plugin does: every
    /// misbehaviour becomes an `Outcome::Failed` with the reason.
    ///
    /// It blocks for as long as the plugin runs: call it from a blocking thread
    /// (`tokio::task::spawn_blocking`) or outside any async runtime, never from an async
    /// task, where a WASI plugin's output would make wasmtime-wasi's runtime panic.
    pub fn run(&self, input: TransformInput) -> Outcome {
        self.run_measured(Call::stateless(input)).0
    }

    /// Runs each call in a fresh instance, spread over the sandbox's threads (blocking
    /// threads of the tokio runtime it is awaited in, at most `sandbox.threads` calls at once
    /// across all pipelines). The results are in call order. A component of contract 0.1.0
    /// has no access to state: its calls change none.
    pub async fn run_all(&self, calls: Vec<Call>) -> Result<Vec<CallResult>, RunError> {
        let count = calls.len();
        let width = self.share.as_ref().unwrap_or(&self.threads).count;
        let per_thread = count.div_ceil(width).max(MIN_INPUTS_PER_THREAD);
        let mut calls = calls.into_iter().peekable();
        let mut shares = Vec::new();
        while calls.peek().is_some() {
            let share: Vec<Call> = calls.by_ref().take(per_thread).collect();
            let plugin = self.clone();
            shares.push(async move {
                // The pipeline's share first, then a thread of the sandbox's: a pipeline at
                // its share waits without holding a thread another pipeline could use.
                let _share = match &plugin.share {
                    Some(share) => Some(
                        share
                            .permits
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|e| RunError::Panicked(e.to_string()))?,
                    ),
                    None => None,
                };
                let _permit = plugin
                    .threads
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| RunError::Panicked(e.to_string()))?;
                tokio::task::spawn_blocking(move || {
                    share
                        .into_iter()
                        .map(|call| {
                            plugin
                                .try_run(call)
                                .map(|(outcome, usage, changes)| CallResult {
                                    outcome,
                                    cost: CallCost {
                                        fuel: usage.fuel,
                                        elapsed: usage.elapsed,
                                    },
                                    changes,
                                })
                        })
                        .collect::<Result<Vec<_>, RunError>>()
                })
                .await
                .map_err(|e| RunError::Panicked(e.to_string()))?
            });
        }
        let mut outcomes = Vec::with_capacity(count);
        for share in futures::future::join_all(shares).await {
            outcomes.extend(share?);
        }
        Ok(outcomes)
    }

    /// Like `run`, for a call that may carry its key's state: also reports the fuel, memory
    /// and time the call used, and its state changes (none unless it transformed the
    /// input). When the engine is out of instances (other calls hold them all), it waits
    /// for one.
    pub fn run_measured(&self, call: Call) -> (Outcome, Usage, StateChanges) {
        let mut pause = Duration::from_millis(1);
        loop {
            match self.try_run(call.clone()) {
                Ok(result) => return result,
                Err(_) => {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    /// Runs one call in a fresh instance: its outcome, what it used and its state changes.
    /// `Err` only when the engine has no instance, memory or table free for it, which is the
    /// host's fault, never the input's.
    fn try_run(&self, call: Call) -> Result<(Outcome, Usage, StateChanges), RunError> {
        let started = std::time::Instant::now();
        let dedup_key = call.input.dedup_key.clone();
        let mut store = self.new_store(wasi::Inputs::of(&call.input), call.state);
        let instantiated = self.pre.instantiate(&mut store);
        let outcome = match instantiated {
            Ok(instance) => {
                let result = instance.call(&mut store, call.input);
                self.outcome(&mut store, result)
            }
            Err(error) if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() => {
                return Err(RunError::Exhausted(one_line(&format!("{error:#}"))));
            }
            Err(error) => self.outcome(&mut store, Err(error)),
        };
        store.data().wasi.log_output(&dedup_key);
        let usage = self.usage(&store, started);
        let changes = store.data_mut().changes_if(&outcome);
        Ok((outcome, usage, changes))
    }

    fn usage(&self, store: &Store<CallState>, started: std::time::Instant) -> Usage {
        Usage {
            fuel: self.limits.fuel - store.get_fuel().unwrap_or(0),
            peak_memory_bytes: store.data().peak_memory_bytes,
            elapsed: started.elapsed(),
        }
    }

    /// Runs a call twice in one instance and returns the second call's outcome and state
    /// changes. WASI's clocks and generators are rewound in between, the fuel and deadline
    /// renewed, and what the first call emitted or wrote forgotten (the second call sees the
    /// key's state as the first did), so a plugin that keeps no state of its own between
    /// calls gives what it gives in a fresh instance. The harness's determinism check uses
    /// it to catch plugins whose results depend on earlier calls; the pipeline itself never
    /// reuses an instance.
    ///
    /// `None` when the comparison would prove nothing: the second call drew random bytes,
    /// and a runtime that lazily initialises itself in its first call (CPython does) draws
    /// them at a different point of the stream than a fresh instance would.
    pub fn run_in_used_instance(&self, call: Call) -> Option<(Outcome, StateChanges)> {
        let state_before = call.state.clone();
        let mut store = self.new_store(wasi::Inputs::of(&call.input), call.state);
        let instantiated = self.pre.instantiate(&mut store);
        let instance = match instantiated {
            Ok(instance) => instance,
            Err(error) => return Some((self.outcome(&mut store, Err(error)), StateChanges::new())),
        };
        store.data_mut().wasi.checkpoint();
        let first = instance.call(&mut store, call.input.clone());
        if first.is_err() {
            // A trap leaves the instance unusable; the fresh run saw the same trap.
            return Some((self.outcome(&mut store, first), StateChanges::new()));
        }
        store.data_mut().wasi.rewind();
        store.data_mut().forget_call(state_before);
        self.renew_budget(&mut store);
        let second = instance.call(&mut store, call.input);
        if store.data().wasi.drew_randomness() {
            return None;
        }
        let outcome = self.outcome(&mut store, second);
        let changes = store.data_mut().changes_if(&outcome);
        Some((outcome, changes))
    }

    /// What a call's result means, in weir's terms.
    fn outcome(
        &self,
        store: &mut Store<CallState>,
        result: wasmtime::Result<Result<Vec<PluginOutput>, Refusal>>,
    ) -> Outcome {
        match result {
            // The output policy (weir-core) judges the outputs: the sandbox only runs.
            Ok(Ok(outputs)) => Outcome::Outputs(outputs),
            Ok(Err(Refusal { kind, reason })) => Outcome::failed(kind, reason),
            Err(error) => {
                // A host function that ended the call said why.
                if let Some(Refusal { kind, reason }) = store.data_mut().refusal.take() {
                    return Outcome::failed(kind, reason);
                }
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
                        // A host function's refusal: its own words, without the backtrace.
                        None => one_line(&error.root_cause().to_string()),
                    },
                };
                Outcome::failed(kind, reason)
            }
        }
    }

    /// A store for one call, with this plugin's fuel, deadline and memory and output limits,
    /// and the state of the input's key, if its pipeline keeps state.
    fn new_store(&self, wasi_inputs: wasi::Inputs, state: Option<StateView>) -> Store<CallState> {
        let mut store = Store::new(
            &self.engine,
            CallState {
                memory_limit: self.limits.memory_bytes,
                memory_denied: false,
                peak_memory_bytes: 0,
                wasi: wasi::State::new(wasi_inputs),
                state,
                emitted: Vec::new(),
                emitted_bytes: 0,
                max_outputs: self.limits.max_outputs,
                max_output_bytes: self.limits.max_output_bytes,
                refusal: None,
            },
        );
        store.limiter(|state| state as &mut dyn ResourceLimiter);
        store.epoch_deadline_trap();
        self.renew_budget(&mut store);
        store
    }

    /// Gives a store this plugin's whole fuel budget and deadline.
    fn renew_budget(&self, store: &mut Store<CallState>) {
        // Fuel cannot fail to be set: fuel consumption is on for this engine.
        store
            .set_fuel(self.limits.fuel)
            .expect("the engine consumes fuel");
        let ticks = self
            .limits
            .deadline_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64);
        store.set_epoch_deadline(ticks);
    }
}

/// An instance of a plugin, by its contract.
enum Instance {
    V1(v1::Plugin),
    V2(v2::Plugin),
}

impl Instance {
    /// Calls `transform` on `input`: the outputs it returned (0.1.0) or emitted (0.2.0),
    /// or why it refused the input.
    fn call(
        &self,
        store: &mut Store<CallState>,
        input: TransformInput,
    ) -> wasmtime::Result<Result<Vec<PluginOutput>, Refusal>> {
        match self {
            Instance::V1(plugin) => {
                use v1::exports::weir::transform::transformer::{Message, TransformError};
                let message = Message {
                    subject: input.subject,
                    headers: input.headers,
                    payload: input.payload,
                    stream_sequence: input.stream_sequence,
                    data_time_unix_ns: input.data_time_unix_ns,
                    dedup_key: input.dedup_key,
                    seed: input.seed,
                };
                let result = plugin
                    .weir_transform_transformer()
                    .call_transform(&mut *store, &message)?;
                Ok(match result {
                    Ok(outputs) => Ok(outputs
                        .into_iter()
                        .map(|o| PluginOutput {
                            subject: o.subject,
                            headers: o.headers,
                            payload: o.payload,
                        })
                        .collect()),
                    Err(TransformError::InvalidInput(reason)) => Err(Refusal {
                        kind: FailureKind::InvalidInput,
                        reason,
                    }),
                    Err(TransformError::PluginFailed(reason)) => Err(Refusal {
                        kind: FailureKind::PluginFailed,
                        reason,
                    }),
                })
            }
            Instance::V2(plugin) => {
                use v2::weir::transform::types::{Message, TransformError};
                let state_key = store
                    .data()
                    .state
                    .as_ref()
                    .map(|state| state.key().to_owned())
                    .unwrap_or_default();
                let message = Message {
                    subject: input.subject,
                    headers: input.headers,
                    payload: input.payload,
                    stream_sequence: input.stream_sequence,
                    data_time_unix_ns: input.data_time_unix_ns,
                    dedup_key: input.dedup_key,
                    seed: input.seed,
                    state_key,
                };
                let result = plugin
                    .weir_transform_transformer()
                    .call_transform(&mut *store, &message)?;
                Ok(match result {
                    Ok(()) => Ok(std::mem::take(&mut store.data_mut().emitted)),
                    Err(TransformError::InvalidInput(reason)) => Err(Refusal {
                        kind: FailureKind::InvalidInput,
                        reason,
                    }),
                    Err(TransformError::PluginFailed(reason)) => Err(Refusal {
                        kind: FailureKind::PluginFailed,
                        reason,
                    }),
                })
            }
        }
    }
}

/// Per-call store data: the memory limit, and whether the plugin ran into it (so a trap
/// that follows can be reported as what it is); for a 0.2.0 plugin, its key's state, what it
/// emitted so far, and why a host function ended the call.
struct CallState {
    memory_limit: usize,
    memory_denied: bool,
    peak_memory_bytes: usize,
    /// What a plugin that imports WASI sees; built on its first WASI call only.
    wasi: wasi::State,
    state: Option<StateView>,
    emitted: Vec<PluginOutput>,
    emitted_bytes: usize,
    max_outputs: usize,
    max_output_bytes: usize,
    refusal: Option<Refusal>,
}

impl CallState {
    /// Forgets what a call emitted and wrote, for another call in the same instance that
    /// starts from `state`.
    fn forget_call(&mut self, state: Option<StateView>) {
        self.emitted.clear();
        self.emitted_bytes = 0;
        self.refusal = None;
        self.state = state;
    }

    /// The call's state changes, which count only if it transformed its input.
    fn changes_if(&mut self, outcome: &Outcome) -> StateChanges {
        match outcome {
            Outcome::Outputs(_) => self
                .state
                .take()
                .map(StateView::into_changes)
                .unwrap_or_default(),
            Outcome::Failed { .. } => StateChanges::new(),
        }
    }
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

/// The engine's settings apart from its instance allocator: all that the compiled code
/// depends on, the same in weir's compiler process as in the sandbox.
fn engine_config(settings: &SandboxConfig) -> Config {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .cranelift_nan_canonicalization(true)
        .relaxed_simd_deterministic(true)
        .max_wasm_stack(settings.max_stack_bytes)
        // Bounds checks compiled into the plugin instead of guard pages. With guard
        // pages, a slot whose memory grew during a call (any plugin that allocates) has
        // its protection shrunk back before reuse: an mprotect that interrupts every
        // other core to flush its TLB. Measured: a fresh instance and call 12.3 → 7.4 µs,
        // weir's CPU per input in a pipeline 33 → 25 µs. wasmtime turns the Spectre
        // mitigation of heap accesses off with them; a plugin has no clock to time a side
        // channel with (its clocks read the message's data time) and no threads.
        .signals_based_traps(false)
        .memory_guard_size(0);
    config
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

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Settings of the one wasm engine all pipelines share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The most stack a plugin call may use, in bytes. By default 512 KiB, at most 1 MiB;
    /// deep recursion past it traps ("stack overflow") and the input goes to the DLQ.
    pub max_stack_bytes: usize,
    /// Keep compiled plugins on disk, so that a restart does not compile them again (a
    /// Python component takes seconds). By default true.
    pub compile_cache: bool,
    /// Where; by default `$XDG_CACHE_HOME/weir/compiled` (or `~/.cache/weir/compiled`).
    /// Relative to the configuration file. weir creates it private to its user, and will
    /// not use one that others may write to.
    pub compile_cache_dir: Option<PathBuf>,
    /// How many plugin calls run at once, across all pipelines: a batch's inputs are spread
    /// over this many threads. By default the number of cores, at most `MAX_THREADS`.
    pub threads: usize,
    /// The largest component file weir agrees to compile, in bytes. By default 64 MiB (the
    /// Python plugin is 18 MB).
    pub max_component_bytes: usize,
    /// The most functions a component's core modules may have together. By default
    /// 100 000 (the Python plugin has about 12 000).
    pub max_functions: usize,
    /// The largest function body weir agrees to compile, in bytes. By default 1 MiB (the
    /// Python plugin's largest is about 200 KB).
    pub max_function_bytes: usize,
    /// How long compiling one component may take, in milliseconds, before weir stops it
    /// and refuses the component. By default 120 000.
    pub compile_timeout_ms: u64,
    /// How much memory compiling one component may use, in bytes. By default 2 GiB.
    pub compile_memory_bytes: usize,
    /// The most the compile cache keeps on disk, in bytes; the entries used longest ago go
    /// first. By default 1 GiB.
    pub compile_cache_bytes: u64,
}

/// The most plugin calls that may run at once (the engine's instance pool holds twice as
/// many instances).
pub const MAX_THREADS: usize = 32;

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            max_stack_bytes: 512 * 1024,
            compile_cache: true,
            compile_cache_dir: None,
            threads: std::thread::available_parallelism()
                .map_or(1, |cores| cores.get())
                .min(MAX_THREADS),
            max_component_bytes: 64 << 20,
            max_functions: 100_000,
            max_function_bytes: 1 << 20,
            compile_timeout_ms: 120_000,
            compile_memory_bytes: 2 << 30,
            compile_cache_bytes: 1 << 30,
        }
    }
}

impl SandboxConfig {
    /// The directory of compiled plugins, if the cache is on and a place for it is known.
    pub fn compile_cache_dir(&self) -> Option<PathBuf> {
        if !self.compile_cache {
            return None;
        }
        if let Some(dir) = &self.compile_cache_dir {
            return Some(dir.clone());
        }
        let cache_home = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
        Some(cache_home.join("weir").join("compiled"))
    }
}

/// The largest wasm stack a plugin call may have: well inside the 2 MiB stacks of the
/// threads that run plugins.
pub const MAX_WASM_STACK: usize = 1024 * 1024;

/// What one plugin call may use. Exceeding a limit sends the input to the DLQ.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Fuel (roughly, wasm instructions) per message. By default 100 000 000. Deterministic:
    /// an input that runs out always runs out.
    pub fuel: u64,
    /// Linear memory per instance, in bytes. By default 64 MiB.
    pub memory_bytes: usize,
    /// Wall-clock backstop per message, in milliseconds. By default 5000. Unlike fuel it
    /// depends on the machine: keep it well above what the fuel budget takes to burn.
    pub deadline_ms: u64,
    /// The most outputs one message may produce. By default 1000.
    pub max_outputs: usize,
    /// The most output bytes (payloads and headers) one message may produce. By default 4 MiB.
    pub max_output_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            fuel: 100_000_000,
            memory_bytes: 64 * 1024 * 1024,
            deadline_ms: 5000,
            max_outputs: 1000,
            max_output_bytes: 4 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostile_plugin() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/dist/hostile.wasm")
    }

    fn input(payload: &str, sequence: u64) -> TransformInput {
        TransformInput {
            subject: "in.x".into(),
            headers: Vec::new(),
            payload: payload.as_bytes().to_vec(),
            stream_sequence: sequence,
            data_time_unix_ns: 0,
            dedup_key: format!("k{sequence}"),
            seed: sequence,
        }
    }

    /// A plugin held to a share of one thread never takes the other: a plugin that spins on
    /// every input once held every thread of the sandbox, and other pipelines' calls waited
    /// for it (the healthy pipeline's drain went from 0.13 s to 5.7 s).
    // One runtime thread: the spawned run takes its permits in one poll, before this task
    // looks (the calls themselves run on blocking threads).
    #[tokio::test(flavor = "current_thread")]
    async fn a_plugin_held_to_its_share_leaves_the_other_threads_free() {
        let settings = SandboxConfig {
            threads: 2,
            compile_cache: false,
            ..SandboxConfig::default()
        };
        let limits = LimitsConfig::default();
        let sandbox =
            Sandbox::new(&settings, limits.memory_bytes, Compiler::InThisProcess).unwrap();
        let spinning = sandbox
            .load(&hostile_plugin(), &limits)
            .expect("scripts/build-plugins.sh built plugins/dist/hostile.wasm")
            .with_thread_share(1);
        let inputs = (0..64).map(|i| Call::stateless(input("loop", i))).collect();
        let running = tokio::spawn(async move { spinning.run_all(inputs).await });
        // Its calls start (the state itself is awaited), holding one thread of the two.
        while sandbox.threads.permits.available_permits() == 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            sandbox.threads.permits.available_permits(),
            1,
            "the spinning plugin holds only its share"
        );
        // Another pipeline's call runs on the free thread at once.
        let other = sandbox
            .load(&hostile_plugin(), &limits)
            .unwrap()
            .with_thread_share(1);
        let results = other
            .run_all(vec![Call::stateless(input("fine", 1))])
            .await
            .unwrap();
        assert!(
            matches!(results[0].outcome, Outcome::Outputs(_)),
            "{:?}",
            results[0]
        );
        assert!(
            !running.is_finished(),
            "the other call did not wait for the spinning ones"
        );
        let spun = running.await.unwrap().unwrap();
        assert!(spun.iter().all(|result| matches!(
            result.outcome,
            Outcome::Failed {
                kind: FailureKind::FuelExhausted,
                ..
            }
        )));
    }

    /// A 0.2.0 plugin reads and writes its key's state through the host and emits its
    /// outputs; the changes of a call that fails come back empty, and a write past a state
    /// limit or an emit past an output limit ends the call with its own kind.
    #[test]
    fn a_stateful_plugin_changes_its_keys_state_and_emits_within_the_limits() {
        use weir_core::state::{KeyState, StateLimits};
        let balances =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/dist/balances.wasm");
        let sandbox = Sandbox::new(
            &SandboxConfig {
                compile_cache: false,
                ..SandboxConfig::default()
            },
            LimitsConfig::default().memory_bytes,
            Compiler::InThisProcess,
        )
        .unwrap();
        let load = |limits: &LimitsConfig| {
            sandbox
                .load(&balances, limits)
                .expect("scripts/build-plugins.sh built plugins/dist/balances.wasm")
        };
        let plugin = load(&LimitsConfig::default());
        assert_eq!(plugin.contract(), V2_EXPORT);
        let call = |plugin: &Plugin, amount: &str, balance: Option<&str>, limits: StateLimits| {
            let base = KeyState::from_entries(
                balance.map(|b| ("balance".to_owned(), b.as_bytes().to_vec())),
            );
            let state = StateView::new("acct-7".into(), Arc::new(base), limits);
            let call = Call {
                input: input(amount, 1),
                state: Some(state),
            };
            plugin.try_run(call).unwrap()
        };
        let (outcome, _, changes) = call(&plugin, "+40", Some("2"), StateLimits::default());
        let Outcome::Outputs(outputs) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(
            (outputs[0].subject.as_str(), outputs[0].payload.as_slice()),
            ("balance.acct-7", &b"42"[..])
        );
        assert_eq!(changes["balance"].as_deref(), Some(&b"42"[..]));

        let (overdraft, _, changes) = call(&plugin, "-50", Some("42"), StateLimits::default());
        assert!(
            matches!(&overdraft, Outcome::Failed { kind: FailureKind::InvalidInput, reason } if reason.contains("overdraft")),
            "{overdraft:?}"
        );
        assert!(changes.is_empty(), "a failed call changes nothing");

        // "balance" and "1" are 8 bytes.
        let tiny = StateLimits {
            max_entry_bytes: 7,
            max_key_bytes: 100,
        };
        let (over, _, changes) = call(&plugin, "+1", None, tiny);
        assert!(
            matches!(&over, Outcome::Failed { kind: FailureKind::StateLimit, reason } if reason.contains("state.max_entry_bytes")),
            "{over:?}"
        );
        assert!(changes.is_empty());

        let no_outputs = load(&LimitsConfig {
            max_outputs: 0,
            ..LimitsConfig::default()
        });
        let (refused, _, changes) = call(&no_outputs, "+1", None, StateLimits::default());
        assert!(
            matches!(&refused, Outcome::Failed { kind: FailureKind::OutputRejected, reason } if reason.contains("limits.max_outputs")),
            "{refused:?}"
        );
        assert!(changes.is_empty());

        // Without state (a pipeline with no [pipeline.state]), a write fails the call.
        let (stateless, _, _) = plugin.try_run(Call::stateless(input("+1", 1))).unwrap();
        assert!(
            matches!(&stateless, Outcome::Failed { kind: FailureKind::PluginFailed, reason } if reason.contains("[pipeline.state]")),
            "{stateless:?}"
        );
    }
}
