//! `weir state`: a stateful pipeline's state, read from its store while it runs (or not),
//! for operators. Reads only: RocksDB's secondary instance takes no lock and writes nothing
//! to the store.

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
            let keys = reader.keys(&after, limit).map_err(store_error)?;
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
            let state = reader.entries(&key).map_err(store_error)?;
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

fn open(target: &PipelineArgs) -> Result<(String, StateReader), crate::Error> {
    let pipeline = target.load()?;
    let (Some(store_dir), Some(_)) = (&pipeline.store_dir, &pipeline.state) else {
        return Err(crate::Error::Usage(format!(
            "pipeline {:?} keeps no state: it has no [pipeline.state]",
            pipeline.name
        )));
    };
    let reader = StateReader::open(store_dir).map_err(store_error)?;
    Ok((pipeline.name, reader))
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
