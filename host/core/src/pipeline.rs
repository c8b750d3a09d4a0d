//! The message path of one pipeline: fetch a batch → dedup lookup → execute new inputs →
//! commit → publish → ack, over the ports of `ports.rs`.
//!
//! # The exactly-once invariant
//!
//! **An input is acknowledged only after its outputs are durably committed and published;
//! a committed input is never executed again.**
//!
//! `commit_stage`, `publish_stage` and then `ack_stage` keep it, for each batch, in this
//! order:
//! 1. look every input's dedup key up in the store; a committed key is not executed. Its
//!    stored messages are published again only if its outbox entry is still there (JetStream
//!    drops the ones it has as duplicates by their deterministic `Nats-Msg-Id`);
//! 2. execute the new inputs;
//! 3. commit all their records, and their outbox entries, in one synced write; until that
//!    write returns, nothing of the batch is published or acked;
//! 4. publish every message of the batch and await JetStream's acks; until then nothing is
//!    acked. A retry publishes only what JetStream has not acknowledged (after its duplicate
//!    window a second copy would be stored), and narrows the outbox entries to the same; a
//!    message the server refuses for good turns its input into an `output-rejected` dead
//!    letter, committed before it is published, instead of holding the batch forever;
//! 5. ack the inputs (double ack), then clear their outbox entries.
//!
//! A later batch overlaps an earlier one (it is committed while the earlier one is published,
//! and published while the earlier one is acked), never by reordering a batch's own steps.
//! An outbox entry that outlives its publish by a few milliseconds only makes a later batch
//! holding the same key publish it again, inside JetStream's duplicate window.
//!
//! A crash before 3 completes leaves the inputs unacked: they are redelivered and executed
//! once. A crash after 3 leaves outbox entries, re-published on start, and unacked inputs,
//! which step 1 recognises. A lost ack only causes a redelivery, which step 1 absorbs. The
//! store, not the ack, is the source of truth (nats-server may accept a late ack for a
//! different delivery of the same message). In at-least-once mode there is no store:
//! steps 1 and 3 do nothing, and only the deterministic output ids stand between a
//! redelivery and a duplicate.
//!
//! A partitioned pipeline (one with a [`Fence`]) keeps the invariant without a store of its
//! own: steps 3 and 4 are one atomic batch on the output stream, the outputs and dead letters
//! of a run of inputs with the progress marker that makes those inputs done (`fenced.rs`;
//! [`crate::fence`] says why it holds even against an owner that lost the partition). Step
//! 1 reads the last marker, and a batch that another batch committed while it executed is
//! not committed twice. So nothing is published before it is committed, nothing committed
//! is unpublished, and no outbox is needed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::dead_letter::{DeadLetterHeaders, DeadLetterSchema};
use crate::fence::Fence;
use crate::input::{DedupMode, Input, dedup_key};
use crate::metrics::PipelineMetrics;
use crate::plugin::{Call, CallResult, FailureKind, Outcome};
use crate::policy::OutputPolicy;
use crate::ports::{
    DedupStore, Delivery, Fault, Ledger, PluginRuntime, PluginSlot, Point, Probe, PublishError,
    Publisher, RunError, Source,
};
use crate::record::{Disposition, DoneRecord, Lineage, OutboundMessage};
use crate::retry::{Backoff, sleep_unless_shutdown};
use crate::state::{KeyState, StateChanges, StateSettings, StateView};
use crate::status::{Phase, PipelineStatus};
use crate::text;
use crate::trace::TraceContext;

mod fenced;

/// How many outbox records are re-published per round on start.
const OUTBOX_REPLAY_CHUNK: usize = 1000;

/// How much of a dead letter's reason a log line carries.
const LOGGED_REASON: usize = 1024;

/// Why a pipeline stopped on its own: nothing retrying could heal.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// The store cannot be trusted any more (a corrupt record, a bug in its adapter).
    #[error(transparent)]
    Store(Box<dyn std::error::Error + Send + Sync>),
    /// A plugin call panicked in the host: a bug, never anything a plugin does.
    #[error("{0}")]
    PluginCrashed(String),
    /// A partitioned pipeline's ledger cannot be used: its marker cannot be read, or the
    /// output stream refuses it for good.
    #[error("{0}")]
    Ledger(String),
    /// Another run has taken the partition over: this one must not publish or ack anything
    /// more of it.
    #[error("{0}")]
    TakenOver(String),
}

/// What a pipeline is, beyond its ports.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Part of every output's and dead letter's id.
    pub name: String,
    pub dedup: DedupMode,
    /// The input stream's name: part of every dedup key.
    pub input_stream: String,
    /// The durable consumer's name, for each message's span.
    pub consumer: String,
    /// While a batch is in hand, the server is told every half of it that it is being
    /// worked on, so that it is not redelivered.
    pub ack_wait: Duration,
    /// A stateful pipeline's state; `None` for a stateless one. Needs a store.
    pub state: Option<StateSettings>,
}

/// One pipeline's message path, over its ports. `store` is `None` in at-least-once mode,
/// which records nothing, and in a partitioned pipeline, which commits through its `fence`
/// to the output stream instead.
pub struct Pipeline<St, Pu, R, Pr> {
    pub settings: Settings,
    pub store: Option<Arc<St>>,
    pub fence: Option<Fence>,
    pub publisher: Pu,
    /// Shared with whatever reloads the plugin.
    pub runtime: Arc<PluginSlot<R>>,
    pub probe: Pr,
    pub policy: OutputPolicy,
    pub dead_letters: DeadLetterSchema,
    pub metrics: PipelineMetrics,
    pub status: Arc<PipelineStatus>,
}

impl<St, Pu, R, Pr> Pipeline<St, Pu, R, Pr>
where
    St: DedupStore,
    Pu: Publisher + Ledger,
    R: PluginRuntime,
    Pr: Probe,
{
    /// Runs until `shutdown` fires, then finishes the batches in hand, hands back to the
    /// server what it pulled and did not finish, and returns. Returns an error only for a
    /// fault that retrying cannot heal.
    ///
    /// Three batches are in flight at once: while one is acked, the next is published, and
    /// the one after it is fetched, executed and committed. Each batch still keeps the
    /// invariant on its own; a later batch's lookup sees every earlier batch's commit,
    /// because commits happen one batch after another.
    pub async fn run<S>(&self, mut source: S, shutdown: CancellationToken) -> Result<(), Fatal>
    where
        S: Source,
    {
        let started = match &self.fence {
            Some(fence) => {
                self.status.enter(Phase::TakingOver);
                self.take_over(fence, &shutdown).await
            }
            None => {
                self.status.enter(Phase::Replaying);
                self.replay_outbox(&shutdown).await
            }
        };
        match started {
            Ok(true) => {}
            Ok(false) => {
                self.status.stopped("shut down");
                return Ok(());
            }
            Err(fatal) => {
                self.status.stopped(&fatal.to_string());
                return Err(fatal);
            }
        }
        self.status.enter(Phase::Running);
        let (to_ack, published) = tokio::sync::mpsc::channel(1);
        let (result, ()) = tokio::join!(
            self.commit_and_publish(&mut source, to_ack, &shutdown),
            self.ack_stage(published),
        );
        // What was pulled and never processed goes back to the server now, for the next
        // owner of the consumer, instead of waiting out `ack_wait`.
        let handed_back = source.stop().await;
        self.metrics.handed_back.inc_by(handed_back as u64);
        self.status.stopped(
            match &result {
                Ok(()) => "shut down".into(),
                Err(fatal) => fatal.to_string(),
            }
            .as_str(),
        );
        tracing::info!(stats = ?self.metrics.snapshot(), "pipeline stopped");
        result
    }

    /// Fetches, commits and publishes batches, handing each published one to `to_ack`.
    async fn commit_and_publish<S: Source>(
        &self,
        source: &mut S,
        to_ack: tokio::sync::mpsc::Sender<PublishedBatch<S::Delivery>>,
        shutdown: &CancellationToken,
    ) -> Result<(), Fatal> {
        let mut committed: Option<CommittedBatch<S::Delivery>> = None;
        loop {
            let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<()>();
            let finishing = async {
                let finished = self.finish(committed.take(), &to_ack, shutdown).await;
                let _ = finished_tx.send(());
                finished
            };
            let next = async {
                let batch = self.next_batch(source, shutdown).await?;
                self.read_floor(source).await;
                let staged = self
                    .with_keepalive(&batch, async {
                        // A partitioned pipeline with state runs a batch once the batch
                        // before is committed: on the state it committed, and knowing which
                        // of its inputs are done.
                        if self.fence.is_some() && self.settings.state.is_some() {
                            let _ = finished_rx.await;
                            return self.commit_stage(&batch, shutdown).await;
                        }
                        let staged = self.commit_stage(&batch, shutdown).await;
                        // Committed, it waits for the previous batch to be published: the
                        // server must not redeliver it meanwhile either.
                        let _ = finished_rx.await;
                        staged
                    })
                    .await;
                Some(staged.map(|staged| (batch, staged)))
            };
            // A fatal error of the batch being finished stops the pipeline at once, not once
            // the next batch has come (which may be never).
            let ((), next) = futures::future::try_join(finishing, async { Ok(next.await) }).await?;
            match next {
                None => break,
                Some(Ok((batch, Some(staged)))) => {
                    committed = Some(CommittedBatch { batch, staged })
                }
                // Shut down before the commit: nothing of this batch is acked.
                Some(Ok((batch, None))) => {
                    self.hand_back(&batch).await;
                    break;
                }
                Some(Err(fatal)) => return Err(fatal),
            }
        }
        self.finish(committed, &to_ack, shutdown).await
    }

    /// The next batch, retrying a failing source. `None` on shutdown.
    async fn next_batch<S: Source>(
        &self,
        source: &mut S,
        shutdown: &CancellationToken,
    ) -> Option<Vec<S::Delivery>> {
        let mut retrier = Retrier::new(Step::Fetch, self, shutdown);
        loop {
            let ready = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                ready = source.ready() => ready,
            };
            if let Err(error) = ready {
                if !retrier.failed(error).await {
                    return None;
                }
                continue;
            }
            // Consuming again: the step is no longer retrying, whenever the next input comes.
            retrier.recovered();
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                next = source.next_batch() => next,
            };
            match next {
                Ok(batch) if !batch.is_empty() => return Some(batch),
                Ok(_) => continue,
                Err(error) => {
                    if !retrier.failed(error).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Runs `work` while telling the server, every half `ack_wait`, that `batch` is being
    /// worked on (a slow plugin, a long fan-out, retries), so it is not redelivered.
    async fn with_keepalive<D: Delivery, T>(
        &self,
        batch: &[D],
        work: impl Future<Output = T>,
    ) -> T {
        let period = self.settings.ack_wait / 2;
        let keepalive = async {
            let mut ticker = tokio::time::interval(period);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                futures::future::join_all(batch.iter().map(|delivery| delivery.progress())).await;
            }
        };
        tokio::select! {
            result = work => result,
            never = keepalive => never,
        }
    }

    /// Publishes a committed batch (step 4 of the module docs) and hands it on to be acked.
    async fn finish<D: Delivery>(
        &self,
        committed: Option<CommittedBatch<D>>,
        to_ack: &tokio::sync::mpsc::Sender<PublishedBatch<D>>,
        shutdown: &CancellationToken,
    ) -> Result<(), Fatal> {
        let Some(CommittedBatch { batch, staged }) = committed else {
            return Ok(());
        };
        let started = Instant::now();
        let publishing = async {
            match &self.fence {
                Some(fence) => {
                    let committed = self.commit_fenced(fence, &batch, staged, shutdown).await;
                    if let Ok(None) = committed {
                        fence.abandon();
                    }
                    committed
                }
                None => self.publish_stage(&batch, staged, shutdown).await,
            }
        };
        let published = self.with_keepalive(&batch, publishing).await?;
        self.metrics.stage("publish", started.elapsed());
        tracing::debug!(inputs = batch.len(), took = ?started.elapsed(), "batch published");
        match published {
            // The ack stage outlives this stage: it stops only once every sender is gone.
            Some(published) => {
                let _ = to_ack.send(PublishedBatch { batch, published }).await;
            }
            // Shut down while publishing: committed and in the outbox, it is published
            // again by whoever gets it next.
            None => self.hand_back(&batch).await,
        }
        Ok(())
    }

    /// Step 5, batch after batch: ack the inputs, then clear their outbox entries. A failed
    /// ack only means a redelivery, which step 1 absorbs.
    async fn ack_stage<D: Delivery>(
        &self,
        mut published: tokio::sync::mpsc::Receiver<PublishedBatch<D>>,
    ) {
        while let Some(PublishedBatch { batch, published }) = published.recv().await {
            let started = Instant::now();
            // An input that published nothing here (a redelivery of a done one) gets a plain
            // ack: if it is lost, the next redelivery costs one lookup again. The others get
            // a double ack, so that a failure is seen and logged.
            let acks = futures::future::join_all(batch.iter().zip(&published).map(
                |(delivery, published)| async move {
                    match published {
                        Some(_) => delivery.ack().await,
                        None => delivery.ack_unconfirmed().await,
                    }
                },
            ))
            .await;
            self.metrics.stage("ack", started.elapsed());
            let now = unix_now_ns();
            for (delivery, result) in batch.iter().zip(&acks) {
                if result.is_ok() {
                    let stored = delivery.input().published_unix_ns;
                    let seconds = now.saturating_sub(stored) as f64 / 1e9;
                    self.metrics.end_to_end_seconds.observe(seconds);
                }
            }
            let acked = acks.iter().filter(|result| result.is_ok()).count();
            if let Some(Err(error)) = acks.into_iter().find(Result::is_err) {
                tracing::warn!(%error, failed = batch.len() - acked, "some acks failed; those inputs will be redelivered and deduplicated");
            }
            self.metrics.acked.inc_by(acked as u64);
            self.probe.reached(Point::Acked).await;
            let published_keys: Vec<String> = published.into_iter().flatten().collect();
            if !published_keys.is_empty() {
                self.clear_outbox(published_keys).await;
            }
            tracing::debug!(inputs = batch.len(), took = ?started.elapsed(), "batch acked");
        }
    }

    /// Hands a batch the pipeline stops before finishing back to the server.
    async fn hand_back<D: Delivery>(&self, batch: &[D]) {
        let handed_back = futures::future::join_all(batch.iter().map(Delivery::hand_back)).await;
        let handed_back = handed_back.into_iter().filter(|&sent| sent).count();
        self.metrics.handed_back.inc_by(handed_back as u64);
        tracing::debug!(
            inputs = batch.len(),
            handed_back,
            "unfinished batch handed back"
        );
    }

    /// Re-publishes what was committed but not confirmed published before the last stop.
    /// False on shutdown first; fails only on a fault retrying cannot heal.
    async fn replay_outbox(&self, shutdown: &CancellationToken) -> Result<bool, Fatal> {
        let Some(store) = &self.store else {
            return Ok(true);
        };
        let mut retrier = Retrier::new(Step::ReadOutbox, self, shutdown);
        let pending = loop {
            let store = store.clone();
            match blocking(move || store.pending_outbox()).await {
                Ok(pending) => {
                    retrier.recovered();
                    break pending;
                }
                Err(error) if !error.is_transient() => return Err(fatal_store(error)),
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(false);
                    }
                }
            }
        };
        if pending.is_empty() {
            return Ok(true);
        }
        tracing::info!(inputs = pending.len(), "re-publishing the outbox");
        for chunk in pending.chunks(OUTBOX_REPLAY_CHUNK) {
            let mut publications: Vec<Publication> = chunk
                .iter()
                .map(|(key, record)| Publication::new(None, key, Arc::new(record.clone())))
                .collect();
            if !self
                .publish_until_done(&mut publications, &[], shutdown)
                .await?
            {
                return Ok(false);
            }
            let keys: Vec<String> = chunk.iter().map(|(key, _)| key.clone()).collect();
            self.clear_outbox(keys).await;
        }
        Ok(true)
    }

    /// Steps 1 to 3 of the module docs: look up, execute the new inputs, commit. Returns
    /// what to publish for each input (`None` where nothing needs publishing), or `None` on
    /// shutdown before the commit; an error on a fault retrying cannot heal.
    async fn commit_stage<D: Delivery>(
        &self,
        batch: &[D],
        shutdown: &CancellationToken,
    ) -> Result<Option<Staged>, Fatal> {
        self.probe.reached(Point::Fetched).await;
        let started = Instant::now();
        self.metrics.received.inc_by(batch.len() as u64);
        self.metrics.batch_inputs.observe(batch.len() as f64);
        let keys: Vec<String> = batch
            .iter()
            .map(|delivery| {
                dedup_key(
                    self.settings.dedup,
                    &self.settings.input_stream,
                    delivery.input(),
                )
            })
            .collect();

        // 1. Which inputs are already committed, and what is left to publish of each? (In
        // at-least-once mode, none are known; a partitioned pipeline's last marker says, and
        // it publishes everything it commits.)
        let mut retrier = Retrier::new(Step::Lookup, self, shutdown);
        let committed: Vec<Option<Option<DoneRecord>>> = loop {
            if let Some(fence) = &self.fence {
                let done = |delivery: &D| fence.is_done(delivery.input()).then_some(None);
                break batch.iter().map(done).collect();
            }
            let Some(store) = self.store.clone() else {
                break vec![None; keys.len()];
            };
            let lookup_keys = keys.clone();
            let lookup = blocking(move || {
                let refs: Vec<&str> = lookup_keys.iter().map(String::as_str).collect();
                store.lookup(&refs)
            });
            match lookup.await {
                Ok(committed) => {
                    // Not retrying any more, though the retrier lives to the batch's end.
                    retrier.recovered();
                    break committed
                        .into_iter()
                        .map(|committed| committed.map(|committed| committed.unpublished))
                        .collect();
                }
                Err(error) if !error.is_transient() => return Err(fatal_store(error)),
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(None);
                    }
                }
            }
        };

        let looked_up_at = started.elapsed();
        // 2. Execute the new ones: each key once, even if it appears twice in the batch.
        // A committed input is re-published only as far as its outbox entry says the server
        // has not acknowledged it: a re-publish of what it has, after the duplicate window,
        // would be a real duplicate.
        let deduplicated = committed.iter().filter(|c| c.is_some()).count();
        self.metrics.deduplicated.inc_by(deduplicated as u64);
        let committed_earlier: Vec<usize> = (0..committed.len())
            .filter(|&index| committed[index].is_some())
            .collect();
        let mut records: Vec<Option<Arc<DoneRecord>>> = Vec::with_capacity(keys.len());
        let mut first_index_of_key: HashMap<&str, usize> = HashMap::new();
        let mut to_execute = Vec::new();
        for (index, committed) in committed.into_iter().enumerate() {
            match committed {
                Some(unpublished) => records.push(unpublished.map(Arc::new)),
                None => {
                    records.push(None);
                    // A repeat of a key first seen in this batch is published once, there.
                    if first_index_of_key.insert(&keys[index], index).is_none() {
                        to_execute.push(index);
                    }
                }
            }
        }
        let Some(executed) = self.execute(batch, &keys, &to_execute, shutdown).await? else {
            return Ok(None);
        };
        let executed_at = started.elapsed();
        self.probe.reached(Point::Executed).await;
        self.metrics.stage("execute", executed_at - looked_up_at);
        let mut new_records = Vec::with_capacity(executed.records.len());
        let mut dead_letters = Vec::new();
        let mut states = vec![None; batch.len()];
        for (&index, state) in to_execute.iter().zip(executed.after) {
            states[index] = state;
        }
        for (&index, (record, dead_letter)) in to_execute.iter().zip(executed.records) {
            let record = Arc::new(record);
            dead_letters.extend(dead_letter.map(|kind| (index, kind)));
            new_records.push((keys[index].clone(), record.clone()));
            records[index] = Some(record);
        }
        if self.fence.is_some() {
            // Committed when they are published.
            return Ok(Some(Staged {
                records,
                recheck: Vec::new(),
                keys,
                dead_letters,
                states,
            }));
        }

        // 3. Commit the new records, and the state they changed, in one synced write.
        let committing_at = started.elapsed();
        if !self.commit(new_records, executed.state, shutdown).await? {
            return Ok(None);
        }
        self.metrics
            .stage("commit", started.elapsed() - committing_at);
        for (_, kind) in dead_letters {
            self.metrics.dead_letters(kind, 1);
        }

        tracing::debug!(inputs = batch.len(), ?looked_up_at, ?executed_at, committed_at = ?started.elapsed(), "batch committed");
        self.probe.reached(Point::Committed).await;
        // Inputs committed earlier and still in the outbox: by the time this batch is
        // published, the batch that committed them may have published them, and publishing
        // them again after the server's duplicate window would double them.
        let recheck = committed_earlier
            .into_iter()
            .filter(|&index| records[index].is_some())
            .collect();
        Ok(Some(Staged {
            records,
            recheck,
            keys,
            dead_letters: Vec::new(),
            states: Vec::new(),
        }))
    }

    /// Runs the plugin on the inputs at `indexes` and turns each outcome into its record
    /// (in `indexes` order). In a stateful pipeline the inputs of one state key run one after
    /// another, each on the state the one before left; a call's changes count only if its
    /// input is transformed. `None` on shutdown while the store or the runtime is retried
    /// (that is never the input's fault).
    async fn execute<D: Delivery>(
        &self,
        batch: &[D],
        keys: &[String],
        indexes: &[usize],
        shutdown: &CancellationToken,
    ) -> Result<Option<Executed>, Fatal> {
        let mut records: Vec<Option<(DoneRecord, Option<FailureKind>)>> =
            (0..indexes.len()).map(|_| None).collect();
        // This batch's plugin, for all its calls, whatever a reload does meanwhile.
        let runtime = self.runtime.current();
        let lineage = runtime.lineage();
        // Each input the plugin is to see, by wave: the nth input of every state key runs in
        // wave n (all of them in wave 0 without state). An input whose headers could not be
        // read never reaches the plugin: it is a poison input of the stream's, not the
        // plugin's to judge; nor does one without a state key, which has no place in order.
        let mut waves: Vec<Vec<(usize, Option<String>)>> = Vec::new();
        let mut inputs_of_key: HashMap<String, usize> = HashMap::new();
        for (at, &index) in indexes.iter().enumerate() {
            let input = batch[index].input();
            let key = &keys[index];
            if let Some(unreadable) = &input.unreadable_headers {
                let reason = format!("its header block cannot be read: {}", unreadable.reason);
                let outcome = Outcome::failed(FailureKind::UnreadableInput, reason);
                records[at] = Some(self.record_for(input, key, &lineage, outcome));
                continue;
            }
            let (wave, state_key) = match &self.settings.state {
                None => (0, None),
                Some(state) => match state.key.key_of(input) {
                    Ok(state_key) => {
                        let earlier = inputs_of_key.entry(state_key.clone()).or_default();
                        *earlier += 1;
                        (*earlier - 1, Some(state_key))
                    }
                    Err(reason) => {
                        let outcome = Outcome::failed(FailureKind::InvalidInput, reason);
                        records[at] = Some(self.record_for(input, key, &lineage, outcome));
                        continue;
                    }
                },
            };
            if waves.len() <= wave {
                waves.push(Vec::new());
            }
            waves[wave].push((at, state_key));
        }
        let Some(mut states) = self
            .load_state(inputs_of_key.into_keys().collect(), shutdown)
            .await?
        else {
            return Ok(None);
        };
        let mut changed: BTreeMap<String, StateChanges> = BTreeMap::new();
        // Per input executed: its key's state after it, when it changed it.
        let mut after: Vec<Option<(String, Arc<KeyState>)>> = vec![None; indexes.len()];
        for wave in waves {
            let calls = || {
                wave.iter()
                    .map(|(at, state_key)| {
                        let index = indexes[*at];
                        let input = batch[index].input().transform_input(&keys[index]);
                        let state = state_key.as_ref().zip(self.settings.state.as_ref()).map(
                            |(state_key, settings)| {
                                let base = states[state_key].clone();
                                StateView::new(state_key.clone(), base, settings.limits)
                            },
                        );
                        Call { input, state }
                    })
                    .collect()
            };
            let Some(results) = self.run_wave(&*runtime, calls, shutdown).await? else {
                return Ok(None);
            };
            for ((at, state_key), result) in wave.into_iter().zip(results) {
                let index = indexes[at];
                let input = batch[index].input();
                let (mut record, mut dead_letter) =
                    self.record_for(input, &keys[index], &lineage, result.outcome);
                if let Some(state_key) = state_key
                    && dead_letter.is_none()
                    && !result.changes.is_empty()
                {
                    let state = states.get_mut(&state_key).expect("loaded for its inputs");
                    match self.state_too_large(state.encoded_len_after(&result.changes)) {
                        Some(reason) => {
                            let outcome = Outcome::failed(FailureKind::StateLimit, reason);
                            (record, dead_letter) =
                                self.record_for(input, &keys[index], &lineage, outcome);
                        }
                        None => {
                            // Copied only while someone else holds this state: a snapshot
                            // a partitioned pipeline keeps for an earlier input (below).
                            Arc::make_mut(state).apply(&result.changes);
                            if self.fence.is_some() {
                                after[at] = Some((state_key.clone(), state.clone()));
                            }
                            changed.entry(state_key).or_default().extend(result.changes);
                        }
                    }
                }
                records[at] = Some((record, dead_letter));
            }
        }
        if let Some(fence) = &self.fence {
            fence.cache_states(states);
        }
        Ok(Some(Executed {
            records: records
                .into_iter()
                .map(|record| record.expect("every input has a record"))
                .collect(),
            state: changed.into_iter().collect(),
            after,
        }))
    }

    /// Why a key's state cannot be committed, if it cannot: a partitioned pipeline commits
    /// a key's whole state as one message of the output stream, which must fit the stream's
    /// and the server's limits.
    fn state_too_large(&self, encoded_len: usize) -> Option<String> {
        let fence = self.fence.as_ref()?;
        let limit = fence.settings.max_state_bytes;
        (encoded_len > limit).then(|| {
            format!(
                "the state of this key would take {encoded_len} bytes in its message on the output stream, more than the {limit} the stream and the server accept"
            )
        })
    }

    /// The state of `keys`, read from the store, retrying transient faults. `None` on
    /// shutdown first.
    async fn load_state(
        &self,
        keys: Vec<String>,
        shutdown: &CancellationToken,
    ) -> Result<Option<HashMap<String, Arc<KeyState>>>, Fatal> {
        if let Some(fence) = &self.fence {
            return self.load_fenced_state(fence, keys, shutdown).await;
        }
        // Without a store (which a stateful pipeline's configuration refuses) every key
        // starts empty.
        let Some(store) = self.store.as_ref().filter(|_| !keys.is_empty()) else {
            return Ok(Some(
                keys.into_iter().map(|key| (key, Arc::default())).collect(),
            ));
        };
        let keys = Arc::new(keys);
        let mut retrier = Retrier::new(Step::LoadState, self, shutdown);
        loop {
            let (store, loading) = (store.clone(), keys.clone());
            let loaded = blocking(move || {
                let refs: Vec<&str> = loading.iter().map(String::as_str).collect();
                store.load_state(&refs)
            });
            match loaded.await {
                Ok(states) => {
                    return Ok(Some(
                        keys.iter()
                            .cloned()
                            .zip(states.into_iter().map(Arc::new))
                            .collect(),
                    ));
                }
                Err(error) if !error.is_transient() => return Err(fatal_store(error)),
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// A partitioned pipeline's state of `keys`: as this run executed it, or else the last
    /// message on the key's state subject (none: the key starts empty). `None` on shutdown
    /// first.
    async fn load_fenced_state(
        &self,
        fence: &Fence,
        keys: Vec<String>,
        shutdown: &CancellationToken,
    ) -> Result<Option<HashMap<String, Arc<KeyState>>>, Fatal> {
        let mut retrier = Retrier::new(Step::LoadState, self, shutdown);
        let mut states = HashMap::with_capacity(keys.len());
        for key in keys {
            let state = match fence.cached_state(&key) {
                Some(state) => state,
                None => loop {
                    let subject = fence.state_subject(&key);
                    match self.publisher.last_marker(&subject).await {
                        Ok(None) => break Arc::default(),
                        Ok(Some(stored)) => {
                            let state = KeyState::decode(&stored.payload).map_err(|error| {
                                Fatal::Ledger(format!(
                                    "the state of key {key:?} on {subject} (sequence {}) cannot be read: {error}",
                                    stored.sequence
                                ))
                            })?;
                            break Arc::new(state);
                        }
                        Err(error) => {
                            if !retrier.failed(error).await {
                                return Ok(None);
                            }
                        }
                    }
                },
            };
            states.insert(key, state);
        }
        Ok(Some(states))
    }

    /// Runs one wave of plugin calls, retrying while the runtime has no instance free.
    /// `None` on shutdown first.
    async fn run_wave(
        &self,
        runtime: &R,
        calls: impl Fn() -> Vec<Call>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<CallResult>>, Fatal> {
        let mut retrier = Retrier::new(Step::Execute, self, shutdown);
        loop {
            match runtime.run_all(calls()).await {
                Ok(results) => {
                    self.metrics.executed.inc_by(results.len() as u64);
                    for result in &results {
                        self.metrics
                            .plugin_call_seconds
                            .observe(result.cost.elapsed.as_secs_f64());
                        self.metrics.plugin_fuel.observe(result.cost.fuel as f64);
                    }
                    return Ok(Some(results));
                }
                // Nothing was committed: when the host goes down, the batch is redelivered.
                Err(RunError::Panicked(message)) => {
                    tracing::error!(%message, "a plugin call panicked in the host; nothing of the batch is acked");
                    return Err(Fatal::PluginCrashed(format!(
                        "a plugin call panicked in the host (a bug in weir: report it): {message}"
                    )));
                }
                Err(error @ RunError::Exhausted(_)) => {
                    if !retrier.failed(error).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Commits `records` in one synced write, retrying transient faults. False on shutdown
    /// before it succeeded; true at once without a store or records.
    async fn commit(
        &self,
        records: Vec<(String, Arc<DoneRecord>)>,
        state: Vec<(String, StateChanges)>,
        shutdown: &CancellationToken,
    ) -> Result<bool, Fatal> {
        let Some(store) = &self.store else {
            return Ok(true);
        };
        if records.is_empty() {
            return Ok(true);
        }
        let records = Arc::new(records);
        let state = Arc::new(state);
        let mut retrier = Retrier::new(Step::Commit, self, shutdown);
        loop {
            let committing = store.clone();
            let (records, state) = (records.clone(), state.clone());
            let commit = blocking(move || {
                let refs: Vec<(&str, &DoneRecord)> = records
                    .iter()
                    .map(|(key, record)| (key.as_str(), &**record))
                    .collect();
                let state: Vec<(&str, &StateChanges)> = state
                    .iter()
                    .map(|(key, changes)| (key.as_str(), changes))
                    .collect();
                committing.commit(&refs, &state)
            });
            match commit.await {
                Ok(()) => return Ok(true),
                Err(error) if !error.is_transient() => return Err(fatal_store(error)),
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(false);
                    }
                    // A store may refuse writes after a failed one until it is reopened.
                    let reopening = store.clone();
                    if let Err(error) = blocking(move || reopening.reopen()).await {
                        tracing::warn!(%error, "reopening the store failed");
                    }
                }
            }
        }
    }

    /// Step 4: publish what the batch's inputs map to and await the server's acks. Returns,
    /// per input, its key if its messages were published here (and so it may have an
    /// outbox entry to clear), or `None` on shutdown before that: then nothing is acked.
    async fn publish_stage<D: Delivery>(
        &self,
        batch: &[D],
        staged: Staged,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Option<String>>>, Fatal> {
        let mut records = staged.records;
        if let Some(store) = &self.store
            && !staged.recheck.is_empty()
        {
            let store = store.clone();
            let keys: Vec<String> = staged
                .recheck
                .iter()
                .map(|&index| staged.keys[index].clone())
                .collect();
            let found = blocking(move || {
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                store.lookup(&refs)
            })
            .await;
            // On a failed lookup, publish what was read before: inside the duplicate window
            // a message the server has is dropped.
            if let Ok(found) = found {
                for (&index, committed) in staged.recheck.iter().zip(found) {
                    records[index] = committed.and_then(|c| c.unpublished).map(Arc::new);
                }
            }
        }

        let inputs: Vec<&Input> = batch.iter().map(Delivery::input).collect();
        let mut publications: Vec<Publication> = records
            .iter()
            .enumerate()
            .filter_map(|(index, record)| {
                let record = record.clone()?;
                Some(Publication::new(Some(index), &staged.keys[index], record))
            })
            .collect();
        if !self
            .publish_until_done(&mut publications, &inputs, shutdown)
            .await?
        {
            // Committed and in the outbox: re-published on the next start.
            return Ok(None);
        }

        self.probe.reached(Point::Published).await;
        // Only what was published here can still be in the outbox (a redelivery storm
        // publishes nothing, and so clears nothing).
        Ok(Some(
            staged
                .keys
                .into_iter()
                .zip(&records)
                .map(|(key, record)| record.is_some().then_some(key))
                .collect(),
        ))
    }

    /// Publishes every message of `publications` until the server has acknowledged each;
    /// false if shutdown came first. A retry sends only what is not acknowledged yet. A
    /// message the server refuses for good turns its input into a dead letter
    /// (`inputs[index]`, when known), committed before it is published.
    async fn publish_until_done(
        &self,
        publications: &mut [Publication],
        inputs: &[&Input],
        shutdown: &CancellationToken,
    ) -> Result<bool, Fatal> {
        let mut retrier = Retrier::new(Step::Publish, self, shutdown);
        loop {
            let sending: Vec<(usize, usize)> = publications
                .iter()
                .enumerate()
                .flat_map(|(at, publication)| {
                    publication
                        .pending()
                        .map(move |message_index| (at, message_index))
                })
                .collect();
            if sending.is_empty() {
                return Ok(true);
            }
            let messages: Vec<&OutboundMessage> = sending
                .iter()
                .map(|&(at, index)| &publications[at].record.messages[index])
                .collect();
            let results = self.publisher.publish_each(&messages).await;
            let mut transient = None;
            let mut refused: Vec<(usize, usize, PublishError)> = Vec::new();
            let mut acknowledged = 0;
            for (&(at, index), result) in sending.iter().zip(results) {
                match result {
                    Ok(()) => {
                        publications[at].acknowledged[index] = true;
                        acknowledged += 1;
                    }
                    Err(refusal @ PublishError::Refused(_)) => refused.push((at, index, refusal)),
                    Err(failure) => {
                        transient.get_or_insert(failure);
                    }
                }
            }
            self.metrics.published.inc_by(acknowledged as u64);

            let mut rejected = HashSet::new();
            // Outputs turned into dead letters: counted once the store has them.
            let mut outputs_rejected = 0;
            for (at, index, refusal) in refused {
                if !rejected.insert(at) {
                    continue;
                }
                let publication = &mut publications[at];
                let input = publication.index.and_then(|i| inputs.get(i).copied());
                match self.reject(publication, input, Some(index), &refusal) {
                    Some(record) => {
                        if publication.record.disposition == Disposition::Transformed {
                            outputs_rejected += 1;
                        }
                        publication.replace(record)
                    }
                    None => {
                        // Even the barest dead letter is refused: the DLQ stream cannot take
                        // weir's letters at all, which an operator must fix.
                        tracing::error!(%refusal, "the DLQ stream refuses even a dead letter without payload or input headers: raise its max_msg_size");
                        rejected.remove(&at);
                        transient.get_or_insert(refusal);
                    }
                }
            }
            if !rejected.is_empty() {
                let records: Vec<(String, Arc<DoneRecord>)> = rejected
                    .iter()
                    .map(|&at| {
                        (
                            publications[at].key.clone(),
                            publications[at].record.clone(),
                        )
                    })
                    .collect();
                if !self.commit(records, Vec::new(), shutdown).await? {
                    return Ok(false);
                }
                self.metrics
                    .dead_letters(FailureKind::OutputRejected, outputs_rejected);
            }
            if let Some(failure) = transient {
                self.narrow_outbox(publications).await;
                if !retrier.failed(failure).await {
                    return Ok(false);
                }
            }
        }
    }

    /// The dead letter that replaces a publication the server refused for good (message
    /// `index`, when known: an atomic batch is refused whole): `output-rejected` for an
    /// output, the barest letter for a dead letter the DLQ stream refused. `None` if even
    /// that was refused.
    fn reject(
        &self,
        publication: &Publication,
        input: Option<&Input>,
        index: Option<usize>,
        refusal: &PublishError,
    ) -> Option<DoneRecord> {
        // The outbox on start has no input at hand: the letter points at it by its key.
        let unknown;
        let input = match input {
            Some(input) => input,
            None => {
                unknown = Input {
                    subject: String::new(),
                    headers: Vec::new(),
                    payload: Default::default(),
                    stream_sequence: 0,
                    stream_created_unix_ns: 0,
                    published_unix_ns: 0,
                    unreadable_headers: None,
                };
                &unknown
            }
        };
        if publication.record.disposition == Disposition::DeadLettered {
            if publication.bare {
                return None;
            }
            let bare = DeadLetterSchema {
                max_message_bytes: 0,
                ..self.dead_letters.clone()
            };
            let letter =
                DeadLetterHeaders::parse(&publication.record.messages[index.unwrap_or(0)].headers);
            let kind = FailureKind::parse(&letter.kind).unwrap_or(FailureKind::OutputRejected);
            tracing::warn!(dedup_key = %publication.key, %refusal, "the DLQ stream refused a dead letter; publishing it without the input's payload and headers");
            // A record of an older store has no lineage; its letter may name the plugin.
            let lineage = publication.record.lineage.clone().or_else(|| {
                (!letter.plugin_sha256.is_empty()).then(|| Lineage {
                    sha256: letter.plugin_sha256.clone(),
                    contract: letter.plugin_contract.clone(),
                })
            });
            return Some(DoneRecord {
                disposition: Disposition::DeadLettered,
                messages: vec![bare.letter(
                    input,
                    &publication.key,
                    lineage.as_ref(),
                    kind,
                    &letter.reason,
                )],
                lineage,
            });
        }
        let reason = match index {
            Some(index) => {
                let published = publication.acknowledged.iter().filter(|a| **a).count();
                format!(
                    "the server refused output {index} for good ({refusal}); {published} of the input's outputs were published before"
                )
            }
            None => format!(
                "the server refused the input's outputs for good ({refusal}); none was published"
            ),
        };
        let trace = TraceContext::of(&input.headers);
        let _entered = self
            .message_span(input, &publication.key, trace.as_ref())
            .entered();
        Some(self.dead_letter_record(
            input,
            &publication.key,
            publication.record.lineage.clone(),
            FailureKind::OutputRejected,
            &reason,
        ))
    }

    /// Narrows the outbox entries of partly published inputs to what is left, so that a
    /// restart does not publish again what the server already has.
    async fn narrow_outbox(&self, publications: &[Publication]) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let entries: Vec<(String, Option<DoneRecord>)> = publications
            .iter()
            .filter(|publication| publication.acknowledged.iter().any(|a| *a))
            .map(|publication| (publication.key.clone(), publication.remaining()))
            .collect();
        if entries.is_empty() {
            return;
        }
        let result = blocking(move || {
            let refs: Vec<(&str, Option<&DoneRecord>)> = entries
                .iter()
                .map(|(key, record)| (key.as_str(), record.as_ref()))
                .collect();
            store.narrow_outbox(&refs)
        })
        .await;
        if let Err(error) = result {
            // A wider entry than needed only re-publishes, inside the duplicate window.
            tracing::warn!(%error, "recording what was published failed");
        }
    }

    async fn clear_outbox(&self, keys: Vec<String>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let result = blocking(move || {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            store.clear_outbox(&refs)
        })
        .await;
        if let Err(error) = result {
            // Harmless: a stale outbox entry only causes a re-publish on the next start.
            tracing::warn!(%error, "clearing the outbox failed");
        }
    }

    /// Turns a plugin's outcome into the exact messages to publish for this input, and the
    /// kind of dead letter it is, if it is one.
    fn record_for(
        &self,
        input: &Input,
        key: &str,
        lineage: &Lineage,
        outcome: Outcome,
    ) -> (DoneRecord, Option<FailureKind>) {
        let trace = TraceContext::of(&input.headers);
        let span = self.message_span(input, key, trace.as_ref());
        let _entered = span.enter();
        let (kind, reason) = match outcome {
            Outcome::Outputs(outputs) => {
                match self.policy.outbound(key, trace.as_ref(), lineage, outputs) {
                    Ok(messages) => {
                        let record = DoneRecord {
                            disposition: Disposition::Transformed,
                            messages,
                            lineage: Some(lineage.clone()),
                        };
                        return (record, None);
                    }
                    Err(reason) => (FailureKind::OutputRejected, reason),
                }
            }
            Outcome::Failed { kind, reason } => (kind, reason),
        };
        (
            self.dead_letter_record(input, key, Some(lineage.clone()), kind, &reason),
            Some(kind),
        )
    }

    /// The span of one input's processing: what is logged of an input is logged in it,
    /// which joins a log line to the input's trace and names the input as OpenTelemetry's
    /// messaging conventions do.
    fn message_span(
        &self,
        input: &Input,
        key: &str,
        trace: Option<&TraceContext>,
    ) -> tracing::Span {
        tracing::info_span!(
            "message",
            trace_id = trace.map(|trace| trace.trace_id.as_str()),
            parent_span_id = trace.map(|trace| trace.parent_id.as_str()),
            messaging.system = "nats",
            messaging.destination.name = %input.subject,
            messaging.consumer.group.name = %self.settings.consumer,
            messaging.nats.stream = %self.settings.input_stream,
            messaging.nats.stream_sequence = input.stream_sequence,
            dedup_key = key,
        )
    }

    fn dead_letter_record(
        &self,
        input: &Input,
        key: &str,
        lineage: Option<Lineage>,
        kind: FailureKind,
        reason: &str,
    ) -> DoneRecord {
        tracing::info!(kind = kind.as_str(), reason = %text::escaped(reason, LOGGED_REASON), "input dead-lettered");
        DoneRecord {
            disposition: Disposition::DeadLettered,
            messages: vec![
                self.dead_letters
                    .letter(input, key, lineage.as_ref(), kind, reason),
            ],
            lineage,
        }
    }
}

fn fatal_store(error: impl Fault) -> Fatal {
    Fatal::Store(Box::new(error))
}

/// A store call's failure: the store's own, or the blocking task's.
#[derive(Debug, thiserror::Error)]
enum Blocking<E> {
    #[error(transparent)]
    Store(E),
    /// The call panicked: a bug in the store adapter, never transient.
    #[error("a store call panicked: {0} (a bug in weir: report it)")]
    Panicked(String),
}

impl<E: Fault> Fault for Blocking<E> {
    fn is_transient(&self) -> bool {
        match self {
            Blocking::Store(error) => error.is_transient(),
            Blocking::Panicked(_) => false,
        }
    }
}

/// Now, as nanoseconds since the Unix epoch (0 on a clock set before it).
fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static, E: Fault>(
    call: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Blocking<E>> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result.map_err(Blocking::Store),
        Err(join) => Err(Blocking::Panicked(join.to_string())),
    }
}

/// One input's messages on their way to the server.
struct Publication {
    /// The input's place in its batch; `None` for an outbox entry replayed on start.
    index: Option<usize>,
    key: String,
    record: Arc<DoneRecord>,
    /// Per message of `record`: the server has it.
    acknowledged: Vec<bool>,
    /// `record` is already the barest dead letter there is.
    bare: bool,
    /// A partitioned pipeline's: the input's key's state after it, when it changed it,
    /// committed with it.
    state: Option<(String, Arc<KeyState>)>,
}

impl Publication {
    fn new(index: Option<usize>, key: &str, record: Arc<DoneRecord>) -> Publication {
        Publication {
            index,
            key: key.to_owned(),
            acknowledged: vec![false; record.messages.len()],
            record,
            bare: false,
            state: None,
        }
    }

    /// The indexes of the messages the server does not have yet.
    fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        self.acknowledged
            .iter()
            .enumerate()
            .filter(|(_, acknowledged)| !**acknowledged)
            .map(|(index, _)| index)
    }

    /// What is left to publish, as an outbox entry; `None` when nothing is.
    fn remaining(&self) -> Option<DoneRecord> {
        let messages: Vec<OutboundMessage> = self
            .pending()
            .map(|index| self.record.messages[index].clone())
            .collect();
        (!messages.is_empty()).then_some(DoneRecord {
            disposition: self.record.disposition,
            messages,
            lineage: self.record.lineage.clone(),
        })
    }

    /// Publishes `record` instead, from its first message.
    fn replace(&mut self, record: DoneRecord) {
        self.bare = self.record.disposition == Disposition::DeadLettered;
        self.acknowledged = vec![false; record.messages.len()];
        self.record = Arc::new(record);
    }
}

/// A batch whose messages are published, waiting for its inputs to be acked.
struct PublishedBatch<D> {
    batch: Vec<D>,
    /// Per input, its key if this batch published its messages: then its outbox entry goes
    /// once it is acked.
    published: Vec<Option<String>>,
}

/// A batch whose results are committed, waiting to be published and acked.
struct CommittedBatch<D> {
    batch: Vec<D>,
    staged: Staged,
}

/// What executing a batch's new inputs gave: each one's record and the kind of dead letter
/// it is, if it is one; and the state changes of the transformed ones, by state key.
struct Executed {
    records: Vec<(DoneRecord, Option<FailureKind>)>,
    state: Vec<(String, StateChanges)>,
    /// Per input, its key's state after it, when it changed it: what a partitioned
    /// pipeline commits.
    after: Vec<Option<(String, Arc<KeyState>)>>,
}

/// What the commit stage leaves for the publish stage.
struct Staged {
    /// What to publish per input; `None` where nothing needs publishing.
    records: Vec<Option<Arc<DoneRecord>>>,
    /// Indexes of inputs committed by an earlier batch whose outbox entry was still there
    /// at lookup: looked up again just before publishing.
    recheck: Vec<usize>,
    /// Every input's dedup key, in batch order.
    keys: Vec<String>,
    /// A partitioned pipeline's new dead letters (input index, kind), counted once
    /// committed.
    dead_letters: Vec<(usize, FailureKind)>,
    /// A partitioned pipeline's state per input (by index): its key's state after it, when
    /// it changed it.
    states: Vec<Option<(String, Arc<KeyState>)>>,
}

/// A step of the message path that retries transient faults.
#[derive(Debug, Clone, Copy)]
enum Step {
    Fetch,
    Lookup,
    Execute,
    Commit,
    Publish,
    ReadOutbox,
    LoadState,
    TakeOver,
    AtomicCommit,
}

impl Step {
    /// Its `step` label in the metrics and the status.
    fn label(self) -> &'static str {
        match self {
            Step::Fetch => "fetch",
            Step::Lookup => "lookup",
            Step::Execute => "execute",
            Step::Commit => "commit",
            Step::Publish => "publish",
            Step::ReadOutbox => "read-outbox",
            Step::LoadState => "load-state",
            Step::TakeOver => "take-over",
            Step::AtomicCommit => "atomic-commit",
        }
    }

    /// What it does, for the log.
    fn doing(self) -> &'static str {
        match self {
            Step::Fetch => "fetch",
            Step::Lookup => "look up the store",
            Step::Execute => "run the plugin",
            Step::Commit => "commit to the store",
            Step::Publish => "publish",
            Step::ReadOutbox => "read the outbox",
            Step::LoadState => "load the state",
            Step::TakeOver => "take the partition over",
            Step::AtomicCommit => "commit to the output stream",
        }
    }
}

/// Paces the retries of one transient operation: logs and counts each failure, shows the
/// step as retrying in the status until it is over, and waits with backoff.
struct Retrier<'a> {
    step: Step,
    metrics: &'a PipelineMetrics,
    status: &'a PipelineStatus,
    shutdown: &'a CancellationToken,
    backoff: Backoff,
    failed: bool,
}

impl<'a> Retrier<'a> {
    fn new<St, Pu, R, Pr>(
        step: Step,
        pipeline: &'a Pipeline<St, Pu, R, Pr>,
        shutdown: &'a CancellationToken,
    ) -> Retrier<'a> {
        Retrier {
            step,
            metrics: &pipeline.metrics,
            status: &pipeline.status,
            shutdown,
            backoff: Backoff::new(),
            failed: false,
        }
    }

    /// Records a failure and waits before the next try; false if shutdown came first.
    async fn failed(&mut self, error: impl std::fmt::Display) -> bool {
        let delay = self.backoff.next_delay();
        let (label, doing) = (self.step.label(), self.step.doing());
        tracing::warn!(%error, retry_in = ?delay, "{doing} failed; retrying");
        self.metrics.retry(label);
        self.status
            .retry_failed(label, error.to_string(), !self.failed);
        self.failed = true;
        if sleep_unless_shutdown(delay, self.shutdown).await {
            true
        } else {
            tracing::warn!("shutting down with {doing} unfinished; its inputs stay unacked");
            false
        }
    }

    /// The operation works again, though the retrier goes on (and keeps its backoff, should
    /// it fail again at once).
    fn recovered(&mut self) {
        if self.failed {
            self.status.retry_over(self.step.label());
            self.failed = false;
        }
    }
}

impl Drop for Retrier<'_> {
    fn drop(&mut self) {
        self.recovered();
    }
}
