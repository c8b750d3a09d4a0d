//! What a plugin runtime is given and gives back: the vocabulary of the plugin port.
//!
//! The sandbox adapter turns wasm calls into these values; the core never sees wasm.

use sha2::{Digest, Sha256};

use crate::state::{StateChanges, StateView};

/// One input, as the plugin sees it.
#[derive(Debug, Clone)]
pub struct TransformInput {
    pub subject: String,
    /// Sorted by name, so that the plugin's view does not depend on hash order.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub stream_sequence: u64,
    pub data_time_unix_ns: u64,
    pub dedup_key: String,
    pub seed: u64,
}

impl TransformInput {
    /// The plugin's seed for an input: the first 8 bytes of the dedup key's sha256, so the
    /// same input always gets the same seed.
    pub fn seed_for(dedup_key: &str) -> u64 {
        let digest = Sha256::digest(dedup_key.as_bytes());
        u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
    }
}

/// One output a plugin asked for, before the output policy maps it onto a real subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginOutput {
    /// Relative to the pipeline's output prefix.
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// Why a plugin call produced no outputs. Every kind is deterministic except `Deadline`,
/// which is a wall-clock backstop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin said the input is invalid.
    InvalidInput,
    /// The plugin said it failed.
    PluginFailed,
    /// The plugin trapped (a panic, an unreachable, a bad memory access).
    Trap,
    /// The plugin ran out of fuel.
    FuelExhausted,
    /// The plugin ran past the wall-clock deadline.
    Deadline,
    /// The plugin asked for more memory than the limit.
    MemoryLimit,
    /// The plugin recursed past the stack limit.
    StackOverflow,
    /// The plugin produced outputs the output policy refuses (too many, too large, a subject
    /// or header NATS or weir would not accept), or the server refused one.
    OutputRejected,
    /// The input's header block could not be read as headers (invalid UTF-8, a line without
    /// a colon, a bad header name): the plugin never saw it.
    UnreadableInput,
    /// The plugin wrote more state than `[pipeline.state]` allows (an entry or a key too
    /// large): the call ended there, and none of its changes applied.
    StateLimit,
}

impl FailureKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [FailureKind; 10] = [
        FailureKind::InvalidInput,
        FailureKind::PluginFailed,
        FailureKind::Trap,
        FailureKind::FuelExhausted,
        FailureKind::Deadline,
        FailureKind::MemoryLimit,
        FailureKind::StackOverflow,
        FailureKind::OutputRejected,
        FailureKind::UnreadableInput,
        FailureKind::StateLimit,
    ];

    /// The stable name used in DLQ headers, fixtures and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::InvalidInput => "invalid-input",
            FailureKind::PluginFailed => "plugin-failed",
            FailureKind::Trap => "trap",
            FailureKind::FuelExhausted => "fuel-exhausted",
            FailureKind::Deadline => "deadline",
            FailureKind::MemoryLimit => "memory-limit",
            FailureKind::StackOverflow => "stack-overflow",
            FailureKind::OutputRejected => "output-rejected",
            FailureKind::UnreadableInput => "unreadable-input",
            FailureKind::StateLimit => "state-limit",
        }
    }

    /// The kind named `name`, as `as_str` spells it.
    pub fn parse(name: &str) -> Option<FailureKind> {
        FailureKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

/// What one plugin call cost, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCost {
    /// Fuel used: about one unit per wasm instruction.
    pub fuel: u64,
    /// Wall-clock time, instantiation included.
    pub elapsed: std::time::Duration,
}

/// One plugin call: an input and, in a stateful pipeline, its key's state as the inputs
/// before it left it.
#[derive(Debug, Clone)]
pub struct Call {
    pub input: TransformInput,
    pub state: Option<StateView>,
}

impl Call {
    /// A call of a pipeline without state.
    pub fn stateless(input: TransformInput) -> Call {
        Call { input, state: None }
    }
}

/// What one plugin call gave back: its outcome, its cost, and the changes it made to its
/// key's state (which apply only if the input is transformed).
#[derive(Debug)]
pub struct CallResult {
    pub outcome: Outcome,
    pub cost: CallCost,
    pub changes: StateChanges,
}

/// The result of running one input through a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Outputs(Vec<PluginOutput>),
    Failed { kind: FailureKind, reason: String },
}

impl Outcome {
    pub fn failed(kind: FailureKind, reason: impl Into<String>) -> Outcome {
        Outcome::Failed {
            kind,
            reason: reason.into(),
        }
    }
}

/// How many of the sandbox's `threads` one of `pipelines` pipelines may run plugin calls
/// on at once: all but one for each other pipeline (at least one), so that a slow or
/// hostile plugin, busy on every thread it may take, always leaves a thread for every other
/// pipeline. One pipeline alone gets them all.
pub fn thread_share(threads: usize, pipelines: usize) -> usize {
    threads.saturating_sub(pipelines.saturating_sub(1)).max(1)
}

/// The hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(FailureKind::parse("Trap"), None);
    }

    #[test]
    fn a_pipeline_s_thread_share_leaves_a_thread_for_every_other_pipeline() {
        assert_eq!(thread_share(4, 1), 4);
        assert_eq!(thread_share(4, 2), 3);
        assert_eq!(thread_share(4, 4), 1);
        assert_eq!(thread_share(2, 2), 1);
        assert_eq!(
            thread_share(2, 5),
            1,
            "fewer threads than pipelines: one each, in turns"
        );
    }

    #[test]
    fn sha256_hex_is_lowercase_hex_of_the_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
