//! In-memory fakes of every port, for unit tests of the core: a world of one input stream,
//! its consumer's acks and the output streams (with a duplicate window that a test can let
//! pass), a store that outlives "processes", a plugin runtime that is a plain function, and
//! a probe that kills the "process" at a chosen point of the path.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::input::Input;
use crate::plugin::{Call, CallCost, CallResult, FailureKind, Outcome, PluginOutput};
use crate::ports::{
    CommitError, Committed, DedupStore, Delivery, Fault, LeaseError, LeaseState, Leases, Ledger,
    PluginRuntime, Point, Probe, PublishError, Publisher, RunError, Source, StoredMarker,
};
use crate::record::{DoneRecord, Lineage, OutboundMessage};
use crate::state::{KeyState, StateChanges, StateView};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The server side: the input stream, which inputs are acked, the output streams.
#[derive(Default)]
pub struct World {
    state: Mutex<WorldState>,
    acked: tokio::sync::Notify,
}

#[derive(Default)]
struct WorldState {
    inputs: Vec<Input>,
    acked: HashSet<u64>,
    /// Inputs delivered and handed back, in order (a stream sequence each time).
    delivered: Vec<u64>,
    handed_back: Vec<u64>,
    /// Every message the output streams store, in order.
    stored: Vec<OutboundMessage>,
    /// The ids inside the duplicate window.
    window: HashSet<String>,
    /// The next this many publishes fail.
    failing_publishes: usize,
    /// Publishes to this subject fail while it is set.
    failing_subject: Option<String>,
    /// Messages whose payload is larger than this are refused for good.
    refuse_larger_than: Option<usize>,
    /// Every atomic commit with a message besides its marker is refused for good (an output
    /// stream whose limits no message fits).
    refusing_every_message: bool,
    /// How many atomic commits were tried.
    commit_attempts: usize,
    /// The next this many acks fail.
    failing_acks: usize,
    /// The output stream's last sequence: every message stored and every marker count.
    last_sequence: u64,
    /// Every marker subject's last marker.
    markers: BTreeMap<String, StoredMarker>,
    /// Every marker stored, in order.
    marker_log: Vec<StoredMarker>,
    /// The next this many atomic commits are stored, and their answer is lost.
    losing_commit_answers: usize,
}

impl World {
    pub fn new() -> Arc<World> {
        Arc::default()
    }

    /// Appends inputs to the stream (sequences 1, 2, …), payloads as given.
    pub fn publish_inputs(&self, payloads: &[&str]) {
        let mut state = lock(&self.state);
        for payload in payloads {
            let sequence = state.inputs.len() as u64 + 1;
            state.inputs.push(Input {
                subject: "in.x".into(),
                headers: Vec::new(),
                payload: Bytes::copy_from_slice(payload.as_bytes()),
                stream_sequence: sequence,
                stream_created_unix_ns: 1,
                published_unix_ns: 1_000 + sequence,
                unreadable_headers: None,
            });
        }
    }

    /// Appends an input with headers.
    pub fn publish_input_with_headers(&self, payload: &str, headers: &[(&str, &str)]) {
        self.publish_inputs(&[payload]);
        let mut state = lock(&self.state);
        let input = state.inputs.last_mut().expect("just published");
        input.headers = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
    }

    /// Appends an input whose header block the client could not read.
    pub fn publish_unreadable_input(&self, payload: &str, reason: &str, block: &[u8]) {
        self.publish_inputs(&[payload]);
        let mut state = lock(&self.state);
        let input = state.inputs.last_mut().expect("just published");
        input.unreadable_headers = Some(crate::input::UnreadableHeaders {
            reason: reason.into(),
            block: Some(Bytes::copy_from_slice(block)),
        });
    }

    /// The duplicate window passes: a message published again now is stored again.
    pub fn expire_duplicate_window(&self) {
        lock(&self.state).window.clear();
    }

    pub fn fail_publishes(&self, count: usize) {
        lock(&self.state).failing_publishes = count;
    }

    pub fn fail_subject(&self, subject: Option<&str>) {
        lock(&self.state).failing_subject = subject.map(str::to_owned);
    }

    pub fn refuse_larger_than(&self, bytes: usize) {
        lock(&self.state).refuse_larger_than = Some(bytes);
    }

    pub fn refuse_every_message(&self) {
        lock(&self.state).refusing_every_message = true;
    }

    pub fn commit_attempts(&self) -> usize {
        lock(&self.state).commit_attempts
    }

    pub fn fail_acks(&self, count: usize) {
        lock(&self.state).failing_acks = count;
    }

    pub fn lose_commit_answers(&self, count: usize) {
        lock(&self.state).losing_commit_answers = count;
    }

    /// Every progress marker stored, in order.
    pub fn markers(&self) -> Vec<StoredMarker> {
        lock(&self.state).marker_log.clone()
    }

    /// Replaces the last marker on `subject` with one that cannot be read.
    pub fn corrupt_marker(&self, subject: &str) {
        let mut state = lock(&self.state);
        state.last_sequence += 1;
        let marker = StoredMarker {
            sequence: state.last_sequence,
            payload: b"{not json".to_vec(),
        };
        state.markers.insert(subject.to_owned(), marker);
    }

    /// Every stored message, in order.
    pub fn stored(&self) -> Vec<OutboundMessage> {
        lock(&self.state).stored.clone()
    }

    /// Every input delivered and never acked, in order, and every input handed back, in
    /// order, once per hand back.
    pub fn unacked_and_handed_back(&self) -> (Vec<u64>, Vec<u64>) {
        let state = lock(&self.state);
        let mut unacked: Vec<u64> = state
            .delivered
            .iter()
            .copied()
            .filter(|sequence| !state.acked.contains(sequence))
            .collect();
        unacked.sort_unstable();
        unacked.dedup();
        let mut handed_back = state.handed_back.clone();
        handed_back.sort_unstable();
        (unacked, handed_back)
    }

    /// How many inputs are acked.
    pub fn acked(&self) -> usize {
        lock(&self.state).acked.len()
    }

    /// Waits until every input is acked.
    pub async fn all_acked(&self) {
        let inputs = lock(&self.state).inputs.len();
        self.acked_at_least(inputs).await;
    }

    /// Waits until at least `count` inputs are acked.
    pub async fn acked_at_least(&self, count: usize) {
        loop {
            let notified = self.acked.notified();
            if lock(&self.state).acked.len() >= count {
                return;
            }
            notified.await;
        }
    }
}

/// The durable consumer, for one "process": it delivers each unacked input once.
pub struct FakeSource {
    world: Arc<World>,
    delivered: HashSet<u64>,
    batch: usize,
}

impl FakeSource {
    pub fn new(world: &Arc<World>, batch: usize) -> FakeSource {
        FakeSource {
            world: world.clone(),
            delivered: HashSet::new(),
            batch,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FakeError(pub String);

impl Source for FakeSource {
    type Delivery = FakeDelivery;
    type Error = FakeError;

    async fn next_batch(&mut self) -> Result<Vec<FakeDelivery>, FakeError> {
        let batch: Vec<FakeDelivery> = {
            let mut state = lock(&self.world.state);
            let batch: Vec<FakeDelivery> = state
                .inputs
                .iter()
                .filter(|input| {
                    !state.acked.contains(&input.stream_sequence)
                        && !self.delivered.contains(&input.stream_sequence)
                })
                .take(self.batch)
                .map(|input| FakeDelivery {
                    world: self.world.clone(),
                    input: input.clone(),
                })
                .collect();
            let sequences = batch.iter().map(|delivery| delivery.input.stream_sequence);
            state.delivered.extend(sequences);
            batch
        };
        if batch.is_empty() {
            // Nothing left: wait, as a pull that gets nothing does, until shutdown.
            std::future::pending::<()>().await;
        }
        self.delivered
            .extend(batch.iter().map(|delivery| delivery.input.stream_sequence));
        Ok(batch)
    }

    async fn ready(&mut self) -> Result<(), FakeError> {
        Ok(())
    }

    async fn ack_floor(&mut self) -> Result<u64, FakeError> {
        let state = lock(&self.world.state);
        let floor = state
            .inputs
            .iter()
            .take_while(|input| state.acked.contains(&input.stream_sequence))
            .last()
            .map_or(0, |input| input.stream_sequence);
        Ok(floor)
    }

    /// Nothing to hand back: a fake batch is taken whole, never received ahead.
    async fn stop(&mut self) -> usize {
        0
    }
}

pub struct FakeDelivery {
    world: Arc<World>,
    input: Input,
}

impl FakeDelivery {
    fn settle(&self) -> Result<(), FakeError> {
        let mut state = lock(&self.world.state);
        if state.failing_acks > 0 {
            state.failing_acks -= 1;
            return Err(FakeError("ack lost".into()));
        }
        state.acked.insert(self.input.stream_sequence);
        drop(state);
        self.world.acked.notify_waiters();
        Ok(())
    }
}

impl Delivery for FakeDelivery {
    type Error = FakeError;

    fn input(&self) -> &Input {
        &self.input
    }

    async fn ack(&self) -> Result<(), FakeError> {
        self.settle()
    }

    async fn ack_unconfirmed(&self) -> Result<(), FakeError> {
        self.settle()
    }

    async fn progress(&self) {}

    async fn hand_back(&self) -> bool {
        let mut state = lock(&self.world.state);
        let sequence = self.input.stream_sequence;
        assert!(
            !state.acked.contains(&sequence),
            "input {sequence} handed back after its ack"
        );
        state.handed_back.push(sequence);
        true
    }
}

/// Publishes into the world's output streams.
pub struct FakePublisher {
    pub world: Arc<World>,
}

impl Publisher for FakePublisher {
    async fn publish_each(&self, messages: &[&OutboundMessage]) -> Vec<Result<(), PublishError>> {
        let mut state = lock(&self.world.state);
        messages
            .iter()
            .map(|message| {
                if state
                    .refuse_larger_than
                    .is_some_and(|limit| message.payload.len() > limit)
                {
                    return Err(PublishError::Refused("message size exceeds maximum".into()));
                }
                if state.failing_subject.as_deref() == Some(message.subject.as_str()) {
                    return Err(PublishError::Failed("no responders".into()));
                }
                if state.failing_publishes > 0 {
                    state.failing_publishes -= 1;
                    return Err(PublishError::Failed("timed out".into()));
                }
                if state.window.insert(message.msg_id.clone()) {
                    state.stored.push((*message).clone());
                }
                Ok(())
            })
            .collect()
    }
}

/// The output stream as a ledger: an atomic batch stores every message and the marker, or
/// nothing; one with an id inside the duplicate window is refused whole.
impl Ledger for FakePublisher {
    async fn last_marker(&self, subject: &str) -> Result<Option<StoredMarker>, PublishError> {
        let state = lock(&self.world.state);
        if state.failing_subject.as_deref() == Some(subject) {
            return Err(PublishError::Failed("no responders".into()));
        }
        // A marker, or a key's state: the last stored message on the subject.
        let stored = || {
            let at = state.stored.iter().rposition(|m| m.subject == subject)?;
            Some(StoredMarker {
                sequence: at as u64 + 1,
                payload: state.stored[at].payload.clone(),
            })
        };
        Ok(state.markers.get(subject).cloned().or_else(stored))
    }

    async fn commit_atomically(
        &self,
        messages: &[&OutboundMessage],
        marker: &OutboundMessage,
        after: u64,
    ) -> Result<u64, CommitError> {
        let mut state = lock(&self.world.state);
        state.commit_attempts += 1;
        if state.refusing_every_message && !messages.is_empty() {
            return Err(CommitError::Refused("message size exceeds maximum".into()));
        }
        let last = state.markers.get(&marker.subject).map_or(0, |m| m.sequence);
        if last != after {
            return Err(CommitError::ChainMoved(format!(
                "wrong last sequence: {last}"
            )));
        }
        if let Some(limit) = state.refuse_larger_than
            && messages.iter().any(|message| message.payload.len() > limit)
        {
            return Err(CommitError::Refused("message size exceeds maximum".into()));
        }
        // As nats-server 2.12.1 does: an id inside the duplicate window refuses the batch.
        if messages
            .iter()
            .copied()
            .chain([marker])
            .any(|message| state.window.contains(&message.msg_id))
        {
            return Err(CommitError::Refused(
                "atomic publish batch contains duplicate message id".into(),
            ));
        }
        if state.failing_publishes > 0 {
            state.failing_publishes -= 1;
            return Err(CommitError::Failed("timed out".into()));
        }
        for message in messages.iter().copied().chain([marker]) {
            state.window.insert(message.msg_id.clone());
        }
        state
            .stored
            .extend(messages.iter().map(|message| (*message).clone()));
        state.last_sequence += messages.len() as u64 + 1;
        let stored = StoredMarker {
            sequence: state.last_sequence,
            payload: marker.payload.clone(),
        };
        state.marker_log.push(stored.clone());
        state.markers.insert(marker.subject.clone(), stored);
        if state.losing_commit_answers > 0 {
            state.losing_commit_answers -= 1;
            return Err(CommitError::Failed("timed out".into()));
        }
        Ok(state.last_sequence)
    }
}

/// A store kept in memory, shared between "processes" the way a directory on disk is.
#[derive(Default)]
pub struct FakeStore {
    state: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    done: BTreeMap<String, DoneRecord>,
    outbox: BTreeMap<String, DoneRecord>,
    /// Every state key's entries.
    state: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// The next this many calls fail transiently.
    failing: usize,
    /// Every call fails: a corrupt record.
    corrupt: bool,
    /// The next call panics (a bug in a store adapter).
    panic_next: bool,
    /// The next this many commits fail transiently (the other calls work).
    failing_commits: usize,
    commits: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FakeStoreError {
    transient: bool,
    message: String,
}

impl Fault for FakeStoreError {
    fn is_transient(&self) -> bool {
        self.transient
    }
}

impl FakeStore {
    pub fn new() -> Arc<FakeStore> {
        Arc::default()
    }

    pub fn fail_next(&self, calls: usize) {
        lock(&self.state).failing = calls;
    }

    pub fn corrupt(&self) {
        lock(&self.state).corrupt = true;
    }

    pub fn panic_next(&self) {
        lock(&self.state).panic_next = true;
    }

    pub fn fail_commits(&self, count: usize) {
        lock(&self.state).failing_commits = count;
    }

    pub fn commits(&self) -> usize {
        lock(&self.state).commits
    }

    pub fn outbox_len(&self) -> usize {
        lock(&self.state).outbox.len()
    }

    /// Every committed record, by dedup key.
    pub fn records(&self) -> BTreeMap<String, DoneRecord> {
        lock(&self.state).done.clone()
    }

    /// Every state key's committed entries.
    pub fn state(&self) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        lock(&self.state).state.clone()
    }

    fn call<T>(&self, work: impl FnOnce(&mut StoreState) -> T) -> Result<T, FakeStoreError> {
        let mut state = lock(&self.state);
        if std::mem::take(&mut state.panic_next) {
            drop(state);
            panic!("the store adapter panics on purpose");
        }
        if state.corrupt {
            return Err(FakeStoreError {
                transient: false,
                message: "record is corrupt".into(),
            });
        }
        if state.failing > 0 {
            state.failing -= 1;
            return Err(FakeStoreError {
                transient: true,
                message: "No space left on device".into(),
            });
        }
        Ok(work(&mut state))
    }
}

impl DedupStore for FakeStore {
    type Error = FakeStoreError;

    fn lookup(&self, keys: &[&str]) -> Result<Vec<Option<Committed>>, FakeStoreError> {
        self.call(|state| {
            keys.iter()
                .map(|key| {
                    state.done.get(*key).map(|record| Committed {
                        record: record.clone(),
                        unpublished: state.outbox.get(*key).cloned(),
                    })
                })
                .collect()
        })
    }

    fn commit(
        &self,
        records: &[(&str, &DoneRecord)],
        changes: &[(&str, &StateChanges)],
    ) -> Result<(), FakeStoreError> {
        {
            let mut state = lock(&self.state);
            if state.failing_commits > 0 {
                state.failing_commits -= 1;
                return Err(FakeStoreError {
                    transient: true,
                    message: "No space left on device".into(),
                });
            }
        }
        self.call(|state| {
            state.commits += 1;
            for (key, record) in records {
                state.done.insert(key.to_string(), (*record).clone());
                state.outbox.insert(key.to_string(), (*record).clone());
            }
            for (key, changes) in changes {
                let entries = state.state.entry(key.to_string()).or_default();
                for (name, change) in changes.iter() {
                    match change {
                        Some(value) => entries.insert(name.clone(), value.clone()),
                        None => entries.remove(name),
                    };
                }
            }
        })
    }

    fn load_state(&self, keys: &[&str]) -> Result<Vec<KeyState>, FakeStoreError> {
        self.call(|state| {
            keys.iter()
                .map(|key| {
                    let entries = state.state.get(*key).cloned().unwrap_or_default();
                    KeyState::from_entries(entries)
                })
                .collect()
        })
    }

    fn narrow_outbox(&self, entries: &[(&str, Option<&DoneRecord>)]) -> Result<(), FakeStoreError> {
        self.call(|state| {
            for (key, remaining) in entries {
                match remaining {
                    Some(record) => state.outbox.insert(key.to_string(), (*record).clone()),
                    None => state.outbox.remove(*key),
                };
            }
        })
    }

    fn clear_outbox(&self, keys: &[&str]) -> Result<(), FakeStoreError> {
        self.call(|state| {
            for key in keys {
                state.outbox.remove(*key);
            }
        })
    }

    fn pending_outbox(&self) -> Result<Vec<(String, DoneRecord)>, FakeStoreError> {
        self.call(|state| {
            state
                .outbox
                .iter()
                .map(|(key, record)| (key.clone(), record.clone()))
                .collect()
        })
    }

    fn reopen(&self) -> Result<(), FakeStoreError> {
        Ok(())
    }
}

/// A plugin that is a function of the input and its key's state. A payload `bad…` is
/// invalid input, `two…` makes two outputs, `big…` one output of 1000 bytes, anything else
/// one output with the payload. With state, a payload that is a number (`+5`, `-3`) is a
/// transaction: it adds to the key's `balance` entry and outputs the balance after it, unless
/// that would go below zero (invalid input); `hoard…` writes an entry past any limit.
pub struct FakeRuntime {
    /// The sha256 its lineage gives.
    pub sha256: String,
    pub calls: AtomicUsize,
    /// The next call panics (a host bug).
    pub panic_next: AtomicBool,
    /// The next this many calls find no instance free.
    pub exhausted: AtomicUsize,
    /// Done once, when the next call starts (before it finds an instance or not).
    pub on_next_call: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl FakeRuntime {
    pub fn new() -> FakeRuntime {
        FakeRuntime::named("fake")
    }

    /// A runtime whose lineage gives `sha256`: one version of a plugin.
    pub fn named(sha256: &str) -> FakeRuntime {
        FakeRuntime {
            sha256: sha256.into(),
            calls: AtomicUsize::new(0),
            panic_next: AtomicBool::new(false),
            exhausted: AtomicUsize::new(0),
            on_next_call: std::sync::Mutex::default(),
        }
    }

    pub fn transform(call: &mut Call) -> Outcome {
        let input = &call.input;
        let payload = String::from_utf8_lossy(&input.payload).into_owned();
        let output = |subject: &str, payload: Vec<u8>| PluginOutput {
            subject: subject.into(),
            headers: Vec::new(),
            payload,
        };
        if let Some(state) = &mut call.state {
            if payload.starts_with("hoard") {
                state
                    .set("note", b"hoarding".to_vec())
                    .expect("a note fits");
                if let Err(exceeded) = state.set("hoard", vec![0; 10 << 20]) {
                    return Outcome::failed(FailureKind::StateLimit, exceeded.0);
                }
            } else if let Ok(amount) = payload.parse::<i64>() {
                return FakeRuntime::transact(state, amount);
            }
        }
        if payload.starts_with("bad") {
            Outcome::failed(FailureKind::InvalidInput, "not an order")
        } else if payload.starts_with("two") {
            Outcome::Outputs(vec![
                output("a", payload.clone().into_bytes()),
                output("b", payload.into_bytes()),
            ])
        } else if payload.starts_with("big") {
            Outcome::Outputs(vec![output("a", vec![b'x'; 1000])])
        } else {
            Outcome::Outputs(vec![output("a", payload.into_bytes())])
        }
    }
}

impl FakeRuntime {
    fn transact(state: &mut StateView, amount: i64) -> Outcome {
        let balance: i64 = state
            .get("balance")
            .map(|value| String::from_utf8_lossy(value).parse().expect("a balance"))
            .unwrap_or(0);
        let after = balance + amount;
        // Written before the check: the host, not the plugin, keeps a failed call's
        // changes out of the state.
        state
            .set("balance", after.to_string().into_bytes())
            .expect("a balance fits");
        if after < 0 {
            return Outcome::failed(FailureKind::InvalidInput, "overdraft");
        }
        Outcome::Outputs(vec![PluginOutput {
            subject: format!("balance.{}", state.key()),
            headers: Vec::new(),
            payload: after.to_string().into_bytes(),
        }])
    }
}

impl PluginRuntime for FakeRuntime {
    fn lineage(&self) -> Lineage {
        Lineage {
            sha256: self.sha256.clone(),
            contract: "fake@0".into(),
        }
    }

    async fn run_all(&self, calls: Vec<Call>) -> Result<Vec<CallResult>, RunError> {
        if let Some(hook) = lock(&self.on_next_call).take() {
            hook();
        }
        if self.panic_next.swap(false, Ordering::SeqCst) {
            return Err(RunError::Panicked("index out of bounds".into()));
        }
        if self
            .exhausted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(RunError::Exhausted(
                "maximum concurrent limit of 128".into(),
            ));
        }
        self.calls.fetch_add(calls.len(), Ordering::SeqCst);
        Ok(calls
            .into_iter()
            .map(|mut call| CallResult {
                outcome: FakeRuntime::transform(&mut call),
                cost: CallCost::default(),
                changes: call.state.map(StateView::into_changes).unwrap_or_default(),
            })
            .collect())
    }
}

/// Kills the "process" the `nth` time the path reaches `at`: the point never returns, and
/// `crashed` fires so that the test drops the pipeline's future, as `kill -9` would.
pub struct CrashProbe {
    pub at: Point,
    pub nth: usize,
    reached: AtomicUsize,
    pub crashed: Arc<tokio::sync::Notify>,
}

impl CrashProbe {
    pub fn new(at: Point, nth: usize) -> CrashProbe {
        CrashProbe {
            at,
            nth,
            reached: AtomicUsize::new(0),
            crashed: Arc::default(),
        }
    }
}

impl Probe for CrashProbe {
    async fn reached(&self, point: Point) {
        if point == self.at && self.reached.fetch_add(1, Ordering::SeqCst) + 1 == self.nth {
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
    }
}

/// Pauses the "process" the `nth` time the path reaches `at`, until the test releases it: a
/// host stopped (SIGSTOP, a long pause) in the middle of its path.
pub struct PauseProbe {
    pub at: Point,
    pub nth: usize,
    reached: AtomicUsize,
    pub paused: Arc<tokio::sync::Notify>,
    pub release: Arc<tokio::sync::Notify>,
}

impl PauseProbe {
    pub fn new(at: Point, nth: usize) -> PauseProbe {
        PauseProbe {
            at,
            nth,
            reached: AtomicUsize::new(0),
            paused: Arc::default(),
            release: Arc::default(),
        }
    }
}

impl Probe for PauseProbe {
    async fn reached(&self, point: Point) {
        if point == self.at && self.reached.fetch_add(1, Ordering::SeqCst) + 1 == self.nth {
            self.paused.notify_one();
            self.release.notified().await;
        }
    }
}

/// Partition leases kept in memory, on tokio's clock: a lease unrenewed for its TTL expires,
/// and its key's revision moves, as the server's expiry marker moves it.
#[derive(Default)]
pub struct FakeLeases {
    state: Mutex<LeasesState>,
}

#[derive(Default)]
struct LeasesState {
    keys: BTreeMap<String, FakeLease>,
    last_revision: u64,
    /// Holders cut off from the server: their reads and writes fail.
    cut_off: HashSet<String>,
    /// The next this many writes go through, and their answer is lost.
    losing_answers: usize,
}

struct FakeLease {
    holder: Option<String>,
    revision: u64,
    expires_at: tokio::time::Instant,
}

impl FakeLeases {
    pub fn new() -> Arc<FakeLeases> {
        Arc::default()
    }

    /// Cuts `holder` off from the server (`true`), or lets it through again.
    pub fn cut_off(&self, holder: &str, cut: bool) {
        let mut state = lock(&self.state);
        match cut {
            true => state.cut_off.insert(holder.to_owned()),
            false => state.cut_off.remove(holder),
        };
    }

    pub fn lose_write_answers(&self, count: usize) {
        lock(&self.state).losing_answers = count;
    }

    /// Who holds `key` now.
    pub fn holder(&self, key: &str) -> Option<String> {
        let mut state = lock(&self.state);
        current(&mut state, key).holder
    }
}

/// `key` as the server has it now: an expired lease is gone, its revision moved.
fn current(state: &mut LeasesState, key: &str) -> LeaseState {
    let now = tokio::time::Instant::now();
    let mut expired = false;
    if let Some(lease) = state.keys.get(key)
        && lease.holder.is_some()
        && lease.expires_at <= now
    {
        expired = true;
    }
    if expired {
        state.last_revision += 1;
        let revision = state.last_revision;
        let lease = state.keys.get_mut(key).expect("just seen");
        lease.holder = None;
        lease.revision = revision;
    }
    state.keys.get(key).map_or(
        LeaseState {
            holder: None,
            revision: 0,
        },
        |lease| LeaseState {
            holder: lease.holder.clone(),
            revision: lease.revision,
        },
    )
}

/// The revision a write of `key` expecting `revision` gets, as the server's compare-and-set
/// gives it: refused when the key's last revision is another.
fn next_revision(state: &mut LeasesState, key: &str, revision: u64) -> Result<u64, LeaseError> {
    let now = current(state, key);
    if now.revision != revision {
        return Err(LeaseError::Moved(format!(
            "wrong last sequence: {}",
            now.revision
        )));
    }
    state.last_revision += 1;
    Ok(state.last_revision)
}

impl Leases for FakeLeases {
    async fn read(&self, key: &str) -> Result<LeaseState, LeaseError> {
        let mut state = lock(&self.state);
        Ok(current(&mut state, key))
    }

    async fn write(
        &self,
        key: &str,
        holder: &str,
        revision: u64,
        ttl: std::time::Duration,
    ) -> Result<u64, LeaseError> {
        let mut state = lock(&self.state);
        if state.cut_off.contains(holder) {
            return Err(LeaseError::Failed("no responders".into()));
        }
        let written = next_revision(&mut state, key, revision)?;
        state.keys.insert(
            key.to_owned(),
            FakeLease {
                holder: Some(holder.to_owned()),
                revision: written,
                expires_at: tokio::time::Instant::now() + ttl,
            },
        );
        if state.losing_answers > 0 {
            state.losing_answers -= 1;
            return Err(LeaseError::Failed("timed out".into()));
        }
        Ok(written)
    }

    async fn release(&self, key: &str, revision: u64) -> Result<(), LeaseError> {
        let mut state = lock(&self.state);
        let released = next_revision(&mut state, key, revision)?;
        let lease = state.keys.get_mut(key).expect("a lease of that revision");
        lease.holder = None;
        lease.revision = released;
        Ok(())
    }
}
