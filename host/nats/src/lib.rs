//! weir-nats: the NATS side of weir: connect, set up streams and the consumer, fetch
//! batches, publish, ack. It implements weir-core's `Source`, `Delivery` and `Publisher`.
//!
//! **Boundary:** the only crate of weir that imports async_nats. It knows nothing of
//! plugins or the store (it never depends on weir-sandbox or weir-store); the core decides
//! what to publish and when to ack.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, message::PublishMessage, stream};
use async_nats::{ConnectOptions, HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;

use weir_core::input::{Input, UnreadableHeaders};
use weir_core::ports::{self, Delivery, PublishError, Source};
use weir_core::record::OutboundMessage;

mod replay;
pub use replay::{ReplayFrom, StoredInput, StreamPlace};

/// A broker failure. At start they stop the host with the message; at run time they are
/// transient: the pipeline retries them and acks nothing in the meantime.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to NATS at {url:?}: {source} ({hint})")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
        /// What to check, by the kind of failure.
        hint: String,
    },
    #[error("cannot read NATS credentials file {path:?}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "input stream {stream:?} does not exist: create it (e.g. `nats stream add {stream} --subjects '{subject}'`) or set input.create_stream = true"
    )]
    MissingStream { stream: String, subject: String },
    #[error(
        "no stream stores subject {subject:?}, so publishes to it cannot be acknowledged: set {key} to have weir create one, or create a stream for it"
    )]
    Uncaptured { subject: String, key: &'static str },
    #[error(
        "consumer {consumer:?} exists with filter {filters:?} (or without explicit acks), not {subject:?}: delete it (`nats consumer rm`) or set input.consumer to a new name"
    )]
    ConsumerMismatch {
        consumer: String,
        filters: String,
        subject: String,
    },
    #[error(
        "{what} needs nats-server {needed} or later, and the server is {found}: upgrade the cluster's servers"
    )]
    ServerTooOld {
        what: &'static str,
        needed: &'static str,
        found: String,
    },
    #[error("stream {stream:?} cannot hold a partitioned pipeline's commits: {reason}")]
    NotALedger { stream: String, reason: String },
    #[error(
        "input stream {stream:?} has {found}, not the transform {from:?} → {destination:?} that puts each input's partition in front of its subject: the number of partitions is fixed for a stream's life; consume a new stream (or set it with `nats stream edit`, if it is empty)"
    )]
    NotPartitioned {
        stream: String,
        found: String,
        from: String,
        destination: String,
    },
    #[error("{action}: {source}")]
    JetStream {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BrokerError {
    /// Whether the server did not answer in time: a timeout, no responders, or JetStream
    /// "temporarily unavailable". A cluster electing its leaders does this for seconds after
    /// a node dies. (async-nats reports these in several error types; their words are what
    /// they share.)
    pub fn is_unanswered(&self) -> bool {
        match self {
            BrokerError::JetStream { source, .. } => {
                let text = source.to_string();
                ["timed out", "no responders", "temporarily unavailable"]
                    .iter()
                    .any(|words| text.contains(words))
            }
            _ => false,
        }
    }

    fn jetstream(
        action: impl Into<String>,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BrokerError {
        BrokerError::JetStream {
            action: action.into(),
            source: error.into(),
        }
    }
}

/// A connection to the server and its JetStream context.
#[derive(Clone)]
pub struct Broker {
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

impl Broker {
    /// Connects, retrying a server that refuses or does not answer (one that is restarting)
    /// until `connect_timeout_ms` has passed, and failing at once on anything else (bad
    /// credentials, TLS, an unparsable URL). Later disconnections are healed by the client's
    /// own reconnect loop.
    pub async fn connect(config: &NatsConfig, client_name: &str) -> Result<Broker, BrokerError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(config.connect_timeout_ms);
        let mut pause = Duration::from_millis(100);
        // One URL, or several separated by commas (the servers of a cluster).
        let urls: Vec<&str> = config
            .url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        let client = loop {
            let attempt = Broker::options(config, client_name)
                .await?
                .connect(urls.clone())
                .await;
            match attempt {
                Ok(client) => break client,
                Err(error)
                    if matches!(
                        error.kind(),
                        async_nats::ConnectErrorKind::Io | async_nats::ConnectErrorKind::TimedOut
                    ) && tokio::time::Instant::now() + pause < deadline =>
                {
                    // Quiet: a failure to start is reported once, as weir's error line.
                    tracing::debug!(%error, url = %config.url, "NATS not reachable yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(source) => {
                    let hint = connect_hint(&source, config);
                    return Err(BrokerError::Connect {
                        url: config.url.clone(),
                        source,
                        hint,
                    });
                }
            }
        };
        let jetstream = jetstream::new(client.clone());
        Ok(Broker { client, jetstream })
    }

    /// The client options for `config`: credentials, TLS, timeouts, and the connection
    /// events weir logs.
    async fn options(
        config: &NatsConfig,
        client_name: &str,
    ) -> Result<ConnectOptions, BrokerError> {
        let span = tracing::Span::current();
        let mut options = match &config.credentials_file {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| BrokerError::Credentials {
                    path: path.clone(),
                    source,
                })?,
            None => ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &config.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(ca) = &config.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options
            .require_tls(config.tls_required)
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .ping_interval(Duration::from_millis(config.ping_interval_ms))
            .name(client_name)
            // The client's events arrive on its own tasks: they log in the span of whoever
            // connected (the pipeline's), so that every line names its pipeline.
            .event_callback(move |event| {
                tracing::Instrument::instrument(log_connection_event(event), span.clone())
            }))
    }

    /// The server's name and version, for reports.
    pub fn server_description(&self) -> String {
        let info = self.client.server_info();
        format!("nats-server {} ({})", info.version, info.server_name)
    }

    /// Stream `name`, or `None` if there is no such stream.
    async fn find_stream(
        &self,
        name: &str,
    ) -> Result<Option<jetstream::stream::Stream>, BrokerError> {
        match self.jetstream.get_stream(name).await {
            Ok(stream) => Ok(Some(stream)),
            Err(error) if is_stream_not_found(&error) => Ok(None),
            Err(error) => Err(BrokerError::jetstream(
                format!("cannot look up stream {name:?}"),
                error,
            )),
        }
    }

    /// How many messages stream `name` holds, or `None` if there is no such stream.
    pub async fn stream_len(&self, name: &str) -> Result<Option<u64>, BrokerError> {
        Ok(self
            .find_stream(name)
            .await?
            .map(|stream| stream.cached_info().state.messages))
    }

    /// Whether the durable consumer exists (`Ok(false)`: it will be created), and refuses
    /// one with another filter. Changes nothing.
    pub async fn consumer_exists(&self, input: &InputConfig) -> Result<bool, BrokerError> {
        let Some(stream) = self.find_stream(&input.stream).await? else {
            return Ok(false);
        };
        match self.existing_consumer(&stream, input).await? {
            Some(info) => check_consumer(&info.config, input).map(|()| true),
            None => Ok(false),
        }
    }

    /// The info of `input`'s consumer on `stream`, if it exists.
    async fn existing_consumer(
        &self,
        stream: &jetstream::stream::Stream,
        input: &InputConfig,
    ) -> Result<Option<jetstream::consumer::Info>, BrokerError> {
        match stream.consumer_info(&input.consumer).await {
            Ok(info) => Ok(Some(info)),
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::context::ConsumerInfoErrorKind::NotFound
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(BrokerError::jetstream(
                format!("cannot look up consumer {:?}", input.consumer),
                error,
            )),
        }
    }

    /// `input`'s stream, which must exist.
    async fn input_stream(
        &self,
        input: &InputConfig,
    ) -> Result<jetstream::stream::Stream, BrokerError> {
        self.find_stream(&input.stream)
            .await?
            .ok_or_else(|| BrokerError::MissingStream {
                stream: input.stream.clone(),
                subject: input.subject.clone(),
            })
    }

    /// Whether the connection is up now, and how many times it was re-established.
    pub fn connection(&self) -> (bool, u64) {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        let connects = self
            .client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        (connected, connects.saturating_sub(1))
    }

    /// How many replicas stream `name` has (1 when it does not exist).
    pub async fn stream_replicas(&self, name: &str) -> Result<usize, BrokerError> {
        Ok(match self.find_stream(name).await? {
            Some(stream) => stream.cached_info().config.num_replicas.max(1),
            None => 1,
        })
    }

    /// What the durable consumer's own info says of its backlog, if it answers.
    pub async fn consumer_state(&self, input: &InputConfig) -> Result<ConsumerState, BrokerError> {
        let stream = self.input_stream(input).await?;
        let info = stream.consumer_info(&input.consumer).await.map_err(|e| {
            BrokerError::jetstream(format!("cannot look up consumer {:?}", input.consumer), e)
        })?;
        Ok(ConsumerState {
            ack_floor: info.ack_floor.stream_sequence,
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
        })
    }

    /// The largest message (payload and headers) the server accepts.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Finds the input stream, creating it when configured to. A partitioned pipeline's
    /// stream puts each input's partition in front of its subject (`partitioning`): a
    /// stream found without that transform is refused, since its stored subjects name no
    /// partition.
    pub async fn ensure_input_stream(
        &self,
        input: &InputConfig,
        partitioning: Option<&InputPartitioning>,
    ) -> Result<(), BrokerError> {
        if self.check_input_stream(input, partitioning).await? {
            return Ok(());
        }
        if !input.create_stream {
            return Err(BrokerError::MissingStream {
                stream: input.stream.clone(),
                subject: input.subject.clone(),
            });
        }
        self.create_stream_with(stream::Config {
            name: input.stream.clone(),
            subjects: vec![input.subject.clone()],
            storage: stream::StorageType::File,
            subject_transform: partitioning.map(|partitioning| stream::SubjectTransform {
                source: partitioning.source.clone(),
                destination: partitioning.destination.clone(),
            }),
            ..Default::default()
        })
        .await?;
        Ok(())
    }

    /// Whether the input stream exists; an error if it does without the partitioning
    /// transform a partitioned pipeline needs. Changes nothing.
    pub async fn check_input_stream(
        &self,
        input: &InputConfig,
        partitioning: Option<&InputPartitioning>,
    ) -> Result<bool, BrokerError> {
        if let Some(stream) = self.find_stream(&input.stream).await? {
            let Some(partitioning) = partitioning else {
                return Ok(true);
            };
            let transform = stream.cached_info().config.subject_transform.clone();
            let found = transform.map(|t| (t.source, t.destination));
            let wanted = (
                partitioning.source.clone(),
                partitioning.destination.clone(),
            );
            if found.as_ref() != Some(&wanted) {
                return Err(BrokerError::NotPartitioned {
                    stream: input.stream.clone(),
                    found: found.map_or("no subject transform".into(), |(source, destination)| {
                        format!("the transform {source:?} → {destination:?}")
                    }),
                    from: wanted.0,
                    destination: wanted.1,
                });
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Makes sure some stream stores the output subjects (`<prefix>.>`) and the DLQ subject,
    /// creating the configured streams when nothing does: without a stream, a publish is
    /// never acknowledged and nothing could ever be acked.
    pub async fn ensure_output_streams(&self, output: &OutputConfig) -> Result<(), BrokerError> {
        let probe = format!("{}.probe", output.prefix);
        let targets = [
            (
                probe.as_str(),
                output.stream.as_ref(),
                format!("{}.>", output.prefix),
                "output.stream",
            ),
            (
                output.dlq_subject.as_str(),
                output.dlq_stream.as_ref(),
                output.dlq_subject.clone(),
                "output.dlq_stream",
            ),
        ];
        for (subject, stream, stream_subject, key) in targets {
            if self.stream_storing(subject).await?.is_some() {
                continue;
            }
            match stream {
                Some(stream) => {
                    self.create_stream(stream, vec![stream_subject]).await?;
                }
                None => {
                    return Err(BrokerError::Uncaptured {
                        subject: stream_subject,
                        key,
                    });
                }
            }
        }
        Ok(())
    }

    /// The largest message the stream that stores `subject` accepts (its `max_msg_size`),
    /// if it sets one.
    pub async fn stream_message_limit(&self, subject: &str) -> Result<Option<usize>, BrokerError> {
        let Some(name) = self.stream_storing(subject).await? else {
            return Ok(None);
        };
        let Some(stream) = self.find_stream(&name).await? else {
            return Ok(None);
        };
        let limit = stream.cached_info().config.max_message_size;
        Ok(usize::try_from(limit).ok().filter(|&limit| limit > 0))
    }

    /// The stream that stores `subject`, if any.
    pub async fn stream_storing(&self, subject: &str) -> Result<Option<String>, BrokerError> {
        match self.jetstream.stream_by_subject(subject).await {
            Ok(stream) => Ok(Some(stream)),
            Err(error)
                if error.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(error) => Err(BrokerError::jetstream(
                format!("cannot find the stream that stores {subject:?}"),
                error,
            )),
        }
    }

    async fn create_stream(
        &self,
        name: &str,
        subjects: Vec<String>,
    ) -> Result<stream::Stream, BrokerError> {
        self.create_stream_with(stream::Config {
            name: name.to_owned(),
            subjects,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
    }

    async fn create_stream_with(
        &self,
        config: stream::Config,
    ) -> Result<stream::Stream, BrokerError> {
        let name = config.name.clone();
        tracing::info!(stream = name, subjects = ?config.subjects, "creating stream");
        self.jetstream
            .create_stream(config)
            .await
            .map_err(|e| BrokerError::jetstream(format!("cannot create stream {name:?}"), e))
    }

    /// Finds the output stream of a partitioned pipeline, creating it when configured to,
    /// and checks that it can hold the pipeline's commits: one stream stores the outputs,
    /// the dead letters and the progress markers (`markers`, a subject filter), and allows
    /// atomic publish. Returns its name.
    pub async fn ensure_ledger(
        &self,
        output: &OutputConfig,
        markers: &str,
    ) -> Result<String, BrokerError> {
        let outputs = format!("{}.>", output.prefix);
        let probe = format!("{}.probe", output.prefix);
        let name = match (self.stream_storing(&probe).await?, &output.stream) {
            (Some(name), _) => name,
            (None, Some(name)) => {
                self.create_stream_with(stream::Config {
                    name: name.clone(),
                    subjects: vec![
                        outputs.clone(),
                        output.dlq_subject.clone(),
                        markers.to_owned(),
                    ],
                    storage: stream::StorageType::File,
                    allow_atomic_publish: true,
                    ..Default::default()
                })
                .await?;
                name.clone()
            }
            (None, None) => {
                return Err(BrokerError::Uncaptured {
                    subject: outputs,
                    key: "output.stream",
                });
            }
        };
        self.check_ledger(&name, output, markers).await?;
        Ok(name)
    }

    /// The stream that stores a partitioned pipeline's outputs, if one does, checked as
    /// [`Broker::ensure_ledger`] checks it, changing nothing (for `weir check`).
    pub async fn existing_ledger(
        &self,
        output: &OutputConfig,
        markers: &str,
    ) -> Result<Option<String>, BrokerError> {
        let probe = format!("{}.probe", output.prefix);
        let Some(name) = self.stream_storing(&probe).await? else {
            return Ok(None);
        };
        self.check_ledger(&name, output, markers).await?;
        Ok(Some(name))
    }

    /// Whether stream `name` can hold a partitioned pipeline's commits.
    async fn check_ledger(
        &self,
        name: &str,
        output: &OutputConfig,
        markers: &str,
    ) -> Result<(), BrokerError> {
        // Atomic batches (2.12) and, for a partition's order across takeovers, consumer
        // reset (2.14): without reset a new holder would wait forever for inputs in order.
        if !self.server_at_least(2, 14) {
            return Err(BrokerError::ServerTooOld {
                what: "a partitioned pipeline (atomic batches, consumer reset)",
                needed: "2.14",
                found: self.client.server_info().version,
            });
        }
        let marker_probe = markers.replace('>', "0");
        let not_a_ledger = |reason: String| BrokerError::NotALedger {
            stream: name.to_owned(),
            reason,
        };
        for (subject, filter, what) in [
            (
                output.dlq_subject.as_str(),
                output.dlq_subject.as_str(),
                "the dead letters (output.dlq_subject)",
            ),
            (marker_probe.as_str(), markers, "the progress markers"),
        ] {
            match self.stream_storing(subject).await? {
                Some(stream) if stream == name => {}
                Some(other) => {
                    return Err(not_a_ledger(format!(
                        "{what} go to stream {other:?}: outputs, dead letters and markers are \
                         committed together, so one stream must store them all; add {filter:?} \
                         to {name:?}'s subjects and remove it from {other:?}'s"
                    )));
                }
                None => {
                    return Err(not_a_ledger(format!(
                        "it does not store {what}: add {filter:?} to its subjects"
                    )));
                }
            }
        }
        let mut stream =
            self.jetstream.get_stream(name).await.map_err(|e| {
                BrokerError::jetstream(format!("cannot look up stream {name:?}"), e)
            })?;
        let info = stream
            .info()
            .await
            .map_err(|e| BrokerError::jetstream(format!("cannot look up stream {name:?}"), e))?;
        if !info.config.allow_atomic_publish {
            return Err(not_a_ledger(
                "it does not allow atomic publish: set allow_atomic_publish in its configuration \
                 (nats-server 2.12 or later)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Creates (or finds and checks) the durable pull consumer. Pulling starts with the
    /// first `next_message`, so that nothing is fetched (and left waiting) before the
    /// pipeline is ready for it.
    pub async fn consume(
        &self,
        input: &InputConfig,
        batch: &BatchConfig,
    ) -> Result<MessageSource, BrokerError> {
        let source = MessageSource {
            jetstream: self.jetstream.clone(),
            input: input.clone(),
            max_messages: batch.max_messages,
            max_wait: Duration::from_millis(batch.max_wait_ms),
            messages: None,
            stream_created_unix_ns: 0,
            arriving: None,
            taken: Vec::new(),
            failed_restarts: 0,
            next_in_order: None,
        };
        source.consumer().await?;
        Ok(source)
    }

    /// A source that delivers a partition's inputs in stream order to this holder alone:
    /// the consumer is rewound to its ack floor now (what another holder pulled and did not
    /// ack comes again, in order), and again whenever a delivery is seen to have gone to
    /// another puller.
    pub async fn consume_in_order(
        &self,
        input: &InputConfig,
        batch: &BatchConfig,
    ) -> Result<MessageSource, BrokerError> {
        let mut source = self.consume(input, batch).await?;
        reset_consumer(&self.client, input).await?;
        source.next_in_order = Some(1);
        Ok(source)
    }

    /// Makes the server hand out again, at once, every input the consumer delivered and
    /// never had acked. A previous weir on this consumer (killed, or stopped with inputs
    /// pulled but not finished) holds them until `ack_wait` otherwise, and with enough of
    /// them the consumer's unacked limit stops all delivery. Only where a store tells which
    /// inputs are done (exactly-once): a reset also redelivers inputs acked out of order.
    /// Needs nats-server 2.14 or later (consumer reset, ADR-60); on an older server the
    /// inputs wait out `ack_wait`, as they would without it. Returns how many were held.
    pub async fn redeliver_pending(&self, input: &InputConfig) -> Result<u64, BrokerError> {
        if !self.server_at_least(2, 14) {
            return Ok(0);
        }
        let Some(stream) = self.find_stream(&input.stream).await? else {
            return Ok(0);
        };
        let held = stream
            .consumer_info(&input.consumer)
            .await
            .map_err(|e| {
                BrokerError::jetstream(format!("cannot look up consumer {:?}", input.consumer), e)
            })?
            .num_ack_pending as u64;
        if held == 0 {
            return Ok(0);
        }
        reset_consumer(&self.client, input).await?;
        Ok(held)
    }

    /// Whether the connected server's version is `major.minor` or later.
    fn server_at_least(&self, major: u64, minor: u64) -> bool {
        version_at_least(&self.client.server_info().version, major, minor)
    }

    pub fn publisher(&self) -> Publisher {
        Publisher {
            jetstream: self.jetstream.clone(),
            ledger_stream: None,
        }
    }

    /// The publisher of a partitioned pipeline, whose atomic commits and progress markers
    /// go to `stream` (its output stream).
    /// The subjects `stream` holds messages on that match `filter`.
    pub async fn subjects(&self, stream: &str, filter: &str) -> Result<Vec<String>, BrokerError> {
        let cannot = |e: &dyn std::fmt::Display| BrokerError::JetStream {
            action: format!("cannot list the subjects {filter:?} of stream {stream:?}"),
            source: e.to_string().into(),
        };
        let stream = self
            .jetstream
            .get_stream_no_info(stream)
            .await
            .map_err(|e| cannot(&e))?;
        let mut subjects = stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| cannot(&e))?;
        let mut found = Vec::new();
        while let Some(subject) = subjects.next().await {
            found.push(subject.map_err(|e| cannot(&e))?.0);
        }
        Ok(found)
    }

    pub fn ledger(&self, stream: &str) -> Publisher {
        Publisher {
            jetstream: self.jetstream.clone(),
            ledger_stream: Some(stream.to_owned()),
        }
    }
}

async fn log_connection_event(event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => tracing::info!("connected to NATS"),
        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
        async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
        other => tracing::warn!(event = %other, "NATS connection event"),
    }
}

/// Refuses an existing durable consumer that would deliver other subjects, or not wait for
/// explicit acks.
fn check_consumer(
    existing: &jetstream::consumer::Config,
    input: &InputConfig,
) -> Result<(), BrokerError> {
    let filters = if existing.filter_subjects.is_empty() {
        vec![existing.filter_subject.clone()]
    } else {
        existing.filter_subjects.clone()
    };
    if filters != [input.subject.clone()]
        || existing.ack_policy != jetstream::consumer::AckPolicy::Explicit
    {
        return Err(BrokerError::ConsumerMismatch {
            consumer: input.consumer.clone(),
            filters: filters.join(", "),
            subject: input.subject.clone(),
        });
    }
    Ok(())
}

fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// What to check when connecting failed this way.
fn connect_hint(error: &async_nats::ConnectError, config: &NatsConfig) -> String {
    use async_nats::ConnectErrorKind;
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            "the server is reachable but refused weir's credentials: check pipeline.nats \
             user and password, token, nkey_seed or credentials_file"
                .into()
        }
        ConnectErrorKind::Tls => {
            "check pipeline.nats tls_required, tls_ca_file, tls_cert_file and tls_key_file".into()
        }
        ConnectErrorKind::ServerParse | ConnectErrorKind::Dns => {
            "check pipeline.nats.url: one nats:// URL, or several separated by commas".into()
        }
        _ => format!(
            "is nats-server running and reachable there? weir tried for pipeline.nats.connect_timeout_ms = {}",
            config.connect_timeout_ms
        ),
    }
}

/// The consumer's limit of inputs delivered and not yet acked, for batches of `max_messages`:
/// weir's three batches in flight and one pulled ahead, and never below the server's default.
fn max_ack_pending(max_messages: usize) -> i64 {
    i64::try_from(4 * max_messages)
        .unwrap_or(i64::MAX)
        .max(1000)
}

/// A durable consumer's ack floor and backlog, from its info.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerState {
    /// Every input at or below this stream sequence is acknowledged.
    pub ack_floor: u64,
    /// Messages in the stream not yet delivered (the lag).
    pub pending: u64,
    /// Delivered and not acknowledged.
    pub ack_pending: u64,
    /// Delivered more than once and not acknowledged.
    pub redelivered: u64,
}

/// Batches of input messages from the durable consumer.
pub struct MessageSource {
    jetstream: jetstream::Context,
    input: InputConfig,
    max_messages: usize,
    max_wait: Duration,
    messages: Option<pull::Stream>,
    /// The input stream's creation time, read whenever pulling (re)starts: part of every
    /// dedup key, so that a stream deleted and re-created under the same name does not make
    /// its new messages look processed.
    stream_created_unix_ns: u64,
    /// A message received while its metadata is read, and the batch in the making: kept
    /// here rather than in the batch's future, so that what a cancelled future had
    /// received is neither lost nor left to `ack_wait` (`next_batch` goes on with it, and
    /// `stop` hands it back).
    arriving: Option<jetstream::Message>,
    taken: Vec<InputMessage>,
    /// Tries to pull afresh that failed in a row (see `restart_timeout`).
    failed_restarts: u32,
    /// In order (a partition's source): the consumer sequence the next delivery must have,
    /// counted from this source's own reset of the consumer. Another, that is a delivery
    /// went to another puller (a holder that lost the partition and still pulls).
    next_in_order: Option<u64>,
}

/// Whether `version` ("2.14.0", "2.15.1-beta") is `major.minor` or later.
fn version_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut numbers = version
        .split(['.', '-'])
        .map(|n| n.parse::<u64>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (major, minor)
}

/// Rewinds the consumer to its ack floor (an empty `CONSUMER.RESET`, nats-server 2.14):
/// what it delivered and was not acked is forgotten and delivered again, in stream order,
/// numbered from consumer sequence 1.
async fn reset_consumer(
    client: &async_nats::Client,
    input: &InputConfig,
) -> Result<(), BrokerError> {
    let reply = client
        .request(
            format!("$JS.API.CONSUMER.RESET.{}.{}", input.stream, input.consumer),
            Bytes::new(),
        )
        .await
        .map_err(|e| BrokerError::jetstream("cannot reset the consumer", e))?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
    if let Some(error) = answer.get("error") {
        return Err(BrokerError::jetstream(
            format!("cannot reset consumer {:?}", input.consumer),
            error.to_string(),
        ));
    }
    Ok(())
}

/// How long `stop` waits for the server to confirm the end of pulling (the messages it
/// sent before arrive meanwhile) and to take the hand-backs. Only a server that is away
/// takes this long; it then gets the inputs back after `ack_wait`.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// How long a try to pull afresh is given after `failures` tries in a row failed: a second
/// while an election may still be going on (they take 4 to 10 s), so that the first try
/// after it gets through; then twice as long each time, up to 16 s, for a server that is
/// merely slow to answer.
fn restart_timeout(failures: u32) -> Duration {
    const QUICK_TRIES: u32 = 10;
    Duration::from_secs(1) * 2u32.pow(failures.saturating_sub(QUICK_TRIES).min(4))
}

impl MessageSource {
    /// The durable consumer, created if missing; refused if it exists with another filter.
    /// Also returns the input stream's creation time.
    async fn consumer(&self) -> Result<(jetstream::consumer::PullConsumer, u64), BrokerError> {
        let stream = self
            .jetstream
            .get_stream(&self.input.stream)
            .await
            .map_err(|e| {
                BrokerError::jetstream(format!("cannot look up stream {:?}", self.input.stream), e)
            })?;
        let created =
            u64::try_from(stream.cached_info().created.unix_timestamp_nanos()).unwrap_or(0);
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &self.input.consumer,
                pull::Config {
                    durable_name: Some(self.input.consumer.clone()),
                    description: self.input.description.clone(),
                    deliver_policy: match self.input.start_sequence {
                        Some(start_sequence) => {
                            jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence }
                        }
                        None => jetstream::consumer::DeliverPolicy::All,
                    },
                    filter_subject: self.input.subject.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_millis(self.input.ack_wait_ms),
                    // What weir holds unacked at most: three batches in flight and one
                    // pulled ahead. The server's default (1 000) is below that for batches
                    // past 250 inputs, and would throttle the pipeline.
                    max_ack_pending: max_ack_pending(self.max_messages),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                BrokerError::jetstream(
                    format!("cannot create consumer {:?}", self.input.consumer),
                    e,
                )
            })?;
        check_consumer(&consumer.cached_info().config, &self.input)?;
        Ok((consumer, created))
    }

    /// Pulls afresh, within `restart_timeout`: while a cluster elects a leader for the
    /// stream or the consumer, a request is never answered, and waiting out the client's
    /// own timeout (5 s a request, two requests) past the election kept weir idle for 10 s.
    async fn restart(&mut self) -> Result<(), BrokerError> {
        self.messages = None;
        let timeout = restart_timeout(self.failed_restarts);
        self.failed_restarts += 1;
        let messages = tokio::time::timeout(timeout, self.pull())
            .await
            .map_err(|_elapsed| {
                BrokerError::jetstream(
                    "cannot start pulling messages",
                    format!("no answer within {timeout:?} (a cluster electing a leader?)"),
                )
            })??;
        self.messages = Some(messages);
        self.failed_restarts = 0;
        Ok(())
    }

    /// The consumer, checked, and a pull on it.
    async fn pull(&mut self) -> Result<pull::Stream, BrokerError> {
        let (consumer, created) = self.consumer().await?;
        if self.stream_created_unix_ns != 0 && created != self.stream_created_unix_ns {
            tracing::warn!(
                stream = %self.input.stream,
                "the input stream was re-created: its messages get new dedup keys"
            );
        }
        self.stream_created_unix_ns = created;
        consumer
            .stream()
            .max_messages_per_batch(self.max_messages)
            // A missed heartbeat is how a pull notices a server that went away without
            // closing the connection: short, so that weir resumes within seconds.
            .heartbeat(Duration::from_secs(1))
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .map_err(|e| BrokerError::jetstream("cannot start pulling messages", e))
    }

    /// Waits for the next message and adds it to the batch in the making. Cancel-safe.
    async fn take_next(&mut self) -> Result<(), BrokerError> {
        if self.arriving.is_none() {
            if self.messages.is_none() {
                self.restart().await?;
            }
            // `restart` either set the stream or returned an error.
            let messages = self.messages.as_mut().expect("restart sets the stream");
            match messages.next().await {
                Some(Ok(message)) => self.arriving = Some(message),
                Some(Err(error)) => {
                    // Pull the consumer afresh: this heals a deleted consumer as well as a
                    // missed heartbeat.
                    self.messages = None;
                    return Err(BrokerError::jetstream("pulling messages failed", error));
                }
                None => {
                    self.messages = None;
                    return Err(BrokerError::jetstream(
                        "pulling messages failed",
                        "the message stream ended",
                    ));
                }
            }
        }
        self.take_arriving().await;
        Ok(())
    }

    /// Adds the message received last to the batch in the making, once its metadata is
    /// read. Cancel-safe: the message stays `arriving` until then.
    async fn take_arriving(&mut self) {
        let Some(message) = &self.arriving else {
            return;
        };
        match InputMessage::read(
            message,
            self.stream_created_unix_ns,
            &self.jetstream,
            self.input.strip_partition,
        )
        .await
        {
            Ok(input) => {
                let message = self.arriving.take().expect("checked above");
                self.taken.push(InputMessage { input, message });
            }
            Err(error) => {
                self.arriving = None;
                tracing::warn!(%error, "skipping a message without metadata");
            }
        }
    }

    /// Adds to the batch in the making whatever arrives within the batch wait, up to the
    /// batch size.
    async fn fill_batch(&mut self) {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        while self.taken.len() < self.max_messages {
            let Some(messages) = self.messages.as_mut() else {
                return;
            };
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(message))) => {
                    self.arriving = Some(message);
                    self.take_arriving().await;
                }
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "pulling messages failed; will pull afresh");
                    self.messages = None;
                    return;
                }
                Ok(None) => {
                    self.messages = None;
                    return;
                }
                Err(_elapsed) => return,
            }
        }
    }

    /// Ends pulling and hands back every message delivered here and not returned in a
    /// batch: the batch in the making, and what the pull received ahead of it (up to a
    /// batch and a half), which arrives until the server confirms the end of pulling. A
    /// message the server sent in the instant it took the end is not seen: it waits out
    /// `ack_wait` (or the reset at an exactly-once start). Returns how many it handed back.
    pub async fn stop(&mut self) -> usize {
        let mut unsettled: Vec<jetstream::Message> = std::mem::take(&mut self.taken)
            .into_iter()
            .map(|taken| taken.message)
            .collect();
        unsettled.extend(self.arriving.take());
        if let Some(mut messages) = self.messages.take() {
            let drained = async {
                messages
                    .drain()
                    .await
                    .map_err(|e| BrokerError::jetstream("cannot end pulling", e))?;
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(message) => unsettled.push(message),
                        Err(error) => {
                            return Err(BrokerError::jetstream("cannot end pulling", error));
                        }
                    }
                }
                Ok(())
            };
            match tokio::time::timeout(STOP_WAIT, drained).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "what was pulled ahead waits out ack_wait")
                }
                Err(_elapsed) => tracing::warn!(
                    waited = ?STOP_WAIT,
                    "the server did not confirm the end of pulling; what was pulled ahead waits out ack_wait"
                ),
            }
        }
        if unsettled.is_empty() {
            return 0;
        }
        let handed_back = async {
            for message in &unsettled {
                message
                    .ack_with(AckKind::Nak(None))
                    .await
                    .map_err(|e| BrokerError::jetstream("cannot hand back an input", e))?;
            }
            // The hand-backs are plain publishes: flushed, they are on their way before
            // the process exits.
            self.jetstream
                .client()
                .flush()
                .await
                .map_err(|e| BrokerError::jetstream("cannot hand back inputs", e))
        };
        match tokio::time::timeout(STOP_WAIT, handed_back).await {
            Ok(Ok(())) => {
                tracing::info!(
                    inputs = unsettled.len(),
                    "handed back the inputs pulled and not processed"
                );
                return unsettled.len();
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, inputs = unsettled.len(), "the inputs pulled and not processed wait out ack_wait")
            }
            Err(_elapsed) => tracing::warn!(
                inputs = unsettled.len(),
                "the server did not take the hand-backs; the inputs pulled and not processed wait out ack_wait"
            ),
        }
        0
    }
}

/// One input message: what the core sees of it, and the handle to ack it with.
pub struct InputMessage {
    pub input: Input,
    message: jetstream::Message,
}

impl InputMessage {
    /// The input as the core sees it.
    async fn read(
        message: &jetstream::Message,
        stream_created_unix_ns: u64,
        jetstream: &jetstream::Context,
        strip_partition: bool,
    ) -> Result<Input, BrokerError> {
        let info = message
            .info()
            .map_err(|e| BrokerError::jetstream("message has no JetStream metadata", e))?;
        let stream_sequence = info.stream_sequence;
        let published_unix_ns = u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0);
        let unreadable_headers = match unreadable_reason(message) {
            Some(reason) => {
                let stream = info.stream.to_owned();
                tracing::warn!(
                    %stream,
                    stream_sequence,
                    reason = %weir_core::text::escaped(&reason, 256),
                    "an input's header block cannot be read: it goes to the DLQ as unreadable-input"
                );
                let block = stored_header_block(jetstream, &stream, stream_sequence).await;
                Some(UnreadableHeaders { reason, block })
            }
            None => None,
        };
        let subject = match strip_partition {
            true => message
                .subject
                .split_once('.')
                .map_or(message.subject.as_str(), |(_, subject)| subject),
            false => message.subject.as_str(),
        };
        Ok(Input {
            subject: subject.to_owned(),
            headers: sorted_headers(message.headers.as_ref()),
            payload: message.payload.clone(),
            stream_sequence,
            stream_created_unix_ns,
            published_unix_ns,
            unreadable_headers,
        })
    }

    /// Acknowledges the message and waits for the server to confirm (double ack).
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.message
            .double_ack()
            .await
            .map_err(|e| BrokerError::jetstream("ack failed", e))
    }

    /// Acknowledges the message without waiting for the server (a plain ack).
    pub async fn ack_unconfirmed(&self) -> Result<(), BrokerError> {
        self.message
            .ack()
            .await
            .map_err(|e| BrokerError::jetstream("ack failed", e))
    }

    /// Tells the server the message is still being worked on, resetting its ack timer.
    pub async fn progress(&self) {
        if let Err(error) = self.message.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "progress ack failed");
        }
    }

    /// Hands the message back (a nak), for the server to redeliver at once. True if the
    /// nak was sent.
    pub async fn hand_back(&self) -> bool {
        match self.message.ack_with(AckKind::Nak(None)).await {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(%error, "hand back failed; the input waits out ack_wait");
                false
            }
        }
    }
}

impl Delivery for InputMessage {
    type Error = BrokerError;

    fn input(&self) -> &Input {
        &self.input
    }

    async fn ack(&self) -> Result<(), BrokerError> {
        InputMessage::ack(self).await
    }

    async fn ack_unconfirmed(&self) -> Result<(), BrokerError> {
        InputMessage::ack_unconfirmed(self).await
    }

    async fn progress(&self) {
        InputMessage::progress(self).await
    }

    async fn hand_back(&self) -> bool {
        InputMessage::hand_back(self).await
    }
}

impl Source for MessageSource {
    type Delivery = InputMessage;
    type Error = BrokerError;

    /// Waits for a first message, then takes what arrives within the batch wait.
    async fn next_batch(&mut self) -> Result<Vec<InputMessage>, BrokerError> {
        if self.taken.is_empty() {
            self.take_next().await?;
        }
        self.fill_batch().await;
        let batch = std::mem::take(&mut self.taken);
        let Some(next) = self.next_in_order else {
            return Ok(batch);
        };
        let sequences: Vec<u64> = batch
            .iter()
            .filter_map(|m| m.message.info().ok().map(|info| info.consumer_sequence))
            .collect();
        let in_order = sequences.len() == batch.len()
            && sequences
                .iter()
                .enumerate()
                .all(|(at, &sequence)| sequence == next + at as u64);
        if in_order {
            self.next_in_order = Some(next + batch.len() as u64);
            return Ok(batch);
        }
        // Another puller got deliveries since this source's reset (a holder that lost the
        // partition and still pulled): what it got would come back after later inputs. Pull
        // afresh from the ack floor instead; this batch comes again, in order.
        tracing::warn!(
            expected = next,
            got = ?sequences.first(),
            "another puller received inputs of this partition; rewinding its consumer to keep their order"
        );
        self.messages = None;
        self.arriving = None;
        let client = self.jetstream.client();
        reset_consumer(&client, &self.input).await?;
        self.next_in_order = Some(1);
        Ok(Vec::new())
    }

    async fn ready(&mut self) -> Result<(), BrokerError> {
        if self.messages.is_none() {
            self.restart().await?;
        }
        Ok(())
    }

    async fn ack_floor(&mut self) -> Result<u64, BrokerError> {
        let consumer = &self.input.consumer;
        let cannot = || format!("cannot read the ack floor of consumer {consumer:?}");
        let stream = self
            .jetstream
            .get_stream_no_info(&self.input.stream)
            .await
            .map_err(|e| BrokerError::jetstream(cannot(), e))?;
        let info = stream
            .consumer_info(consumer)
            .await
            .map_err(|e| BrokerError::jetstream(cannot(), e))?;
        Ok(info.ack_floor.stream_sequence)
    }

    async fn stop(&mut self) -> usize {
        MessageSource::stop(self).await
    }
}

/// Why a delivered message's header block could not be read, if it could not. The client
/// (patched: vendor/async-nats/WEIR-PATCH.md) delivers such a message without headers, the
/// reason in its description, instead of dropping the connection.
fn unreadable_reason(message: &async_nats::Message) -> Option<String> {
    if message.status.is_some() || message.headers.is_some() {
        return None;
    }
    message
        .description
        .as_deref()?
        .strip_prefix(async_nats::message::UNREADABLE_HEADERS)
        .map(str::to_owned)
}

/// The header block of message `sequence` of `stream` as stored, read through the stream's
/// message-get API (its headers arrive base64 in JSON, which the client does not parse).
/// `None`, with a warning, if it cannot be read: the dead letter then points at the input.
async fn stored_header_block(
    jetstream: &jetstream::Context,
    stream: &str,
    sequence: u64,
) -> Option<Bytes> {
    #[derive(serde::Deserialize)]
    struct Got {
        message: Stored,
    }
    #[derive(serde::Deserialize)]
    struct Stored {
        #[serde(default)]
        hdrs: Option<String>,
    }
    let got: Result<jetstream::response::Response<Got>, _> = jetstream
        .request(
            format!("STREAM.MSG.GET.{stream}"),
            &serde_json::json!({ "seq": sequence }),
        )
        .await;
    let failure = match got {
        Ok(jetstream::response::Response::Ok(Got { message })) => {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(message.hdrs.unwrap_or_default())
            {
                Ok(block) => return Some(Bytes::from(block)),
                Err(error) => error.to_string(),
            }
        }
        Ok(jetstream::response::Response::Err { error }) => error.to_string(),
        Err(error) => error.to_string(),
    };
    tracing::warn!(%stream, sequence, %failure, "cannot read the stored header block; the dead letter points at the input");
    None
}

/// Headers as pairs, sorted by name; a repeated name keeps its values in order.
fn sorted_headers(headers: Option<&HeaderMap>) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = headers
        .iter()
        .flat_map(|map| map.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.to_string(), value.as_str().to_owned()))
        })
        .collect();
    // A stable sort: values of one name keep their order.
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    pairs
}

/// Where a stream stands: its last sequence and how many messages it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMark {
    pub last_sequence: u64,
    pub messages: u64,
}

/// A message as stored in a stream, read back by the operator tools.
pub struct StoredMessage {
    pub stream_sequence: u64,
    pub stored_unix_ns: u64,
    pub subject: String,
    /// Sorted by name; a repeated name keeps its values in order.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Broker {
    /// Every message of `stream` on `subject`, oldest first.
    pub async fn read_subject(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Vec<StoredMessage>, BrokerError> {
        let all = time::OffsetDateTime::UNIX_EPOCH;
        self.read_since(stream, vec![subject.to_owned()], all, |_| true)
            .await
    }

    /// The last (at most) `count` messages of `stream` on `subject`, newest first, found by
    /// reading back from the stream's last sequence at most `scan` messages (a stream that
    /// also stores other subjects may hold fewer of them in that span). `None` when the
    /// stream's mark (its last sequence and message count, which a deletion changes) is
    /// still `unless`: nothing was added or removed since the caller read it.
    pub async fn recent_messages(
        &self,
        stream: &str,
        subject: &str,
        count: usize,
        scan: u64,
        unless: Option<StreamMark>,
    ) -> Result<Option<(StreamMark, Vec<StoredMessage>)>, BrokerError> {
        let action = || format!("cannot read the last of {subject:?} from stream {stream:?}");
        // Looking the stream up fetches its info: its state is as fresh as a second request's.
        let handle = self
            .jetstream
            .get_stream(stream)
            .await
            .map_err(|e| BrokerError::jetstream(action(), e))?;
        let state = handle.cached_info().state.clone();
        let mark = StreamMark {
            last_sequence: state.last_sequence,
            messages: state.messages,
        };
        if unless == Some(mark) {
            return Ok(None);
        }
        let mut recent = Vec::with_capacity(count);
        let lowest = state
            .first_sequence
            .max(state.last_sequence.saturating_sub(scan.saturating_sub(1)));
        for sequence in (lowest..=state.last_sequence).rev() {
            if recent.len() == count || state.messages == 0 {
                break;
            }
            // A sequence deleted since (a replayed dead letter) or of another subject is
            // passed over.
            let Ok(message) = handle.get_raw_message(sequence).await else {
                continue;
            };
            if message.subject.as_str() != subject {
                continue;
            }
            recent.push(StoredMessage {
                stream_sequence: message.sequence,
                stored_unix_ns: u64::try_from(message.time.unix_timestamp_nanos()).unwrap_or(0),
                subject: message.subject.to_string(),
                headers: sorted_headers(Some(&message.headers)),
                payload: message.payload,
            });
        }
        Ok(Some((mark, recent)))
    }

    /// One stored message, by sequence.
    pub async fn stored_message(
        &self,
        stream: &str,
        sequence: u64,
    ) -> Result<StoredMessage, BrokerError> {
        let action = || format!("cannot read message {sequence} of stream {stream:?}");
        let message = self
            .jetstream
            .get_stream(stream)
            .await
            .map_err(|e| BrokerError::jetstream(action(), e))?
            .get_raw_message(sequence)
            .await
            .map_err(|e| BrokerError::jetstream(action(), e))?;
        Ok(StoredMessage {
            stream_sequence: message.sequence,
            stored_unix_ns: u64::try_from(message.time.unix_timestamp_nanos()).unwrap_or(0),
            subject: message.subject.to_string(),
            headers: sorted_headers(Some(&message.headers)),
            payload: message.payload,
        })
    }

    /// Removes one message from a stream.
    pub async fn delete_message(&self, stream: &str, sequence: u64) -> Result<(), BrokerError> {
        let action = || format!("cannot delete message {sequence} of stream {stream:?}");
        self.jetstream
            .get_stream(stream)
            .await
            .map_err(|e| BrokerError::jetstream(action(), e))?
            .delete_message(sequence)
            .await
            .map_err(|e| BrokerError::jetstream(action(), e))?;
        Ok(())
    }
}

/// How many publishes may await their acks at once. The JetStream context admits 5000
/// (`max_ack_inflight`) and makes the next publish wait for a free slot: a window above that
/// would wait for acks that are only awaited after it, forever.
const PUBLISH_WINDOW: usize = 1000;

/// JetStream API errors caused by the message itself: the server gives the same answer on
/// every retry (nats-server's `processJetStreamMsg`; weir's output policy refuses all of
/// them before publishing, so these are a backstop for a stream changed under weir).
/// (10077, "store failed", is not among them: it also means a full stream that discards new
/// messages, which heals when the stream has room.)
const REFUSED_FOR_GOOD: [jetstream::ErrorCode; 5] = [
    jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
    jetstream::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
    jetstream::ErrorCode::MESSAGE_TTL_INVALID,
    jetstream::ErrorCode::MESSAGE_TTL_DISABLED,
    jetstream::ErrorCode::STREAM_ROLLUP_FAILED,
];

/// Why JetStream did not take a message.
#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    /// The server refuses this message for what it is, and would on every retry.
    #[error("the server refuses the message to {subject:?} for good: {source}")]
    Refused {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    /// Anything else (no connection, no stream yet, a timeout): retry later.
    #[error("publish to {subject:?} failed: {source}")]
    Failed {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    /// Not sent, because an earlier message of its window could not be: retry later.
    #[error("publish to {subject:?} not sent: an earlier one could not be ({reason})")]
    Unsent { subject: String, reason: String },
}

impl PublishFailure {
    fn of(subject: &str, source: jetstream::context::PublishError) -> PublishFailure {
        use std::error::Error as _;
        let api_code = source
            .source()
            .and_then(|cause| cause.downcast_ref::<jetstream::Error>())
            .map(|api| api.error_code());
        let refused = source.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
            || api_code.is_some_and(|code| REFUSED_FOR_GOOD.contains(&code));
        let subject = subject.to_owned();
        if refused {
            PublishFailure::Refused { subject, source }
        } else {
            PublishFailure::Failed { subject, source }
        }
    }
}

/// The publisher as the core's port: a refusal for good is the core's `Refused`.
impl ports::Publisher for Publisher {
    async fn publish_each(&self, messages: &[&OutboundMessage]) -> Vec<Result<(), PublishError>> {
        Publisher::publish_each(self, messages)
            .await
            .into_iter()
            .map(|result| {
                result.map_err(|failure| match failure {
                    PublishFailure::Refused { .. } => PublishError::Refused(failure.to_string()),
                    PublishFailure::Failed { .. } | PublishFailure::Unsent { .. } => {
                        PublishError::Failed(failure.to_string())
                    }
                })
            })
            .collect()
    }
}

/// The KV bucket of every partitioned pipeline's partition leases.
pub const LEASE_BUCKET: &str = "weir-leases";

/// How long the server keeps the marker of an expired or deleted lease: the key's revision
/// that the next take names (after it, the key has no revision, and a take names 0).
const LEASE_MARKER_TTL: Duration = Duration::from_secs(60);

/// Partition leases in a KV bucket with per-message TTLs: a take or a renewal is a publish
/// with `Nats-TTL` and `Nats-Expected-Last-Subject-Sequence` (async-nats's `update` takes no
/// TTL, and its `create_with_ttl` drops the TTL on a key whose lease expired). The learning
/// tests in `tests/tests/e2e/kv_lease.rs` check on a real cluster what this relies on.
#[derive(Clone)]
pub struct LeaseStore {
    jetstream: jetstream::Context,
    store: jetstream::kv::Store,
}

impl Broker {
    /// The bucket of partition leases, created when missing with `replicas` replicas.
    pub async fn leases(&self, replicas: usize) -> Result<LeaseStore, BrokerError> {
        let cannot = |e: &dyn std::fmt::Display| BrokerError::JetStream {
            action: format!("cannot open the lease bucket {LEASE_BUCKET:?}"),
            source: e.to_string().into(),
        };
        let store = match self.jetstream.get_key_value(LEASE_BUCKET).await {
            Ok(store) => store,
            Err(_) => {
                let created = self
                    .jetstream
                    .create_key_value(jetstream::kv::Config {
                        bucket: LEASE_BUCKET.into(),
                        history: 1,
                        num_replicas: replicas,
                        limit_markers: Some(LEASE_MARKER_TTL),
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(store) => store,
                    // Another host created it meanwhile.
                    Err(error) => self
                        .jetstream
                        .get_key_value(LEASE_BUCKET)
                        .await
                        .map_err(|_| cannot(&error))?,
                }
            }
        };
        Ok(LeaseStore {
            jetstream: self.jetstream.clone(),
            store,
        })
    }
}

/// A lease as an operator sees it.
#[derive(Debug, Clone)]
pub struct LeaseView {
    /// Who holds it; `None` when none does.
    pub holder: Option<String>,
    /// How long ago it was last written (taken, renewed, released or expired).
    pub age: Duration,
}

impl LeaseStore {
    /// Lease `key` as it is now; `None` if it was never written (or is long gone).
    pub async fn view(&self, key: &str) -> Result<Option<LeaseView>, BrokerError> {
        use jetstream::kv::Operation;
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|e| BrokerError::JetStream {
                action: format!("cannot read lease {key:?}"),
                source: Box::new(e),
            })?;
        Ok(entry.map(|entry| {
            let written = std::time::SystemTime::from(entry.created);
            LeaseView {
                holder: (entry.operation == Operation::Put)
                    .then(|| String::from_utf8_lossy(&entry.value).into_owned()),
                age: written.elapsed().unwrap_or_default(),
            }
        }))
    }
}

impl ports::Leases for LeaseStore {
    async fn read(&self, key: &str) -> Result<ports::LeaseState, ports::LeaseError> {
        use jetstream::kv::Operation;
        let entry =
            self.store.entry(key).await.map_err(|e| {
                ports::LeaseError::Failed(format!("cannot read lease {key:?}: {e}"))
            })?;
        Ok(match entry {
            Some(entry) if entry.operation == Operation::Put => ports::LeaseState {
                holder: Some(String::from_utf8_lossy(&entry.value).into_owned()),
                revision: entry.revision,
            },
            Some(marker) => ports::LeaseState {
                holder: None,
                revision: marker.revision,
            },
            None => ports::LeaseState {
                holder: None,
                revision: 0,
            },
        })
    }

    async fn write(
        &self,
        key: &str,
        holder: &str,
        revision: u64,
        ttl: Duration,
    ) -> Result<u64, ports::LeaseError> {
        let publish = PublishMessage::build()
            .expected_last_subject_sequence(revision)
            .ttl(ttl)
            .payload(Bytes::copy_from_slice(holder.as_bytes()));
        let answer = match self
            .jetstream
            .send_publish(format!("$KV.{LEASE_BUCKET}.{key}"), publish)
            .await
        {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        answer.map(|ack| ack.sequence).map_err(|error| {
            let reason = format!("writing lease {key:?}: {error}");
            match error.kind() {
                jetstream::context::PublishErrorKind::WrongLastSequence => {
                    ports::LeaseError::Moved(reason)
                }
                _ => ports::LeaseError::Failed(reason),
            }
        })
    }

    async fn release(&self, key: &str, revision: u64) -> Result<(), ports::LeaseError> {
        self.store
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(|e| ports::LeaseError::Failed(format!("releasing lease {key:?}: {e}")))
    }
}

/// A partitioned pipeline's members, the hosts running it, as keys of the lease bucket:
/// `_members.<pipeline>.<member>`, each written with a TTL by its host while it runs.
fn members_prefix(pipeline: &str) -> String {
    format!("_members.{pipeline}.")
}

impl LeaseStore {
    /// Keeps `me` registered as a member of `pipeline` (rewritten every third of `ttl`, so
    /// that it expires a TTL after this host dies) and `live` current with every member the
    /// bucket holds, this one included once the server has it. Runs until dropped.
    pub async fn keep_membership(
        &self,
        pipeline: &str,
        me: &str,
        ttl: Duration,
        live: tokio::sync::watch::Sender<std::collections::BTreeSet<String>>,
    ) -> std::convert::Infallible {
        let key = format!("{}{me}", members_prefix(pipeline));
        let register = async {
            loop {
                let publish = PublishMessage::build()
                    .ttl(ttl)
                    .payload(Bytes::copy_from_slice(me.as_bytes()));
                let written = match self
                    .jetstream
                    .send_publish(format!("$KV.{LEASE_BUCKET}.{key}"), publish)
                    .await
                {
                    Ok(ack) => ack.await.map(drop),
                    Err(error) => Err(error),
                };
                if let Err(error) = written {
                    tracing::warn!(%error, "registering this host as a member of the pipeline failed; trying again");
                }
                tokio::time::sleep(ttl / 3).await;
            }
        };
        let watch = async {
            loop {
                if let Err(error) = self.watch_members(pipeline, &live).await {
                    tracing::warn!(%error, "watching the pipeline's members failed; watching again");
                }
                tokio::time::sleep(MEMBERS_WATCH_RETRY).await;
            }
        };
        tokio::join!(register, watch).0
    }

    /// Follows the members of `pipeline` into `live`, from the bucket's last entry for each,
    /// until the watch ends.
    async fn watch_members(
        &self,
        pipeline: &str,
        live: &tokio::sync::watch::Sender<std::collections::BTreeSet<String>>,
    ) -> Result<(), String> {
        use jetstream::kv::Operation;
        let prefix = members_prefix(pipeline);
        let mut watch = self
            .store
            .watch_with_history(format!("{prefix}*"))
            .await
            .map_err(|e| e.to_string())?;
        // Built afresh on each watch; published once it has caught up with the bucket, and
        // on each change after that.
        let mut members = std::collections::BTreeSet::new();
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|e| e.to_string())?;
            let Some(member) = entry.key.strip_prefix(&prefix) else {
                continue;
            };
            match entry.operation {
                Operation::Put => members.insert(member.to_owned()),
                // Left (deleted on its way out) or expired (its host died).
                Operation::Delete | Operation::Purge => members.remove(member),
            };
            if entry.delta == 0 {
                live.send_if_modified(|live| {
                    let changed = *live != members;
                    live.clone_from(&members);
                    changed
                });
            }
        }
        Err("the server ended the watch".into())
    }

    /// Removes `me` from the members of `pipeline` at once, so that the others take its
    /// partitions without waiting for them. Best effort: otherwise it expires.
    pub async fn leave_membership(&self, pipeline: &str, me: &str) {
        let key = format!("{}{me}", members_prefix(pipeline));
        match self.store.delete(&key).await {
            Ok(()) => tracing::info!("left the pipeline's members"),
            Err(error) => {
                tracing::warn!(%error, "leaving the pipeline's members failed; this host's registration expires after the lease TTL")
            }
        }
    }

    /// The members of `pipeline` now, for the operator.
    pub async fn members(&self, pipeline: &str) -> Result<Vec<String>, BrokerError> {
        let prefix = members_prefix(pipeline);
        let cannot = |e: &dyn std::fmt::Display| BrokerError::JetStream {
            action: format!("cannot read the members of pipeline {pipeline:?}"),
            source: e.to_string().into(),
        };
        let keys: Vec<String> = self
            .store
            .keys()
            .await
            .map_err(|e| cannot(&e))?
            .filter_map(|key| async { key.ok() })
            .collect()
            .await;
        let mut members: Vec<String> = keys
            .iter()
            .filter_map(|key| key.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect();
        members.sort_unstable();
        Ok(members)
    }
}

/// How long after a failed or ended watch of the members it is tried again.
const MEMBERS_WATCH_RETRY: Duration = Duration::from_millis(500);

/// JetStream API errors that refuse an atomic batch for good, besides those that refuse a
/// message ([`REFUSED_FOR_GOOD`]): the core then commits its inputs one by one to find the
/// one refused. A batch of ids the stream already has (10201) is one: retried, it would be
/// refused until the duplicate window passes, and then stored twice.
const BATCH_REFUSED_FOR_GOOD: [jetstream::ErrorCode; 4] = [
    jetstream::ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH,
    jetstream::ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE,
    jetstream::ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER,
    jetstream::ErrorCode::ATOMIC_PUBLISH_DISABLED,
];

/// A `Nats-Batch-Id` no other batch of any weir shares: the process's start and a count.
fn new_batch_id() -> String {
    static STARTED: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let started = STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos())
    });
    let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("weir-{started:x}-{}-{count:x}", std::process::id())
}

/// The headers of a message as published: its own, then its `Nats-Msg-Id`.
fn publish_headers(message: &OutboundMessage) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &message.headers {
        // The output policy only lets publishable headers through; skip rather than
        // panic on one from an older store.
        if let (Ok(name), Ok(value)) = (HeaderName::from_str(name), HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    }
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message.msg_id.as_str());
    headers
}

/// The output stream as a partitioned pipeline's ledger: each commit is an atomic batch
/// (ADR-50), its messages staged by core publishes and committed by the marker, which
/// carries `Nats-Expected-Last-Subject-Sequence`. The learning tests in
/// `tests/tests/e2e/atomic_batch.rs` check on a real cluster what this relies on.
impl ports::Ledger for Publisher {
    async fn last_marker(
        &self,
        subject: &str,
    ) -> Result<Option<ports::StoredMarker>, PublishError> {
        let Some(name) = &self.ledger_stream else {
            return Err(PublishError::Failed(NO_LEDGER.into()));
        };
        let failed = |error: &dyn std::fmt::Display| {
            PublishError::Failed(format!(
                "cannot read the last marker on {subject:?} of stream {name:?}: {error}"
            ))
        };
        let stream = self
            .jetstream
            .get_stream_no_info(name)
            .await
            .map_err(|e| failed(&e))?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(Some(ports::StoredMarker {
                sequence: message.sequence,
                payload: message.payload.to_vec(),
            })),
            Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(error) => Err(failed(&error)),
        }
    }

    async fn commit_atomically(
        &self,
        messages: &[&OutboundMessage],
        marker: &OutboundMessage,
        after: u64,
    ) -> Result<u64, ports::CommitError> {
        use async_nats::header::{
            NATS_BATCH_COMMIT, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        };
        if self.ledger_stream.is_none() {
            return Err(ports::CommitError::Failed(NO_LEDGER.into()));
        }
        let batch = new_batch_id();
        let client = self.jetstream.client();
        for (index, message) in messages.iter().enumerate() {
            let mut headers = publish_headers(message);
            headers.insert(NATS_BATCH_ID, batch.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, (index + 1).to_string().as_str());
            client
                .publish_with_headers(
                    message.subject.clone(),
                    headers,
                    Bytes::copy_from_slice(&message.payload),
                )
                .await
                .map_err(|e| {
                    ports::CommitError::Failed(format!("staging a message of the batch: {e}"))
                })?;
        }
        let mut headers = publish_headers(marker);
        headers.insert(NATS_BATCH_ID, batch.as_str());
        headers.insert(
            NATS_BATCH_SEQUENCE,
            (messages.len() + 1).to_string().as_str(),
        );
        headers.insert(NATS_BATCH_COMMIT, "1");
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            after.to_string().as_str(),
        );
        let payload = Bytes::copy_from_slice(&marker.payload);
        let answer = match self
            .jetstream
            .publish_with_headers(marker.subject.clone(), headers, payload)
            .await
        {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        answer
            .map(|ack| ack.sequence)
            .map_err(|error| commit_error(&marker.subject, error))
    }
}

const NO_LEDGER: &str = "this publisher has no ledger stream (a bug in weir: report it)";

/// What a refused commit means to the core.
fn commit_error(subject: &str, error: jetstream::context::PublishError) -> ports::CommitError {
    use std::error::Error as _;
    if error.kind() == jetstream::context::PublishErrorKind::WrongLastSequence {
        return ports::CommitError::ChainMoved(error.to_string());
    }
    let api_code = error
        .source()
        .and_then(|cause| cause.downcast_ref::<jetstream::Error>())
        .map(|api| api.error_code());
    let for_good = error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
        || api_code.is_some_and(|code| {
            REFUSED_FOR_GOOD.contains(&code) || BATCH_REFUSED_FOR_GOOD.contains(&code)
        });
    let reason = format!("the atomic batch ending with marker {subject:?}: {error}");
    if for_good {
        ports::CommitError::Refused(reason)
    } else {
        ports::CommitError::Failed(reason)
    }
}

/// Publishes outbound messages to JetStream; for a partitioned pipeline, also commits
/// atomic batches to its output stream (`ledger_stream`).
#[derive(Clone)]
pub struct Publisher {
    jetstream: jetstream::Context,
    ledger_stream: Option<String>,
}

impl Publisher {
    /// Publishes every message, all in flight at once, and waits until JetStream has
    /// answered each: per message, in order, `Ok` once JetStream has it (a duplicate counts:
    /// the server already had it), or why not. A failed message does not stop the others.
    pub async fn publish_each(
        &self,
        messages: &[&OutboundMessage],
    ) -> Vec<Result<(), PublishFailure>> {
        let mut results = Vec::with_capacity(messages.len());
        for window in messages.chunks(PUBLISH_WINDOW) {
            results.extend(self.publish_window(window).await);
        }
        results
    }

    /// Publishes every message and waits for all acks; the first failure, if any.
    pub async fn publish_all(&self, messages: &[&OutboundMessage]) -> Result<(), PublishFailure> {
        self.publish_each(messages).await.into_iter().collect()
    }

    async fn publish_window(
        &self,
        messages: &[&OutboundMessage],
    ) -> Vec<Result<(), PublishFailure>> {
        let mut acks = Vec::with_capacity(messages.len());
        let mut unsent = None;
        for message in messages {
            let publish = PublishMessage::build()
                .headers(publish_headers(message))
                .payload(Bytes::copy_from_slice(&message.payload));
            let sent = self
                .jetstream
                .send_publish(message.subject.clone(), publish)
                .await;
            // A send that fails (the client's queue stayed full for its whole timeout: the
            // server is away) fails the rest of the window at once, rather than each
            // message after a timeout of its own, one after another.
            let failed = sent.as_ref().err().map(ToString::to_string);
            acks.push(async move {
                let ack = sent.map_err(|e| PublishFailure::of(&message.subject, e))?;
                ack.into_future()
                    .await
                    .map(|_| ())
                    .map_err(|e| PublishFailure::of(&message.subject, e))
            });
            if failed.is_some() {
                unsent = failed;
                break;
            }
        }
        let mut results = futures::future::join_all(acks).await;
        if let Some(reason) = unsent {
            results.extend(messages[results.len()..].iter().map(|message| {
                Err(PublishFailure::Unsent {
                    subject: message.subject.clone(),
                    reason: reason.clone(),
                })
            }));
        }
        results
    }
}

/// How to reach the NATS server. Credentials and TLS are optional and combine as
/// async-nats allows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// A `.creds` file (JWT + nkey seed).
    pub credentials_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// An nkey seed (`SU…`).
    pub nkey_seed: Option<String>,
    /// Require TLS. By default false (a `tls://` URL also turns it on).
    #[serde(default)]
    pub tls_required: bool,
    /// A PEM file of root certificates to trust, in addition to the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for mutual TLS; set both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// How long weir keeps trying to make its first connection, in milliseconds: a server
    /// that refuses or does not answer (one that is restarting) is retried until then; any
    /// other failure stops weir at once. By default 10000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How often the client pings the server, in milliseconds. Two unanswered pings mark the
    /// connection dead and start a reconnect: this bounds how long a link that dies without
    /// a reset (a silent route, a frozen server) can hold the pipeline. By default 2000.
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

fn default_ping_interval_ms() -> u64 {
    2000
}

/// Where inputs come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// The JetStream stream to consume.
    pub stream: String,
    /// Set by a partitioned pipeline for each partition's consumer: the stored subjects
    /// begin with the partition, which the core never sees (the plugin sees the subject as
    /// it was published).
    #[serde(skip)]
    pub strip_partition: bool,
    /// The subject filter of the consumer, e.g. `orders.>`. Also the stream's subject when
    /// weir creates the stream.
    pub subject: String,
    /// The durable consumer's name; weir creates it when it does not exist.
    pub consumer: String,
    /// Set by a replay run: the stream sequence its consumer starts at (by default the
    /// stream's first).
    #[serde(skip)]
    pub start_sequence: Option<u64>,
    /// Set by a replay run: its definition, kept as the consumer's description so that a
    /// run started again can tell its own consumer.
    #[serde(skip)]
    pub description: Option<String>,
    /// Create the stream (file storage, subject = `subject`) when it does not exist. By
    /// default true.
    #[serde(default = "default_true")]
    pub create_stream: bool,
    /// How long the server waits for an ack before redelivering, in milliseconds. By default
    /// 30000, at least 100. weir sends progress acks every half of it while a batch is in
    /// hand, so a slow batch is not redelivered.
    #[serde(default = "default_ack_wait_ms")]
    pub ack_wait_ms: u64,
}

fn default_true() -> bool {
    true
}

fn default_ack_wait_ms() -> u64 {
    30_000
}

/// The input stream's subject transform that puts each input's partition in front of its
/// subject (nats-server's `partition(n, wildcards…)` mapping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPartitioning {
    pub source: String,
    pub destination: String,
}

/// Where outputs and dead letters go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// The subject prefix a plugin publishes under: its output `x.y` goes to
    /// `<prefix>.x.y`. Must not be matched by the input subject filter.
    pub prefix: String,
    /// The stream that stores the outputs. weir creates it (subjects `<prefix>` and
    /// `<prefix>.>`) when it does not exist. Without it, some stream must already capture
    /// the prefix.
    pub stream: Option<String>,
    /// The dead-letter subject: inputs the plugin rejected or failed on, with the reason.
    pub dlq_subject: String,
    /// The stream that stores dead letters, created when missing, as for `stream`.
    pub dlq_stream: Option<String>,
}

/// How inputs are grouped: one store commit (one fsync) and one round of publish acks per
/// batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// The most messages per batch. By default 256.
    pub max_messages: usize,
    /// How long to wait for more messages once a batch has its first, in milliseconds. By
    /// default 5. Higher values give larger batches under light load, at that latency.
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_messages: 256,
            max_wait_ms: 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::version_at_least;

    #[test]
    fn server_versions_compare_by_major_then_minor() {
        assert!(version_at_least("2.14.0", 2, 14));
        assert!(version_at_least("2.15.1", 2, 14));
        assert!(version_at_least("3.0.0", 2, 14));
        assert!(version_at_least("2.14.0-RC.1", 2, 14));
        assert!(!version_at_least("2.13.9", 2, 14));
        assert!(!version_at_least("2.9.25", 2, 14));
        assert!(!version_at_least("", 2, 14));
    }
}
