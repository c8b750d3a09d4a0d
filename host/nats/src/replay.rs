//! What a replay run asks of the input stream besides consuming it: where a range of it
//! starts and ends, how many inputs it holds, and how far the run's own consumer is; and
//! what `weir plugin diff` reads: a range of inputs as the pipeline would see them, and
//! what the pipeline published since a time. All of it is read with short-lived consumers
//! of its own, which the server forgets at once.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use futures::StreamExt;
use time::OffsetDateTime;

use weir_core::input::Input;

use crate::{Broker, BrokerError, InputConfig, InputMessage, StoredMessage};

/// An input's place in its stream: its sequence and when the stream stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPlace {
    pub sequence: u64,
    pub stored: OffsetDateTime,
}

/// An input read back from its stream, as the pipeline sees it, with the partition it was
/// stored under (a partitioned pipeline's).
pub struct StoredInput {
    pub partition: Option<u32>,
    pub input: Input,
}

/// Where a range starts: a stream sequence, or the first input stored at or after a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    Sequence(u64),
    Time(OffsetDateTime),
}

impl Broker {
    /// The sequence of the last message of `input`'s stream now (0 while it is empty).
    pub async fn last_sequence(&self, input: &InputConfig) -> Result<u64, BrokerError> {
        let mut stream = self.input_stream(input).await?;
        let name = &input.stream;
        let info = stream
            .info()
            .await
            .map_err(|e| BrokerError::jetstream(format!("cannot look up stream {name:?}"), e))?;
        Ok(info.state.last_sequence)
    }

    /// The first input of `input`'s stream matching its subject filter from `from` on, if
    /// there is one, and how many match from there to the stream's end.
    pub async fn first_from(
        &self,
        input: &InputConfig,
        from: ReplayFrom,
    ) -> Result<(Option<StreamPlace>, u64), BrokerError> {
        let deliver_policy = match from {
            ReplayFrom::Sequence(start_sequence) => DeliverPolicy::ByStartSequence {
                start_sequence: start_sequence.max(1),
            },
            ReplayFrom::Time(start_time) => DeliverPolicy::ByStartTime { start_time },
        };
        let stream = self.input_stream(input).await?;
        let cannot = |e: &dyn std::fmt::Display| {
            BrokerError::jetstream(
                format!("cannot read stream {:?}", input.stream),
                e.to_string(),
            )
        };
        let mut probe: jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                deliver_policy,
                filter_subject: input.subject.clone(),
                ..reader_config()
            })
            .await
            .map_err(|e| cannot(&e))?;
        let pending = probe.info().await.map_err(|e| cannot(&e))?.num_pending;
        let mut first = None;
        if pending > 0 {
            let mut messages = probe
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| cannot(&e))?;
            if let Some(message) = messages.next().await {
                let message = message.map_err(|e| cannot(&e))?;
                let info = message.info().map_err(|e| cannot(&e))?;
                first = Some(StreamPlace {
                    sequence: info.stream_sequence,
                    stored: info.published,
                });
            }
        }
        let name = probe.cached_info().name.clone();
        // Best effort: the server forgets it after `inactive_threshold` anyway.
        let _ = stream.delete_consumer(&name).await;
        Ok((first, pending))
    }

    /// When `input`'s stream stored its message at `sequence`, if it has one there.
    pub async fn stored_at(
        &self,
        input: &InputConfig,
        sequence: u64,
    ) -> Result<Option<OffsetDateTime>, BrokerError> {
        let stream = self.input_stream(input).await?;
        let name = &input.stream;
        match stream.get_raw_message(sequence).await {
            Ok(message) => Ok(Some(message.time)),
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::stream::RawMessageErrorKind::NoMessageFound
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(BrokerError::jetstream(
                format!("cannot read message {sequence} of stream {name:?}"),
                error,
            )),
        }
    }

    /// The description of `input`'s consumer, if the consumer exists (`Some(None)`: it
    /// exists without one).
    pub async fn consumer_description(
        &self,
        input: &InputConfig,
    ) -> Result<Option<Option<String>>, BrokerError> {
        let stream = self.input_stream(input).await?;
        let info = self.existing_consumer(&stream, input).await?;
        Ok(info.map(|info| info.config.description))
    }

    /// The inputs of `input`'s stream matching its subject filter, from sequence `first` to
    /// `last`, as the pipeline sees them (a partitioned stream's partition token stripped
    /// from the subject when `input.strip_partition`, and kept as the partition).
    pub async fn read_inputs(
        &self,
        input: &InputConfig,
        first: u64,
        last: u64,
    ) -> Result<Vec<StoredInput>, BrokerError> {
        let stream = self.input_stream(input).await?;
        let created =
            u64::try_from(stream.cached_info().created.unix_timestamp_nanos()).unwrap_or(0);
        let config = pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: first.max(1),
            },
            filter_subject: input.subject.clone(),
            ..reader_config()
        };
        let action = format!("cannot read stream {:?}", input.stream);
        let mut messages = Vec::new();
        self.read_to_end(&stream, config, &action, last, |message| {
            messages.push(message);
            Ok(())
        })
        .await?;
        let mut inputs = Vec::new();
        for message in messages {
            let read =
                InputMessage::read(&message, created, &self.jetstream, input.strip_partition)
                    .await?;
            let partition = match input.strip_partition {
                true => message
                    .subject
                    .split_once('.')
                    .and_then(|(partition, _)| partition.parse().ok()),
                false => None,
            };
            inputs.push(StoredInput {
                partition,
                input: read,
            });
        }
        Ok(inputs)
    }

    /// Every message of `stream` on any of `subjects` stored at or after `since` that
    /// `keep` keeps, oldest first (only those are held in memory).
    pub async fn read_since(
        &self,
        stream: &str,
        subjects: Vec<String>,
        since: OffsetDateTime,
        mut keep: impl FnMut(&StoredMessage) -> bool + Send,
    ) -> Result<Vec<StoredMessage>, BrokerError> {
        let action = format!("cannot read stream {stream:?}");
        // Looking the stream up fetches its info: what it holds now is what is read, not
        // what is stored while reading.
        let handle = self
            .jetstream
            .get_stream(stream)
            .await
            .map_err(|e| BrokerError::jetstream(action.clone(), e))?;
        let last = handle.cached_info().state.last_sequence;
        let config = pull::Config {
            deliver_policy: DeliverPolicy::ByStartTime { start_time: since },
            filter_subjects: subjects,
            ..reader_config()
        };
        let mut kept = Vec::new();
        self.read_to_end(&handle, config, &action, last, |message| {
            let info = message
                .info()
                .map_err(|e| BrokerError::jetstream(action.clone(), e))?;
            let stored = StoredMessage {
                stream_sequence: info.stream_sequence,
                stored_unix_ns: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
                subject: message.subject.to_string(),
                headers: crate::sorted_headers(message.headers.as_ref()),
                payload: message.payload.clone(),
            };
            if keep(&stored) {
                kept.push(stored);
            }
            Ok(())
        })
        .await?;
        Ok(kept)
    }

    /// Hands `sink` what a reader consumer with `config` delivers, up to stream sequence
    /// `last` or the stream's end, whichever comes first.
    async fn read_to_end(
        &self,
        stream: &jetstream::stream::Stream,
        config: pull::Config,
        action: &str,
        last: u64,
        mut sink: impl FnMut(jetstream::Message) -> Result<(), BrokerError> + Send,
    ) -> Result<(), BrokerError> {
        let cannot = |e: &dyn std::fmt::Display| BrokerError::jetstream(action, e.to_string());
        let mut reader: jetstream::consumer::PullConsumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| cannot(&e))?;
        let mut remaining = reader.info().await.map_err(|e| cannot(&e))?.num_pending;
        'reading: while remaining > 0 {
            let mut batch = reader
                .fetch()
                .max_messages(remaining.min(1000) as usize)
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| cannot(&e))?;
            let mut received = false;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| cannot(&e))?;
                let info = message.info().map_err(|e| cannot(&e))?;
                if info.stream_sequence > last {
                    break 'reading;
                }
                remaining = info.pending;
                received = true;
                sink(message)?;
            }
            // Nothing within the wait: what was pending may have been removed meanwhile
            // (retention, a replayed dead letter).
            if !received {
                remaining = reader.info().await.map_err(|e| cannot(&e))?.num_pending;
                if remaining > 0 {
                    return Err(cannot(&"the server sent nothing"));
                }
            }
        }
        let name = reader.cached_info().name.clone();
        // Best effort: the server forgets it after `inactive_threshold` anyway.
        let _ = stream.delete_consumer(&name).await;
        Ok(())
    }
}

/// A short-lived consumer that reads without acks, in memory, forgotten soon after.
fn reader_config() -> pull::Config {
    pull::Config {
        ack_policy: jetstream::consumer::AckPolicy::None,
        inactive_threshold: Duration::from_secs(30),
        memory_storage: true,
        num_replicas: 1,
        ..Default::default()
    }
}
