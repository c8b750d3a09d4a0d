//! The dead-letter schema: the headers a dead letter carries, built and parsed here and
//! nowhere else (the pipeline builds them, `weir dlq` parses them).
//!
//! A dead letter is the input's payload and its own headers (except `Nats-*`, which
//! JetStream would act on, and `Weir-*`, which a producer must not be able to forge), plus
//! weir's headers saying what happened. If that is larger than the server accepts, the
//! payload is left out, then the input's headers: the input stays in its stream, and the
//! letter points at it.

use crate::headers::{self, MAX_HEADER_BLOCK, MSG_ID_HEADER};
use crate::input::{Input, MAX_INLINE_MSG_ID};
use crate::plugin::FailureKind;
use crate::record::{Lineage, OutboundMessage, PLUGIN_CONTRACT, PLUGIN_SHA256};
use crate::text;

/// `invalid-input`, `trap`, …: [`FailureKind::as_str`].
pub const KIND: &str = "Weir-Dlq-Kind";
/// What went wrong, escaped and at most [`MAX_REASON_LEN`] bytes.
pub const REASON: &str = "Weir-Dlq-Reason";
pub const INPUT_STREAM: &str = "Weir-Input-Stream";
pub const INPUT_SEQUENCE: &str = "Weir-Input-Sequence";
pub const INPUT_SUBJECT: &str = "Weir-Input-Subject";
pub const DEDUP_KEY: &str = "Weir-Dedup-Key";
/// The input's `Nats-Msg-Id`, when it had one.
pub const INPUT_MSG_ID: &str = "Weir-Input-Msg-Id";
/// Present when the input was too large to carry with its payload.
pub const PAYLOAD_OMITTED: &str = "Weir-Dlq-Payload-Omitted";
/// Present when the input's headers were too large to carry as well.
pub const HEADERS_OMITTED: &str = "Weir-Dlq-Headers-Omitted";
/// The input's header block as the stream stored it, base64: present when it could not be
/// read as headers (`unreadable-input`).
pub const INPUT_HEADER_BLOCK: &str = "Weir-Dlq-Input-Header-Block";
/// Set by `weir dlq replay` on the input it re-publishes: `<dlq stream>#<sequence>`.
pub const REPLAY_OF: &str = "Weir-Replay-Of";

/// The longest reason kept in a dead letter.
pub const MAX_REASON_LEN: usize = 1024;

/// What a pipeline's dead letters say about where they come from.
#[derive(Debug, Clone)]
pub struct DeadLetterSchema {
    /// Part of every dead letter's `Nats-Msg-Id`.
    pub pipeline: String,
    pub dlq_subject: String,
    pub input_stream: String,
    /// The largest message the server and the DLQ stream accept.
    pub max_message_bytes: usize,
}

impl DeadLetterSchema {
    /// The dead letter of `input`, recorded under `dedup_key`, for a failure of `kind` under
    /// the plugin `lineage` names (`None` for a record written before weir recorded it).
    pub fn letter(
        &self,
        input: &Input,
        dedup_key: &str,
        lineage: Option<&Lineage>,
        kind: FailureKind,
        reason: &str,
    ) -> OutboundMessage {
        let mut weir_headers = vec![
            (KIND.to_owned(), kind.as_str().to_owned()),
            (REASON.to_owned(), text::escaped(reason, MAX_REASON_LEN)),
        ];
        weir_headers.extend(lineage.iter().flat_map(|lineage| lineage.headers()));
        weir_headers.extend([
            (INPUT_STREAM.to_owned(), self.input_stream.clone()),
            (INPUT_SEQUENCE.to_owned(), input.stream_sequence.to_string()),
            (INPUT_SUBJECT.to_owned(), input.subject.clone()),
            (DEDUP_KEY.to_owned(), dedup_key.to_owned()),
        ]);
        if let Some(id) = input.header(MSG_ID_HEADER) {
            weir_headers.push((
                INPUT_MSG_ID.to_owned(),
                text::escaped(id, MAX_INLINE_MSG_ID),
            ));
        }
        let mut input_headers: Vec<(String, String)> = input
            .headers
            .iter()
            .filter(|(name, _)| !headers::is_nats_header(name) && !headers::is_weir_header(name))
            .cloned()
            .collect();
        // Kept, and left out, as the input's headers are.
        if let Some(block) = input
            .unreadable_headers
            .as_ref()
            .and_then(|u| u.block.as_ref())
        {
            use base64::Engine;
            input_headers.push((
                INPUT_HEADER_BLOCK.to_owned(),
                base64::engine::general_purpose::STANDARD.encode(block),
            ));
        }
        let mut letter = OutboundMessage {
            subject: self.dlq_subject.clone(),
            msg_id: format!("{}:{dedup_key}:dlq", self.pipeline),
            headers: [input_headers, weir_headers.clone()].concat(),
            payload: input.payload.to_vec(),
        };
        let fits = |letter: &OutboundMessage| {
            letter.header_block_len() <= MAX_HEADER_BLOCK
                && letter.wire_size() <= self.max_message_bytes
        };
        if !fits(&letter) {
            letter.payload.clear();
            letter
                .headers
                .push((PAYLOAD_OMITTED.to_owned(), "too large".into()));
        }
        if !fits(&letter) {
            weir_headers.push((PAYLOAD_OMITTED.to_owned(), "too large".into()));
            weir_headers.push((HEADERS_OMITTED.to_owned(), "too large".into()));
            letter.headers = weir_headers;
        }
        letter
    }
}

/// What weir's headers on a stored dead letter say, and the input's own headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterHeaders {
    pub kind: String,
    pub reason: String,
    pub plugin_sha256: String,
    pub plugin_contract: String,
    pub input_stream: String,
    pub input_sequence: String,
    pub input_subject: String,
    pub dedup_key: String,
    pub input_msg_id: Option<String>,
    /// The input's payload was left out: replay it from the input stream.
    pub payload_omitted: bool,
    /// The input's headers were left out too.
    pub headers_omitted: bool,
    /// The input's own headers: everything but weir's.
    pub input_headers: Vec<(String, String)>,
    /// The input's header block as stored, when it could not be read as headers.
    pub input_header_block: Option<Vec<u8>>,
}

impl DeadLetterHeaders {
    /// Reads a stored dead letter's headers (one that lacks some reads them as empty).
    pub fn parse(headers: &[(String, String)]) -> DeadLetterHeaders {
        let find = |name: &str| {
            headers
                .iter()
                .find(|(header, _)| header.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.clone())
        };
        let get = |name: &str| find(name).unwrap_or_default();
        DeadLetterHeaders {
            kind: get(KIND),
            reason: get(REASON),
            plugin_sha256: get(PLUGIN_SHA256),
            plugin_contract: get(PLUGIN_CONTRACT),
            input_stream: get(INPUT_STREAM),
            input_sequence: get(INPUT_SEQUENCE),
            input_subject: get(INPUT_SUBJECT),
            dedup_key: get(DEDUP_KEY),
            input_msg_id: find(INPUT_MSG_ID),
            payload_omitted: find(PAYLOAD_OMITTED).is_some(),
            headers_omitted: find(HEADERS_OMITTED).is_some(),
            input_header_block: find(INPUT_HEADER_BLOCK).and_then(|encoded| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()
            }),
            input_headers: headers
                .iter()
                .filter(|(name, _)| !headers::is_weir_header(name))
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::test_input;
    use crate::record::test_lineage;

    fn schema(max_message_bytes: usize) -> DeadLetterSchema {
        DeadLetterSchema {
            pipeline: "p".into(),
            dlq_subject: "dlq".into(),
            input_stream: "IN".into(),
            max_message_bytes,
        }
    }

    #[test]
    fn a_letter_parses_back_to_what_was_built() {
        let input = test_input(
            9,
            &[
                ("Content-Type", "json"),
                (MSG_ID_HEADER, "m1"),
                ("Weir-Dlq-Kind", "forged"),
            ],
            b"{}",
        );
        let letter = schema(1 << 20).letter(
            &input,
            "IN@7#9",
            Some(&test_lineage()),
            FailureKind::Trap,
            "boom\nERROR forged",
        );
        assert_eq!(letter.subject, "dlq");
        assert_eq!(letter.msg_id, "p:IN@7#9:dlq");
        assert_eq!(letter.payload, b"{}");
        let parsed = DeadLetterHeaders::parse(&letter.headers);
        assert_eq!(parsed.kind, "trap");
        assert_eq!(
            parsed.reason, "boom\\nERROR forged",
            "the reason is escaped"
        );
        assert_eq!(parsed.plugin_sha256, "ab".repeat(32));
        assert_eq!(parsed.plugin_contract, "weir:transform/transformer@0.2.0");
        assert_eq!(parsed.input_sequence, "9");
        assert_eq!(parsed.input_subject, "in.a");
        assert_eq!(parsed.dedup_key, "IN@7#9");
        assert_eq!(parsed.input_msg_id.as_deref(), Some("m1"));
        assert!(!parsed.payload_omitted && !parsed.headers_omitted);
        assert_eq!(
            parsed.input_headers,
            [("Content-Type".to_owned(), "json".to_owned())],
            "the input's Nats-* and forged Weir-* headers are not carried"
        );
    }

    #[test]
    fn a_letter_too_large_leaves_out_the_payload_then_the_headers() {
        let input = test_input(1, &[("h", &"v".repeat(600))], &[b'x'; 4000]);
        let letter =
            schema(2000).letter(&input, "k", Some(&test_lineage()), FailureKind::Trap, "r");
        assert!(letter.payload.is_empty() && letter.wire_size() <= 2000);
        let parsed = DeadLetterHeaders::parse(&letter.headers);
        assert!(parsed.payload_omitted && !parsed.headers_omitted);
        let letter = schema(700).letter(&input, "k", Some(&test_lineage()), FailureKind::Trap, "r");
        let parsed = DeadLetterHeaders::parse(&letter.headers);
        assert!(parsed.payload_omitted && parsed.headers_omitted);
        assert!(parsed.input_headers.is_empty() && letter.wire_size() <= 700);
    }

    #[test]
    fn input_headers_that_would_push_the_letter_past_64k_are_left_out() {
        let big = "v".repeat(60_000);
        let input = test_input(1, &[("a", &big), ("b", &big[..5_000])], b"p");
        let letter = schema(8 << 20).letter(
            &input,
            "k",
            Some(&test_lineage()),
            FailureKind::Trap,
            &"r".repeat(5000),
        );
        assert!(letter.header_block_len() <= MAX_HEADER_BLOCK);
    }

    #[test]
    fn the_reason_is_bounded() {
        let input = test_input(1, &[], b"");
        let letter = schema(1 << 20).letter(
            &input,
            "k",
            Some(&test_lineage()),
            FailureKind::PluginFailed,
            &"x".repeat(60 << 20),
        );
        assert!(DeadLetterHeaders::parse(&letter.headers).reason.len() <= MAX_REASON_LEN);
    }
}
