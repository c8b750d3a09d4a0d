//! The ports: what the core needs from the world, as small traits. The adapters implement
//! them (weir's NATS side, RocksDB store and wasm sandbox); `fakes` implements them in
//! memory, so that every crash window and fault is a unit test of the core.

use std::future::Future;

use crate::input::Input;
use crate::plugin::{Call, CallResult};
use crate::record::{DoneRecord, Lineage, OutboundMessage};
use crate::state::{KeyState, StateChanges};

/// A failure of an adapter, and whether retrying may heal it.
pub trait Fault: std::error::Error + Send + Sync + 'static {
    /// True for what passes (a server away, a full disk, a timeout); false for what retrying
    /// cannot heal (a corrupt record, a bug), which stops the pipeline.
    fn is_transient(&self) -> bool;
}

/// One delivered input, and how to settle it with the server.
pub trait Delivery: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    fn input(&self) -> &Input;
    /// Acknowledges it and waits for the server to confirm (a double ack).
    fn ack(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Acknowledges it without waiting for the server (a plain ack).
    fn ack_unconfirmed(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Tells the server it is still being worked on, so that it is not redelivered.
    fn progress(&self) -> impl Future<Output = ()> + Send;
    /// Hands it back unsettled (a nak), for the server to redeliver at once rather than
    /// after `ack_wait`: the pipeline stops before it is done with it. Best effort: a hand
    /// back that fails leaves it to `ack_wait`. True if it was handed back.
    fn hand_back(&self) -> impl Future<Output = bool> + Send;
}

/// Where inputs come from: the durable consumer.
pub trait Source: Send {
    type Delivery: Delivery;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The next batch: waits for a first input, then takes what arrives within the batch
    /// wait. Cancel-safe: what a dropped future had received is kept for the next call (or
    /// `stop`). An error is transient: the core
    /// waits and asks again.
    fn next_batch(
        &mut self,
    ) -> impl Future<Output = Result<Vec<Self::Delivery>, Self::Error>> + Send;
    /// Makes sure the source is consuming (pulling afresh after a failure), without
    /// waiting for an input: `Ok` once it is, which tells a source that failed and
    /// recovered from one that is still failing, however long no input arrives. An error
    /// is transient.
    fn ready(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The consumer's ack floor, as the server reports it now: every input at or below this
    /// stream sequence is acknowledged. An error is transient. A partitioned pipeline's
    /// progress markers carry it ([`crate::fence`]).
    fn ack_floor(&mut self) -> impl Future<Output = Result<u64, Self::Error>> + Send;
    /// Stops consuming and hands back (as [`Delivery::hand_back`] does) every input delivered
    /// to this source that no batch returned: those of a batch cancelled in the making, and
    /// those received ahead. Returns within seconds, even when the server is away, with
    /// how many it handed back.
    fn stop(&mut self) -> impl Future<Output = usize> + Send;
}

/// Why the server did not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// It refuses this message for what it is, and would on every retry.
    #[error("refused for good: {0}")]
    Refused(String),
    /// Anything else (no connection, no stream yet, a timeout): retry later.
    #[error("{0}")]
    Failed(String),
}

/// Where outputs and dead letters go.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes every message and waits until the server has answered each: per message,
    /// in order, `Ok` once the server has it (a duplicate counts), or why not. A failed
    /// message does not stop the others.
    fn publish_each(
        &self,
        messages: &[&OutboundMessage],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send;
}

/// A marker as the server stores it: its stream sequence and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMarker {
    pub sequence: u64,
    pub payload: Vec<u8>,
}

/// Why an atomic commit did not go through (as far as this host knows).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The marker it was chained on is no longer the subject's last message: nothing of the
    /// batch was stored. Another owner committed, or an earlier try of this very batch did.
    #[error("the progress marker it was chained on is no longer the last: {0}")]
    ChainMoved(String),
    /// The server refuses a message of it for what it is, and would on every retry; nothing
    /// of the batch was stored.
    #[error("refused for good: {0}")]
    Refused(String),
    /// Anything else (no connection, a timeout): it may or may not have been stored.
    #[error("{0}")]
    Failed(String),
}

/// The output stream as a partitioned pipeline's ledger: atomic batches of messages that
/// end with a progress marker chained on the one before ([`crate::fence`]).
pub trait Ledger: Send + Sync + 'static {
    /// The last message on `subject` of the output stream, read from its leader; `None` if
    /// there is none. An error is transient.
    fn last_marker(
        &self,
        subject: &str,
    ) -> impl Future<Output = Result<Option<StoredMarker>, PublishError>> + Send;
    /// Stores `messages` and then `marker` as one atomic batch, only if the last message on
    /// the marker's subject is still the one at `after` (0: there is none). Returns the
    /// marker's stream sequence.
    fn commit_atomically(
        &self,
        messages: &[&OutboundMessage],
        marker: &OutboundMessage,
        after: u64,
    ) -> impl Future<Output = Result<u64, CommitError>> + Send;
}

/// A partition's lease as the server keeps it ([`crate::lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The run that holds it; `None` when none does (never taken, released, expired).
    pub holder: Option<String>,
    /// The key's last revision (0: never written), which a take or a renewal names.
    pub revision: u64,
}

/// Why a lease was not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The key's last revision is not the one named: another write came first.
    #[error("the lease was written meanwhile: {0}")]
    Moved(String),
    /// Anything else (the server away, a timeout): the write may have gone through.
    #[error("{0}")]
    Failed(String),
}

/// Where partition leases live: keys with a TTL, written by compare-and-set.
pub trait Leases: Send + Sync + 'static {
    fn read(&self, key: &str) -> impl Future<Output = Result<LeaseState, LeaseError>> + Send;
    /// Writes `holder` to `key` with a fresh `ttl`, only if the key's last revision is still
    /// `revision`. Returns the new revision.
    fn write(
        &self,
        key: &str,
        holder: &str,
        revision: u64,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<u64, LeaseError>> + Send;
    /// Deletes the lease, only if its last revision is still `revision`.
    fn release(
        &self,
        key: &str,
        revision: u64,
    ) -> impl Future<Output = Result<(), LeaseError>> + Send;
}

/// A committed input: its record, and what of it the server has not acknowledged yet (its
/// outbox entry; `None` once everything is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub record: DoneRecord,
    pub unpublished: Option<DoneRecord>,
}

/// The dedup store: which inputs are done, and what is left to publish for them. Its calls
/// block (they touch the disk): the core runs them on blocking threads.
pub trait DedupStore: Send + Sync + 'static {
    type Error: Fault;

    /// The committed records of `keys`, in order; `None` for keys never committed (or
    /// forgotten after the retention).
    fn lookup(&self, keys: &[&str]) -> Result<Vec<Option<Committed>>, Self::Error>;
    /// Durably records done inputs and their outbox entries (the whole record), and the
    /// changes to the state of the keys in `state`, all or nothing, before returning.
    fn commit(
        &self,
        records: &[(&str, &DoneRecord)],
        state: &[(&str, &StateChanges)],
    ) -> Result<(), Self::Error>;
    /// Narrows outbox entries to what is left to publish (`None`: nothing, the entry goes).
    fn narrow_outbox(&self, entries: &[(&str, Option<&DoneRecord>)]) -> Result<(), Self::Error>;
    /// Removes outbox entries whose messages are all acknowledged.
    fn clear_outbox(&self, keys: &[&str]) -> Result<(), Self::Error>;
    /// Every outbox entry: what was committed but not known to be published.
    fn pending_outbox(&self) -> Result<Vec<(String, DoneRecord)>, Self::Error>;
    /// The state of each of `keys`, in order (empty for a key never written).
    fn load_state(&self, keys: &[&str]) -> Result<Vec<KeyState>, Self::Error>;
    /// Makes the store writable again after a failed write.
    fn reopen(&self) -> Result<(), Self::Error>;
}

/// Why a batch's plugin calls did not all run. Neither is the input's fault: nothing is
/// dead-lettered for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The runtime has no instance free: transient, retry later.
    #[error("the plugin runtime has no instance free: {0}")]
    Exhausted(String),
    /// A call panicked in the host: a bug, which stops the pipeline.
    #[error("a plugin call panicked: {0}")]
    Panicked(String),
}

/// The plugin runtime: runs inputs through the pipeline's plugin.
pub trait PluginRuntime: Send + Sync + 'static {
    /// Which plugin this is: its component's sha256 and its contract, which every result
    /// carries.
    fn lineage(&self) -> Lineage;
    /// Runs each call in a fresh instance; the results are in call order. No two calls
    /// share a state key: each may change its key's state.
    fn run_all(
        &self,
        calls: Vec<Call>,
    ) -> impl Future<Output = Result<Vec<CallResult>, RunError>> + Send;
}

impl<T: PluginRuntime> PluginRuntime for std::sync::Arc<T> {
    fn lineage(&self) -> Lineage {
        (**self).lineage()
    }

    fn run_all(
        &self,
        calls: Vec<Call>,
    ) -> impl Future<Output = Result<Vec<CallResult>, RunError>> + Send {
        (**self).run_all(calls)
    }
}

/// The plugin a pipeline runs, which a reload may replace while the pipeline runs.
///
/// A batch takes the plugin once, before its first call, and runs every call of its
/// inputs (retries and waves included) on that one, recording its lineage: so a swap takes
/// effect between two batches, and no input runs under both plugins or under neither.
pub struct PluginSlot<R> {
    current: std::sync::RwLock<std::sync::Arc<R>>,
}

impl<R: PluginRuntime> PluginSlot<R> {
    pub fn new(runtime: R) -> PluginSlot<R> {
        PluginSlot {
            current: std::sync::RwLock::new(std::sync::Arc::new(runtime)),
        }
    }

    /// The plugin the next batch runs on.
    pub fn current(&self) -> std::sync::Arc<R> {
        // A poisoned lock still holds a whole `Arc`: nothing can be half-swapped.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes `runtime` the plugin of every batch that has not taken one yet, and returns
    /// the one it replaces (which batches in hand keep running on).
    pub fn replace(&self, runtime: R) -> std::sync::Arc<R> {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *current, std::sync::Arc::new(runtime))
    }
}

/// A named point of the message path, in path order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A batch in hand, nothing looked up.
    Fetched,
    /// Plugin outcomes in memory, nothing committed.
    Executed,
    /// The batch durably committed, nothing published.
    Committed,
    /// Outputs acknowledged by the server, inputs not acked.
    Published,
    /// Inputs acked, outbox not cleared.
    Acked,
}

impl Point {
    pub fn as_str(self) -> &'static str {
        match self {
            Point::Fetched => "fetched",
            Point::Executed => "executed",
            Point::Committed => "committed",
            Point::Published => "published",
            Point::Acked => "acked",
        }
    }
}

/// Watches the message path pass its points: where the tests strike (a crash, a pause).
pub trait Probe: Send + Sync + 'static {
    fn reached(&self, point: Point) -> impl Future<Output = ()> + Send;
}

/// The probe of a production pipeline: nothing happens at any point.
pub struct NoProbe;

impl Probe for NoProbe {
    async fn reached(&self, _point: Point) {}
}
