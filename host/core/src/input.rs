//! An input message as the core sees it, and the identity under which it is recorded.

use bytes::Bytes;
use serde::Deserialize;

use crate::headers::MSG_ID_HEADER;
use crate::plugin::{TransformInput, sha256_hex};

/// One input message, as it was stored in the input stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub subject: String,
    /// Sorted by name; a repeated name keeps its values in order.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    pub stream_sequence: u64,
    /// The creation time of the stream the message came from, in Unix nanoseconds: part of
    /// its dedup key, so that a stream re-created under the same name starts afresh.
    pub stream_created_unix_ns: u64,
    /// When the stream stored it: the plugin's data time.
    pub published_unix_ns: u64,
    /// Set when its header block could not be read as headers (then `headers` is empty):
    /// the plugin never sees such an input, it is dead-lettered as `unreadable-input`.
    pub unreadable_headers: Option<UnreadableHeaders>,
}

/// Why an input's header block could not be read, and the block as the stream stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableHeaders {
    pub reason: String,
    /// `None` when it could not be fetched from the stream either.
    pub block: Option<Bytes>,
}

impl Input {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }

    /// What the plugin is given for this input, recorded under `dedup_key`.
    pub fn transform_input(&self, dedup_key: &str) -> TransformInput {
        TransformInput {
            subject: self.subject.clone(),
            headers: self.headers.clone(),
            payload: self.payload.to_vec(),
            stream_sequence: self.stream_sequence,
            data_time_unix_ns: self.published_unix_ns,
            dedup_key: dedup_key.to_owned(),
            seed: TransformInput::seed_for(dedup_key),
        }
    }
}

/// How an input's dedup key is derived (design.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DedupMode {
    /// Stream name, stream creation time and stream sequence: exact for redeliveries.
    #[default]
    StreamSequence,
    /// The producer's `Nats-Msg-Id` header (falling back to the stream sequence when a
    /// message has none): also catches producer retries published after JetStream's own
    /// duplicate window closed.
    MsgId,
}

/// The longest producer `Nats-Msg-Id` used as a dedup key as is; longer ones are hashed.
pub const MAX_INLINE_MSG_ID: usize = 256;

/// The identity under which `input`, from stream `stream`, is recorded as processed.
pub fn dedup_key(mode: DedupMode, stream: &str, input: &Input) -> String {
    if mode == DedupMode::MsgId
        && let Some(id) = input.header(MSG_ID_HEADER)
        && !id.is_empty()
    {
        // A long id would bloat every record and output id derived from it (and could push
        // a dead letter past max_payload): long ones are keyed by their hash.
        if id.len() > MAX_INLINE_MSG_ID {
            return format!("msg-id:sha256:{}", sha256_hex(id.as_bytes()));
        }
        return format!("msg-id:{id}");
    }
    format!(
        "{stream}@{}#{}",
        input.stream_created_unix_ns, input.stream_sequence
    )
}

#[cfg(test)]
pub(crate) fn test_input(sequence: u64, headers: &[(&str, &str)], payload: &[u8]) -> Input {
    Input {
        subject: "in.a".into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        payload: Bytes::copy_from_slice(payload),
        stream_sequence: sequence,
        stream_created_unix_ns: 7,
        published_unix_ns: 1_000 + sequence,
        unreadable_headers: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_stream_sequence_or_the_producer_id() {
        let plain = test_input(5, &[], b"");
        assert_eq!(dedup_key(DedupMode::StreamSequence, "S", &plain), "S@7#5");
        assert_eq!(
            dedup_key(DedupMode::MsgId, "S", &plain),
            "S@7#5",
            "no id: the sequence"
        );
        let with_id = test_input(5, &[(MSG_ID_HEADER, "order-1")], b"");
        assert_eq!(dedup_key(DedupMode::MsgId, "S", &with_id), "msg-id:order-1");
        assert_eq!(dedup_key(DedupMode::StreamSequence, "S", &with_id), "S@7#5");
        let long = "x".repeat(MAX_INLINE_MSG_ID + 1);
        let with_long_id = test_input(5, &[(MSG_ID_HEADER, &long)], b"");
        let key = dedup_key(DedupMode::MsgId, "S", &with_long_id);
        assert!(
            key.starts_with("msg-id:sha256:") && key.len() == 14 + 64,
            "{key}"
        );
    }

    #[test]
    fn the_plugin_sees_the_stored_time_and_a_seed_of_the_key() {
        let input = test_input(3, &[], b"p").transform_input("k");
        assert_eq!(input.data_time_unix_ns, 1_003);
        assert_eq!(input.seed, TransformInput::seed_for("k"));
        assert_ne!(input.seed, TransformInput::seed_for("k2"));
    }
}
