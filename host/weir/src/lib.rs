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

/// Starts every pipeline of `config` (all checks happen before anything is consumed), runs
/// them until `shutdown` fires, lets each finish the batch in hand, and returns what they
/// did.
pub async fn run(config: ValidConfig, shutdown: CancellationToken) -> Result<RunReport, Error> {
    let sandbox = weir_sandbox::Sandbox::new(config.sandbox(), config.largest_memory_limit())
        .map_err(|e| Error::Engine(format!("{e:#}")))?;
    let mut pipelines = Vec::with_capacity(config.pipelines().len());
    let share = weir_core::plugin::thread_share(config.sandbox().threads, config.pipelines().len());
    for pipeline in config.into_pipelines() {
        let span = tracing::info_span!("pipeline", pipeline = %pipeline.config().name);
        let starting = pipeline::Pipeline::start(pipeline, &sandbox, share);
        pipelines.push(tracing::Instrument::instrument(starting, span).await?);
    }
    let mut report = RunReport {
        pipelines: Vec::new(),
    };
    let mut running = tokio::task::JoinSet::new();
    let mut all_stats = Vec::new();
    for (index, pipeline) in pipelines.into_iter().enumerate() {
        let name = pipeline.name().to_owned();
        all_stats.push(pipeline.stats());
        report.pipelines.push((name.clone(), Default::default()));
        let shutdown = shutdown.clone();
        // Every line a pipeline logs carries its name, through the span it runs in.
        let span = tracing::info_span!("pipeline", pipeline = %name);
        running.spawn(tracing::Instrument::instrument(
            async move { (index, pipeline.run(shutdown).await) },
            span,
        ));
    }
    // The first pipeline to fail stops the others: a host that runs only some of its
    // pipelines would look healthy while one of them made no progress.
    let mut failure = None;
    while let Some(joined) = running.join_next().await {
        let error = match joined {
            Ok((_, Ok(()))) => continue,
            Ok((_, Err(error))) => error,
            Err(join_error) => Error::Crashed {
                pipeline: "?".into(),
                message: join_error.to_string(),
            },
        };
        tracing::error!(%error, "stopping every pipeline");
        shutdown.cancel();
        failure.get_or_insert(error);
    }
    for (entry, stats) in report.pipelines.iter_mut().zip(&all_stats) {
        entry.1 = stats.snapshot();
    }
    // The sandbox (and its epoch thread) lives until every pipeline has stopped.
    drop(sandbox);
    match failure {
        Some(error) => Err(error),
        None => Ok(report),
    }
}
