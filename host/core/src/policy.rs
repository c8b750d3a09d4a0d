//! The output policy: which of a plugin's outputs weir publishes, and as what. One function,
//! [`OutputPolicy::outbound`], decides for the pipeline and for `weir plugin test` alike.
//!
//! It refuses, as `output-rejected`, everything the server would refuse on every retry (a
//! publish refused for a reason that will not change must never reach the publish stage,
//! where it would hold its whole batch): a header block over 64 KiB, a message over the
//! server's `max_payload` or the output stream's `max_msg_size`, a header name or value the
//! wire cannot carry. And what weir itself reserves: subjects with wildcards or over
//! [`MAX_SUBJECT_LEN`], headers named `Nats-*` (JetStream acts on them) or `Weir-*` (dead
//! letters and replays are recognised by them), more outputs or bytes than the limits allow.

use crate::headers::{self, MAX_HEADER_BLOCK, MSG_ID_HEADER};
use crate::plugin::{FailureKind, Outcome, PluginOutput, TransformInput};
use crate::record::{Lineage, OutboundMessage, PLUGIN_CONTRACT, PLUGIN_SHA256};
use crate::text;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

/// The longest subject an output may have, prefix included: far below the server's
/// control-line limit (4 KiB by default), which would drop the connection.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// The largest message JetStream's file store keeps: a record of 32 MiB, less its own
/// framing and the subject (nats-server refuses a larger one with error 10077 whatever
/// `max_payload` allows).
pub const MAX_STORED_MESSAGE: usize = (32 << 20) - 64 - MAX_SUBJECT_LEN;

/// How much of a value the policy quotes when it refuses it.
const QUOTED: usize = 64;

/// What a pipeline lets its plugin publish.
#[derive(Debug, Clone)]
pub struct OutputPolicy {
    /// Part of every output's `Nats-Msg-Id`.
    pub pipeline: String,
    /// Every output subject is `<prefix>.<the plugin's subject>`.
    pub prefix: String,
    /// The most outputs one input may produce (`limits.max_outputs`).
    pub max_outputs: usize,
    /// The most output bytes, payloads and headers, one input may produce
    /// (`limits.max_output_bytes`).
    pub max_output_bytes: usize,
    /// The largest message, header block and payload, that the server and the output
    /// stream accept: the smaller of `max_payload` and the stream's `max_msg_size`.
    pub max_message_bytes: usize,
}

impl OutputPolicy {
    /// The messages to publish for a plugin's outputs, or why the input is dead-lettered
    /// instead (always `output-rejected`). An input's `trace` goes on into each output, as
    /// a child span (unless the plugin set the output's `traceparent` itself).
    pub fn outbound(
        &self,
        dedup_key: &str,
        trace: Option<&TraceContext>,
        lineage: &Lineage,
        outputs: Vec<PluginOutput>,
    ) -> Result<Vec<OutboundMessage>, String> {
        if outputs.len() > self.max_outputs {
            return Err(format!(
                "produced {} outputs, more than {} (limits.max_outputs)",
                outputs.len(),
                self.max_outputs
            ));
        }
        let bytes: usize = outputs.iter().map(output_bytes).sum();
        if bytes > self.max_output_bytes {
            return Err(format!(
                "produced {bytes} output bytes, more than {} (limits.max_output_bytes)",
                self.max_output_bytes
            ));
        }
        outputs
            .into_iter()
            .enumerate()
            .map(|(index, output)| self.message(dedup_key, trace, lineage, index, output))
            .collect()
    }

    /// A plugin's outcome as the pipeline would treat it: outputs the policy refuses become
    /// an `output-rejected` failure. For `weir plugin test`, which reports what weir would
    /// do without publishing: the outputs of `input`, trace and lineage headers included.
    pub fn judge(&self, input: &TransformInput, lineage: &Lineage, outcome: Outcome) -> Outcome {
        let trace = TraceContext::of(&input.headers);
        match outcome {
            Outcome::Outputs(outputs) => {
                match self.outbound(&input.dedup_key, trace.as_ref(), lineage, outputs.clone()) {
                    Ok(_) => Outcome::Outputs(outputs),
                    Err(reason) => Outcome::failed(FailureKind::OutputRejected, reason),
                }
            }
            failed => failed,
        }
    }

    fn message(
        &self,
        dedup_key: &str,
        trace: Option<&TraceContext>,
        lineage: &Lineage,
        index: usize,
        output: PluginOutput,
    ) -> Result<OutboundMessage, String> {
        let quoted = |value: &str| format!("{:?}", text::escaped(value, QUOTED));
        if !crate::subject::is_literal(&output.subject) {
            return Err(format!(
                "output {index} has subject {}, which is not a non-empty subject without wildcards",
                quoted(&output.subject)
            ));
        }
        let subject = format!("{}.{}", self.prefix, output.subject);
        if subject.len() > MAX_SUBJECT_LEN {
            return Err(format!(
                "output {index} has a subject of {} bytes, more than {MAX_SUBJECT_LEN}",
                subject.len()
            ));
        }
        let mut kept = Vec::with_capacity(output.headers.len());
        for (name, value) in output.headers {
            if name.eq_ignore_ascii_case(MSG_ID_HEADER) {
                // Documented as ignored: the host sets its own, deterministic id.
                continue;
            }
            if name.eq_ignore_ascii_case(PLUGIN_SHA256)
                || name.eq_ignore_ascii_case(PLUGIN_CONTRACT)
            {
                // Ignored too, not refused: a plugin downstream of another weir pipeline may
                // pass its input's headers on, lineage included; weir sets its own.
                continue;
            }
            if headers::is_nats_header(&name) {
                return Err(format!(
                    "output {index} sets header {}: headers named Nats-* are reserved for NATS",
                    quoted(&name)
                ));
            }
            if headers::is_weir_header(&name) {
                return Err(format!(
                    "output {index} sets header {}: headers named Weir-* are reserved for weir",
                    quoted(&name)
                ));
            }
            if !headers::is_valid_name(&name) {
                return Err(format!(
                    "output {index} has header name {}, which NATS cannot carry (printable ASCII without ':')",
                    quoted(&name)
                ));
            }
            if !headers::is_valid_value(&value) {
                return Err(format!(
                    "output {index} has a value of header {} with control characters or surrounding spaces",
                    quoted(&name)
                ));
            }
            kept.push((name, value));
        }
        // A plugin that sets its own traceparent owns the output's trace context; one that
        // sets only a tracestate changes the state the output's child span carries.
        let sets = |header: &str| {
            kept.iter()
                .any(|(name, _)| name.eq_ignore_ascii_case(header))
        };
        if let Some(trace) = trace
            && !sets(TRACEPARENT)
        {
            let plugin_state = sets(TRACESTATE);
            kept.extend(
                trace
                    .child_headers(dedup_key, index)
                    .into_iter()
                    .filter(|(name, _)| !(plugin_state && name == TRACESTATE)),
            );
        }
        kept.extend(lineage.headers());
        let message = OutboundMessage {
            subject,
            msg_id: format!("{}:{dedup_key}:{index}", self.pipeline),
            headers: kept,
            payload: output.payload,
        };
        let header_block = message.header_block_len();
        if header_block > MAX_HEADER_BLOCK {
            return Err(format!(
                "output {index} has {header_block} bytes of headers, more than JetStream's {MAX_HEADER_BLOCK}"
            ));
        }
        let wire_size = header_block + message.payload.len();
        if wire_size > self.max_message_bytes {
            return Err(format!(
                "output {index} is {wire_size} bytes with headers, more than the {} the server and output stream accept",
                self.max_message_bytes
            ));
        }
        Ok(message)
    }
}

/// What an output counts against `limits.max_output_bytes`.
pub fn output_bytes(output: &PluginOutput) -> usize {
    output.subject.len()
        + output.payload.len()
        + output
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_lineage;

    fn policy() -> OutputPolicy {
        OutputPolicy {
            pipeline: "p".into(),
            prefix: "out".into(),
            max_outputs: 10,
            max_output_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
        }
    }

    fn output(subject: &str, headers: &[(&str, &str)]) -> PluginOutput {
        PluginOutput {
            subject: subject.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            payload: b"x".to_vec(),
        }
    }

    fn refusal(outputs: Vec<PluginOutput>) -> String {
        policy()
            .outbound("k", None, &test_lineage(), outputs)
            .unwrap_err()
    }

    #[test]
    fn accepted_outputs_get_the_prefix_and_deterministic_ids() {
        let messages = policy()
            .outbound(
                "k",
                None,
                &test_lineage(),
                vec![
                    output("a.b", &[("Content-Type", "json"), ("nats-msg-id", "mine")]),
                    output("c", &[]),
                ],
            )
            .unwrap();
        assert_eq!(messages[0].subject, "out.a.b");
        assert_eq!(messages[0].msg_id, "p:k:0");
        assert_eq!(messages[1].msg_id, "p:k:1");
        assert_eq!(
            messages[0].headers[..1],
            [("Content-Type".to_owned(), "json".to_owned())],
            "the plugin's own Nats-Msg-Id is dropped"
        );
        assert_eq!(messages[0].headers[1..], test_lineage().headers());
    }

    #[test]
    fn outputs_carry_the_inputs_trace_as_child_spans_unless_the_plugin_set_one() {
        let input_headers = [
            (
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            ),
            ("tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned()),
        ];
        let trace = TraceContext::of(&input_headers).unwrap();
        let own = "00-11111111111111111111111111111111-2222222222222222-00";
        let outputs = || {
            vec![
                output("a", &[("Content-Type", "json")]),
                output("b", &[]),
                output("c", &[("traceparent", own)]),
                output("d", &[("tracestate", "mine=1")]),
            ]
        };
        let messages = policy()
            .outbound("k", Some(&trace), &test_lineage(), outputs())
            .unwrap();
        // Each output's own headers, then the trace's, then the lineage's.
        let own_and_trace = |message: &OutboundMessage| {
            let (before, lineage_headers) = message.headers.split_at(message.headers.len() - 2);
            assert_eq!(lineage_headers, test_lineage().headers());
            before.to_vec()
        };
        assert_eq!(
            own_and_trace(&messages[0])[1..],
            trace.child_headers("k", 0)[..],
            "{:?}",
            messages[0].headers
        );
        assert_eq!(own_and_trace(&messages[1]), trace.child_headers("k", 1));
        assert_ne!(messages[0].headers[1], messages[1].headers[0]);
        assert_eq!(
            own_and_trace(&messages[2]),
            [("traceparent".to_owned(), own.to_owned())]
        );
        // The plugin's tracestate replaces the input's: one tracestate, on weir's child span.
        assert_eq!(
            own_and_trace(&messages[3]),
            [
                ("tracestate".to_owned(), "mine=1".to_owned()),
                trace.child_headers("k", 3)[0].clone(),
            ]
        );
        // Byte-identical when made again (a re-publish after a crash).
        assert_eq!(
            policy()
                .outbound("k", Some(&trace), &test_lineage(), outputs())
                .unwrap(),
            messages
        );
    }

    #[test]
    fn subjects_that_are_not_literal_or_too_long_are_refused() {
        for subject in ["", "a.>", "a.*", "a b", "a..b"] {
            assert!(refusal(vec![output(subject, &[])]).contains("subject"));
        }
        let long = "a".repeat(MAX_SUBJECT_LEN);
        assert!(refusal(vec![output(&long, &[])]).contains("more than 1024"));
    }

    #[test]
    fn reserved_and_unwireable_headers_are_refused() {
        assert!(refusal(vec![output("a", &[("Nats-Rollup", "all")])]).contains("Nats-*"));
        assert!(refusal(vec![output("a", &[("Weir-Dlq-Kind", "trap")])]).contains("Weir-*"));
        assert!(refusal(vec![output("a", &[("weir-replay-of", "x")])]).contains("Weir-*"));
        assert!(refusal(vec![output("a", &[("a:b", "v")])]).contains("cannot carry"));
        for value in ["a\r\nERROR weir: forged", "\u{1b}[31m", "bare\r"] {
            assert!(refusal(vec![output("a", &[("h", value)])]).contains("control characters"));
        }
    }

    #[test]
    fn a_header_block_jetstream_would_refuse_is_refused() {
        // One 70 000-byte value: the server answers 10097 on every try.
        let value = "v".repeat(70_000);
        assert!(refusal(vec![output("a", &[("h", &value)])]).contains("bytes of headers"));
        // Many small ones add up the same way.
        let many: Vec<(String, String)> =
            (0..10_000).map(|i| (format!("h{i}"), "v".into())).collect();
        let mut flooded = output("a", &[]);
        flooded.headers = many;
        assert!(refusal(vec![flooded]).contains("bytes of headers"));
        // Just under the limit passes.
        let fits = "v".repeat(MAX_HEADER_BLOCK - 200);
        assert!(
            policy()
                .outbound(
                    "k",
                    None,
                    &test_lineage(),
                    vec![output("a", &[("h", &fits)])]
                )
                .is_ok()
        );
    }

    #[test]
    fn count_bytes_and_message_size_limits_are_refused() {
        let policy = OutputPolicy {
            max_outputs: 2,
            max_output_bytes: 100,
            max_message_bytes: 60,
            ..policy()
        };
        let three = vec![output("a", &[]), output("b", &[]), output("c", &[])];
        assert!(
            policy
                .outbound("k", None, &test_lineage(), three)
                .unwrap_err()
                .contains("limits.max_outputs")
        );
        let mut big = output("a", &[]);
        big.payload = vec![0; 101];
        assert!(
            policy
                .outbound("k", None, &test_lineage(), vec![big])
                .unwrap_err()
                .contains("limits.max_output_bytes")
        );
        let mut wide = output("a", &[]);
        wide.payload = vec![0; 40];
        assert!(
            policy
                .outbound("k", None, &test_lineage(), vec![wide])
                .unwrap_err()
                .contains("server and output stream")
        );
    }

    #[test]
    fn refusals_quote_plugin_text_escaped_and_bounded() {
        let name = format!("Nats-\u{1b}[2J{}", "x".repeat(10_000));
        let reason = refusal(vec![output("a", &[(&name, "v")])]);
        assert!(!reason.contains('\u{1b}') && reason.len() < 300, "{reason}");
    }

    fn input(headers: &[(&str, &str)]) -> TransformInput {
        TransformInput {
            subject: "in".into(),
            headers: headers
                .iter()
                .map(|&(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
            payload: Vec::new(),
            stream_sequence: 1,
            data_time_unix_ns: 0,
            dedup_key: "k".into(),
            seed: 0,
        }
    }

    #[test]
    fn judge_counts_the_trace_headers_the_pipeline_would_add() {
        let traced = input(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        // Headers that fit alone (with the lineage), and not with the child span's
        // traceparent beside them.
        let value = "v".repeat(MAX_HEADER_BLOCK - 80 - lineage_bytes());
        let outcome = || Outcome::Outputs(vec![output("a", &[("h", &value)])]);
        assert_eq!(
            policy().judge(&input(&[]), &test_lineage(), outcome()),
            outcome()
        );
        assert!(matches!(
            policy().judge(&traced, &test_lineage(), outcome()),
            Outcome::Failed {
                kind: FailureKind::OutputRejected,
                ..
            }
        ));
    }

    /// What the lineage headers add to a header block.
    fn lineage_bytes() -> usize {
        test_lineage()
            .headers()
            .iter()
            .map(|(name, value)| name.len() + value.len() + 4)
            .sum()
    }

    #[test]
    fn every_output_names_its_plugin_and_the_names_count_against_the_header_limit() {
        let messages = policy()
            .outbound(
                "k",
                None,
                &test_lineage(),
                vec![output("a", &[]), output("b", &[])],
            )
            .unwrap();
        for message in &messages {
            assert_eq!(
                message.headers,
                [
                    ("Weir-Plugin-Sha256".to_owned(), "ab".repeat(32)),
                    (
                        "Weir-Plugin-Contract".to_owned(),
                        "weir:transform/transformer@0.2.0".to_owned()
                    ),
                ]
            );
        }
        // A plugin that passes on an upstream pipeline's lineage gets its own instead.
        let passed_on = output(
            "a",
            &[
                ("Weir-Plugin-Sha256", "upstream"),
                ("weir-plugin-contract", "upstream"),
            ],
        );
        let messages = policy()
            .outbound("k", None, &test_lineage(), vec![passed_on])
            .unwrap();
        assert_eq!(messages[0].headers, test_lineage().headers());
        // A header that fits alone, and not with the lineage beside it.
        let fits_alone = "v".repeat(MAX_HEADER_BLOCK - 60);
        let refused = policy()
            .outbound(
                "k",
                None,
                &test_lineage(),
                vec![output("a", &[("h", &fits_alone)])],
            )
            .unwrap_err();
        assert!(refused.contains("bytes of headers"), "{refused}");
    }

    #[test]
    fn judge_turns_refused_outputs_into_output_rejected() {
        let judged = policy().judge(
            &input(&[]),
            &test_lineage(),
            Outcome::Outputs(vec![output("a.>", &[])]),
        );
        assert!(matches!(
            judged,
            Outcome::Failed {
                kind: FailureKind::OutputRejected,
                ..
            }
        ));
        let fine = Outcome::Outputs(vec![output("a", &[])]);
        assert_eq!(
            policy().judge(&input(&[]), &test_lineage(), fine.clone()),
            fine
        );
    }
}
