//! weir: a WebAssembly plugin host for JetStream stream transforms, with exactly-once
//! effects. See ARCHITECTURE.md for the map of this crate.
//!
//! [`run`] is the entry point: given a validated configuration, it checks everything the
//! configuration names, then runs
//! each pipeline until the shutdown token fires.

pub mod check;
pub mod cli;
pub mod config;
pub mod dlq;
pub mod fault;
pub mod pipeline;

use tokio_util::sync::CancellationToken;

pub use config::{Config, ValidConfig};
pub use weir_core::stats::StatsSnapshot;
pub use weir_sandbox::Compiler;

/// Why weir could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Engine(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0} problems found; each is marked FAIL above")]
    Checked(usize),
    #[error("{0} dead letters were skipped; see the reasons above")]
    Skipped(usize),
    #[error(transparent)]
    Dlq(#[from] dlq::DlqError),
    #[error(
        "pipeline {pipeline:?} stopped: {source} (restore the store from a backup, or move it aside to start afresh with a new consumer)"
    )]
    Stopped {
        pipeline: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pipeline {pipeline:?} failed: {message}")]
    Crashed { pipeline: String, message: String },
    #[error("pipeline {pipeline:?}: {source}")]
    Start {
        pipeline: String,
        #[source]
        source: StartError,
    },
}

/// What stopped a pipeline from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Plugin(#[from] weir_sandbox::LoadError),
    #[error(transparent)]
    Store(#[from] weir_store::StoreError),
    #[error(transparent)]
    Broker(#[from] weir_nats::BrokerError),
}

/// What each pipeline did, reported when `run` returns.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub pipelines: Vec<(String, StatsSnapshot)>,
}

/// The name of the `weir` command that compiles a component in a child process.
const COMPILE_COMMAND: &str = "compile-component";

/// A compiler that runs the `weir` binary at `program` (its hidden `compile-component`
/// command) in a child process, held to the sandbox's compile deadline and memory limit.
pub fn compiler_at(program: std::path::PathBuf) -> Compiler {
    Compiler::ChildProcess {
        program,
        args: vec![COMPILE_COMMAND.into()],
    }
}

/// The compiler of the `weir` binary this process runs.
pub fn own_compiler() -> Result<Compiler, Error> {
    std::env::current_exe().map(compiler_at).map_err(|e| {
        Error::Engine(format!(
            "cannot find weir's own executable to compile plugins with: {e}"
        ))
    })
}

/// Starts every pipeline of `config`, each as soon as its own checks pass (one whose plugin
/// takes long to compile delays no other), runs them until `shutdown` fires, lets each
/// finish the batch in hand, and returns what they did. A pipeline that cannot start stops
/// the others, as a failing one does. Plugins are compiled by `compiler`.
pub async fn run(
    config: ValidConfig,
    compiler: Compiler,
    shutdown: CancellationToken,
) -> Result<RunReport, Error> {
    let sandbox =
        weir_sandbox::Sandbox::new(config.sandbox(), config.largest_memory_limit(), compiler)
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
    let sandbox = std::sync::Arc::new(sandbox);
    let share = weir_core::plugin::thread_share(config.sandbox().threads, config.pipelines().len());
    let mut report = RunReport {
        pipelines: Vec::new(),
    };
    let mut running = tokio::task::JoinSet::new();
    for (index, pipeline) in config.into_pipelines().into_iter().enumerate() {
        let name = pipeline.config().name.clone();
        report.pipelines.push((name.clone(), Default::default()));
        let sandbox = sandbox.clone();
        let shutdown = shutdown.clone();
        // Every line a pipeline logs carries its name, through the span it runs in.
        let span = tracing::info_span!("pipeline", pipeline = %name);
        running.spawn(tracing::Instrument::instrument(
            async move {
                let started = tokio::select! {
                    started = pipeline::Pipeline::start(pipeline, &sandbox, share) => started,
                    () = shutdown.cancelled() => return (index, None, Ok(())),
                };
                match started {
                    Ok(pipeline) => {
                        let stats = pipeline.stats();
                        (index, Some(stats), pipeline.run(shutdown).await)
                    }
                    Err(error) => (index, None, Err(error)),
                }
            },
            span,
        ));
    }
    // The first pipeline to fail stops the others: a host that runs only some of its
    // pipelines would look healthy while one of them made no progress.
    let mut failure = None;
    let mut all_stats = Vec::new();
    while let Some(joined) = running.join_next().await {
        let error = match joined {
            Ok((index, stats, result)) => {
                all_stats.extend(stats.map(|stats| (index, stats)));
                match result {
                    Ok(()) => continue,
                    Err(error) => error,
                }
            }
            Err(join_error) => Error::Crashed {
                pipeline: "?".into(),
                message: join_error.to_string(),
            },
        };
        // A pipeline that cannot start is reported once, as weir's error line; one that
        // fails while running is logged where it happened, too.
        if !matches!(error, Error::Start { .. }) {
            tracing::error!(%error, "stopping every pipeline");
        }
        shutdown.cancel();
        failure.get_or_insert(error);
    }
    for (index, stats) in all_stats {
        report.pipelines[index].1 = stats.snapshot();
    }
    // The sandbox (and its epoch thread) lives until every pipeline has stopped.
    drop(sandbox);
    match failure {
        Some(error) => Err(error),
        None => Ok(report),
    }
}
