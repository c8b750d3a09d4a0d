//! The `weir` command line. Exit codes: 0 after a clean stop, 2 for a configuration or
//! plugin that cannot work as written, 1 for any other failure (server, store, engine).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

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
    /// Run the pipelines of a configuration file until SIGINT or SIGTERM.
    Run {
        /// The TOML configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("weir: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Run { config } => runtime.block_on(run(config)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weir: {error}");
            ExitCode::from(error.exit_code() as u8)
        }
    }
}

async fn run(config_path: PathBuf) -> Result<(), weir::Error> {
    let config = weir::Config::load(&config_path)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let report = weir::run(config, shutdown).await?;
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

/// Fires `shutdown` on the first SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers; stop weir with SIGKILL");
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("signal received: finishing the batch in hand, then stopping");
    shutdown.cancel();
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
