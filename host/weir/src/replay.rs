//! `weir replay`: a range of a pipeline's input stream run again, through its plugin or
//! another, exactly as the pipeline runs inputs live (the data time is each input's stored
//! time), to its output prefix or another: a backfill after a fix.
//!
//! A replay run is a pipeline of its own on `weir_core::pipeline`, exactly once with a
//! store (`ValidPipeline::for_replay`): its own durable consumer (`weir-replay-<run>`,
//! starting at the range's first input), its own store and its own output ids (the run's
//! name is in each), so it never touches the live pipeline's consumer, store or ids, and a
//! run killed and started again under the same name goes on where it stopped, publishing
//! nothing twice. Its definition (the arguments, the plugin's sha256 and the range they
//! resolved to) is kept as its consumer's description: started again, a run reads its range
//! from there, and refuses other arguments under its name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use weir_nats::{Broker, ConsumerState, ReplayFrom, StreamPlace};

use crate::config::{ReplayWiring, ValidPipeline};
use crate::{Error, StartError};

/// Where a range ends: at a stream sequence, or with the last input stored at or before a
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayTo {
    Sequence(u64),
    Time(OffsetDateTime),
}

/// What to replay, as `weir replay` is asked.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub from: ReplayFrom,
    /// `None`: to the input stream's last message when the run is first started.
    pub to: Option<ReplayTo>,
    /// The plugin to run instead of the pipeline's.
    pub plugin: Option<PathBuf>,
    /// The prefix to publish under instead of the pipeline's.
    pub output_prefix: Option<String>,
    /// The stream weir creates for `output_prefix` when none stores it.
    pub output_stream: Option<String>,
    /// The run's name; by default derived from the arguments, so that the same command
    /// resumes the same run.
    pub name: Option<String>,
    /// The run's store; by default `weir-replay/<run>` beside the configuration file.
    pub store_dir: Option<PathBuf>,
}

/// A replay run's definition, as its consumer's description keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Definition {
    pipeline: String,
    from: String,
    to: String,
    plugin_sha256: String,
    output_prefix: String,
    /// The range the arguments resolved to when the run was first started.
    first: u64,
    last: u64,
}

impl Definition {
    /// Whether `other` was asked with the same arguments (its range may have resolved
    /// otherwise: the stream moves on).
    fn same_request(&self, other: &Definition) -> bool {
        (
            &self.pipeline,
            &self.from,
            &self.to,
            &self.plugin_sha256,
            &self.output_prefix,
        ) == (
            &other.pipeline,
            &other.from,
            &other.to,
            &other.plugin_sha256,
            &other.output_prefix,
        )
    }
}

/// A replay run ready to start: its name, range and wiring.
pub struct ReplayPlan {
    pub run: String,
    /// The replay run as a pipeline.
    pub pipeline: ValidPipeline,
    /// The range's first input (`None`: it has none), and its last stream sequence.
    pub first: Option<StreamPlace>,
    pub last: u64,
    /// When the stream stored the message at `last`, if it has one.
    pub last_stored: Option<OffsetDateTime>,
    /// How many inputs the range holds.
    pub inputs: u64,
    /// The run was started before, and goes on.
    pub resumed: bool,
    pub store_dir: PathBuf,
    pub plugin: PathBuf,
    pub plugin_sha256: String,
    pub output_prefix: String,
}

/// Works out replay run `request` of `pipeline` (whose configuration file is in
/// `config_dir`): its name, its range (read from its consumer when it was started before)
/// and its wiring. Changes nothing on the server.
pub async fn plan(
    pipeline: &ValidPipeline,
    config_dir: &Path,
    request: &ReplayRequest,
) -> Result<ReplayPlan, Error> {
    let config = pipeline.config();
    if config.state.is_some() {
        return Err(Error::Usage(format!(
            "pipeline {:?} is stateful: a replay would start each key's state empty in the middle of its history, so weir does not replay stateful pipelines",
            config.name
        )));
    }
    let plugin = match &request.plugin {
        Some(path) => path.clone(),
        None => config.plugin.clone(),
    };
    let bytes = std::fs::read(&plugin)
        .map_err(|e| Error::Usage(format!("cannot read plugin {plugin:?}: {e}")))?;
    let plugin_sha256 = weir_core::plugin::sha256_hex(&bytes);
    let output_prefix = request
        .output_prefix
        .clone()
        .unwrap_or_else(|| config.output.prefix.clone());
    let mut definition = Definition {
        pipeline: config.name.clone(),
        from: match request.from {
            ReplayFrom::Sequence(sequence) => format!("seq:{sequence}"),
            ReplayFrom::Time(time) => format!("time:{}", rfc3339(time)),
        },
        to: match request.to {
            Some(ReplayTo::Sequence(sequence)) => format!("seq:{sequence}"),
            Some(ReplayTo::Time(time)) => format!("time:{}", rfc3339(time)),
            None => "end".to_owned(),
        },
        plugin_sha256: plugin_sha256.clone(),
        output_prefix: output_prefix.clone(),
        first: 0,
        last: 0,
    };
    let run = match &request.name {
        Some(name) => valid_run_name(name)?,
        None => derived_run_name(&definition),
    };
    let store_dir = request
        .store_dir
        .clone()
        .unwrap_or_else(|| config_dir.join("weir-replay").join(&run));
    let wiring = |first: u64, description: String| ReplayWiring {
        run: run.clone(),
        plugin: plugin.clone(),
        prefix: output_prefix.clone(),
        output_stream: request.output_stream.clone(),
        store_dir: store_dir.clone(),
        first,
        description,
    };
    let input = pipeline
        .for_replay(wiring(1, String::new()))
        .config()
        .input
        .clone();
    let broker_error = |e| start_error(config, e);
    let broker = Broker::connect(&config.nats, &format!("weir-replay-{run}"))
        .await
        .map_err(broker_error)?;
    let probe = format!("{output_prefix}.probe");
    let stored = broker.stream_storing(&probe).await.map_err(broker_error)?;
    if stored.is_none() && request.output_stream.is_none() {
        return Err(Error::Usage(format!(
            "no stream stores {output_prefix}.>: create one, or name one for weir to create with --output-stream"
        )));
    }
    let resumed = match broker
        .consumer_description(&input)
        .await
        .map_err(broker_error)?
    {
        None => false,
        Some(description) => {
            let earlier: Option<Definition> = description
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok());
            match earlier {
                Some(earlier) if earlier.same_request(&definition) => {
                    definition = earlier;
                    true
                }
                Some(earlier) => {
                    return Err(Error::Usage(format!(
                        "replay run {run:?} exists, from {} to {} with plugin sha256 {} to prefix {:?}: give the same arguments to resume it, or another --name",
                        earlier.from, earlier.to, earlier.plugin_sha256, earlier.output_prefix
                    )));
                }
                None => {
                    return Err(Error::Usage(format!(
                        "consumer {:?} on stream {:?} is not a replay run's: give another --name",
                        input.consumer, input.stream
                    )));
                }
            }
        }
    };
    if !resumed {
        definition.last = match request.to {
            Some(ReplayTo::Sequence(sequence)) => sequence,
            Some(ReplayTo::Time(time)) => {
                let after = time + time::Duration::nanoseconds(1);
                match broker
                    .first_from(&input, ReplayFrom::Time(after))
                    .await
                    .map_err(broker_error)?
                {
                    (Some(next), _) => next.sequence - 1,
                    (None, _) => broker.last_sequence(&input).await.map_err(broker_error)?,
                }
            }
            None => broker.last_sequence(&input).await.map_err(broker_error)?,
        };
    }
    let from = match resumed {
        true => ReplayFrom::Sequence(definition.first),
        false => request.from,
    };
    // Past the range first, so that inputs arriving meanwhile cannot make the count short.
    let (_, past) = broker
        .first_from(&input, ReplayFrom::Sequence(definition.last + 1))
        .await
        .map_err(broker_error)?;
    let (first, from_first) = broker
        .first_from(&input, from)
        .await
        .map_err(broker_error)?;
    let first = first.filter(|first| first.sequence <= definition.last);
    if !resumed {
        definition.first = first.map_or(definition.last + 1, |first| first.sequence);
    }
    let last_stored = match definition.last {
        0 => None,
        last => broker.stored_at(&input, last).await.map_err(broker_error)?,
    };
    let description = serde_json::to_string(&definition).expect("a definition serializes");
    Ok(ReplayPlan {
        pipeline: pipeline.for_replay(wiring(definition.first, description)),
        run,
        first,
        last: definition.last,
        last_stored,
        inputs: match first {
            Some(_) => from_first.saturating_sub(past),
            None => 0,
        },
        resumed,
        store_dir,
        plugin,
        plugin_sha256,
        output_prefix,
    })
}

/// What a replay run did.
#[derive(Debug, Clone)]
pub struct ReplaySummary {
    /// Every input of the range is done (false: stopped by a signal first).
    pub complete: bool,
    pub stats: crate::StatsSnapshot,
    pub dead_letters: Vec<(&'static str, u64)>,
}

/// Runs `plan` on `compiler`'s sandbox until its range is done or `shutdown` fires;
/// `progress` hears where the run's consumer is, every fifth of a second.
pub async fn run(
    config: &crate::ValidConfig,
    plan: ReplayPlan,
    compiler: crate::Compiler,
    shutdown: CancellationToken,
    progress: impl Fn(ConsumerState) + Send,
) -> Result<ReplaySummary, Error> {
    let sandbox =
        weir_sandbox::Sandbox::new(config.sandbox(), config.largest_memory_limit(), compiler)
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
    let sandbox = Arc::new(sandbox);
    let name = plan.pipeline.config().name.clone();
    let metrics = weir_core::metrics::Metrics::default();
    let watched = Arc::new(weir_admin::Watched::new(
        name.clone(),
        Some(plan.store_dir.display().to_string()),
        metrics.pipeline(&name),
    ));
    let threads = config.sandbox().threads;
    let started = tokio::select! {
        started = crate::pipeline::Pipeline::start(plan.pipeline, 0, &sandbox, threads, &watched, None) => started?,
        () = shutdown.cancelled() => {
            return Ok(ReplaySummary {
                complete: false,
                stats: watched.metrics.snapshot(),
                dead_letters: Vec::new(),
            });
        }
    };
    let complete = started.run_until(plan.last, shutdown, progress).await?;
    Ok(ReplaySummary {
        complete,
        stats: watched.metrics.snapshot(),
        dead_letters: watched.metrics.dead_letters_by_kind(),
    })
}

pub(crate) fn start_error(
    config: &crate::config::PipelineConfig,
    error: weir_nats::BrokerError,
) -> Error {
    Error::Start {
        pipeline: config.name.clone(),
        source: StartError::Broker(error),
    }
}

/// A run's name from its arguments: the same command names the same run.
fn derived_run_name(definition: &Definition) -> String {
    let arguments = format!(
        "{}\n{}\n{}\n{}\n{}",
        definition.pipeline,
        definition.from,
        definition.to,
        definition.plugin_sha256,
        definition.output_prefix
    );
    let pipeline: String = definition
        .pipeline
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                true => c,
                false => '-',
            },
        )
        .take(32)
        .collect();
    let hash = weir_core::plugin::sha256_hex(arguments.as_bytes());
    format!("{pipeline}-{}", &hash[..12])
}

/// `name`, if it can name a run (and its consumer).
fn valid_run_name(name: &str) -> Result<String, Error> {
    let valid = !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    match valid {
        true => Ok(name.to_owned()),
        false => Err(Error::Usage(format!(
            "--name {name:?}: a run's name is 1 to 48 letters, digits, '-' and '_'"
        ))),
    }
}

/// `time` as RFC 3339.
pub fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339)
        .unwrap_or_else(|_| time.unix_timestamp().to_string())
}

/// An RFC 3339 time given on the command line.
pub fn parse_rfc3339(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time (like 2026-12-07T08:00:00Z): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> Definition {
        Definition {
            pipeline: "orders".into(),
            from: "seq:10".into(),
            to: "end".into(),
            plugin_sha256: "ab".into(),
            output_prefix: "fixed".into(),
            first: 10,
            last: 99,
        }
    }

    #[test]
    fn a_run_is_named_by_its_arguments_alone() {
        let a = definition();
        let resolved_otherwise = Definition {
            last: 120,
            ..definition()
        };
        assert_eq!(derived_run_name(&a), derived_run_name(&resolved_otherwise));
        assert!(a.same_request(&resolved_otherwise));
        let other_plugin = Definition {
            plugin_sha256: "cd".into(),
            ..definition()
        };
        assert_ne!(derived_run_name(&a), derived_run_name(&other_plugin));
        assert!(!a.same_request(&other_plugin));
        assert!(derived_run_name(&a).starts_with("orders-"));
        assert!(valid_run_name(&derived_run_name(&a)).is_ok());
    }

    #[test]
    fn a_run_name_is_refused_unless_it_can_name_a_consumer() {
        assert!(valid_run_name("fix-2026_12").is_ok());
        for bad in ["", "a.b", "a b", "a*", &"x".repeat(49)] {
            assert!(valid_run_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_are_read_and_written_as_rfc3339() {
        let time = parse_rfc3339("2026-12-07T08:00:00Z").unwrap();
        assert_eq!(rfc3339(time), "2026-12-07T08:00:00Z");
        assert!(parse_rfc3339("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
