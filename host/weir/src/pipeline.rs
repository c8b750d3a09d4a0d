//! One pipeline, wired: its plugin (the sandbox), its store (RocksDB), its streams and
//! consumer (NATS), checked and prepared before anything is consumed, then handed to the
//! message path of `weir_core::pipeline`, which decides everything and keeps the
//! exactly-once invariant.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_core::dead_letter::{DeadLetterHeaders, DeadLetterSchema};
use weir_core::fence::{Fence, FenceSettings, MAX_BATCH_MESSAGES};
use weir_core::pipeline::{Fatal, Settings};
use weir_core::policy::{MAX_STORED_MESSAGE, OutputPolicy};
use weir_core::ports::PluginSlot;
use weir_core::status::PipelineStatus;

use crate::config::{Delivery, PipelineConfig, ValidPipeline};
use crate::fault::FaultProbe;
use crate::{Error, StartError};
use weir_admin::{PluginIdentity, RECENT_DEAD_LETTERS, RecentDeadLetter, Watched};
use weir_core::lease::LeaseSettings;
use weir_core::spread::Members;
use weir_nats::{
    BatchConfig, Broker, InputConfig, LeaseStore, MessageSource, Publisher, StreamMark,
};
use weir_sandbox::{Plugin, Sandbox};
use weir_store::Store;

/// A pipeline whose plugin, store, streams and consumer are all in place.
pub struct Pipeline {
    path: weir_core::pipeline::Pipeline<Store, Publisher, Plugin, FaultProbe>,
    /// Where it consumes from: now, or (partitioned) whenever it holds its partition.
    source: Consuming,
    poller: Poller,
}

/// Boxed: a source is large, and the pipeline holds one or the other until it runs.
enum Consuming {
    Now(Box<MessageSource>),
    WhenLeased(Box<Partition>),
}

/// What a partitioned pipeline needs to consume its partition whenever it holds its lease.
struct Partition {
    leases: LeaseStore,
    lease: LeaseSettings,
    membership: Arc<Membership>,
    broker: Broker,
    input: InputConfig,
    batch: BatchConfig,
}

/// A partitioned pipeline's membership on this host: the member it is, the members it
/// sees (which say where each partition is wanted, `weir_core::spread`), and its
/// registration. That starts once every partition of the pipeline here is ready to take its
/// lease (a host wanted for partitions it cannot run yet would only hold them up), and ends
/// at shutdown by leaving at once, so that the others take its partitions as it releases
/// them.
pub struct Membership {
    pipeline: String,
    members: Members,
    ttl: Duration,
    /// Partitions of the pipeline here not ready yet, and what the registration updates.
    unready: std::sync::Mutex<(u32, Option<MembersSender>)>,
    registration: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

type MembersSender = tokio::sync::watch::Sender<std::collections::BTreeSet<String>>;

impl Membership {
    pub fn new(pipeline: &ValidPipeline) -> Arc<Membership> {
        let config = pipeline.config();
        let (live, members) = Members::channel(&member_name());
        Arc::new(Membership {
            pipeline: config.name.clone(),
            members,
            ttl: Duration::from_secs(config.lease_ttl_secs),
            unready: std::sync::Mutex::new((config.partition_indexes().len() as u32, Some(live))),
            registration: std::sync::Mutex::new(None),
        })
    }

    /// A partition is ready: the last one starts the registration, on `leases`, until
    /// `shutdown`.
    fn ready(&self, leases: &LeaseStore, shutdown: &CancellationToken) {
        let live = {
            let mut unready = self.unready.lock().unwrap_or_else(|e| e.into_inner());
            unready.0 = unready.0.saturating_sub(1);
            match unready.0 {
                0 => unready.1.take(),
                _ => None,
            }
        };
        let Some(live) = live else { return };
        let (leases, shutdown) = (leases.clone(), shutdown.clone());
        let (pipeline, me, ttl) = (
            self.pipeline.clone(),
            self.members.me().to_owned(),
            self.ttl,
        );
        let registration = tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => leases.leave_membership(&pipeline, &me).await,
                never = leases.keep_membership(&pipeline, &me, ttl, live) => match never {},
            }
        });
        *self.registration.lock().unwrap_or_else(|e| e.into_inner()) = Some(registration);
    }

    /// Waits until the registration, if it started, has ended (after shutdown).
    pub async fn left(&self) {
        let registration = self
            .registration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(registration) = registration {
            let _ = registration.await;
        }
    }
}

impl Partition {
    /// The partition's source, for a run that has just taken its lease: the consumer is
    /// rewound to its ack floor, so that what the last holder pulled and never acked comes
    /// again at once and in order, and whatever another puller gets from now on is noticed
    /// (`Broker::consume_in_order`).
    async fn consume(&self) -> Result<MessageSource, weir_nats::BrokerError> {
        self.broker.consume_in_order(&self.input, &self.batch).await
    }
}

/// How often the connection's state, and the consumer's and store's sizes, are read into
/// the status and the metrics.
const CONNECTION_POLL: Duration = Duration::from_secs(1);
const SIZES_POLL: Duration = Duration::from_secs(5);

/// Reads what the message path does not see into the pipeline's status and metrics.
struct Poller {
    broker: Broker,
    input: InputConfig,
    dlq_subject: String,
    store: Option<Arc<Store>>,
    watched: Arc<Watched>,
}

impl Pipeline {
    /// Checks and prepares everything before anything is consumed: the plugin, the store
    /// (and its lock), the server, the streams and the consumer. Its plugin runs on at most
    /// `thread_share` of the sandbox's threads at once.
    pub async fn start(
        pipeline: ValidPipeline,
        partition: u32,
        sandbox: &Arc<Sandbox>,
        thread_share: usize,
        watched: &Arc<Watched>,
        membership: Option<Arc<Membership>>,
    ) -> Result<Pipeline, Error> {
        let config = pipeline.config();
        let status: &PipelineStatus = &watched.status;
        status.starting("loading the plugin");
        let fail = |source: StartError| Error::Start {
            pipeline: config.name.clone(),
            source,
        };
        // Compiling blocks (for seconds, for a large component): on a thread of its own.
        let loading = {
            let (sandbox, plugin, limits) = (
                sandbox.clone(),
                config.plugin.clone(),
                config.limits.clone(),
            );
            tokio::task::spawn_blocking(move || sandbox.load(&plugin, &limits))
        };
        let plugin = loading
            .await
            .map_err(|e| Error::Crashed {
                pipeline: config.name.clone(),
                message: format!("loading the plugin: {e}"),
            })?
            .map_err(|e| fail(e.into()))?
            .with_thread_share(thread_share);
        // Validated with the configuration.
        let state = config
            .state
            .as_ref()
            .and_then(|state| state.settings().ok());
        StartError::unless_contract_fits(config, &config.plugin, &plugin).map_err(fail)?;
        watched.set_plugin(PluginIdentity {
            sha256: plugin.sha256().to_owned(),
            contract: plugin.contract().to_owned(),
        });
        watched
            .metrics
            .plugin_loaded(plugin.sha256(), plugin.contract());
        status.starting("opening the store");
        let store = match pipeline.delivery() {
            Delivery::ExactlyOnce { store_dir } => Some(Arc::new(
                Store::open(store_dir, config.store_settings()).map_err(|e| fail(e.into()))?,
            )),
            Delivery::AtLeastOnce | Delivery::Partitioned => None,
        };
        status.starting("connecting to NATS");
        let broker = Broker::connect(&config.nats, &format!("weir-{}", config.name))
            .await
            .map_err(|e| fail(e.into()))?;
        status.set_connected(true);
        status.starting("checking the streams and the consumer");
        // A cluster may not answer for seconds (electing leaders after a node died): the
        // set-up waits for it as the connection waits for a restarting server.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(config.nats.connect_timeout_ms);
        let partitioning = config.input_partitioning();
        answered(deadline, || {
            broker.ensure_input_stream(&config.input, partitioning.as_ref())
        })
        .await
        .map_err(|e| fail(e.into()))?;
        // A partitioned pipeline commits to its output stream: its name.
        let ledger = match pipeline.delivery() {
            Delivery::Partitioned => {
                let markers = config.marker_subjects();
                Some(
                    answered(deadline, || broker.ensure_ledger(&config.output, &markers))
                        .await
                        .map_err(|e| fail(e.into()))?,
                )
            }
            Delivery::ExactlyOnce { .. } | Delivery::AtLeastOnce => {
                answered(deadline, || broker.ensure_output_streams(&config.output))
                    .await
                    .map_err(|e| fail(e.into()))?;
                None
            }
        };
        // What the server and the streams accept, checked before publishing rather than
        // learnt from a refusal.
        let message_limit = async |subject: &str| -> Result<usize, Error> {
            let stream_limit = answered(deadline, || broker.stream_message_limit(subject))
                .await
                .map_err(|e| fail(e.into()))?;
            Ok(publishable(broker.max_payload(), stream_limit))
        };
        let output_limit = message_limit(&format!("{}.probe", config.output.prefix)).await?;
        let dlq_limit = message_limit(&config.output.dlq_subject).await?;
        // A partitioned pipeline's state message: what the limit leaves beside its headers
        // (its id, and the atomic batch's).
        let stateful = state.is_some();
        let state_limit = match (&ledger, stateful) {
            (Some(_), true) => message_limit(&format!("{}.probe", config.state_subjects()))
                .await?
                .saturating_sub(1024),
            _ => 0,
        };
        // The partition's own consumer, when the pipeline has several.
        let input = config.partition_input(partition);
        let source = answered(deadline, || broker.consume(&input, &config.batch))
            .await
            .map_err(|e| fail(e.into()))?;
        // What a previous weir on this consumer pulled and never finished is handed out
        // again at once, not after ack_wait: the store tells which of it is done. (A
        // partitioned pipeline does this when it takes its partition's lease.)
        if let Delivery::ExactlyOnce { .. } = pipeline.delivery() {
            match broker.redeliver_pending(&config.input).await {
                Ok(0) => {}
                Ok(held) => tracing::info!(
                    held,
                    "inputs a previous run delivered and never acked are redelivered now"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "inputs a previous run held wait out input.ack_wait_ms"
                ),
            }
        }
        tracing::info!(
            plugin = %config.plugin.display(),
            plugin_sha256 = plugin.sha256(),
            mode = ?config.mode,
            stream = %config.input.stream,
            "pipeline ready"
        );
        // This run, as its markers and its lease name it.
        let owner = owner();
        let path = weir_core::pipeline::Pipeline {
            settings: Settings {
                name: config.name.clone(),
                dedup: config.dedup,
                input_stream: config.input.stream.clone(),
                consumer: input.consumer.clone(),
                ack_wait: Duration::from_millis(config.input.ack_wait_ms),
                state,
            },
            policy: output_policy(config, ledger.is_some(), output_limit),
            dead_letters: DeadLetterSchema {
                pipeline: config.name.clone(),
                dlq_subject: config.output.dlq_subject.clone(),
                input_stream: config.input.stream.clone(),
                max_message_bytes: dlq_limit,
            },
            publisher: match &ledger {
                Some(stream) => broker.ledger(stream),
                None => broker.publisher(),
            },
            runtime: Arc::new(PluginSlot::new(plugin)),
            store: store.clone(),
            fence: ledger.as_ref().map(|_| {
                Fence::new(FenceSettings {
                    marker_subject: config.marker_subject(partition),
                    owner: owner.clone(),
                    state_subjects: config.state_subjects(),
                    max_state_bytes: state_limit,
                })
            }),
            probe: FaultProbe,
            metrics: watched.metrics.clone(),
            status: watched.status.clone(),
        };
        let source = match (ledger, membership) {
            (None, _) | (_, None) => Consuming::Now(Box::new(source)),
            (Some(_), Some(membership)) => {
                let replicas = answered(deadline, || broker.stream_replicas(&config.input.stream))
                    .await
                    .map_err(|e| fail(e.into()))?;
                let leases = answered(deadline, || broker.leases(replicas))
                    .await
                    .map_err(|e| fail(e.into()))?;
                Consuming::WhenLeased(Box::new(Partition {
                    leases,
                    lease: LeaseSettings {
                        key: config.lease_key(partition),
                        holder: owner,
                        ttl: Duration::from_secs(config.lease_ttl_secs),
                        partition,
                        partitions: config.partition_indexes().len() as u32,
                    },
                    membership,
                    broker: broker.clone(),
                    input: input.clone(),
                    batch: config.batch.clone(),
                }))
            }
        };
        let poller = Poller {
            broker,
            input,
            dlq_subject: config.output.dlq_subject.clone(),
            store,
            watched: watched.clone(),
        };
        Ok(Pipeline {
            path,
            source,
            poller,
        })
    }

    /// The plugin it runs, which a reload may replace.
    pub fn plugin(&self) -> Arc<PluginSlot<Plugin>> {
        self.path.runtime.clone()
    }

    pub fn name(&self) -> &str {
        &self.path.settings.name
    }

    /// Runs until `shutdown` fires, then finishes the batches in hand and returns. Returns
    /// an error only for a fault that retrying cannot heal (a corrupt store, a host bug).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let pipeline = self.path.settings.name.clone();
        let running = async {
            match self.source {
                Consuming::Now(source) => self.path.run(*source, shutdown).await,
                Consuming::WhenLeased(partition) => {
                    partition.membership.ready(&partition.leases, &shutdown);
                    let consume = || partition.consume();
                    weir_core::lease::run_partition(
                        &self.path,
                        &partition.leases,
                        &partition.lease,
                        partition.membership.members.clone(),
                        consume,
                        shutdown,
                    )
                    .await
                }
            }
        };
        let ran = tokio::select! {
            ran = running => ran,
            never = self.poller.run() => match never {},
        };
        ran.map_err(|fatal| stopped_by(pipeline, fatal))
    }

    /// Runs a replay run (`ValidPipeline::for_replay`) until every input of its range, up
    /// to stream sequence `last`, is acknowledged on its consumer, or until `shutdown`
    /// (then it finishes the batches in hand). Inputs past `last` are acknowledged and never
    /// run. `progress` hears where the consumer is, every fifth of a second. Returns
    /// whether the range is done.
    pub async fn run_until(
        self,
        last: u64,
        shutdown: CancellationToken,
        progress: impl Fn(weir_nats::ConsumerState) + Send,
    ) -> Result<bool, Error> {
        let pipeline = self.path.settings.name.clone();
        let Consuming::Now(source) = self.source else {
            return Err(Error::Crashed {
                pipeline,
                message: "a replay run is never partitioned".into(),
            });
        };
        let stop = shutdown.child_token();
        let done = std::sync::atomic::AtomicBool::new(false);
        let (broker, input) = (&self.poller.broker, &self.poller.input);
        let watching = async {
            loop {
                if let Ok(now) = broker.consumer_state(input).await {
                    progress(now);
                    // The consumer's ack floor passes `last` once every input up to it is
                    // acknowledged and one past it was; a consumer with nothing left
                    // matched nothing past it yet.
                    if now.ack_floor >= last || (now.pending == 0 && now.ack_pending == 0) {
                        done.store(true, std::sync::atomic::Ordering::SeqCst);
                        stop.cancel();
                        return std::future::pending::<std::convert::Infallible>().await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let running = self.path.run(
            Bounded {
                inner: *source,
                last,
            },
            stop.clone(),
        );
        let ran = tokio::select! {
            ran = running => ran,
            never = watching => match never {},
        };
        ran.map_err(|fatal| stopped_by(pipeline, fatal))?;
        Ok(done.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// What `config`'s plugin may publish. A partitioned pipeline commits an input's outputs
/// with the marker (and, with state, its key's state) in one atomic batch.
pub(crate) fn output_policy(
    config: &PipelineConfig,
    partitioned: bool,
    max_message_bytes: usize,
) -> OutputPolicy {
    OutputPolicy {
        pipeline: config.name.clone(),
        prefix: config.output.prefix.clone(),
        max_outputs: match (partitioned, config.state.is_some()) {
            (true, false) => config.limits.max_outputs.min(MAX_BATCH_MESSAGES - 1),
            (true, true) => config.limits.max_outputs.min(MAX_BATCH_MESSAGES - 2),
            (false, _) => config.limits.max_outputs,
        },
        max_output_bytes: config.limits.max_output_bytes,
        max_message_bytes,
    }
}

/// The largest message the server (`max_payload`) and a stream (`stream_limit`, if it has
/// one) accept, and weir stores.
pub(crate) fn publishable(max_payload: usize, stream_limit: Option<usize>) -> usize {
    [max_payload, MAX_STORED_MESSAGE]
        .into_iter()
        .chain(stream_limit)
        .min()
        .unwrap_or(MAX_STORED_MESSAGE)
}

/// The error a pipeline stopped with, for a fault retrying cannot heal.
fn stopped_by(pipeline: String, fatal: Fatal) -> Error {
    match fatal {
        Fatal::Store(source) => Error::Stopped { pipeline, source },
        Fatal::PluginCrashed(message) => Error::Crashed { pipeline, message },
        Fatal::Ledger(message) => Error::Ledger { pipeline, message },
        Fatal::TakenOver(message) => Error::TakenOver { pipeline, message },
    }
}

/// A replay run's source: the inputs of its range. One past the range's end (up to stream
/// sequence `last`) is acknowledged on the run's own consumer, which nothing else reads,
/// and never reaches the pipeline.
struct Bounded {
    inner: MessageSource,
    last: u64,
}

impl weir_core::ports::Source for Bounded {
    type Delivery = <MessageSource as weir_core::ports::Source>::Delivery;
    type Error = <MessageSource as weir_core::ports::Source>::Error;

    async fn next_batch(&mut self) -> Result<Vec<Self::Delivery>, Self::Error> {
        use weir_core::ports::Delivery as _;
        let batch = self.inner.next_batch().await?;
        let (inside, past): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|delivery| delivery.input().stream_sequence <= self.last);
        if !past.is_empty() {
            // Acked apart, so that this future stays cancel-safe: nothing awaits after
            // the batch is taken.
            tokio::spawn(async move {
                for delivery in past {
                    let _ = delivery.ack_unconfirmed().await;
                }
            });
        }
        Ok(inside)
    }

    async fn ready(&mut self) -> Result<(), Self::Error> {
        self.inner.ready().await
    }

    async fn ack_floor(&mut self) -> Result<u64, Self::Error> {
        self.inner.ack_floor().await
    }

    async fn stop(&mut self) -> usize {
        self.inner.stop().await
    }
}

/// This run of this host, as its progress markers name it: the host's name, the process and
/// when it started, so that no two runs, here or elsewhere, share it.
fn owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{host}/{}/{started:x}", std::process::id())
}

/// This host as a member of a partitioned pipeline: its name, the process and when it
/// started, in the characters a key's token may hold.
fn member_name() -> String {
    owner()
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => c,
            _ => '_',
        })
        .collect()
}

impl Poller {
    /// Polls until dropped.
    async fn run(&self) -> std::convert::Infallible {
        let mut reconnects = 0;
        let mut connection_ticker = tokio::time::interval(CONNECTION_POLL);
        let mut sizes_ticker = tokio::time::interval(SIZES_POLL);
        for ticker in [&mut connection_ticker, &mut sizes_ticker] {
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        // The DLQ stream's mark when its dead letters were last read: they are read again
        // only when it moves (or a read failed).
        let mut dlq_read_at = None;
        // Apart, so that a server that does not answer the sizes' requests (for seconds)
        // delays no news of the connection.
        let connection = async {
            loop {
                connection_ticker.tick().await;
                self.poll_connection(&mut reconnects);
            }
        };
        let sizes = async {
            loop {
                sizes_ticker.tick().await;
                self.poll_sizes(&mut dlq_read_at).await;
            }
        };
        tokio::join!(connection, sizes).0
    }

    /// Whether the connection is up, and how many times it came back since `reconnects`.
    fn poll_connection(&self, reconnects: &mut u64) {
        let (connected, now_reconnects) = self.broker.connection();
        self.watched.status.set_connected(connected);
        self.watched
            .metrics
            .reconnects
            .inc_by(now_reconnects.saturating_sub(*reconnects));
        *reconnects = now_reconnects;
    }

    /// The consumer's backlog, the store's size and the last dead letters. A server that
    /// does not answer leaves the last figures in place.
    async fn poll_sizes(&self, dlq_read_at: &mut Option<StreamMark>) {
        let metrics = &self.watched.metrics;
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let consumer = tokio::time::timeout(SIZES_POLL, self.broker.consumer_state(&self.input));
        if let Ok(Ok(consumer)) = consumer.await {
            metrics.consumer_pending.set(gauge(consumer.pending));
            metrics
                .consumer_ack_pending
                .set(gauge(consumer.ack_pending));
            metrics
                .consumer_redelivered
                .set(gauge(consumer.redelivered));
        }
        if let Some(store) = &self.store {
            let store = store.clone();
            if let Ok(stats) = tokio::task::spawn_blocking(move || store.stats()).await {
                metrics.store_keys.set(gauge(stats.estimated_keys));
                metrics.store_bytes.set(gauge(stats.size_bytes));
                metrics
                    .store_block_cache_bytes
                    .set(gauge(stats.block_cache_bytes));
            }
        }
        let recent = tokio::time::timeout(SIZES_POLL, self.recent_dead_letters(*dlq_read_at));
        match recent.await {
            Ok(Ok(Some((mark, recent)))) => {
                *self
                    .watched
                    .recent_dead_letters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = recent;
                *dlq_read_at = mark;
            }
            Ok(Ok(None)) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot read the last dead letters for the status");
                *dlq_read_at = None;
            }
            Err(_elapsed) => *dlq_read_at = None,
        }
    }

    /// The last dead letters in the DLQ stream and the stream's mark, or `None` when that
    /// is still `read_at`. A DLQ stream that also stores other subjects is read back no
    /// further than `DLQ_SCAN` messages.
    async fn recent_dead_letters(
        &self,
        read_at: Option<StreamMark>,
    ) -> Result<Option<(Option<StreamMark>, Vec<RecentDeadLetter>)>, weir_nats::BrokerError> {
        const DLQ_SCAN: u64 = 64;
        let Some(stream) = self.broker.stream_storing(&self.dlq_subject).await? else {
            return Ok(Some((None, Vec::new())));
        };
        let Some((mark, stored)) = self
            .broker
            .recent_messages(
                &stream,
                &self.dlq_subject,
                RECENT_DEAD_LETTERS,
                DLQ_SCAN,
                read_at,
            )
            .await?
        else {
            return Ok(None);
        };
        let recent = stored
            .into_iter()
            .map(|message| {
                let headers = DeadLetterHeaders::parse(&message.headers);
                RecentDeadLetter {
                    sequence: message.stream_sequence,
                    stored_unix_ms: message.stored_unix_ns / 1_000_000,
                    kind: headers.kind,
                    reason: headers.reason,
                    input_stream: headers.input_stream,
                    input_sequence: headers.input_sequence,
                    input_subject: headers.input_subject,
                }
            })
            .collect();
        Ok(Some((Some(mark), recent)))
    }
}

/// Runs a start-up request again while the server does not answer it in time
/// (`BrokerError::is_unanswered`), as long as the failed attempt began before `deadline`.
async fn answered<T, F>(
    deadline: tokio::time::Instant,
    mut request: impl FnMut() -> F,
) -> Result<T, weir_nats::BrokerError>
where
    F: Future<Output = Result<T, weir_nats::BrokerError>>,
{
    loop {
        // Compared with when the request began: one that times out (10 s) past the deadline
        // is still asked again once.
        let began = tokio::time::Instant::now();
        match request().await {
            Err(error) if error.is_unanswered() && began < deadline => {
                tracing::info!(%error, "the server does not answer yet (a cluster electing its leaders?); retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            result => return result,
        }
    }
}
