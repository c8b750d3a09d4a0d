//! Operator tools for dead letters: list them, show one, replay them into the input.
//!
//! # How a replay stays exactly-once and is not swallowed by the dedup store
//!
//! A replayed entry is published again on its original input subject, so JetStream stores
//! it under a new stream sequence: with `dedup = "stream-sequence"` its dedup key is new, and
//! the pipeline processes it afresh (with the fixed plugin). Its `Nats-Msg-Id` is
//! `weir-replay:<pipeline>:<dlq stream>:<dlq sequence>`, which is also a fresh key with
//! `dedup = "msg-id"`, and which makes the replay itself idempotent within the input
//! stream's duplicate window: only after JetStream acknowledges the re-published input is
//! the entry deleted from the DLQ, and a replay interrupted between the two and run again
//! publishes under the same id, which the window drops. A deleted entry cannot be replayed
//! twice. The limit: an interrupted replay re-run after the window has passed injects that
//! one entry a second time, so re-run an interrupted replay promptly.

use weir_core::dead_letter::{self, DeadLetterHeaders};
use weir_core::plugin::FailureKind;
use weir_core::record::OutboundMessage;

use crate::config::PipelineConfig;
use weir_nats::{Broker, Publisher, StoredMessage};

/// One dead letter, with what weir recorded about it.
pub struct DeadLetter {
    /// The entry's sequence in the DLQ stream: its handle for `show` and `replay`.
    pub sequence: u64,
    pub stored_unix_ns: u64,
    /// What weir's headers say (kind, reason, input coordinates), and the input's own.
    pub headers: DeadLetterHeaders,
    pub payload: Vec<u8>,
}

impl DeadLetter {
    fn from_stored(message: StoredMessage) -> DeadLetter {
        DeadLetter {
            sequence: message.stream_sequence,
            stored_unix_ns: message.stored_unix_ns,
            headers: DeadLetterHeaders::parse(&message.headers),
            payload: message.payload.to_vec(),
        }
    }
}

/// A tool failure, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] weir_nats::BrokerError),
    #[error(transparent)]
    Publish(#[from] weir_nats::PublishFailure),
    #[error("no stream stores the DLQ subject {subject:?}: there are no dead letters to see yet")]
    NoStream { subject: String },
    #[error("dead letter {sequence} is not in stream {stream:?}: list them with `weir dlq list`")]
    NotFound { stream: String, sequence: u64 },
}

/// The dead letters of one pipeline.
pub struct DeadLetters {
    broker: Broker,
    publisher: Publisher,
    stream: String,
    pipeline: PipelineConfig,
}

impl DeadLetters {
    /// Connects to the pipeline's server and finds the stream that stores its DLQ subject.
    pub async fn open(pipeline: &PipelineConfig) -> Result<DeadLetters, DlqError> {
        let broker =
            Broker::connect(&pipeline.nats, &format!("weir-dlq-{}", pipeline.name)).await?;
        let stream = broker
            .stream_storing(&pipeline.output.dlq_subject)
            .await?
            .ok_or_else(|| DlqError::NoStream {
                subject: pipeline.output.dlq_subject.clone(),
            })?;
        Ok(DeadLetters {
            publisher: broker.publisher(),
            broker,
            stream,
            pipeline: pipeline.clone(),
        })
    }

    /// The stream the dead letters live in.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Every dead letter, oldest first.
    pub async fn list(&self) -> Result<Vec<DeadLetter>, DlqError> {
        let stored = self
            .broker
            .read_subject(&self.stream, &self.pipeline.output.dlq_subject)
            .await?;
        Ok(stored.into_iter().map(DeadLetter::from_stored).collect())
    }

    /// One dead letter, by its DLQ sequence.
    pub async fn get(&self, sequence: u64) -> Result<DeadLetter, DlqError> {
        let not_found = || DlqError::NotFound {
            stream: self.stream.clone(),
            sequence,
        };
        let stored = self
            .broker
            .stored_message(&self.stream, sequence)
            .await
            .map_err(|_| not_found())?;
        if stored.subject != self.pipeline.output.dlq_subject {
            return Err(not_found());
        }
        Ok(DeadLetter::from_stored(stored))
    }

    /// Re-injects one dead letter into the pipeline's input and removes it from the DLQ.
    /// Returns why it was skipped, if it was.
    pub async fn replay(&self, letter: &DeadLetter) -> Result<Option<String>, DlqError> {
        if letter.headers.input_subject.is_empty() {
            return Ok(Some(
                "not a weir dead letter (no Weir-Input-Subject)".into(),
            ));
        }
        if letter.headers.kind == FailureKind::UnreadableInput.as_str() {
            return Ok(Some(format!(
                "its header block could not be read (see `weir dlq show {}`): have its producer publish it again with valid headers",
                letter.sequence
            )));
        }
        if letter.headers.payload_omitted {
            return Ok(Some(format!(
                "its payload was too large for the DLQ: re-publish message {} of stream {:?} instead",
                letter.headers.input_sequence, letter.headers.input_stream
            )));
        }
        if !weir_core::subject::matches(&self.pipeline.input.subject, &letter.headers.input_subject)
        {
            return Ok(Some(format!(
                "its input subject {:?} is no longer matched by input.subject {:?}",
                letter.headers.input_subject, self.pipeline.input.subject
            )));
        }
        let mut headers = letter.headers.input_headers.clone();
        headers.push((
            dead_letter::REPLAY_OF.into(),
            format!("{}#{}", self.stream, letter.sequence),
        ));
        let message = OutboundMessage {
            subject: letter.headers.input_subject.clone(),
            msg_id: format!(
                "weir-replay:{}:{}:{}",
                self.pipeline.name, self.stream, letter.sequence
            ),
            headers,
            payload: letter.payload.clone(),
        };
        self.publisher.publish_all(&[&message]).await?;
        self.broker
            .delete_message(&self.stream, letter.sequence)
            .await?;
        Ok(None)
    }
}
