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
//!    acked;
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::{
    Broker, InputMessage, MSG_ID_HEADER, MessageSource, Publisher, is_publishable_header,
};
use crate::config::{DedupMode, Mode, PipelineConfig};
use crate::record::{Disposition, DoneRecord, OutboundMessage};
use crate::retry::{Backoff, sleep_unless_shutdown};
use crate::sandbox::{FailureKind, Outcome, Plugin, Sandbox, TransformInput, sha256_hex};
use crate::store::{Store, StoreError};
use crate::{Error, StartError};

/// The longest subject an output may have, prefix included: far below the server's
/// control-line limit (4 KiB by default), which would drop the connection.
const MAX_SUBJECT_LEN: usize = 1024;

/// The longest producer `Nats-Msg-Id` used as a dedup key as is; longer ones are hashed.
const MAX_INLINE_MSG_ID: usize = 256;

/// The longest DLQ reason kept in a header.
const MAX_REASON_LEN: usize = 1024;

/// How many outbox records are re-published per round on start.
const OUTBOX_REPLAY_CHUNK: usize = 1000;

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
    /// Messages published (outputs and dead letters, re-publishes included).
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

/// A pipeline whose plugin, store, streams and consumer are all in place.
pub struct Pipeline {
    config: PipelineConfig,
    plugin: Plugin,
    /// `None` in at-least-once mode, which records nothing.
    store: Option<Arc<Store>>,
    /// Taken by `run`: fetching proceeds alongside publishing the previous batch.
    source: Option<MessageSource>,
    publisher: Publisher,
    max_payload: usize,
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
            // Validation requires a store for exactly-once; at-least-once keeps none.
            _ => None,
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
        let source = broker
            .consume(&config.input, &config.batch)
            .await
            .map_err(|e| fail(e.into()))?;
        tracing::info!(
            pipeline = %config.name,
            plugin = %config.plugin.display(),
            plugin_sha256 = plugin.sha256(),
            mode = ?config.mode,
            stream = %config.input.stream,
            "pipeline ready"
        );
        Ok(Pipeline {
            max_payload: broker.max_payload(),
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
    /// an error only for a fault that retrying cannot heal (a corrupt store).
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
        self.replay_outbox(&shutdown)
            .await
            .map_err(|source| Error::Stopped {
                pipeline: self.config.name.clone(),
                source,
            })?;
        let (to_ack, published) = tokio::sync::mpsc::channel(1);
        let (result, ()) = tokio::join!(
            self.commit_and_publish(&mut source, to_ack, &shutdown),
            self.ack_stage(published),
        );
        tracing::info!(pipeline = %self.config.name, stats = ?self.stats.snapshot(), "pipeline stopped");
        result.map_err(|source| Error::Stopped {
            pipeline: self.config.name.clone(),
            source,
        })
    }

    /// Fetches, commits and publishes batches, handing each published one to `to_ack`.
    async fn commit_and_publish(
        &self,
        source: &mut MessageSource,
        to_ack: tokio::sync::mpsc::Sender<PublishedBatch>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let mut committed: Option<CommittedBatch> = None;
        loop {
            let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<()>();
            let finishing = async {
                self.finish(committed.take(), &to_ack, shutdown).await;
                let _ = finished_tx.send(());
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
            let (_, next) = tokio::join!(finishing, next);
            match next {
                None => break,
                Some(Ok((batch, Some(staged)))) => {
                    committed = Some(CommittedBatch { batch, staged })
                }
                // Shut down before the commit: nothing of this batch is acked.
                Some(Ok((_, None))) => break,
                Some(Err(corrupt)) => return Err(corrupt),
            }
        }
        self.finish(committed, &to_ack, shutdown).await;
        Ok(())
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
                    tracing::warn!(pipeline = %self.config.name, %error, retry_in = ?delay, "fetch failed");
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
    ) {
        let Some(CommittedBatch { batch, staged }) = committed else {
            return;
        };
        let started = std::time::Instant::now();
        let published = with_keepalive(
            &batch,
            self.keepalive_period(),
            self.publish_stage(staged, shutdown),
        )
        .await;
        tracing::debug!(pipeline = %self.config.name, inputs = batch.len(), took = ?started.elapsed(), "batch published");
        if let Some(published) = published {
            // The ack stage outlives this stage: it stops only once every sender is gone.
            let _ = to_ack.send(PublishedBatch { batch, published }).await;
        }
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
                tracing::warn!(pipeline = %self.config.name, %error, failed = batch.len() - acked, "some acks failed; those inputs will be redelivered and deduplicated");
            }
            Stats::add(&self.stats.acked, acked);
            crate::fault::point("acked").await;
            let published_keys: Vec<String> = published.into_iter().flatten().collect();
            if !published_keys.is_empty() {
                self.clear_outbox(published_keys).await;
            }
            tracing::debug!(pipeline = %self.config.name, inputs = batch.len(), took = ?started.elapsed(), "batch acked");
        }
    }

    /// Re-publishes what was committed but not confirmed published before the last stop.
    /// Fails only on a corrupt record.
    async fn replay_outbox(&self, shutdown: &CancellationToken) -> Result<(), StoreError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let mut retrier = Retrier::new("read the outbox", shutdown);
        let pending = loop {
            let store = store.clone();
            match blocking(move || store.pending_outbox()).await {
                Ok(pending) => break pending,
                Err(corrupt @ StoreError::Corrupt { .. }) => return Err(corrupt),
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
        tracing::info!(pipeline = %self.config.name, inputs = pending.len(), "re-publishing the outbox");
        for chunk in pending.chunks(OUTBOX_REPLAY_CHUNK) {
            let messages: Vec<&OutboundMessage> =
                chunk.iter().flat_map(|(_, r)| &r.messages).collect();
            if !self.publish(&messages, shutdown).await {
                return Ok(());
            }
            let keys: Vec<String> = chunk.iter().map(|(key, _)| key.clone()).collect();
            self.clear_outbox(keys).await;
        }
        Ok(())
    }

    /// Steps 1 to 3 of the module docs: look up, execute the new inputs, commit. Returns
    /// what to publish for each input (`None` where nothing needs publishing), or `None` on
    /// shutdown before the commit; an error on a corrupt store record.
    async fn commit_stage(
        &self,
        batch: &[InputMessage],
        shutdown: &CancellationToken,
    ) -> Result<Option<Staged>, StoreError> {
        crate::fault::point("fetched").await;
        let started = std::time::Instant::now();
        Stats::add(&self.stats.received, batch.len());
        let keys: Vec<String> = batch.iter().map(|m| self.dedup_key(m)).collect();

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
                Err(corrupt @ StoreError::Corrupt { .. }) => return Err(corrupt),
                Err(error) => {
                    if !retrier.failed(error).await {
                        return Ok(None);
                    }
                }
            }
        };

        let looked_up_at = started.elapsed();
        // 2. Execute the new ones: each key once, even if it appears twice in the batch.
        // A committed input is re-published only while its outbox entry says JetStream has
        // not acknowledged all of it: once it has, a re-publish after the duplicate window
        // would be a real duplicate.
        Stats::add(
            &self.stats.deduplicated,
            committed.iter().filter(|c| c.is_some()).count(),
        );
        let mut needs_publish: Vec<bool> = committed
            .iter()
            .map(|c| c.as_ref().is_none_or(|c| !c.published))
            .collect();
        let committed_earlier: Vec<usize> = (0..committed.len())
            .filter(|&index| committed[index].is_some())
            .collect();
        let mut records: Vec<Option<Arc<DoneRecord>>> = committed
            .into_iter()
            .map(|c| c.map(|c| Arc::new(c.record)))
            .collect();
        let mut first_index_of_key: HashMap<&str, usize> = HashMap::new();
        let mut to_execute = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            if records[index].is_none() {
                if first_index_of_key.insert(key, index).is_none() {
                    to_execute.push(index);
                } else {
                    // A repeat of a key first seen in this batch: published once, there.
                    needs_publish[index] = false;
                }
            }
        }
        let inputs: Vec<TransformInput> = to_execute
            .iter()
            .map(|&index| transform_input(&batch[index], &keys[index]))
            .collect();
        let Some(outcomes) = self.plugin.run_all(inputs).await else {
            // The sandbox turns every plugin misbehaviour into an outcome; a panic here is a
            // host bug. Nothing was committed, so the batch will be redelivered.
            tracing::error!(pipeline = %self.config.name, "plugin execution panicked; batch not acked");
            return Ok(None);
        };
        let executed_at = started.elapsed();
        crate::fault::point("executed").await;
        Stats::add(&self.stats.executed, outcomes.len());
        let mut new_records = Vec::with_capacity(outcomes.len());
        for (&index, outcome) in to_execute.iter().zip(outcomes) {
            let record = Arc::new(self.record_for(&batch[index], &keys[index], outcome));
            if record.disposition == Disposition::DeadLettered {
                Stats::add(&self.stats.dead_lettered, 1);
            }
            new_records.push((keys[index].clone(), record.clone()));
            records[index] = Some(record);
        }
        for (index, key) in keys.iter().enumerate() {
            if records[index].is_none() {
                // A repeat of a key executed above, in this same batch.
                records[index] = records[first_index_of_key[key.as_str()]].clone();
            }
        }

        // 3. Commit the new records in one synced write.
        if let Some(store) = &self.store
            && !new_records.is_empty()
        {
            let new_records = Arc::new(new_records);
            let mut retrier = Retrier::new("commit to the store", shutdown);
            loop {
                let committing = store.clone();
                let new_records = new_records.clone();
                let commit = blocking(move || {
                    let refs: Vec<(&str, &DoneRecord)> = new_records
                        .iter()
                        .map(|(key, record)| (key.as_str(), &**record))
                        .collect();
                    committing.commit(&refs)
                });
                match commit.await {
                    Ok(()) => break,
                    Err(error) => {
                        if !retrier.failed(error).await {
                            return Ok(None);
                        }
                        // RocksDB refuses writes after a failed one until it is reopened.
                        let reopening = store.clone();
                        if let Err(error) = blocking(move || reopening.reopen()).await {
                            tracing::warn!(pipeline = %self.config.name, %error, "reopening the store failed");
                        }
                    }
                }
            }
        }

        tracing::debug!(pipeline = %self.config.name, inputs = batch.len(), ?looked_up_at, ?executed_at, committed_at = ?started.elapsed(), "batch committed");
        crate::fault::point("committed").await;
        // Inputs committed earlier and still in the outbox: by the time this batch is
        // published, the batch that committed them may have published them, and publishing
        // them again after JetStream's duplicate window would double them.
        let recheck = committed_earlier
            .into_iter()
            .filter(|&index| needs_publish[index])
            .collect();
        Ok(Some(Staged {
            records: records
                .into_iter()
                .zip(needs_publish)
                .map(|(record, needed)| record.filter(|_| needed))
                .collect(),
            recheck,
            keys,
        }))
    }

    /// Step 4: publish what the batch's inputs map to and await JetStream's acks. Returns,
    /// per input, its key if its messages were published here (and so it may have an
    /// outbox entry to clear), or `None` on shutdown before that: then nothing is acked.
    async fn publish_stage(
        &self,
        staged: Staged,
        shutdown: &CancellationToken,
    ) -> Option<Vec<Option<String>>> {
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
            // On a failed lookup, publish anyway: a duplicate inside the window is dropped.
            if let Ok(found) = found {
                for (&index, committed) in staged.recheck.iter().zip(found) {
                    if committed.is_some_and(|c| c.published) {
                        records[index] = None;
                    }
                }
            }
        }

        // 4. Publish everything the batch's inputs map to, and await the acks.
        let messages: Vec<&OutboundMessage> = records
            .iter()
            .flatten()
            .flat_map(|record| &record.messages)
            .collect();
        if !self.publish(&messages, shutdown).await {
            // Committed and in the outbox: re-published on the next start.
            return None;
        }

        crate::fault::point("published").await;
        // Only what was published here can still be in the outbox (a redelivery storm
        // publishes nothing, and so clears nothing).
        Some(
            staged
                .keys
                .into_iter()
                .zip(&records)
                .map(|(key, record)| record.is_some().then_some(key))
                .collect(),
        )
    }

    /// Publishes `messages` until JetStream has acknowledged them all; false if shutdown came
    /// first.
    async fn publish(&self, messages: &[&OutboundMessage], shutdown: &CancellationToken) -> bool {
        let mut retrier = Retrier::new("publish", shutdown);
        loop {
            match self.publisher.publish_all(messages).await {
                Ok(()) => {
                    Stats::add(&self.stats.published, messages.len());
                    return true;
                }
                Err(error) => {
                    if !retrier.failed(error).await {
                        return false;
                    }
                }
            }
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
            tracing::warn!(pipeline = %self.config.name, %error, "clearing the outbox failed");
        }
    }

    /// The identity under which an input is recorded (design.md §2).
    fn dedup_key(&self, message: &InputMessage) -> String {
        if self.config.dedup == DedupMode::MsgId
            && let Some(id) = message.header(MSG_ID_HEADER)
            && !id.is_empty()
        {
            // A long id would bloat every record and output id derived from it (and could
            // push a dead letter past max_payload): long ones are keyed by their hash.
            if id.len() > MAX_INLINE_MSG_ID {
                return format!("msg-id:sha256:{}", sha256_hex(id.as_bytes()));
            }
            return format!("msg-id:{id}");
        }
        format!(
            "{}@{}#{}",
            self.config.input.stream, message.stream_created_unix_ns, message.stream_sequence
        )
    }

    /// Turns a plugin's outcome into the exact messages to publish for this input.
    fn record_for(&self, input: &InputMessage, key: &str, outcome: Outcome) -> DoneRecord {
        let outcome = match outcome {
            Outcome::Outputs(outputs) => match self.outbound_outputs(key, outputs) {
                Ok(messages) => {
                    return DoneRecord {
                        disposition: Disposition::Transformed,
                        messages,
                    };
                }
                Err(reason) => Outcome::failed(FailureKind::OutputRejected, reason),
            },
            failed => failed,
        };
        let Outcome::Failed { kind, reason } = outcome else {
            unreachable!("outputs returned above")
        };
        tracing::info!(pipeline = %self.config.name, dedup_key = key, kind = kind.as_str(), %reason, "input dead-lettered");
        DoneRecord {
            disposition: Disposition::DeadLettered,
            messages: vec![self.dead_letter(input, key, kind, &reason)],
        }
    }

    fn outbound_outputs(
        &self,
        key: &str,
        outputs: Vec<crate::sandbox::PluginOutput>,
    ) -> Result<Vec<OutboundMessage>, String> {
        let prefix = &self.config.output.prefix;
        outputs
            .into_iter()
            .enumerate()
            .map(|(index, output)| {
                if !crate::subject::is_literal(&output.subject) {
                    return Err(format!(
                        "output {index} has subject {:?}, which is not a non-empty subject without wildcards",
                        output.subject
                    ));
                }
                let subject = format!("{prefix}.{}", output.subject);
                if subject.len() > MAX_SUBJECT_LEN {
                    return Err(format!(
                        "output {index} has a subject of {} bytes, more than {MAX_SUBJECT_LEN}",
                        subject.len()
                    ));
                }
                let mut headers = Vec::with_capacity(output.headers.len());
                for (name, value) in output.headers {
                    if name.eq_ignore_ascii_case(MSG_ID_HEADER) {
                        // Documented as reserved: the host sets its own, deterministic id.
                        continue;
                    }
                    if is_nats_header(&name) {
                        return Err(format!(
                            "output {index} sets header {name:?}: headers named Nats-* are reserved for NATS"
                        ));
                    }
                    if !is_publishable_header(&name, &value) {
                        return Err(format!(
                            "output {index} has header {name:?} = {value:?}, which NATS cannot carry"
                        ));
                    }
                    headers.push((name, value));
                }
                let message = OutboundMessage {
                    subject,
                    msg_id: format!("{}:{key}:{index}", self.config.name),
                    headers,
                    payload: output.payload,
                };
                if message.wire_size() > self.max_payload {
                    return Err(format!(
                        "output {index} is {} bytes with headers, more than the server's max_payload of {}",
                        message.wire_size(),
                        self.max_payload
                    ));
                }
                Ok(message)
            })
            .collect()
    }

    fn dead_letter(
        &self,
        input: &InputMessage,
        key: &str,
        kind: FailureKind,
        reason: &str,
    ) -> OutboundMessage {
        let mut reason: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        reason.truncate(truncated(&reason, MAX_REASON_LEN).len());
        let mut weir_headers = vec![
            ("Weir-Dlq-Kind".to_owned(), kind.as_str().to_owned()),
            ("Weir-Dlq-Reason".to_owned(), reason),
            (
                "Weir-Plugin-Sha256".to_owned(),
                self.plugin.sha256().to_owned(),
            ),
            (
                "Weir-Input-Stream".to_owned(),
                self.config.input.stream.clone(),
            ),
            (
                "Weir-Input-Sequence".to_owned(),
                input.stream_sequence.to_string(),
            ),
            ("Weir-Input-Subject".to_owned(), input.subject.clone()),
            ("Weir-Dedup-Key".to_owned(), key.to_owned()),
        ];
        if let Some(id) = input.header(MSG_ID_HEADER) {
            weir_headers.push((
                "Weir-Input-Msg-Id".into(),
                truncated(id, MAX_INLINE_MSG_ID).to_owned(),
            ));
        }
        // The input's own headers travel along, except NATS's (JetStream would act on them:
        // expected-sequence checks, rollups, TTLs) and weir's (a producer must not be able
        // to forge a dead letter's reason or origin).
        let input_headers: Vec<(String, String)> = input
            .headers
            .iter()
            .filter(|(name, _)| !is_nats_header(name) && !is_weir_header(name))
            .cloned()
            .collect();
        let mut letter = OutboundMessage {
            subject: self.config.output.dlq_subject.clone(),
            msg_id: format!("{}:{key}:dlq", self.config.name),
            headers: [input_headers, weir_headers.clone()].concat(),
            payload: input.payload.to_vec(),
        };
        // Too large with the added headers: the input stays in its stream, so point at it
        // rather than fail to publish.
        if letter.wire_size() > self.max_payload {
            letter.payload.clear();
            letter
                .headers
                .push(("Weir-Dlq-Payload-Omitted".into(), "too large".into()));
        }
        if letter.wire_size() > self.max_payload {
            weir_headers.push(("Weir-Dlq-Payload-Omitted".into(), "too large".into()));
            letter.headers = weir_headers;
        }
        letter
    }
}

/// Headers in NATS's namespace, which JetStream interprets.
fn is_nats_header(name: &str) -> bool {
    name.get(..5)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("Nats-"))
}

/// Headers in weir's namespace, which dead letters and replays carry.
fn is_weir_header(name: &str) -> bool {
    name.get(..5)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("Weir-"))
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn transform_input(message: &InputMessage, key: &str) -> TransformInput {
    TransformInput {
        subject: message.subject.clone(),
        headers: message.headers.clone(),
        payload: message.payload.to_vec(),
        stream_sequence: message.stream_sequence,
        data_time_unix_ns: message.published_unix_ns,
        dedup_key: key.to_owned(),
        seed: TransformInput::seed_for(key),
    }
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(call).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            operation: "task",
            message: e.to_string(),
        })
    })
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
