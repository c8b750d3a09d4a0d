//! The message path of one pipeline: fetch a batch → dedup lookup → execute new inputs →
//! commit → publish → ack.
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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_core::Mode;
use weir_core::dead_letter::{DeadLetterHeaders, DeadLetterSchema};
use weir_core::input::{Input, dedup_key};
use weir_core::plugin::{FailureKind, Outcome};
use weir_core::policy::{MAX_STORED_MESSAGE, OutputPolicy};
use weir_core::record::{Disposition, DoneRecord, OutboundMessage};
use weir_core::retry::{Backoff, sleep_unless_shutdown};
use weir_core::text;

use crate::broker::{Broker, InputMessage, MessageSource, PublishFailure, Publisher};
use crate::config::PipelineConfig;
use crate::sandbox::{Plugin, RunError, Sandbox};
use crate::store::{Store, StoreError};
use crate::{Error, StartError};

/// How many outbox records are re-published per round on start.
const OUTBOX_REPLAY_CHUNK: usize = 1000;

/// How much of a dead letter's reason a log line carries.
const LOGGED_REASON: usize = 1024;

/// Counters of what a pipeline did, readable while it runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Inputs received from the consumer (redeliveries included).
    pub received: AtomicU64,
    /// Inputs the plugin ran on.
    pub executed: AtomicU64,
    /// Inputs already committed: the plugin did not run; their stored outputs were
    /// re-published only if not yet confirmed published.
    pub deduplicated: AtomicU64,
    /// Inputs committed as dead letters.
    pub dead_lettered: AtomicU64,
    /// Messages JetStream acknowledged (outputs and dead letters, re-publishes included).
    pub published: AtomicU64,
    /// Inputs acknowledged.
    pub acked: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.load(Ordering::Relaxed),
            executed: self.executed.load(Ordering::Relaxed),
            deduplicated: self.deduplicated.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
        }
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A copy of a pipeline's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub executed: u64,
    pub deduplicated: u64,
    pub dead_lettered: u64,
    pub published: u64,
    pub acked: u64,
}

/// Why a pipeline stopped on its own: nothing retrying could heal.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A plugin call panicked in the host: a bug in weir, never anything a plugin does.
    #[error("{0}")]
    PluginCrashed(String),
}

/// A pipeline whose plugin, store, streams and consumer are all in place.
pub struct Pipeline {
    config: PipelineConfig,
    plugin: Plugin,
    /// `None` in at-least-once mode, which records nothing.
    store: Option<Arc<Store>>,
    /// Taken by `run`: fetching proceeds alongside publishing the previous batch.
    source: Option<MessageSource>,
    publisher: Publisher,
    policy: OutputPolicy,
    dead_letters: DeadLetterSchema,
    stats: Arc<Stats>,
}

impl Pipeline {
    /// Checks and prepares everything before anything is consumed: the plugin, the store
    /// (and its lock), the server, the streams and the consumer.
    pub async fn start(config: PipelineConfig, sandbox: &Sandbox) -> Result<Pipeline, Error> {
        let fail = |source: StartError| Error::Start {
            pipeline: config.name.clone(),
            source,
        };
        let plugin = sandbox
            .load(&config.plugin, &config.limits)
            .map_err(|e| fail(e.into()))?;
        let store = match (config.mode, &config.store_dir) {
            (Mode::ExactlyOnce, Some(dir)) => Some(Arc::new(
                Store::open(dir, config.store_settings()).map_err(|e| fail(e.into()))?,
            )),
            (Mode::ExactlyOnce, None) => {
                return Err(Error::Usage(format!(
                    "pipeline {:?} is exactly-once but has no store_dir",
                    config.name
                )));
            }
            (Mode::AtLeastOnce, _) => None,
        };
        let broker = Broker::connect(&config.nats, &format!("weir-{}", config.name))
            .await
            .map_err(|e| fail(e.into()))?;
        broker
            .ensure_input_stream(&config.input)
            .await
            .map_err(|e| fail(e.into()))?;
        broker
            .ensure_output_streams(&config.output)
            .await
            .map_err(|e| fail(e.into()))?;
        // What the server and the streams accept, checked before publishing rather than
        // learnt from a refusal that would hold the batch.
        let message_limit = async |subject: &str| -> Result<usize, Error> {
            let stream_limit = broker
                .stream_message_limit(subject)
                .await
                .map_err(|e| fail(e.into()))?;
            Ok([
                Some(broker.max_payload()),
                stream_limit,
                Some(MAX_STORED_MESSAGE),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("the array holds Some"))
        };
        let output_limit = message_limit(&format!("{}.probe", config.output.prefix)).await?;
        let dlq_limit = message_limit(&config.output.dlq_subject).await?;
        let source = broker
            .consume(&config.input, &config.batch)
            .await
            .map_err(|e| fail(e.into()))?;
        tracing::info!(
            plugin = %config.plugin.display(),
            plugin_sha256 = plugin.sha256(),
            mode = ?config.mode,
            stream = %config.input.stream,
            "pipeline ready"
        );
        Ok(Pipeline {
            policy: OutputPolicy {
                pipeline: config.name.clone(),
                prefix: config.output.prefix.clone(),
                max_outputs: config.limits.max_outputs,
                max_output_bytes: config.limits.max_output_bytes,
                max_message_bytes: output_limit,
            },
            dead_letters: DeadLetterSchema {
                pipeline: config.name.clone(),
                dlq_subject: config.output.dlq_subject.clone(),
                input_stream: config.input.stream.clone(),
                plugin_sha256: plugin.sha256().to_owned(),
                max_message_bytes: dlq_limit,
            },
            publisher: broker.publisher(),
            plugin,
            store,
            source: Some(source),
            config,
            stats: Arc::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` fires, then finishes the batches in hand and returns. Returns
    /// an error only for a fault that retrying cannot heal (a corrupt store, a host bug).
    ///
    /// Three batches are in flight at once: while one is acked, the next is published, and
    /// the one after it is fetched, executed and committed. Each batch still keeps the
    /// invariant on its own; a later batch's lookup sees every earlier batch's commit,
    /// because commits happen one batch after another.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut source = self
            .source
            .take()
            .expect("a pipeline runs once, with the source `start` gave it");
        let stopped = |fatal: Fatal| match fatal {
            Fatal::Store(source) => Error::Stopped {
                pipeline: self.config.name.clone(),
                source,
            },
            Fatal::PluginCrashed(message) => Error::Crashed {
                pipeline: self.config.name.clone(),
                message,
            },
        };
        self.replay_outbox(&shutdown).await.map_err(stopped)?;
        let (to_ack, published) = tokio::sync::mpsc::channel(1);
        let (result, ()) = tokio::join!(
            self.commit_and_publish(&mut source, to_ack, &shutdown),
            self.ack_stage(published),
        );
        tracing::info!(stats = ?self.stats.snapshot(), "pipeline stopped");
        result.map_err(stopped)
    }

    /// Fetches, commits and publishes batches, handing each published one to `to_ack`.
    async fn commit_and_publish(
        &self,
        source: &mut MessageSource,
        to_ack: tokio::sync::mpsc::Sender<PublishedBatch>,
        shutdown: &CancellationToken,
    ) -> Result<(), Fatal> {
        let mut committed: Option<CommittedBatch> = None;
        loop {
            let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<()>();
            let finishing = async {
                let finished = self.finish(committed.take(), &to_ack, shutdown).await;
                let _ = finished_tx.send(());
                finished
            };
            let next = async {
                let batch = self.next_batch(source, shutdown).await?;
                let keepalive = self.keepalive_period();
                let staged = with_keepalive(&batch, keepalive, async {
                    let staged = self.commit_stage(&batch, shutdown).await;
                    // Committed, it waits for the previous batch to be published: the
                    // server must not redeliver it meanwhile either.
                    let _ = finished_rx.await;
                    staged
                })
                .await;
                Some(staged.map(|staged| (batch, staged)))
            };
            let (finished, next) = tokio::join!(finishing, next);
            finished?;
            match next {
                None => break,
                Some(Ok((batch, Some(staged)))) => {
                    committed = Some(CommittedBatch { batch, staged })
                }
                // Shut down before the commit: nothing of this batch is acked.
                Some(Ok((_, None))) => break,
                Some(Err(fatal)) => return Err(fatal),
            }
        }
        self.finish(committed, &to_ack, shutdown).await
    }

    /// The next batch: waits for a first message, then takes what arrives within the batch
    /// wait. `None` on shutdown.
    async fn next_batch(
        &self,
        source: &mut MessageSource,
        shutdown: &CancellationToken,
    ) -> Option<Vec<InputMessage>> {
        let mut backoff = Backoff::new();
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                next = source.next_message() => next,
            };
            match next {
                Ok(first) => {
                    let mut batch = vec![first];
                    source.fill_batch(&mut batch).await;
                    return Some(batch);
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "fetch failed");
                    if !sleep_unless_shutdown(delay, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// While a batch is in hand (a slow plugin, a long fan-out, retries), weir tells the
    /// server every half `ack_wait` that it is being worked on, so it is not redelivered.
    fn keepalive_period(&self) -> Duration {
        Duration::from_millis(self.config.input.ack_wait_ms / 2)
    }

    /// Publishes a committed batch (step 4 of the module docs) and hands it on to be acked.
    async fn finish(
        &self,
        committed: Option<CommittedBatch>,
        to_ack: &tokio::sync::mpsc::Sender<PublishedBatch>,
        shutdown: &CancellationToken,
    ) -> Result<(), Fatal> {
        let Some(CommittedBatch { batch, staged }) = committed else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let published = with_keepalive(
            &batch,
            self.keepalive_period(),
            self.publish_stage(&batch, staged, shutdown),
        )
        .await?;
        tracing::debug!(inputs = batch.len(), took = ?started.elapsed(), "batch published");
        if let Some(published) = published {
            // The ack stage outlives this stage: it stops only once every sender is gone.
            let _ = to_ack.send(PublishedBatch { batch, published }).await;
        }
        Ok(())
    }

    /// Step 5, batch after batch: ack the inputs, then clear their outbox entries. A failed
    /// ack only means a redelivery, which step 1 absorbs.
    async fn ack_stage(&self, mut published: tokio::sync::mpsc::Receiver<PublishedBatch>) {
        while let Some(PublishedBatch { batch, published }) = published.recv().await {
            let started = std::time::Instant::now();
            // An input that published nothing here (a redelivery of a done one) gets a plain
            // ack: if it is lost, the next redelivery costs one lookup again. The others get
            // a double ack, so that a failure is seen and logged.
            let acks = futures::future::join_all(batch.iter().zip(&published).map(
                |(message, published)| async move {
                    match published {
                        Some(_) => message.ack().await,
                        None => message.ack_unconfirmed().await,
                    }
                },
            ))
            .await;
            let acked = acks.iter().filter(|result| result.is_ok()).count();
            if let Some(Err(error)) = acks.into_iter().find(Result::is_err) {
                tracing::warn!(%error, failed = batch.len() - acked, "some acks failed; those inputs will be redelivered and deduplicated");
            }
            Stats::add(&self.stats.acked, acked);
            crate::fault::point("acked").await;
            let published_keys: Vec<String> = published.into_iter().flatten().collect();
            if !published_keys.is_empty() {
                self.clear_outbox(published_keys).await;
            }
            tracing::debug!(inputs = batch.len(), took = ?started.elapsed(), "batch acked");
        }
    }

    /// Re-publishes what was committed but not confirmed published before the last stop.
    /// Fails only on a fault retrying cannot heal.
    async fn replay_outbox(&self, shutdown: &CancellationToken) -> Result<(), Fatal> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let mut retrier = Retrier::new("read the outbox", shutdown);
        let pending = loop {
            let store = store.clone();
            match blocking(move || store.pending_outbox()).await {
                Ok(pending) => break pending,
                Err(error) if !error.is_transient() => return Err(error.into()),
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(());
                    }
                }
            }
        };
        if pending.is_empty() {
            return Ok(());
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
                return Ok(());
            }
            let keys: Vec<String> = chunk.iter().map(|(key, _)| key.clone()).collect();
            self.clear_outbox(keys).await;
        }
        Ok(())
    }

    /// Steps 1 to 3 of the module docs: look up, execute the new inputs, commit. Returns
    /// what to publish for each input (`None` where nothing needs publishing), or `None` on
    /// shutdown before the commit; an error on a fault retrying cannot heal.
    async fn commit_stage(
        &self,
        batch: &[InputMessage],
        shutdown: &CancellationToken,
    ) -> Result<Option<Staged>, Fatal> {
        crate::fault::point("fetched").await;
        let started = std::time::Instant::now();
        Stats::add(&self.stats.received, batch.len());
        let keys: Vec<String> = batch
            .iter()
            .map(|m| dedup_key(self.config.dedup, &self.config.input.stream, &m.input))
            .collect();

        // 1. Which inputs are already committed? (In at-least-once mode, none are known.)
        let mut retrier = Retrier::new("look up the store", shutdown);
        let committed = loop {
            let Some(store) = self.store.clone() else {
                break vec![None; keys.len()];
            };
            let lookup_keys = keys.clone();
            let lookup = blocking(move || {
                let refs: Vec<&str> = lookup_keys.iter().map(String::as_str).collect();
                store.lookup(&refs)
            });
            match lookup.await {
                Ok(committed) => break committed,
                Err(error) if !error.is_transient() => return Err(error.into()),
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(None);
                    }
                }
            }
        };

        let looked_up_at = started.elapsed();
        // 2. Execute the new ones: each key once, even if it appears twice in the batch.
        // A committed input is re-published only as far as its outbox entry says JetStream
        // has not acknowledged it: a re-publish of what it has, after the duplicate window,
        // would be a real duplicate.
        Stats::add(
            &self.stats.deduplicated,
            committed.iter().filter(|c| c.is_some()).count(),
        );
        let committed_earlier: Vec<usize> = (0..committed.len())
            .filter(|&index| committed[index].is_some())
            .collect();
        let mut records: Vec<Option<Arc<DoneRecord>>> = Vec::with_capacity(keys.len());
        let mut first_index_of_key: HashMap<&str, usize> = HashMap::new();
        let mut to_execute = Vec::new();
        for (index, committed) in committed.into_iter().enumerate() {
            match committed {
                Some(committed) => records.push(committed.unpublished.map(Arc::new)),
                None => {
                    records.push(None);
                    if first_index_of_key.insert(&keys[index], index).is_none() {
                        to_execute.push(index);
                    }
                    // Otherwise a repeat of a key first seen in this batch: published once,
                    // there.
                }
            }
        }
        let outcomes = self.execute(batch, &keys, &to_execute, shutdown).await?;
        let Some(outcomes) = outcomes else {
            return Ok(None);
        };
        let executed_at = started.elapsed();
        crate::fault::point("executed").await;
        Stats::add(&self.stats.executed, outcomes.len());
        let mut new_records = Vec::with_capacity(outcomes.len());
        for (&index, outcome) in to_execute.iter().zip(outcomes) {
            let record = Arc::new(self.record_for(&batch[index].input, &keys[index], outcome));
            new_records.push((keys[index].clone(), record.clone()));
            records[index] = Some(record);
        }

        // 3. Commit the new records in one synced write.
        if !self.commit(&new_records, shutdown).await? {
            return Ok(None);
        }

        tracing::debug!(inputs = batch.len(), ?looked_up_at, ?executed_at, committed_at = ?started.elapsed(), "batch committed");
        crate::fault::point("committed").await;
        // Inputs committed earlier and still in the outbox: by the time this batch is
        // published, the batch that committed them may have published them, and publishing
        // them again after JetStream's duplicate window would double them.
        let recheck = committed_earlier
            .into_iter()
            .filter(|&index| records[index].is_some())
            .collect();
        Ok(Some(Staged {
            records,
            recheck,
            keys,
        }))
    }

    /// Runs the plugin on the inputs at `indexes`. `None` on shutdown while the host is out
    /// of instances (retried meanwhile: that is never the input's fault).
    async fn execute(
        &self,
        batch: &[InputMessage],
        keys: &[String],
        indexes: &[usize],
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Outcome>>, Fatal> {
        let mut retrier = Retrier::new("run the plugin", shutdown);
        loop {
            let inputs = indexes
                .iter()
                .map(|&index| batch[index].input.transform_input(&keys[index]))
                .collect();
            match self.plugin.run_all(inputs).await {
                Ok(outcomes) => return Ok(Some(outcomes)),
                // Nothing was committed: if the host goes down now, the batch is redelivered.
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
    /// before it succeeded; nothing to do (true) without a store or records.
    async fn commit(
        &self,
        records: &[(String, Arc<DoneRecord>)],
        shutdown: &CancellationToken,
    ) -> Result<bool, Fatal> {
        let Some(store) = &self.store else {
            return Ok(true);
        };
        if records.is_empty() {
            return Ok(true);
        }
        let records = Arc::new(records.to_vec());
        let mut retrier = Retrier::new("commit to the store", shutdown);
        loop {
            let committing = store.clone();
            let records = records.clone();
            let commit = blocking(move || {
                let refs: Vec<(&str, &DoneRecord)> = records
                    .iter()
                    .map(|(key, record)| (key.as_str(), &**record))
                    .collect();
                committing.commit(&refs)
            });
            match commit.await {
                Ok(()) => return Ok(true),
                Err(error) if !error.is_transient() => return Err(error.into()),
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(false);
                    }
                    // RocksDB refuses writes after a failed one until it is reopened.
                    let reopening = store.clone();
                    if let Err(error) = blocking(move || reopening.reopen()).await {
                        tracing::warn!(%error, "reopening the store failed");
                    }
                }
            }
        }
    }

    /// Step 4: publish what the batch's inputs map to and await JetStream's acks. Returns,
    /// per input, its key if its messages were published here (and so it may have an
    /// outbox entry to clear), or `None` on shutdown before that: then nothing is acked.
    async fn publish_stage(
        &self,
        batch: &[InputMessage],
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
            // a message JetStream has is dropped.
            if let Ok(found) = found {
                for (&index, committed) in staged.recheck.iter().zip(found) {
                    records[index] = committed.and_then(|c| c.unpublished).map(Arc::new);
                }
            }
        }

        let inputs: Vec<&Input> = batch.iter().map(|message| &message.input).collect();
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

        crate::fault::point("published").await;
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

    /// Publishes every message of `publications` until JetStream has acknowledged each; false
    /// if shutdown came first. A retry sends only what is not acknowledged yet. A message the
    /// server refuses for good turns its input into a dead letter (`inputs[index]`, when
    /// known), committed before it is published.
    async fn publish_until_done(
        &self,
        publications: &mut [Publication],
        inputs: &[&Input],
        shutdown: &CancellationToken,
    ) -> Result<bool, Fatal> {
        let mut retrier = Retrier::new("publish", shutdown);
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
            let mut refused: Vec<(usize, usize, PublishFailure)> = Vec::new();
            let mut acknowledged = 0;
            for (&(at, index), result) in sending.iter().zip(results) {
                match result {
                    Ok(()) => {
                        publications[at].acknowledged[index] = true;
                        acknowledged += 1;
                    }
                    Err(failure) if failure.is_refusal() => refused.push((at, index, failure)),
                    Err(failure) => {
                        transient.get_or_insert(failure);
                    }
                }
            }
            Stats::add(&self.stats.published, acknowledged);

            let mut rejected = HashSet::new();
            for (at, index, failure) in refused {
                if !rejected.insert(at) {
                    continue;
                }
                let publication = &mut publications[at];
                let input = publication.index.and_then(|i| inputs.get(i).copied());
                match self.reject(publication, input, index, &failure) {
                    Some(record) => {
                        if publication.record.disposition == Disposition::Transformed {
                            Stats::add(&self.stats.dead_lettered, 1);
                        }
                        publication.replace(record)
                    }
                    None => {
                        // Even the barest dead letter is refused: the DLQ stream cannot take
                        // weir's letters at all, which an operator must fix.
                        tracing::error!(%failure, "the DLQ stream refuses even a dead letter without payload or input headers: raise its max_msg_size");
                        rejected.remove(&at);
                        transient.get_or_insert(failure);
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
                if !self.commit(&records, shutdown).await? {
                    return Ok(false);
                }
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
    /// `index`): `output-rejected` for an output, the barest letter for a dead letter the
    /// DLQ stream refused. `None` if even that was refused.
    fn reject(
        &self,
        publication: &Publication,
        input: Option<&Input>,
        index: usize,
        failure: &PublishFailure,
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
                };
                &unknown
            }
        };
        let published = publication.acknowledged.iter().filter(|a| **a).count();
        if publication.record.disposition == Disposition::DeadLettered {
            if publication.bare {
                return None;
            }
            let bare = DeadLetterSchema {
                max_message_bytes: 0,
                ..self.dead_letters.clone()
            };
            let letter = DeadLetterHeaders::parse(&publication.record.messages[index].headers);
            let kind = FailureKind::parse(&letter.kind).unwrap_or(FailureKind::OutputRejected);
            let reason = letter.reason;
            tracing::warn!(dedup_key = %publication.key, %failure, "the DLQ stream refused a dead letter; publishing it without the input's payload and headers");
            return Some(DoneRecord {
                disposition: Disposition::DeadLettered,
                messages: vec![bare.letter(input, &publication.key, kind, &reason)],
            });
        }
        let reason = format!(
            "the server refused output {index} for good ({failure}); {published} of the input's outputs were published before"
        );
        Some(self.dead_letter_record(
            input,
            &publication.key,
            FailureKind::OutputRejected,
            &reason,
        ))
    }

    /// Narrows the outbox entries of partly published inputs to what is left, so that a
    /// restart does not publish again what JetStream already has.
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

    /// Turns a plugin's outcome into the exact messages to publish for this input.
    fn record_for(&self, input: &Input, key: &str, outcome: Outcome) -> DoneRecord {
        let (kind, reason) = match outcome {
            Outcome::Outputs(outputs) => match self.policy.outbound(key, outputs) {
                Ok(messages) => {
                    return DoneRecord {
                        disposition: Disposition::Transformed,
                        messages,
                    };
                }
                Err(reason) => (FailureKind::OutputRejected, reason),
            },
            Outcome::Failed { kind, reason } => (kind, reason),
        };
        Stats::add(&self.stats.dead_lettered, 1);
        self.dead_letter_record(input, key, kind, &reason)
    }

    fn dead_letter_record(
        &self,
        input: &Input,
        key: &str,
        kind: FailureKind,
        reason: &str,
    ) -> DoneRecord {
        tracing::info!(dedup_key = key, kind = kind.as_str(), reason = %text::escaped(reason, LOGGED_REASON), "input dead-lettered");
        DoneRecord {
            disposition: Disposition::DeadLettered,
            messages: vec![self.dead_letters.letter(input, key, kind, reason)],
        }
    }
}

/// Runs a store call on the blocking pool. A call that panics is a bug, never transient.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(call).await.unwrap_or_else(|e| {
        Err(StoreError::Panicked {
            message: e.to_string(),
        })
    })
}

/// One input's messages on their way to JetStream.
struct Publication {
    /// The input's place in its batch; `None` for an outbox entry replayed on start.
    index: Option<usize>,
    key: String,
    record: Arc<DoneRecord>,
    /// Per message of `record`: JetStream has it.
    acknowledged: Vec<bool>,
    /// `record` is already the barest dead letter there is.
    bare: bool,
}

impl Publication {
    fn new(index: Option<usize>, key: &str, record: Arc<DoneRecord>) -> Publication {
        Publication {
            index,
            key: key.to_owned(),
            acknowledged: vec![false; record.messages.len()],
            record,
            bare: false,
        }
    }

    /// The indexes of the messages JetStream does not have yet.
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
struct PublishedBatch {
    batch: Vec<InputMessage>,
    /// Per input, its key if this batch published its messages: then its outbox entry goes
    /// once it is acked.
    published: Vec<Option<String>>,
}

/// A batch whose results are committed, waiting to be published and acked.
struct CommittedBatch {
    batch: Vec<InputMessage>,
    staged: Staged,
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
}

/// Runs `work` while telling the server, every `period`, that `batch` is being worked on.
async fn with_keepalive<T>(
    batch: &[InputMessage],
    period: Duration,
    work: impl Future<Output = T>,
) -> T {
    let keepalive = async {
        let mut ticker = tokio::time::interval(period);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            futures::future::join_all(batch.iter().map(|message| message.progress())).await;
        }
    };
    tokio::select! {
        result = work => result,
        never = keepalive => never,
    }
}

/// Paces the retries of one transient operation: logs each failure and waits with backoff.
struct Retrier<'a> {
    what: &'static str,
    shutdown: &'a CancellationToken,
    backoff: Backoff,
}

impl<'a> Retrier<'a> {
    fn new(what: &'static str, shutdown: &'a CancellationToken) -> Retrier<'a> {
        Retrier {
            what,
            shutdown,
            backoff: Backoff::new(),
        }
    }

    /// Records a failure and waits before the next try; false if shutdown came first.
    async fn failed(&mut self, error: impl std::fmt::Display) -> bool {
        let delay = self.backoff.next_delay();
        let what = self.what;
        tracing::warn!(%error, retry_in = ?delay, "{what} failed; retrying");
        if sleep_unless_shutdown(delay, self.shutdown).await {
            true
        } else {
            tracing::warn!("shutting down with {what} unfinished; its inputs stay unacked");
            false
        }
    }
}
