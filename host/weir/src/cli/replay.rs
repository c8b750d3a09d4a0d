//! `weir replay`: the command line of `crate::replay`, with a progress bar on a terminal
//! (plain progress lines otherwise) and a summary at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;
use weir_nats::{ConsumerState, ReplayFrom};

use crate::replay::{self, ReplayPlan, ReplayRequest, ReplayTo, parse_rfc3339, rfc3339};

use super::PipelineArgs;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["from_seq", "from_time"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    target: PipelineArgs,
    /// The range's first stream sequence.
    #[arg(long, value_name = "SEQ")]
    from_seq: Option<u64>,
    /// The range starts with the first input stored at or after this time (RFC 3339, like
    /// 2026-12-07T08:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_rfc3339)]
    from_time: Option<time::OffsetDateTime>,
    /// The range's last stream sequence (by default the stream's last when the run is first
    /// started).
    #[arg(long, value_name = "SEQ", conflicts_with = "to_time")]
    to_seq: Option<u64>,
    /// The range ends with the last input stored at or before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_rfc3339)]
    to_time: Option<time::OffsetDateTime>,
    /// Run this plugin component instead of the pipeline's.
    #[arg(long, value_name = "FILE")]
    plugin: Option<std::path::PathBuf>,
    /// Publish under this prefix instead of the pipeline's.
    #[arg(long, value_name = "PREFIX")]
    output_prefix: Option<String>,
    /// The stream for weir to create for --output-prefix when none stores it.
    #[arg(long, value_name = "STREAM", requires = "output_prefix")]
    output_stream: Option<String>,
    /// The run's name (letters, digits, '-' and '_'); by default one derived from the
    /// arguments, so that the same command goes on with the same run.
    #[arg(long, value_name = "RUN")]
    name: Option<String>,
    /// The run's store (by default weir-replay/<run> beside the configuration file).
    #[arg(long, value_name = "DIR")]
    store_dir: Option<std::path::PathBuf>,
    /// Say where the range starts and ends and how many inputs it holds; run nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(args: ReplayArgs) -> Result<(), crate::Error> {
    let signals = super::signals(false);
    let (config, pipeline) = args.target.load_valid()?;
    let config_dir = args
        .target
        .config
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_owned();
    let request = ReplayRequest {
        from: match (args.from_seq, args.from_time) {
            (Some(sequence), _) => ReplayFrom::Sequence(sequence),
            (None, Some(time)) => ReplayFrom::Time(time),
            (None, None) => {
                return Err(crate::Error::Usage(
                    "give --from-seq or --from-time".to_owned(),
                ));
            }
        },
        to: match (args.to_seq, args.to_time) {
            (Some(sequence), _) => Some(ReplayTo::Sequence(sequence)),
            (None, Some(time)) => Some(ReplayTo::Time(time)),
            (None, None) => None,
        },
        plugin: args.plugin,
        output_prefix: args.output_prefix,
        output_stream: args.output_stream,
        name: args.name,
        store_dir: args.store_dir,
    };
    let plan = replay::plan(&pipeline, &config_dir, &request).await?;
    describe(&plan);
    if args.dry_run {
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(super::answer_signals(
        signals,
        shutdown.clone(),
        crate::ReloadRequests::default(),
    ));
    let (run, first, last) = (plan.run.clone(), plan.first, plan.last);
    let first = first.map_or(last + 1, |first| first.sequence);
    let shown = Progress::new(first, last);
    let started = Instant::now();
    let summary = replay::run(&config, plan, crate::own_compiler()?, shutdown, |now| {
        shown.update(now)
    })
    .await?;
    shown.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let stats = summary.stats;
    let dead_letters: Vec<String> = summary
        .dead_letters
        .iter()
        .filter(|(_, count)| *count > 0)
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    println!(
        "replay {run}: {}: {} inputs run ({} found done by an earlier start of the run), {} outputs published, dead letters: {}, in {elapsed:.1} s ({:.0} inputs/s)",
        if summary.complete {
            "complete"
        } else {
            "stopped before the end of its range; the same command goes on"
        },
        stats.executed,
        stats.deduplicated,
        stats.published,
        match dead_letters.is_empty() {
            true => "none".to_owned(),
            false => dead_letters.join(", "),
        },
        stats.executed as f64 / elapsed.max(0.001),
    );
    Ok(())
}

/// The plan, before anything runs.
fn describe(plan: &ReplayPlan) {
    println!(
        "replay {} ({}): pipeline {:?}",
        plan.run,
        if plan.resumed {
            "going on where it stopped"
        } else {
            "new"
        },
        plan.pipeline.config().name
    );
    match plan.first {
        Some(first) => println!(
            "  range: stream sequence {} (stored {}) to {}{}: {} inputs",
            first.sequence,
            rfc3339(first.stored),
            plan.last,
            plan.last_stored
                .map(|stored| format!(" (stored {})", rfc3339(stored)))
                .unwrap_or_default(),
            plan.inputs
        ),
        None => println!(
            "  range: no input from the start asked up to stream sequence {}",
            plan.last
        ),
    }
    println!(
        "  plugin: {} (sha256 {})",
        plan.plugin.display(),
        plan.plugin_sha256
    );
    println!("  outputs under: {}", plan.output_prefix);
    println!("  store: {}", plan.store_dir.display());
}

/// How far the run is, by stream sequence: a bar on a terminal, a line every 5 s otherwise.
struct Progress {
    first: u64,
    last: u64,
    bar: Option<ProgressBar>,
    last_line: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(first: u64, last: u64) -> Progress {
        let length = (last + 1).saturating_sub(first);
        let bar = std::io::stderr().is_terminal().then(|| {
            ProgressBar::new(length).with_style(
                ProgressStyle::with_template(
                    "replaying {bar:40} {pos}/{len} stream sequences ({per_sec}, {eta} left)",
                )
                .expect("the template is valid"),
            )
        });
        Progress {
            first,
            last,
            bar,
            last_line: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn update(&self, now: ConsumerState) {
        let done = now
            .ack_floor
            .min(self.last)
            .saturating_sub(self.first.saturating_sub(1));
        let length = (self.last + 1).saturating_sub(self.first);
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let mut last_line = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
                if last_line.elapsed() >= Duration::from_secs(5) {
                    *last_line = Instant::now();
                    println!(
                        "replaying: {done} of {length} stream sequences done ({:.0} %)",
                        100.0 * done as f64 / length.max(1) as f64
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
