//! `weir plugin diff`: a candidate plugin run on a range of a pipeline's recorded inputs,
//! exactly as the pipeline would run it, and what it would publish compared with what the
//! live pipeline published for each input (read back from its output and DLQ streams by
//! the inputs' output ids). Nothing is published and nothing of the pipeline's is touched:
//! the inputs are read with short-lived consumers of its own. weir-core's `diff` judges
//! each input.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use weir_core::diff::{Change, Published, StoredPart, compare};
use weir_core::input::dedup_key;
use weir_core::plugin::{Call, FailureKind};
use weir_core::ports::PluginRuntime;
use weir_core::record::PLUGIN_SHA256;
use weir_nats::{Broker, StoredInput};

use crate::Error;
use crate::config::{ValidConfig, ValidPipeline};
use crate::pipeline::{output_policy, publishable};

/// How much earlier than its first input the range's outputs are looked for.
const CLOCK_MARGIN: time::Duration = time::Duration::seconds(60);

/// Which recorded inputs to run the candidate on.
#[derive(Debug, Clone, Copy)]
pub enum DiffRange {
    /// The last this many sequences of the input stream.
    Last(u64),
    /// Stream sequences, both included.
    Sequences(u64, u64),
}

/// One input whose candidate result differs from the live one.
pub struct Difference {
    pub sequence: u64,
    pub subject: String,
    pub change: Change,
    pub live: Published,
    pub candidate: Published,
}

/// What `weir plugin diff` found.
pub struct DiffReport {
    pub pipeline: String,
    pub stream: String,
    /// The range's first and last stream sequences, and how many inputs of the pipeline
    /// it holds.
    pub first: u64,
    pub last: u64,
    pub inputs: usize,
    pub candidate_sha256: String,
    pub candidate_contract: String,
    /// The plugins the live outputs and dead letters of the range name, with how many
    /// inputs each made.
    pub live_plugins: BTreeMap<String, usize>,
    /// How many inputs compared as each change (`Same` included).
    pub changes: BTreeMap<Change, usize>,
    /// Inputs the live pipeline has not processed yet: not compared.
    pub not_yet_live: usize,
    /// With `dedup = "msg-id"`: inputs with the id of an earlier one (processed once, as
    /// that one), and inputs none of whose outputs were found (a repeat of an input before
    /// the range, or outputs the stream no longer holds): not compared.
    pub repeats: usize,
    pub not_found: usize,
    /// Every input that differs, in stream order.
    pub differences: Vec<Difference>,
}

/// Runs `candidate` on `range` of `pipeline`'s inputs and compares.
pub async fn diff(
    config: &ValidConfig,
    pipeline: &ValidPipeline,
    candidate: &Path,
    range: DiffRange,
) -> Result<DiffReport, Error> {
    let settings = pipeline.config();
    if settings.state.is_some() {
        return Err(Error::Usage(format!(
            "pipeline {:?} is stateful: its plugin's results depend on each key's state before the range, which the diff does not have",
            settings.name
        )));
    }
    let broker_error = |e| crate::replay::start_error(settings, e);
    let broker = Broker::connect(&settings.nats, &format!("weir-diff-{}", settings.name))
        .await
        .map_err(broker_error)?;
    let input = pipeline.whole_input();
    let (first, last) = match range {
        DiffRange::Sequences(first, last) => (first, last),
        DiffRange::Last(count) => {
            let last = broker.last_sequence(&input).await.map_err(broker_error)?;
            if last == 0 {
                return Err(Error::Usage(format!(
                    "stream {:?} is empty: there is nothing to compare yet",
                    input.stream
                )));
            }
            (last.saturating_sub(count.saturating_sub(1)).max(1), last)
        }
    };
    let inputs = broker
        .read_inputs(&input, first, last)
        .await
        .map_err(broker_error)?;
    if inputs.is_empty() {
        return Err(Error::Usage(format!(
            "stream {:?} holds no inputs of pipeline {:?} ({}) in sequences {first} to {last}",
            input.stream, settings.name, settings.input.subject
        )));
    }
    let keys: Vec<String> = inputs
        .iter()
        .map(|stored| dedup_key(settings.dedup, &input.stream, &stored.input))
        .collect();
    let plugin = crate::load_candidate(config, pipeline, candidate)
        .await
        .map_err(|error| match error {
            Error::Start { source, .. } => {
                Error::Usage(format!("the candidate cannot run: {source}"))
            }
            other => other,
        })?;
    let lineage = plugin.lineage();
    let partitioned = settings.partitions.is_some();
    let output_limit = broker
        .stream_message_limit(&format!("{}.probe", settings.output.prefix))
        .await
        .map_err(broker_error)?;
    let policy = output_policy(
        settings,
        partitioned,
        publishable(broker.max_payload(), output_limit),
    );
    let candidates = run(&plugin, &inputs, &keys)
        .await?
        .into_iter()
        .zip(&inputs)
        .zip(&keys)
        .map(|((outcome, stored), key)| {
            let transform = stored.input.transform_input(key);
            Published::of_outcome(&policy, &transform, &lineage, outcome)
        });
    // Outputs are stored after their inputs, by another stream, perhaps on another node
    // whose clock is a little off.
    let since = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
        inputs[0].input.published_unix_ns,
    ))
    .map_or(time::OffsetDateTime::UNIX_EPOCH, |stored| {
        stored - CLOCK_MARGIN
    });
    // Read before the outputs: an input at or below its floor has all its outputs stored
    // before the outputs are read.
    let floors = ack_floors(&broker, pipeline, &inputs).await;
    let mut live = live_messages(&broker, pipeline, &keys, since)
        .await
        .map_err(broker_error)?;
    let mut report = DiffReport {
        pipeline: settings.name.clone(),
        stream: input.stream.clone(),
        first,
        last,
        inputs: inputs.len(),
        candidate_sha256: lineage.sha256.clone(),
        candidate_contract: lineage.contract.clone(),
        live_plugins: BTreeMap::new(),
        changes: BTreeMap::new(),
        not_yet_live: 0,
        repeats: 0,
        not_found: 0,
        differences: Vec::new(),
    };
    let by_msg_id = settings.dedup == weir_core::input::DedupMode::MsgId;
    let mut seen = std::collections::HashSet::new();
    for ((stored, key), candidate) in inputs.iter().zip(&keys).zip(candidates) {
        let sequence = stored.input.stream_sequence;
        if sequence > floors.get(&stored.partition).copied().unwrap_or(0) {
            report.not_yet_live += 1;
            continue;
        }
        if !seen.insert(key) {
            report.repeats += 1;
            continue;
        }
        let parts = live.remove(key).unwrap_or_default();
        // Without outputs, an input keyed by its own sequence was transformed into none;
        // one keyed by a producer's id may have been a repeat of one before the range.
        if parts.is_empty() && by_msg_id {
            report.not_found += 1;
            continue;
        }
        if let Some(sha256) = parts.first().and_then(|part| header(part, PLUGIN_SHA256)) {
            *report.live_plugins.entry(sha256).or_default() += 1;
        }
        let live = Published::of_stored(parts);
        let change = compare(&live, &candidate);
        *report.changes.entry(change).or_default() += 1;
        if change != Change::Same {
            report.differences.push(Difference {
                sequence,
                subject: stored.input.subject.clone(),
                change,
                live,
                candidate,
            });
        }
    }
    Ok(report)
}

/// The candidate's outcome for each input, in order. An input whose headers cannot be read
/// never reaches a plugin: the pipeline dead-letters it, and so does the diff.
async fn run(
    plugin: &weir_sandbox::Plugin,
    inputs: &[StoredInput],
    keys: &[String],
) -> Result<Vec<weir_core::plugin::Outcome>, Error> {
    use weir_core::plugin::Outcome;
    let mut outcomes: Vec<Option<Outcome>> = inputs
        .iter()
        .map(|stored| {
            stored.input.unreadable_headers.as_ref().map(|unreadable| {
                let reason = format!("its header block cannot be read: {}", unreadable.reason);
                Outcome::failed(FailureKind::UnreadableInput, reason)
            })
        })
        .collect();
    let runnable: Vec<usize> = (0..inputs.len())
        .filter(|&index| outcomes[index].is_none())
        .collect();
    for chunk in runnable.chunks(256) {
        let calls = chunk
            .iter()
            .map(|&index| Call {
                input: inputs[index].input.transform_input(&keys[index]),
                state: None,
            })
            .collect();
        let results = plugin
            .run_all(calls)
            .await
            .map_err(|e| Error::Engine(format!("cannot run the candidate: {e}")))?;
        for (&index, result) in chunk.iter().zip(results) {
            outcomes[index] = Some(result.outcome);
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every input has an outcome"))
        .collect())
}

/// The messages the live pipeline published for the inputs of `keys` (outputs and dead
/// letters), by key, each with the part of its id after the key.
async fn live_messages(
    broker: &Broker,
    pipeline: &ValidPipeline,
    keys: &[String],
    since: time::OffsetDateTime,
) -> Result<HashMap<String, Vec<StoredPart>>, weir_nats::BrokerError> {
    let settings = pipeline.config();
    let outputs = format!("{}.>", settings.output.prefix);
    let dlq = settings.output.dlq_subject.clone();
    let mut reads: Vec<(String, Vec<String>)> = Vec::new();
    for subject in [outputs, dlq] {
        let probe = match subject.strip_suffix(".>") {
            Some(prefix) => format!("{prefix}.probe"),
            None => subject.clone(),
        };
        let Some(stream) = broker.stream_storing(&probe).await? else {
            continue;
        };
        match reads.iter_mut().find(|(read, _)| *read == stream) {
            // One stream storing both: one read, unless one filter covers the other.
            Some((_, subjects)) => {
                if !subjects
                    .iter()
                    .any(|covering| weir_core::subject::matches(covering, &subject))
                {
                    subjects.push(subject);
                }
            }
            None => reads.push((stream, vec![subject])),
        }
    }
    let wanted: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    let id_prefix = format!("{}:", settings.name);
    let mut live: HashMap<String, Vec<StoredPart>> = HashMap::new();
    // An output's id is `<pipeline>:<its input's key>:<part>`.
    let key_and_part = |message: &weir_nats::StoredMessage| -> Option<(String, String)> {
        let (_, id) = message
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(weir_core::headers::MSG_ID_HEADER))?;
        let (key, part) = id.strip_prefix(&id_prefix)?.rsplit_once(':')?;
        wanted
            .contains(key)
            .then(|| (key.to_owned(), part.to_owned()))
    };
    for (stream, subjects) in reads {
        let ours = |message: &weir_nats::StoredMessage| key_and_part(message).is_some();
        for message in broker.read_since(&stream, subjects, since, ours).await? {
            let (key, part) = key_and_part(&message).expect("kept for its id");
            live.entry(key).or_default().push(StoredPart {
                part,
                subject: message.subject,
                headers: message.headers,
                payload: message.payload.to_vec(),
            });
        }
    }
    Ok(live)
}

/// The live consumers' ack floors, by partition: every input at or below its partition's
/// floor has been processed by the live pipeline. A consumer that cannot be read counts as
/// having processed nothing.
async fn ack_floors(
    broker: &Broker,
    pipeline: &ValidPipeline,
    inputs: &[StoredInput],
) -> HashMap<Option<u32>, u64> {
    let mut floors = HashMap::new();
    for partition in inputs.iter().map(|stored| stored.partition) {
        if floors.contains_key(&partition) {
            continue;
        }
        let consumer = match partition {
            Some(partition) => pipeline.config().partition_input(partition),
            None => pipeline.config().input.clone(),
        };
        let floor = broker
            .consumer_state(&consumer)
            .await
            .map_or(0, |state| state.ack_floor);
        floors.insert(partition, floor);
    }
    floors
}

fn header(part: &StoredPart, name: &str) -> Option<String> {
    part.headers
        .iter()
        .find(|(header, _)| header.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.clone())
}
