//! The `weir` command line, behind the `weir` binary (`src/bin/weir.rs`). Exit codes: 0
//! after a clean stop, 2 for a configuration or plugin that cannot work as written, 1 for
//! any other failure (server, store, engine). It lives in the library so that the test
//! suite's `weir-faulty` binary is this same command line with fault injection installed.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::LimitsConfig;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

mod cluster;
mod deploy;
mod diff;
mod dlq;
mod plugin;
mod replay;
mod scaffold;
mod state;
mod status;

/// A WebAssembly plugin host for JetStream stream transforms, with exactly-once effects.
#[derive(Parser)]
#[command(name = "weir", version)]
struct Cli {
    /// Log format: `human` (default) or `json`, one object per line. The level comes from
    /// RUST_LOG (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipelines of a configuration file until SIGINT or SIGTERM. SIGHUP reloads
    /// their plugins.
    Run {
        /// The TOML configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Check a configuration without running it: the file, each plugin, store, server,
    /// stream and consumer. Reports every problem, each with what to do; changes nothing.
    Check {
        /// The TOML configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show what a running `weir run` reports on its admin port: each pipeline's phase,
    /// readiness, inputs per second, lag, dead letters and plugin.
    Status {
        /// The admin port's address, as `[admin] listen` sets it.
        #[arg(long, value_name = "HOST:PORT", default_value = weir_admin::DEFAULT_LISTEN)]
        admin: String,
        /// Take the admin port's address from this configuration file instead.
        #[arg(short, long, conflicts_with = "admin")]
        config: Option<PathBuf>,
    },
    /// Make, build, inspect and test plugin components.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// List, show and replay a pipeline's dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Read a stateful pipeline's state, while it runs or not.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Run a range of a pipeline's input stream again, through its plugin or another, to
    /// its output prefix or another: a backfill. Exactly once per run: a run stopped (even
    /// with SIGKILL) and started again with the same arguments goes on where it stopped.
    /// Never touches the pipeline's own consumer, store or output ids.
    Replay(replay::ReplayArgs),
    /// A partitioned pipeline's partitions, as the server knows them.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// weir's compiler process, which weir runs itself for each component it compiles.
    #[command(hide = true)]
    CompileComponent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Show a component's size, sha256, imports and exports, and whether weir can run it.
    Inspect {
        /// The component (`.wasm`).
        file: PathBuf,
    },
    /// Run golden fixtures (one JSON file per case) against a component: each case in two
    /// fresh instances and once more in a used one, failing on a wrong or non-deterministic
    /// result.
    Test {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The directory of `*.json` fixtures.
        #[arg(long)]
        fixtures: PathBuf,
        /// Write each case's actual result into its fixture instead of comparing.
        #[arg(long)]
        update: bool,
        /// Then run this many generated inputs (mutated fixture payloads), failing on any
        /// trap or exhausted limit; an error the plugin returns is fine.
        #[arg(long, value_name = "N")]
        fuzz: Option<usize>,
        /// The seed of the generated inputs: the same seed makes the same inputs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Create a plugin crate that builds and passes its own tests: a JSON transform, native
    /// unit tests (`cargo test`) and golden fixtures (`weir plugin test`).
    New {
        /// The crate's name (lowercase letters, digits, `-` and `_`).
        name: String,
        /// Where to create it (a new directory NAME inside).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The weir guest SDK (`guest-sdk/` of the weir repository); by default the one this
        /// weir was built from.
        #[arg(long)]
        sdk: Option<PathBuf>,
        /// A stateful plugin: running totals per state key, instead of a stateless greeter.
        #[arg(long)]
        stateful: bool,
    },
    /// Put a new plugin in a pipeline's plugin file and have the running `weir run` swap
    /// it in without stopping: checked here first, then by the running weir while the old
    /// one serves; each partition runs it from its next batch. Refused, the old file is put
    /// back. The replaced file is kept as `<plugin>.previous`.
    Deploy {
        #[command(flatten)]
        target: PipelineArgs,
        /// The new component (`.wasm`).
        file: PathBuf,
    },
    /// Run a candidate plugin on a pipeline's recorded inputs, exactly as the pipeline
    /// would, and compare what it would publish with what the live plugin published (read
    /// back from the output and DLQ streams): a summary, then the first differences.
    /// Publishes nothing.
    Diff {
        #[command(flatten)]
        target: PipelineArgs,
        /// The candidate component (`.wasm`).
        file: PathBuf,
        /// The inputs among the input stream's last N sequences (without a range: 100).
        #[arg(long, value_name = "N", conflicts_with_all = ["from_seq", "to_seq"])]
        last: Option<u64>,
        /// The first stream sequence of the range.
        #[arg(long, value_name = "S", requires = "to_seq")]
        from_seq: Option<u64>,
        /// The last stream sequence of the range.
        #[arg(long, value_name = "S2", requires = "from_seq")]
        to_seq: Option<u64>,
        /// How many differences to print.
        #[arg(long, value_name = "K", default_value_t = 10)]
        show: usize,
    },
    /// Build a plugin crate to a component (with the installed target, else the sysroot in
    /// WEIR_WASM_SYSROOT), then show what `inspect` shows.
    Build {
        /// The plugin crate's directory.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// The wasm target: wasm32-wasip2, or wasm32-unknown-unknown (linked into a
        /// component by the toolchain's wasm-component-ld).
        #[arg(long, default_value = scaffold::DEFAULT_TARGET, value_parser = scaffold::TARGETS)]
        target: String,
    },
}

/// The limits a plugin is tested under; the defaults are `weir run`'s.
#[derive(clap::Args)]
struct LimitArgs {
    /// Fuel per case (limits.fuel).
    #[arg(long, default_value_t = LimitsConfig::default().fuel)]
    fuel: u64,
    /// Linear memory per instance, in bytes (limits.memory_bytes).
    #[arg(long, default_value_t = LimitsConfig::default().memory_bytes)]
    memory_bytes: usize,
}

impl LimitArgs {
    fn into_limits(self) -> LimitsConfig {
        LimitsConfig {
            fuel: self.fuel,
            memory_bytes: self.memory_bytes,
            ..LimitsConfig::default()
        }
    }
}

/// Selects one pipeline of a configuration file.
#[derive(clap::Args)]
struct PipelineArgs {
    /// The TOML configuration file.
    #[arg(short, long)]
    config: PathBuf,
    /// The pipeline's name; needed only when the file has more than one.
    #[arg(short, long)]
    pipeline: Option<String>,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List the dead letters: sequence, when, why, which input, which plugin.
    List {
        #[command(flatten)]
        target: PipelineArgs,
    },
    /// Show one dead letter whole: reason, coordinates, headers and payload.
    Show {
        #[command(flatten)]
        target: PipelineArgs,
        /// The dead letter's sequence in the DLQ stream (from `weir dlq list`).
        sequence: u64,
    },
    /// Re-inject dead letters into the pipeline's input (e.g. after a plugin fix), each once,
    /// and remove them from the DLQ. The pipeline then processes them as new inputs.
    Replay {
        #[command(flatten)]
        target: PipelineArgs,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "sequences")]
        all: bool,
        /// The sequences to replay (from `weir dlq list`).
        #[arg(required_unless_present = "all")]
        sequences: Vec<u64>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Each partition: who holds its lease and how fresh it is, what its last progress
    /// marker says (commits, ack floor, inputs done above it), and the consumer's backlog.
    Status {
        #[command(flatten)]
        target: PipelineArgs,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// List the state keys, each with its entry count and bytes.
    List {
        #[command(flatten)]
        target: PipelineArgs,
        /// Start after this key (as the last page printed it).
        #[arg(long, default_value = "")]
        after: String,
        /// The most keys to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one state key's entries and their values.
    Get {
        #[command(flatten)]
        target: PipelineArgs,
        /// The state key, as the pipeline's `[pipeline.state] key` reads it from an input.
        #[arg(long)]
        key: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Runs the command line of this process and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        // weir's own compiler process: no async runtime, nothing but the compilation.
        Command::CompileComponent { args } => return weir_sandbox::compile_child_main(&args),
        Command::Plugin { command } => plugin::run(command),
        Command::Run { config } => block_on(run(config)),
        Command::Check { config } => block_on(check(config)),
        Command::Dlq { command } => block_on(dlq::run(command)),
        Command::State { command } => state::run(command),
        Command::Cluster {
            command: ClusterCommand::Status { target },
        } => block_on(cluster::status(target)),
        Command::Status { admin, config } => block_on(status(admin, config)),
        Command::Replay(args) => block_on(replay::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weir: {error}");
            ExitCode::from(exit_code(&error))
        }
    }
}

/// Runs a command's future on a new async runtime.
fn block_on(command: impl Future<Output = Result<(), crate::Error>>) -> Result<(), crate::Error> {
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| crate::Error::Engine(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(command);
    // Everything a command awaits has finished. What can be left is a plugin still compiling
    // for a pipeline that was stopped before it started: not waited for (a compile bomb
    // would hold the stop up to its deadline); its compiler process dies with this one.
    runtime.shutdown_background();
    result
}

/// The process exit code for an error: 2 for a configuration, command line or plugin that
/// cannot work as written, 1 for everything else. (0 is a clean stop, 130 a second signal.)
fn exit_code(error: &crate::Error) -> u8 {
    use crate::{Error, StartError};
    match error {
        Error::Config(_) | Error::Usage(_) => 2,
        // weir's own compiler process failing is the host's trouble, not the plugin's.
        Error::Start {
            source: StartError::Plugin(weir_sandbox::LoadError::Compiler { .. }),
            ..
        } => 1,
        Error::Start {
            source: StartError::Plugin(_) | StartError::StatelessPlugin { .. },
            ..
        } => 2,
        _ => 1,
    }
}

async fn run(config_path: PathBuf) -> Result<(), crate::Error> {
    // Installed before anything else, so that a signal during start-up stops weir cleanly
    // too.
    let signals = signals(true);
    let config = crate::Config::load(&config_path)?;
    let (shutdown, reloads) = (CancellationToken::new(), crate::ReloadRequests::default());
    tokio::spawn(answer_signals(signals, shutdown.clone(), reloads.clone()));
    let report = crate::run(config, crate::own_compiler()?, shutdown, reloads).await?;
    for (pipeline, stats) in report.pipelines {
        tracing::info!(
            %pipeline,
            received = stats.received,
            executed = stats.executed,
            deduplicated = stats.deduplicated,
            dead_lettered = stats.dead_lettered,
            published = stats.published,
            acked = stats.acked,
            "stopped cleanly"
        );
    }
    Ok(())
}

async fn status(admin: String, config: Option<PathBuf>) -> Result<(), crate::Error> {
    let admin = match config {
        Some(path) => match crate::Config::load(&path)?.admin().address() {
            Some(address) => address.to_owned(),
            None => {
                return Err(crate::Error::Usage(format!(
                    "{path:?} turns the admin port off (admin.listen = \"\"): there is no status to read"
                )));
            }
        },
        None => admin,
    };
    status::run(&admin).await
}

async fn check(config_path: PathBuf) -> Result<(), crate::Error> {
    let findings = crate::check::check(&config_path).await?;
    let mut pipeline = None;
    let mut problems = 0;
    for finding in &findings {
        if finding.pipeline != pipeline {
            pipeline = finding.pipeline.clone();
            if let Some(name) = &pipeline {
                println!("pipeline {name:?}:");
            }
        }
        let (status, text) = match &finding.outcome {
            Ok(detail) => ("ok  ", detail),
            Err(problem) => {
                problems += 1;
                ("FAIL", problem)
            }
        };
        println!("  {status}  {:<14} {text}", finding.item);
    }
    match problems {
        0 => {
            println!("weir check: {config_path:?} is ready to run");
            Ok(())
        }
        n => Err(crate::Error::Checked(n)),
    }
}

impl PipelineArgs {
    /// The selected pipeline's configuration.
    fn load(&self) -> Result<crate::config::PipelineConfig, crate::Error> {
        let (_, pipeline) = self.load_valid()?;
        Ok(pipeline.config().clone())
    }

    /// The whole configuration, and the selected pipeline.
    fn load_valid(
        &self,
    ) -> Result<(crate::ValidConfig, crate::config::ValidPipeline), crate::Error> {
        let config = crate::Config::load(&self.config)?;
        let pipelines = config.pipelines();
        let names: Vec<&str> = pipelines.iter().map(|p| p.config().name.as_str()).collect();
        let found = match &self.pipeline {
            Some(name) => pipelines.iter().find(|p| &p.config().name == name),
            None if pipelines.len() == 1 => pipelines.first(),
            None => {
                return Err(crate::Error::Usage(format!(
                    "{:?} has {} pipelines: choose one with --pipeline ({})",
                    self.config,
                    names.len(),
                    names.join(", ")
                )));
            }
        };
        let found = found.cloned().ok_or_else(|| {
            crate::Error::Usage(format!(
                "{:?} has no pipeline {:?}; it has: {}",
                self.config,
                self.pipeline.as_deref().unwrap_or_default(),
                names.join(", ")
            ))
        })?;
        Ok((config, found))
    }
}

/// The handlers of the signals a command answers.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    /// `weir run`'s only: elsewhere SIGHUP keeps its default, ending the process.
    hangup: Option<tokio::signal::unix::Signal>,
}

/// SIGINT's and SIGTERM's handlers, and SIGHUP's if `hangup`, from now on; `None` (and an
/// error logged) if they cannot be installed.
fn signals(hangup: bool) -> Option<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        hangup.then(|| signal(SignalKind::hangup())).transpose(),
    ) {
        (Ok(interrupt), Ok(terminate), Ok(hangup)) => Some(Signals {
            interrupt,
            terminate,
            hangup,
        }),
        _ => {
            tracing::error!(
                "cannot install signal handlers; stop weir with SIGKILL, reload through the admin port"
            );
            None
        }
    }
}

/// Asks `reloads` for a plugin reload on each SIGHUP (when its handler is installed);
/// fires `shutdown` on the first SIGINT or SIGTERM, and exits at once on the second.
async fn answer_signals(
    signals: Option<Signals>,
    shutdown: CancellationToken,
    reloads: crate::ReloadRequests,
) {
    let Some(mut signals) = signals else {
        return;
    };
    let mut stops = 0;
    loop {
        let hangup = async {
            match &mut signals.hangup {
                Some(hangup) => hangup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hangup => {
                reloads.request();
                continue;
            }
            _ = signals.interrupt.recv() => {}
            _ = signals.terminate.recv() => {}
        }
        stops += 1;
        if stops == 1 {
            tracing::info!(
                "signal received: finishing the batch in hand, then stopping (signal again to stop at once)"
            );
            shutdown.cancel();
            continue;
        }
        // A second signal means "now": nothing is lost (unacked inputs are redelivered,
        // the outbox is re-published on start), only the batch in hand is abandoned.
        eprintln!("weir: second signal: stopping at once");
        std::process::exit(130);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
