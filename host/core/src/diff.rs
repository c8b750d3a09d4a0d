//! `weir plugin diff`'s judgement: what a candidate plugin would publish for an input,
//! against what the live pipeline published for it.
//!
//! Both sides are compared as the pipeline publishes them: outputs after the output policy
//! (subjects under the prefix, the plugin's headers and the trace headers weir derives from
//! the input), or a dead letter's kind. What differs by construction is left out: the ids
//! and headers NATS uses (`Nats-*`) and the lineage headers, which name each side's plugin.

use crate::dead_letter::DeadLetterHeaders;
use crate::headers;
use crate::plugin::{Outcome, TransformInput};
use crate::policy::OutputPolicy;
use crate::record::{Lineage, PLUGIN_CONTRACT, PLUGIN_SHA256};
use crate::trace::TraceContext;

/// One output as the comparison sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub subject: String,
    /// Sorted by name; the plugin's own and the trace headers.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Output {
    fn new(subject: String, headers: &[(String, String)], payload: Vec<u8>) -> Output {
        let mut compared: Vec<(String, String)> = headers
            .iter()
            .filter(|(name, _)| {
                !headers::is_nats_header(name)
                    && !name.eq_ignore_ascii_case(PLUGIN_SHA256)
                    && !name.eq_ignore_ascii_case(PLUGIN_CONTRACT)
            })
            .cloned()
            .collect();
        compared.sort();
        Output {
            subject,
            headers: compared,
            payload,
        }
    }
}

/// What a pipeline published, or would publish, for one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Outputs(Vec<Output>),
    DeadLetter { kind: String, reason: String },
}

/// One message read back from a stream for an input: the part of its id after the
/// input's dedup key (`0`, `1`, … or `dlq`), and the message.
pub struct StoredPart {
    pub part: String,
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Published {
    /// What the pipeline would publish for `input` if its plugin's outcome were `outcome`:
    /// the output policy's messages, or a dead letter (`output-rejected` when the policy
    /// refuses the outputs).
    pub fn of_outcome(
        policy: &OutputPolicy,
        input: &TransformInput,
        lineage: &Lineage,
        outcome: Outcome,
    ) -> Published {
        let trace = TraceContext::of(&input.headers);
        match outcome {
            Outcome::Outputs(outputs) => {
                match policy.outbound(&input.dedup_key, trace.as_ref(), lineage, outputs) {
                    Ok(messages) => Published::Outputs(
                        messages
                            .into_iter()
                            .map(|m| Output::new(m.subject, &m.headers, m.payload))
                            .collect(),
                    ),
                    Err(reason) => Published::DeadLetter {
                        kind: crate::plugin::FailureKind::OutputRejected.as_str().into(),
                        reason,
                    },
                }
            }
            Outcome::Failed { kind, reason } => Published::DeadLetter {
                kind: kind.as_str().into(),
                reason,
            },
        }
    }

    /// What the streams hold for one input: its dead letter if it has one, else its
    /// outputs in index order (none: the plugin returned none).
    pub fn of_stored(mut parts: Vec<StoredPart>) -> Published {
        if let Some(letter) = parts.iter().find(|part| part.part == "dlq") {
            let letter = DeadLetterHeaders::parse(&letter.headers);
            return Published::DeadLetter {
                kind: letter.kind,
                reason: letter.reason,
            };
        }
        parts.sort_by_key(|part| part.part.parse::<usize>().unwrap_or(usize::MAX));
        Published::Outputs(
            parts
                .into_iter()
                .map(|part| Output::new(part.subject, &part.headers, part.payload))
                .collect(),
        )
    }
}

/// How a candidate's result for an input differs from the live one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Same,
    /// Both publish outputs, not the same ones.
    Outputs,
    /// The candidate dead-letters an input the live plugin transformed.
    NowDeadLettered,
    /// The candidate transforms an input the live plugin dead-lettered.
    NoLongerDeadLettered,
    /// Both dead-letter it, for different kinds of failure.
    DeadLetterKind,
}

impl Change {
    pub fn describe(self) -> &'static str {
        match self {
            Change::Same => "same",
            Change::Outputs => "outputs differ",
            Change::NowDeadLettered => "now dead-lettered",
            Change::NoLongerDeadLettered => "no longer dead-lettered",
            Change::DeadLetterKind => "dead-lettered for another reason",
        }
    }
}

/// How `candidate` differs from `live`. Two dead letters of one kind are the same: a
/// reason's text (a trap's, say) may name code locations of either build.
pub fn compare(live: &Published, candidate: &Published) -> Change {
    match (live, candidate) {
        (Published::Outputs(live), Published::Outputs(candidate)) if live == candidate => {
            Change::Same
        }
        (Published::Outputs(_), Published::Outputs(_)) => Change::Outputs,
        (Published::Outputs(_), Published::DeadLetter { .. }) => Change::NowDeadLettered,
        (Published::DeadLetter { .. }, Published::Outputs(_)) => Change::NoLongerDeadLettered,
        (Published::DeadLetter { kind: live, .. }, Published::DeadLetter { kind, .. })
            if live == kind =>
        {
            Change::Same
        }
        (Published::DeadLetter { .. }, Published::DeadLetter { .. }) => Change::DeadLetterKind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{FailureKind, PluginOutput};

    fn policy() -> OutputPolicy {
        OutputPolicy {
            pipeline: "p".into(),
            prefix: "out".into(),
            max_outputs: 2,
            max_output_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
        }
    }

    fn input() -> TransformInput {
        TransformInput {
            subject: "in.a".into(),
            headers: vec![(
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            )],
            payload: b"x".to_vec(),
            stream_sequence: 7,
            data_time_unix_ns: 1,
            dedup_key: "IN@1#7".into(),
            seed: 1,
        }
    }

    fn lineage(sha256: &str) -> Lineage {
        Lineage {
            sha256: sha256.into(),
            contract: "weir:transform/transformer@0.2.0".into(),
        }
    }

    fn output(subject: &str, payload: &str) -> PluginOutput {
        PluginOutput {
            subject: subject.into(),
            headers: vec![("kind".into(), "order".into())],
            payload: payload.into(),
        }
    }

    /// The live side as the output stream stores what the pipeline published with
    /// `lineage`: every header, ids and lineage included.
    fn stored(outcome: Outcome, lineage: &Lineage) -> Published {
        let trace = TraceContext::of(&input().headers);
        let parts = match outcome {
            Outcome::Outputs(outputs) => policy()
                .outbound("IN@1#7", trace.as_ref(), lineage, outputs)
                .expect("accepted")
                .into_iter()
                .enumerate()
                .rev()
                .map(|(index, message)| {
                    let mut headers = message.headers;
                    headers.push(("Nats-Msg-Id".into(), message.msg_id));
                    StoredPart {
                        part: index.to_string(),
                        subject: message.subject,
                        headers,
                        payload: message.payload,
                    }
                })
                .collect(),
            Outcome::Failed { kind, reason } => vec![StoredPart {
                part: "dlq".into(),
                subject: "dlq".into(),
                headers: vec![
                    (crate::dead_letter::KIND.into(), kind.as_str().into()),
                    (crate::dead_letter::REASON.into(), reason),
                ],
                payload: Vec::new(),
            }],
        };
        Published::of_stored(parts)
    }

    #[test]
    fn the_same_outputs_by_another_plugin_are_the_same() {
        let outputs = vec![output("a", "1"), output("b", "2")];
        let live = stored(Outcome::Outputs(outputs.clone()), &lineage("old"));
        let candidate = Published::of_outcome(
            &policy(),
            &input(),
            &lineage("new"),
            Outcome::Outputs(outputs),
        );
        assert_eq!(compare(&live, &candidate), Change::Same);
    }

    #[test]
    fn a_payload_subject_header_or_count_that_differs_is_a_difference() {
        let live = stored(
            Outcome::Outputs(vec![output("a", "1"), output("b", "2")]),
            &lineage("old"),
        );
        let mut header = output("b", "2");
        header.headers[0].1 = "refund".into();
        for outputs in [
            vec![output("a", "1"), output("b", "3")],
            vec![output("a", "1"), output("c", "2")],
            vec![output("a", "1"), header],
            vec![output("a", "1")],
            vec![],
        ] {
            let candidate = Published::of_outcome(
                &policy(),
                &input(),
                &lineage("new"),
                Outcome::Outputs(outputs.clone()),
            );
            assert_eq!(compare(&live, &candidate), Change::Outputs, "{outputs:?}");
        }
    }

    #[test]
    fn dead_letters_compare_by_kind_and_refused_outputs_are_dead_letters() {
        let failed = |kind, reason: &str| Outcome::failed(kind, reason);
        let live = stored(failed(FailureKind::Trap, "at 0x1f"), &lineage("old"));
        let same_kind = Published::of_outcome(
            &policy(),
            &input(),
            &lineage("new"),
            failed(FailureKind::Trap, "at 0x2c"),
        );
        assert_eq!(compare(&live, &same_kind), Change::Same);
        let too_many = Outcome::Outputs(vec![output("a", "1"); 3]);
        let rejected = Published::of_outcome(&policy(), &input(), &lineage("new"), too_many);
        assert!(
            matches!(&rejected, Published::DeadLetter { kind, .. } if kind == "output-rejected")
        );
        assert_eq!(compare(&live, &rejected), Change::DeadLetterKind);
        let transformed = stored(Outcome::Outputs(vec![output("a", "1")]), &lineage("old"));
        assert_eq!(compare(&transformed, &rejected), Change::NowDeadLettered);
        assert_eq!(compare(&live, &transformed), Change::NoLongerDeadLettered);
    }
}
