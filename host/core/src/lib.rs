//! weir-core: every decision of weir's message path, and the exactly-once invariant
//! (written once, in [`pipeline`], next to the code that keeps it).
//!
//! The path runs over ports ([`ports`]): a source of input batches, a publisher, a dedup
//! store, a plugin runtime and a probe. The adapters implement them; in-memory fakes do in
//! this crate's tests, where every crash window and fault is a unit test. It owns what an
//! input's identity is ([`input::dedup_key`]), what a plugin's outputs become
//! ([`policy::OutputPolicy`], used alike by the pipeline and `weir plugin test`), what a dead
//! letter says ([`dead_letter`], built and parsed by the same code), what the store records
//! per input ([`record`]), NATS subject and header syntax, how transient faults are
//! retried, and what a pipeline counts ([`metrics`]) and where it is ([`status`]) for the
//! operator's admin port.
//!
//! **Boundary:** weir-core does not depend on wasmtime, rocksdb, async-nats or an HTTP
//! framework (`.ci/check-crate-graph` fails the build if it does). The adapters
//! (weir-sandbox, weir-store, weir-nats) import those and speak to the core in its types.

pub mod dead_letter;
pub mod diff;
#[cfg(test)]
mod fakes;
pub mod fence;
#[cfg(test)]
mod fence_tests;
pub mod headers;
pub mod input;
pub mod lease;
#[cfg(test)]
mod lease_tests;
pub mod metrics;
pub mod pipeline;
#[cfg(test)]
mod pipeline_tests;
pub mod plugin;
pub mod policy;
pub mod ports;
pub mod record;
pub mod retry;
pub mod spread;
pub mod state;
pub mod status;
pub mod subject;
pub mod text;
pub mod trace;

use serde::Deserialize;

/// The delivery guarantee of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every input's outputs are committed to the store before they are published, and a
    /// committed input never runs again.
    #[default]
    ExactlyOnce,
    /// No store: outputs carry deterministic ids, so only JetStream's duplicate window
    /// stands between a redelivery and a duplicate.
    AtLeastOnce,
}
