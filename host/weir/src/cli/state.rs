//! `weir state`: a stateful pipeline's state, read from its store while it runs (or not),
//! for operators. Reads only: RocksDB's secondary instance takes no lock and writes nothing
//! to the store. A partitioned pipeline's state is read from its output stream, where each
//! key's last state message is its state.

use weir_core::ports::Ledger;
use weir_core::state::KeyState;
use weir_nats::Broker;
use weir_store::StateReader;

use super::{PipelineArgs, StateCommand};

/// The most of a value `get` shows; the rest is counted.
const SHOWN_VALUE: usize = 1024;

pub fn run(command: StateCommand) -> Result<(), crate::Error> {
    match command {
        StateCommand::List {
            target,
            after,
            limit,
        } => {
            let (name, reader) = open(&target)?;
            let keys = reader.keys(&after, limit)?;
            println!("{} state keys of pipeline {name:?}", keys.len());
            if !keys.is_empty() {
                println!("{:>8}  {:>10}  KEY", "ENTRIES", "BYTES");
            }
            for (key, entries, bytes) in &keys {
                println!("{entries:>8}  {bytes:>10}  {}", shown_text(key));
            }
            if keys.len() == limit
                && let Some((last, _, _)) = keys.last()
            {
                println!("(more may follow: --after {})", shown_text(last));
            }
            Ok(())
        }
        StateCommand::Get { target, key } => {
            let (name, reader) = open(&target)?;
            let state = reader.entries(&key)?;
            println!(
                "state key {} of pipeline {name:?}: {} entries, {} bytes",
                shown_text(&key),
                state.entries().len(),
                state.bytes()
            );
            for (entry, value) in state.entries() {
                println!("  {} = {}", shown_text(entry), shown_value(value));
            }
            Ok(())
        }
    }
}

/// Where a pipeline's state is read from.
enum States {
    Store(StateReader),
    /// A partitioned pipeline's output stream (boxed: a runtime and a client are large).
    Stream(Box<StreamStates>),
}

/// A partitioned pipeline's output stream, its state subjects' prefix, and a runtime for
/// the client.
struct StreamStates {
    runtime: tokio::runtime::Runtime,
    broker: Broker,
    stream: String,
    subjects: String,
}

impl States {
    /// Up to `limit` keys after `after`, in order, each with its entries and bytes.
    fn keys(&self, after: &str, limit: usize) -> Result<Vec<(String, usize, usize)>, crate::Error> {
        match self {
            States::Store(reader) => reader.keys(after, limit).map_err(store_error),
            States::Stream(states) => states.runtime.block_on(states.keys(after, limit)),
        }
    }

    fn entries(&self, key: &str) -> Result<KeyState, crate::Error> {
        match self {
            States::Store(reader) => reader.entries(key).map_err(store_error),
            States::Stream(states) => states.runtime.block_on(states.entries(key)),
        }
    }
}

impl StreamStates {
    /// The keys with a state subject in the stream, as [`States::keys`].
    async fn keys(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, usize, usize)>, crate::Error> {
        let filter = format!("{}.>", self.subjects);
        let listed = self
            .broker
            .subjects(&self.stream, &filter)
            .await
            .map_err(engine)?;
        let mut keys: Vec<String> = listed
            .iter()
            .filter_map(|subject| weir_core::fence::state_key(&self.subjects, subject))
            .filter(|key| key.as_str() > after)
            .collect();
        keys.sort_unstable();
        keys.truncate(limit);
        let mut shown = Vec::with_capacity(keys.len());
        for key in keys {
            let state = self.entries(&key).await?;
            shown.push((key, state.entries().len(), state.bytes()));
        }
        Ok(shown)
    }

    /// A key's last state message, decoded (none: no entries).
    async fn entries(&self, key: &str) -> Result<KeyState, crate::Error> {
        let subject = weir_core::fence::state_subject(&self.subjects, key);
        let stored = self
            .broker
            .ledger(&self.stream)
            .last_marker(&subject)
            .await
            .map_err(engine)?;
        match stored {
            None => Ok(KeyState::default()),
            Some(stored) => KeyState::decode(&stored.payload).map_err(|error| {
                crate::Error::Engine(format!(
                    "the state message at sequence {} of stream {:?} cannot be read: {error}",
                    stored.sequence, self.stream
                ))
            }),
        }
    }
}

fn open(target: &PipelineArgs) -> Result<(String, States), crate::Error> {
    let pipeline = target.load()?;
    if pipeline.state.is_none() {
        return Err(crate::Error::Usage(format!(
            "pipeline {:?} keeps no state: it has no [pipeline.state]",
            pipeline.name
        )));
    }
    if let Some(store_dir) = &pipeline.store_dir {
        let reader = StateReader::open(store_dir).map_err(store_error)?;
        return Ok((pipeline.name, States::Store(reader)));
    }
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| crate::Error::Engine(format!("cannot start the async runtime: {e}")))?;
    let (broker, stream) = runtime.block_on(async {
        let broker = Broker::connect(&pipeline.nats, &format!("weir-state-{}", pipeline.name))
            .await
            .map_err(engine)?;
        let stream = broker
            .existing_ledger(&pipeline.output, &pipeline.marker_subjects())
            .await
            .map_err(engine)?;
        Ok::<_, crate::Error>((broker, stream))
    })?;
    let Some(stream) = stream else {
        return Err(crate::Error::Engine(format!(
            "no stream holds the commits of pipeline {:?} yet: it has not run",
            pipeline.name
        )));
    };
    Ok((
        pipeline.name.clone(),
        States::Stream(Box::new(StreamStates {
            runtime,
            broker,
            stream,
            subjects: pipeline.state_subjects(),
        })),
    ))
}

fn engine(error: impl std::fmt::Display) -> crate::Error {
    crate::Error::Engine(error.to_string())
}

fn store_error(error: weir_store::StoreError) -> crate::Error {
    crate::Error::Engine(error.to_string())
}

/// A key or entry name as a terminal shows it: quoted, control characters escaped.
fn shown_text(text: &str) -> String {
    format!("{:?}", weir_core::text::escaped(text, SHOWN_VALUE))
}

/// A value: as text when it is UTF-8, else as hex; at most `SHOWN_VALUE` bytes of it.
fn shown_value(value: &[u8]) -> String {
    let shown = &value[..value.len().min(SHOWN_VALUE)];
    let rest = if value.len() > SHOWN_VALUE {
        format!(" … ({} bytes)", value.len())
    } else {
        String::new()
    };
    match std::str::from_utf8(shown) {
        Ok(text) => format!("{}{rest}", shown_text(text)),
        Err(_) => {
            let hex: String = shown.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("0x{hex}{rest}")
        }
    }
}
