//! The fenced commit of a partitioned pipeline: which inputs of its partition are done, as
//! a progress marker that travels in the same atomic batch as their outputs.
//!
//! A partitioned pipeline keeps nothing it relies on at its host. Each commit is one atomic
//! batch on the output stream ([`crate::ports::Ledger`]): the outputs and dead letters of a
//! run of inputs, and a marker on the partition's own subject saying which inputs of the
//! input stream are done, chained on the marker before it (the server stores the batch only
//! if that marker is still the subject's last message). So:
//! - an input is done exactly when the last marker says so: the batch that made it done also
//!   published its messages, all or nothing, and a host with an empty disk reads the marker
//!   and resumes where the last owner stopped;
//! - an owner that has lost the partition cannot publish: its next batch is chained on a
//!   marker that is no longer the last (the new owner's first act is a takeover marker), so
//!   the server refuses it whole, and it acks nothing it did not commit.
//!
//! A marker names the inputs done by stream sequence: every sequence at or below `floor` (the
//! consumer's ack floor, read from the server: an input is acked only once committed), and
//! the committed ones above it (`done_above`), which the next floor prunes.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::input::Input;
use crate::record::OutboundMessage;

/// The most messages one atomic batch holds (nats-server's limit): an input's outputs and
/// the marker must fit in one.
pub const MAX_BATCH_MESSAGES: usize = 1000;

/// The header that marks a progress marker, with its format's version.
pub const PROGRESS_HEADER: &str = "Weir-Progress";
const PROGRESS_VERSION: &str = "1";

/// What a partitioned pipeline is, beyond a pipeline's settings.
#[derive(Debug, Clone)]
pub struct FenceSettings {
    /// The subject of the partition's progress markers, on the output stream.
    pub marker_subject: String,
    /// This run of this host, unique among every run that may ever own the partition. Each
    /// time the run takes the partition over, its markers name it with the count of its
    /// takeovers (`<owner>#<n>`), so that it tells its own commits from another owner's and
    /// from its own of an earlier takeover, and no two of its markers share an id.
    pub owner: String,
    /// What a stateful pipeline's state subjects start with: a key's state is the last
    /// message on `<state_subjects>.<key in hex>` (see [`Fence::state_subject`]).
    pub state_subjects: String,
    /// The most bytes a key's encoded state may take in its message: a state that would
    /// take more is refused (the input that would grow it is a `state-limit` dead letter).
    pub max_state_bytes: usize,
}

/// The most keys whose state a run keeps in memory: past it the cache starts again empty
/// (each key's state is in the output stream, read again when next needed).
const MAX_CACHED_STATES: usize = 100_000;

/// The subject whose last message is `key`'s state, under `state_subjects`; the key in hex.
pub fn state_subject(state_subjects: &str, key: &str) -> String {
    let mut subject = format!("{state_subjects}.");
    for byte in key.bytes() {
        subject.push_str(&format!("{byte:02x}"));
    }
    subject
}

/// The key a state subject names (what [`state_subject`] wrote after `state_subjects`);
/// `None` for a subject that is not one.
pub fn state_key(state_subjects: &str, subject: &str) -> Option<String> {
    let hex = subject.strip_prefix(state_subjects)?.strip_prefix('.')?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(hex.get(at..at + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// How often the consumer's ack floor is read for the markers: a floor read earlier is
/// only lower, so it costs a longer `done_above`, never a wrong one.
pub const FLOOR_PERIOD: Duration = Duration::from_secs(1);

/// A partitioned pipeline's fence: its settings, and the chain of markers as far as this
/// run knows it (its own last marker, once it has taken the partition over).
pub struct Fence {
    pub settings: FenceSettings,
    chain: Mutex<Chain>,
}

#[derive(Default)]
struct Chain {
    /// The owner this run's markers name since its last takeover.
    owner: String,
    takeovers: u64,
    /// What the last marker says.
    progress: Progress,
    /// The last marker's stream sequence (0: none yet).
    sequence: u64,
    /// The consumer's ack floor as last read, and when.
    floor: Option<u64>,
    floor_read_at: Option<tokio::time::Instant>,
    /// A stateful pipeline's state as this run executed it, by key: what the run's commits
    /// say, and its batch in hand on top. Emptied at each takeover.
    states: std::collections::HashMap<String, std::sync::Arc<crate::state::KeyState>>,
    /// A commit of this run did not go through (it shut down meanwhile): no later batch may
    /// commit, since it ran on state that batch left.
    abandoned: bool,
}

impl Fence {
    pub fn new(settings: FenceSettings) -> Fence {
        Fence {
            settings,
            chain: Mutex::default(),
        }
    }

    fn chain(&self) -> std::sync::MutexGuard<'_, Chain> {
        self.chain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Begins a takeover: the owner its markers name from now on.
    pub(crate) fn begin_takeover(&self) -> String {
        let mut chain = self.chain();
        chain.states.clear();
        chain.abandoned = false;
        chain.takeovers += 1;
        chain.owner = format!("{}#{}", self.settings.owner, chain.takeovers);
        chain.owner.clone()
    }

    /// The subject whose last message is `key`'s state. The key is in hex: any string may
    /// be a state key, and a subject token holds few characters.
    pub fn state_subject(&self, key: &str) -> String {
        state_subject(&self.settings.state_subjects, key)
    }

    /// `key`'s state as this run last executed it, if it has it.
    pub(crate) fn cached_state(&self, key: &str) -> Option<std::sync::Arc<crate::state::KeyState>> {
        self.chain().states.get(key).cloned()
    }

    /// Keeps `states` as this run executed them.
    pub(crate) fn cache_states(
        &self,
        states: impl IntoIterator<Item = (String, std::sync::Arc<crate::state::KeyState>)>,
    ) {
        let mut chain = self.chain();
        for (key, state) in states {
            if chain.states.len() >= MAX_CACHED_STATES && !chain.states.contains_key(&key) {
                chain.states.clear();
            }
            chain.states.insert(key, state);
        }
    }

    /// A commit did not go through: nothing later commits until the next takeover.
    pub(crate) fn abandon(&self) {
        self.chain().abandoned = true;
    }

    pub(crate) fn is_abandoned(&self) -> bool {
        self.chain().abandoned
    }

    /// The owner this run's markers name since its last takeover.
    pub(crate) fn owner(&self) -> String {
        self.chain().owner.clone()
    }

    /// Whether the last marker says `input` is done.
    pub(crate) fn is_done(&self, input: &Input) -> bool {
        self.chain().progress.is_done(input)
    }

    /// The progress after this run's next commit, which makes `inputs` done, and the
    /// sequence of the marker to chain it on.
    pub(crate) fn next_commit<'a>(
        &self,
        inputs: impl IntoIterator<Item = &'a Input>,
    ) -> (Progress, u64) {
        let chain = self.chain();
        (
            chain.progress.after_commit(inputs, chain.floor),
            chain.sequence,
        )
    }

    /// `progress` is the last marker now, at `sequence`.
    pub(crate) fn chained(&self, progress: Progress, sequence: u64) {
        let mut chain = self.chain();
        chain.progress = progress;
        chain.sequence = sequence;
    }

    /// Whether the ack floor is due to be read again.
    pub(crate) fn floor_due(&self) -> bool {
        self.chain()
            .floor_read_at
            .is_none_or(|at| at.elapsed() >= FLOOR_PERIOD)
    }

    pub(crate) fn floor_read(&self, floor: Option<u64>) {
        let mut chain = self.chain();
        chain.floor_read_at = Some(tokio::time::Instant::now());
        if floor.is_some() {
            chain.floor = floor;
        }
    }
}

/// Which inputs of a partition are done, and who said so: a marker's payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The run that published this marker.
    pub owner: String,
    /// How many commits that run had made with it (0: its takeover marker).
    pub commit: u64,
    /// The creation time of the input stream the sequences belong to: a stream re-created
    /// under the same name starts its sequences afresh, and no input of it is done yet.
    pub stream_created_unix_ns: u64,
    /// Every input at or below this stream sequence is done.
    pub floor: u64,
    /// The inputs above `floor` that are done.
    pub done_above: BTreeSet<u64>,
}

/// Why a marker could not be read.
#[derive(Debug, thiserror::Error)]
#[error("the progress marker at sequence {sequence} of the output stream cannot be read: {reason}")]
pub struct UnreadableMarker {
    pub sequence: u64,
    pub reason: String,
}

impl Progress {
    /// Whether `input` is done.
    pub fn is_done(&self, input: &Input) -> bool {
        input.stream_created_unix_ns == self.stream_created_unix_ns
            && (input.stream_sequence <= self.floor
                || self.done_above.contains(&input.stream_sequence))
    }

    /// The same progress, said by `owner` taking the partition over.
    pub fn taken_over_by(&self, owner: &str) -> Progress {
        Progress {
            owner: owner.to_owned(),
            commit: 0,
            ..self.clone()
        }
    }

    /// The progress after this owner's next commit, which makes `inputs` done; `floor` is
    /// the consumer's ack floor as last read, if it was.
    pub fn after_commit<'a>(
        &self,
        inputs: impl IntoIterator<Item = &'a Input>,
        floor: Option<u64>,
    ) -> Progress {
        let mut next = Progress {
            commit: self.commit + 1,
            ..self.clone()
        };
        for input in inputs {
            if input.stream_created_unix_ns != next.stream_created_unix_ns {
                // The first input of a re-created stream: nothing of it is done yet, and the
                // old stream's sequences mean nothing to it.
                next.stream_created_unix_ns = input.stream_created_unix_ns;
                next.floor = 0;
                next.done_above.clear();
            }
            next.done_above.insert(input.stream_sequence);
        }
        if let Some(floor) = floor {
            next.floor = next.floor.max(floor);
        }
        let floor = next.floor;
        next.done_above.retain(|&sequence| sequence > floor);
        next
    }

    /// The marker message that says it, on `subject`. Its id is unique to the owner's
    /// commit, so that no other batch's ids can collide with it.
    pub fn marker(&self, subject: &str) -> OutboundMessage {
        OutboundMessage {
            subject: subject.to_owned(),
            msg_id: format!("{subject}:{}:{}", self.owner, self.commit),
            headers: vec![(PROGRESS_HEADER.to_owned(), PROGRESS_VERSION.to_owned())],
            payload: serde_json::to_vec(self).expect("progress serializes"),
        }
    }

    /// Reads a marker's payload (stored at `sequence`).
    pub fn parse(sequence: u64, payload: &[u8]) -> Result<Progress, UnreadableMarker> {
        serde_json::from_slice(payload).map_err(|error| UnreadableMarker {
            sequence,
            reason: error.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::test_input;

    fn input(sequence: u64) -> Input {
        test_input(sequence, &[], b"")
    }

    #[test]
    fn an_input_is_done_at_or_below_the_floor_or_named_above_it() {
        let progress = Progress::default()
            .taken_over_by("a")
            .after_commit(&[input(1), input(2), input(5)], None);
        assert_eq!(progress.commit, 1);
        assert!(progress.is_done(&input(2)) && progress.is_done(&input(5)));
        assert!(!progress.is_done(&input(3)) && !progress.is_done(&input(6)));
        let floored = progress.after_commit(&[input(7)], Some(2));
        assert_eq!(floored.floor, 2);
        assert_eq!(floored.done_above, BTreeSet::from([5, 7]));
        assert!(floored.is_done(&input(1)) && !floored.is_done(&input(3)));
        // A floor read earlier than the marker's never lowers it.
        assert_eq!(floored.after_commit(&[], Some(1)).floor, 2);
    }

    #[test]
    fn a_recreated_stream_starts_with_nothing_done() {
        let progress = Progress::default().after_commit(&[input(1), input(2)], Some(2));
        let mut recreated = input(1);
        recreated.stream_created_unix_ns += 1;
        assert!(!progress.is_done(&recreated));
        let after = progress.after_commit([&recreated], None);
        assert!(after.is_done(&recreated) && !after.is_done(&input(1)));
        assert_eq!((after.floor, after.done_above.len()), (0, 1));
    }

    #[test]
    fn a_marker_reads_back_and_a_corrupt_one_says_where_it_is() {
        let progress = Progress::default()
            .taken_over_by("host-a/1")
            .after_commit(&[input(9)], Some(4));
        let marker = progress.marker("_weir.progress.p.0");
        assert_eq!(marker.msg_id, "_weir.progress.p.0:host-a/1:1");
        assert_eq!(Progress::parse(3, &marker.payload).unwrap(), progress);
        let corrupt = Progress::parse(3, b"{\"owner\":").unwrap_err();
        assert!(corrupt.to_string().contains("sequence 3"), "{corrupt}");
    }
}

#[cfg(test)]
mod state_subject_tests {
    use super::*;

    #[test]
    fn a_state_subject_names_its_key_whatever_the_key_holds() {
        for key in ["acct-7", "a.b c", "", "é>*"] {
            let subject = state_subject("_weir.progress.p.state", key);
            assert!(!subject[23..].contains(['.', ' ', '*', '>']), "{subject}");
            assert_eq!(
                state_key("_weir.progress.p.state", &subject).as_deref(),
                Some(key)
            );
        }
        assert_eq!(
            state_key("_weir.progress.p.state", "_weir.progress.p.0"),
            None
        );
        assert_eq!(
            state_key("_weir.progress.p.state", "_weir.progress.p.state.zz"),
            None
        );
    }
}
