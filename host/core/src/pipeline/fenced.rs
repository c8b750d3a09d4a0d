//! A partitioned pipeline's commit: steps 3 and 4 of the invariant as one atomic batch per
//! run of inputs, each ending with the progress marker that makes them done
//! ([`crate::fence`]), chained on the marker before it.

use std::collections::{HashSet, VecDeque};

use tokio_util::sync::CancellationToken;

use super::{Fatal, Pipeline, Publication, Retrier, Staged, Step};
use crate::fence::{Fence, MAX_BATCH_MESSAGES, Progress};
use crate::plugin::FailureKind;
use crate::ports::{
    CommitError, DedupStore, Delivery, Ledger, PluginRuntime, Point, Probe, PublishError,
    Publisher, Source,
};
use crate::record::{Disposition, OutboundMessage};
use crate::state::KeyState;

/// What became of one atomic batch.
enum Unit {
    Committed,
    /// The server refuses a message of it for good: nothing of it was stored.
    Refused(String),
    ShutDown,
}

/// The last marker, read: `None` if the subject has none yet.
type LastMarker = Option<(u64, Progress)>;

impl<St, Pu, R, Pr> Pipeline<St, Pu, R, Pr>
where
    St: DedupStore,
    Pu: Publisher + Ledger,
    R: PluginRuntime,
    Pr: Probe,
{
    /// Takes the partition over: reads its last marker and publishes a takeover marker
    /// chained on it, so that a previous owner still running can commit nothing more. False
    /// on shutdown first.
    pub(super) async fn take_over(
        &self,
        fence: &Fence,
        shutdown: &CancellationToken,
    ) -> Result<bool, Fatal> {
        let owner = &fence.begin_takeover();
        let mut retrier = Retrier::new(Step::TakeOver, self, shutdown);
        loop {
            let Some(last) = self.last_marker(fence, &mut retrier).await? else {
                return Ok(false);
            };
            let (after, progress) = last.unwrap_or_default();
            if progress.owner == *owner && progress.commit == 0 {
                // An earlier try went through, and its answer was lost.
                fence.chained(progress, after);
                return Ok(true);
            }
            let takeover = progress.taken_over_by(owner);
            let marker = takeover.marker(&fence.settings.marker_subject);
            match self.publisher.commit_atomically(&[], &marker, after).await {
                Ok(sequence) => {
                    tracing::info!(
                        previous_owner = %progress.owner,
                        floor = progress.floor,
                        done_above = progress.done_above.len(),
                        "partition taken over"
                    );
                    fence.chained(takeover, sequence);
                    return Ok(true);
                }
                Err(CommitError::Refused(reason)) => {
                    return Err(Fatal::Ledger(format!(
                        "the output stream refuses the partition's progress marker on {} for good: {reason}",
                        fence.settings.marker_subject
                    )));
                }
                // Another owner moved the chain meanwhile, or the answer was lost: read again.
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Steps 3 and 4 of the invariant for a partitioned pipeline: commits the batch's new
    /// results by publishing them, in atomic batches with the marker that makes their
    /// inputs done. Returns what `publish_stage` does.
    pub(super) async fn commit_fenced<D: Delivery>(
        &self,
        fence: &Fence,
        batch: &[D],
        staged: Staged,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Option<String>>>, Fatal> {
        // A batch before did not commit (this run is shutting down): this one ran on what
        // it left, and must not commit without it.
        if fence.is_abandoned() {
            return Ok(None);
        }
        // An input the batch before committed while this one executed (one delivered again
        // meanwhile) is done: committing it again would publish it twice.
        let mut pending: Vec<Publication> = Vec::new();
        let mut states = staged.states;
        states.resize(batch.len(), None);
        for (index, record) in staged.records.iter().enumerate() {
            if let Some(record) = record
                && !fence.is_done(batch[index].input())
            {
                let mut publication =
                    Publication::new(Some(index), &staged.keys[index], record.clone());
                publication.state = states[index].take();
                pending.push(publication);
            }
        }
        let inputs: Vec<_> = batch.iter().map(Delivery::input).collect();
        let mut rejected = HashSet::new();
        // An input whose messages cannot share a batch with the marker is refused before
        // anything is sent (the output limits of a partitioned pipeline keep it rare).
        for publication in &mut pending {
            if messages_of(publication) >= MAX_BATCH_MESSAGES {
                let refusal = PublishError::Refused(format!(
                    "its {} messages and the progress marker do not fit in one atomic batch of {MAX_BATCH_MESSAGES}",
                    messages_of(publication)
                ));
                let index = publication.index.expect("an input of the batch");
                let record = self
                    .reject(publication, Some(inputs[index]), None, &refusal)
                    .expect("a dead letter is one message");
                publication.replace(record);
                rejected.insert(index);
            }
        }
        let mut units = units(pending);
        let mut published: Vec<Option<String>> = vec![None; batch.len()];
        // One retrier for every refusal of a dead letter at its barest, so that its backoff
        // grows from one to the next.
        let mut barest_refused = Retrier::new(Step::AtomicCommit, self, shutdown);
        while let Some(mut unit) = units.pop_front() {
            match self.commit_unit(fence, &inputs, &unit, shutdown).await? {
                Unit::Committed => {
                    for publication in unit {
                        let index = publication.index.expect("an input of the batch");
                        if rejected.contains(&index) {
                            self.metrics.dead_letters(FailureKind::OutputRejected, 1);
                        }
                        published[index] = Some(publication.key);
                    }
                }
                Unit::Refused(reason) if unit.len() > 1 => {
                    // Which input's messages are refused? Each goes alone.
                    tracing::debug!(%reason, inputs = unit.len(), "an atomic batch was refused; committing its inputs one by one");
                    for publication in unit.into_iter().rev() {
                        units.push_front(vec![publication]);
                    }
                }
                Unit::Refused(reason) => {
                    let publication = &mut unit[0];
                    let index = publication.index.expect("an input of the batch");
                    let refusal = PublishError::Refused(reason);
                    match self.reject(publication, Some(inputs[index]), None, &refusal) {
                        Some(record) => {
                            if publication.record.disposition == Disposition::Transformed {
                                rejected.insert(index);
                            }
                            publication.replace(record);
                        }
                        None => {
                            tracing::error!(%refusal, "the output stream refuses even a dead letter without payload or input headers: raise its max_msg_size");
                            if !barest_refused.failed(refusal).await {
                                return Ok(None);
                            }
                        }
                    }
                    units.push_front(unit);
                }
                Unit::ShutDown => return Ok(None),
            }
        }
        for (index, kind) in staged.dead_letters {
            if published[index].is_some() {
                self.metrics.dead_letters(kind, 1);
            }
        }
        self.probe.reached(Point::Committed).await;
        self.probe.reached(Point::Published).await;
        Ok(Some(published))
    }

    /// Commits one atomic batch, retrying until it is known stored or refused. An answer
    /// that does not say (a timeout, a chain that moved) is settled by reading the last
    /// marker: this commit's own marker there means it went through; another owner's means
    /// the partition is lost.
    async fn commit_unit(
        &self,
        fence: &Fence,
        inputs: &[&crate::input::Input],
        unit: &[Publication],
        shutdown: &CancellationToken,
    ) -> Result<Unit, Fatal> {
        let owner = &fence.owner();
        let mut retrier = Retrier::new(Step::AtomicCommit, self, shutdown);
        let unit_inputs = || {
            unit.iter()
                .map(|publication| inputs[publication.index.expect("an input of the batch")])
        };
        let outputs = unit
            .iter()
            .flat_map(|publication| publication.record.messages.iter());
        // Each key's state after the unit's last input of it.
        let states: std::collections::BTreeMap<&str, &KeyState> = unit
            .iter()
            .filter_map(|publication| publication.state.as_ref())
            .map(|(key, state)| (key.as_str(), &**state))
            .collect();
        let outputs: Vec<&OutboundMessage> = outputs.collect();
        loop {
            let (next, after) = fence.next_commit(unit_inputs());
            let marker = next.marker(&fence.settings.marker_subject);
            // Named by the commit, whose number is the same on every try of it: a try that
            // went through is not stored again.
            let state_messages: Vec<OutboundMessage> = states
                .iter()
                .map(|(key, state)| {
                    let subject = fence.state_subject(key);
                    OutboundMessage {
                        msg_id: format!("{}:{}:{}", subject, owner, next.commit),
                        subject,
                        headers: Vec::new(),
                        payload: state.encode(),
                    }
                })
                .collect();
            let messages: Vec<&OutboundMessage> =
                outputs.iter().copied().chain(&state_messages).collect();
            let failure = match self
                .publisher
                .commit_atomically(&messages, &marker, after)
                .await
            {
                Ok(sequence) => {
                    fence.chained(next, sequence);
                    self.metrics.published.inc_by(messages.len() as u64);
                    return Ok(Unit::Committed);
                }
                Err(CommitError::Refused(reason)) => return Ok(Unit::Refused(reason)),
                Err(failure) => failure,
            };
            let Some(last) = self.last_marker(fence, &mut retrier).await? else {
                return Ok(Unit::ShutDown);
            };
            let (sequence, progress) = last.unwrap_or_default();
            if progress.owner == *owner && progress.commit == next.commit {
                fence.chained(next, sequence);
                self.metrics.published.inc_by(messages.len() as u64);
                return Ok(Unit::Committed);
            }
            if progress.owner != *owner {
                tracing::warn!(new_owner = %progress.owner, "the partition was taken over; this run stops publishing and acking it");
                return Err(Fatal::TakenOver(format!(
                    "the partition was taken over by {} (its marker is at sequence {sequence}): this run no longer owns it",
                    progress.owner
                )));
            }
            // Still this run's last marker: the batch was not stored. Send it again.
            if !retrier.failed(failure).await {
                return Ok(Unit::ShutDown);
            }
        }
    }

    /// The partition's last marker, read, retrying while the server does not answer. `None`
    /// on shutdown first.
    async fn last_marker(
        &self,
        fence: &Fence,
        retrier: &mut Retrier<'_>,
    ) -> Result<Option<LastMarker>, Fatal> {
        loop {
            match self
                .publisher
                .last_marker(&fence.settings.marker_subject)
                .await
            {
                Ok(None) => return Ok(Some(None)),
                Ok(Some(marker)) => {
                    let progress = Progress::parse(marker.sequence, &marker.payload)
                        .map_err(|error| Fatal::Ledger(error.to_string()))?;
                    return Ok(Some(Some((marker.sequence, progress))));
                }
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Reads the consumer's ack floor for the next markers, at most every
    /// [`crate::fence::FLOOR_PERIOD`]. A failed read keeps the last one: it costs a longer
    /// marker, nothing else.
    pub(super) async fn read_floor<S: Source>(&self, source: &mut S) {
        let Some(fence) = &self.fence else {
            return;
        };
        if !fence.floor_due() {
            return;
        }
        match source.ack_floor().await {
            Ok(floor) => fence.floor_read(Some(floor)),
            Err(error) => {
                tracing::debug!(%error, "reading the consumer's ack floor failed");
                fence.floor_read(None);
            }
        }
    }
}

/// The messages an input adds to an atomic batch: its outputs or dead letter, and its key's
/// state when it changed it.
fn messages_of(publication: &Publication) -> usize {
    publication.record.messages.len() + usize::from(publication.state.is_some())
}

/// Splits publications, in order, into atomic batches: as many inputs as fit beside the
/// marker, never one input's messages across two.
fn units(publications: Vec<Publication>) -> VecDeque<Vec<Publication>> {
    let mut units = VecDeque::new();
    let mut unit: Vec<Publication> = Vec::new();
    let mut messages = 0;
    for publication in publications {
        let count = messages_of(&publication);
        if !unit.is_empty() && messages + count >= MAX_BATCH_MESSAGES {
            units.push_back(std::mem::take(&mut unit));
            messages = 0;
        }
        messages += count;
        unit.push(publication);
    }
    if !unit.is_empty() {
        units.push_back(unit);
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::record::DoneRecord;

    fn publication(messages: usize) -> Publication {
        let message = OutboundMessage {
            subject: "out.a".into(),
            msg_id: "id".into(),
            headers: Vec::new(),
            payload: Vec::new(),
        };
        let record = DoneRecord {
            disposition: Disposition::Transformed,
            messages: vec![message; messages],
            lineage: None,
        };
        Publication::new(Some(0), "k", Arc::new(record))
    }

    #[test]
    fn a_unit_holds_what_fits_beside_the_marker_and_never_splits_an_input() {
        let sizes = |publications: Vec<Publication>| -> Vec<Vec<usize>> {
            units(publications)
                .into_iter()
                .map(|unit| unit.iter().map(|p| p.record.messages.len()).collect())
                .collect()
        };
        assert_eq!(
            sizes(vec![publication(500), publication(499), publication(1)]),
            vec![vec![500, 499], vec![1]]
        );
        assert_eq!(
            sizes(vec![publication(0), publication(999), publication(3)]),
            vec![vec![0, 999], vec![3]]
        );
        assert!(sizes(Vec::new()).is_empty());
    }
}
