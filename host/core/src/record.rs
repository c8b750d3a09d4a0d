//! What the store records for a processed input: the exact messages to publish for it.
//!
//! Outputs and dead letters are both stored as fully formed outbound messages (subject,
//! headers, payload and the deterministic `Nats-Msg-Id`), so re-publishing after a crash or
//! for a redelivered input replays byte-identical messages that JetStream drops as
//! duplicates.

use serde::{Deserialize, Serialize};

/// A message the host publishes: a plugin output or a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundMessage {
    pub subject: String,
    /// `Nats-Msg-Id`, derived from the pipeline, the input's dedup key and the output's
    /// index, so that every re-publish of this message carries the same id.
    pub msg_id: String,
    pub headers: Vec<(String, String)>,
    /// Encoded as one run of bytes, not byte by byte: the same encoding in postcard (a
    /// length, then the bytes), a fifth of the cost of a commit less.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl OutboundMessage {
    /// The bytes of the header block the server receives: the message's headers and its
    /// `Nats-Msg-Id`.
    pub fn header_block_len(&self) -> usize {
        crate::headers::block_len(
            self.headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .chain([(crate::headers::MSG_ID_HEADER, self.msg_id.as_str())]),
        )
    }

    /// The bytes the server counts against its `max_payload`: the header block and the
    /// payload.
    pub fn wire_size(&self) -> usize {
        self.header_block_len() + self.payload.len()
    }
}

/// How an input was disposed of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Disposition {
    /// The plugin produced outputs (possibly none).
    Transformed,
    /// The input went to the dead-letter subject.
    DeadLettered,
}

/// The committed result of one input: `done[dedup_key]` in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneRecord {
    pub disposition: Disposition,
    pub messages: Vec<OutboundMessage>,
    /// The plugin that made it; `None` in a record written before weir recorded it.
    pub lineage: Option<Lineage>,
}

/// The header on every output and dead letter that names the sha256 of the plugin
/// component that made it.
pub const PLUGIN_SHA256: &str = "Weir-Plugin-Sha256";
/// The header that names the contract that plugin speaks (its export,
/// `weir:transform/transformer@0.2.0`).
pub const PLUGIN_CONTRACT: &str = "Weir-Plugin-Contract";

/// Which plugin made a result: the sha256 of its component and the contract it speaks.
/// Every output and dead letter carries it (as headers) and every store record keeps it, so
/// that after a plugin changes each result still says which version made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub sha256: String,
    pub contract: String,
}

/// A plugin's lineage for the core's unit tests: a sha256's length, the 0.2.0 contract.
#[cfg(test)]
pub(crate) fn test_lineage() -> Lineage {
    Lineage {
        sha256: "ab".repeat(32),
        contract: "weir:transform/transformer@0.2.0".into(),
    }
}

impl Lineage {
    /// The headers that carry it.
    pub fn headers(&self) -> [(String, String); 2] {
        [
            (PLUGIN_SHA256.to_owned(), self.sha256.clone()),
            (PLUGIN_CONTRACT.to_owned(), self.contract.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record as stores before `serde_bytes` wrote it: the payload byte by byte.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct PayloadByteByByte {
        subject: String,
        msg_id: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    }

    #[test]
    fn payload_encoding_is_unchanged_for_stores_written_before() {
        let message = OutboundMessage {
            subject: "out.x".into(),
            msg_id: "weir:p:k:0".into(),
            headers: vec![("a".into(), "b".into())],
            payload: (0..=255).collect(),
        };
        let before = PayloadByteByByte {
            subject: message.subject.clone(),
            msg_id: message.msg_id.clone(),
            headers: message.headers.clone(),
            payload: message.payload.clone(),
        };
        let encoded = postcard::to_allocvec(&message).unwrap();
        assert_eq!(encoded, postcard::to_allocvec(&before).unwrap());
        let decoded: OutboundMessage =
            postcard::from_bytes(&postcard::to_allocvec(&before).unwrap()).unwrap();
        assert_eq!(decoded, message);
    }
}
