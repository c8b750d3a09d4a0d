//! What a replay run asks of the input stream besides consuming it: where a range of it
//! starts and ends, how many inputs it holds, and how far the run's own consumer is. The
//! range is found with short-lived consumers of its own, which the server forgets at once.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use futures::StreamExt;
use time::OffsetDateTime;

use crate::{Broker, BrokerError, InputConfig};

/// An input's place in its stream: its sequence and when the stream stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPlace {
    pub sequence: u64,
    pub stored: OffsetDateTime,
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
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(10),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
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
}
