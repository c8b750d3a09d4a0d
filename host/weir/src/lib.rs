//! weir: a WebAssembly plugin host for JetStream stream transforms, with exactly-once
//! effects. See ARCHITECTURE.md for the map of this crate.
//!
//! [`run`] is the entry point: given a validated configuration, it checks everything the
//! configuration names, then runs
//! each pipeline until the shutdown token fires.

pub mod check;
pub mod cli;
pub mod config;
pub mod diff;
pub mod dlq;
pub mod fault;
pub mod pipeline;
pub mod reload;
pub mod replay;

use tokio_util::sync::CancellationToken;

pub use config::{Config, ValidConfig};
pub use reload::ReloadRequests;
pub use weir_core::metrics::StatsSnapshot;
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
    #[error(transparent)]
    Admin(#[from] weir_admin::AdminError),
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
    /// A partitioned pipeline's ledger (its output stream) cannot be used.
    #[error("pipeline {pipeline:?} stopped: {message} (check the output stream's configuration)")]
    Ledger { pipeline: String, message: String },
    /// Another run took a partitioned pipeline's partition over.
    #[error("pipeline {pipeline:?} stopped: {message}")]
    TakenOver { pipeline: String, message: String },
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
    #[error(
        "[pipeline.state] is set, and plugin {plugin:?} exports {contract}, which keeps no state: build it against wit/0.2.0 (weir:transform@0.2.0), or remove [pipeline.state]"
    )]
    StatelessPlugin {
        plugin: std::path::PathBuf,
        contract: &'static str,
    },
}

impl StartError {
    /// Refuses `plugin`, loaded from `path`, for `pipeline` if the pipeline keeps state
    /// and the plugin speaks a contract without it: what `weir run`, `weir check`, a
    /// reload and `weir plugin deploy` all refuse.
    pub(crate) fn unless_contract_fits(
        pipeline: &config::PipelineConfig,
        path: &std::path::Path,
        plugin: &weir_sandbox::Plugin,
    ) -> Result<(), StartError> {
        match pipeline.state.is_some() && plugin.contract() == weir_sandbox::V1_EXPORT {
            true => Err(StartError::StatelessPlugin {
                plugin: path.to_owned(),
                contract: plugin.contract(),
            }),
            false => Ok(()),
        }
    }
}

/// A plugin file no pipeline runs yet, loaded and checked as `weir run` would load it for
/// `pipeline`, on a sandbox of its own (compiling on a blocking thread): for
/// `weir plugin deploy` and `weir plugin diff`. A component weir refuses is
/// `Error::Start` with the reason.
pub async fn load_candidate(
    config: &ValidConfig,
    pipeline: &config::ValidPipeline,
    candidate: &std::path::Path,
) -> Result<weir_sandbox::Plugin, Error> {
    let settings = pipeline.config();
    let limits = settings.limits.clone();
    let sandbox =
        weir_sandbox::Sandbox::new(config.sandbox(), limits.memory_bytes, own_compiler()?)
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
    let path = candidate.to_owned();
    let refused = |source: StartError| Error::Start {
        pipeline: settings.name.clone(),
        source,
    };
    let plugin = tokio::task::spawn_blocking(move || sandbox.load(&path, &limits))
        .await
        .map_err(|e| Error::Engine(format!("loading {} failed: {e}", candidate.display())))?
        .map_err(|e| refused(e.into()))?;
    StartError::unless_contract_fits(settings, candidate, &plugin).map_err(refused)?;
    Ok(plugin)
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
/// the others, as a failing one does. Plugins are compiled by `compiler`. The admin port,
/// unless turned off, is bound before anything starts and serves until every pipeline has
/// stopped (its readiness says why each is not ready meanwhile). Each of `reloads`'
/// requests, and each `POST /reload` on the admin port, reloads the plugins (`reload`).
pub async fn run(
    config: ValidConfig,
    compiler: Compiler,
    shutdown: CancellationToken,
    reloads: ReloadRequests,
) -> Result<RunReport, Error> {
    let sandbox =
        weir_sandbox::Sandbox::new(config.sandbox(), config.largest_memory_limit(), compiler)
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
    let sandbox = std::sync::Arc::new(sandbox);
    let reloader = std::sync::Arc::new(reload::Reloader::new(&config, sandbox.clone()));
    // A partitioned pipeline runs each of its partitions as a pipeline of its own, named
    // `<pipeline>/<partition>` in the logs, metrics and status when it has several.
    let runs: Vec<(config::ValidPipeline, u32, String)> = config
        .pipelines()
        .iter()
        .flat_map(|pipeline| {
            let partitions = pipeline.config().partition_indexes();
            let several = partitions.len() > 1;
            partitions.map(move |partition| {
                let name = &pipeline.config().name;
                let shown = match several {
                    true => format!("{name}/{partition}"),
                    false => name.clone(),
                };
                (pipeline.clone(), partition, shown)
            })
        })
        .collect();
    let share = weir_core::plugin::thread_share(config.sandbox().threads, runs.len());
    let metrics = weir_core::metrics::Metrics::default();
    let watched: Vec<std::sync::Arc<weir_admin::Watched>> = runs
        .iter()
        .map(|(pipeline, _, name)| {
            let store_dir = match pipeline.delivery() {
                config::Delivery::ExactlyOnce { store_dir } => {
                    Some(store_dir.display().to_string())
                }
                config::Delivery::AtLeastOnce | config::Delivery::Partitioned => None,
            };
            std::sync::Arc::new(weir_admin::Watched::new(
                name.clone(),
                store_dir,
                metrics.pipeline(name),
            ))
        })
        .collect();
    let admin_stop = CancellationToken::new();
    let admin = match config.admin().address() {
        Some(address) => {
            let listener = weir_admin::bind(address).await?;
            tracing::info!(%address, "admin port listening (metrics, health, readiness, status)");
            let admin =
                weir_admin::Admin::new(env!("CARGO_PKG_VERSION"), &metrics, watched.clone())
                    .with_reload(reloader.clone());
            Some(tokio::spawn(weir_admin::serve(
                listener,
                std::sync::Arc::new(admin),
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    // Each partitioned pipeline's membership, shared by its partitions here.
    let memberships: std::collections::BTreeMap<String, std::sync::Arc<pipeline::Membership>> =
        config
            .pipelines()
            .iter()
            .filter(|pipeline| matches!(pipeline.delivery(), config::Delivery::Partitioned))
            .map(|pipeline| {
                (
                    pipeline.config().name.clone(),
                    pipeline::Membership::new(pipeline),
                )
            })
            .collect();
    let reloading = tokio::spawn({
        let reloader = reloader.clone();
        async move { reloader.serve(reloads).await }
    });
    let mut running = tokio::task::JoinSet::new();
    for ((pipeline, partition, name), watched) in runs.into_iter().zip(watched.clone()) {
        let membership = memberships.get(&pipeline.config().name).cloned();
        let (sandbox, reloader) = (sandbox.clone(), reloader.clone());
        let pipeline_name = pipeline.config().name.clone();
        let shutdown = shutdown.clone();
        // Every line a pipeline logs carries its name, through the span it runs in.
        let span = tracing::info_span!("pipeline", pipeline = %name);
        running.spawn(tracing::Instrument::instrument(
            async move {
                let started = tokio::select! {
                    started = pipeline::Pipeline::start(pipeline, partition, &sandbox, share, &watched, membership) => started,
                    () = shutdown.cancelled() => {
                        watched.status.stopped("shut down while starting");
                        return Ok(());
                    }
                };
                match started {
                    Ok(started) => {
                        let plugin = started.plugin();
                        reloader.serving(&pipeline_name, plugin, share, watched);
                        started.run(shutdown).await
                    }
                    Err(error) => {
                        watched.status.stopped(&error.to_string());
                        Err(error)
                    }
                }
            },
            span,
        ));
    }
    // The first pipeline to fail stops the others: a host that runs only some of its
    // pipelines would look healthy while one of them made no progress.
    let mut failure = None;
    while let Some(joined) = running.join_next().await {
        let error = match joined {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error,
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
    // Every pipeline has stopped: each membership leaves.
    shutdown.cancel();
    for membership in memberships.values() {
        membership.left().await;
    }
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    reloading.abort();
    let report = RunReport {
        pipelines: watched
            .iter()
            .map(|watched| (watched.name.clone(), watched.metrics.snapshot()))
            .collect(),
    };
    // The sandbox (and its epoch thread) lives until every pipeline has stopped.
    drop(sandbox);
    match failure {
        Some(error) => Err(error),
        None => Ok(report),
    }
}
