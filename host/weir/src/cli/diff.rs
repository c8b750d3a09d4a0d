//! `weir plugin diff`: prints what `crate::diff` found, a summary and the first
//! differences, each output's subject, headers and payload escaped and bounded.

use std::fmt::Write as _;
use std::path::PathBuf;

use weir_core::diff::{Change, Published};
use weir_core::text::escaped;

use super::PipelineArgs;
use crate::diff::{DiffRange, DiffReport};

/// The most of a payload or header value shown.
const SHOWN_BYTES: usize = 160;

pub async fn diff(
    target: PipelineArgs,
    candidate: PathBuf,
    range: DiffRange,
    show: usize,
) -> Result<(), crate::Error> {
    let (config, pipeline) = target.load_valid()?;
    let report = crate::diff::diff(&config, &pipeline, &candidate, range).await?;
    print!("{}", render(&report, &candidate, show));
    Ok(())
}

fn render(report: &DiffReport, candidate: &std::path::Path, show: usize) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "pipeline {}: sequences {} to {} of stream {}, {} inputs",
        report.pipeline, report.first, report.last, report.stream, report.inputs
    );
    let live: Vec<String> = report
        .live_plugins
        .iter()
        .map(|(sha256, inputs)| format!("{} ({inputs} inputs)", short(sha256)))
        .collect();
    let _ = writeln!(
        out,
        "live plugin: {}",
        match live.is_empty() {
            true => "none seen in the range's outputs".to_owned(),
            false => live.join(", "),
        }
    );
    let _ = writeln!(
        out,
        "candidate:   {} (sha256 {}, {})",
        candidate.display(),
        short(&report.candidate_sha256),
        report.candidate_contract
    );
    let compared: usize = report.changes.values().sum();
    let same = report.changes.get(&Change::Same).copied().unwrap_or(0);
    let kinds: Vec<String> = report
        .changes
        .iter()
        .filter(|(change, _)| **change != Change::Same)
        .map(|(change, count)| format!("{count} {}", change.describe()))
        .collect();
    let _ = write!(
        out,
        "compared {compared}: {same} same, {} different",
        compared - same
    );
    if !kinds.is_empty() {
        let _ = write!(out, " ({})", kinds.join(", "));
    }
    let not_compared: Vec<String> = [
        (
            report.not_yet_live,
            "not yet processed by the live pipeline",
        ),
        (report.repeats, "with the msg-id of an earlier input"),
        (
            report.not_found,
            "with no live outputs found (msg-id dedup)",
        ),
    ]
    .into_iter()
    .filter(|(count, _)| *count > 0)
    .map(|(count, why)| format!("{count} {why}"))
    .collect();
    if !not_compared.is_empty() {
        let _ = write!(out, "; not compared: {}", not_compared.join(", "));
    }
    let _ = writeln!(out, "\nnothing was published");
    if report.differences.is_empty() {
        return out;
    }
    let shown = report.differences.len().min(show);
    let _ = writeln!(
        out,
        "\nfirst {shown} of {} differences:",
        report.differences.len()
    );
    for difference in report.differences.iter().take(show) {
        let _ = writeln!(
            out,
            "input {} ({}): {}",
            difference.sequence,
            escaped(&difference.subject, SHOWN_BYTES),
            difference.change.describe()
        );
        let focus = payload_focus(&difference.live, &difference.candidate);
        write_published(&mut out, "live:     ", &difference.live, &focus);
        write_published(&mut out, "candidate:", &difference.candidate, &focus);
    }
    out
}

/// Per output index, where the two sides' payloads first differ, when both have that
/// output and differ only past what a line shows from the start: each side is shown from a
/// little before there.
fn payload_focus(live: &Published, candidate: &Published) -> Vec<Option<usize>> {
    let (Published::Outputs(live), Published::Outputs(candidate)) = (live, candidate) else {
        return Vec::new();
    };
    live.iter()
        .zip(candidate)
        .map(|(live, candidate)| {
            let at = live
                .payload
                .iter()
                .zip(&candidate.payload)
                .position(|(a, b)| a != b)
                .unwrap_or(live.payload.len().min(candidate.payload.len()));
            (at > SHOWN_BYTES / 2).then(|| at - SHOWN_BYTES / 4)
        })
        .collect()
}

fn write_published(out: &mut String, side: &str, published: &Published, focus: &[Option<usize>]) {
    match published {
        Published::DeadLetter { kind, reason } => {
            let _ = writeln!(
                out,
                "  {side} dead letter {kind}: {}",
                escaped(reason, SHOWN_BYTES)
            );
        }
        Published::Outputs(outputs) if outputs.is_empty() => {
            let _ = writeln!(out, "  {side} no outputs");
        }
        Published::Outputs(outputs) => {
            for (index, output) in outputs.iter().enumerate() {
                let lead = match index {
                    0 => side.to_owned(),
                    _ => " ".repeat(side.len()),
                };
                let headers: Vec<String> = output
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        format!(
                            "{}: {}",
                            escaped(name, SHOWN_BYTES),
                            escaped(value, SHOWN_BYTES)
                        )
                    })
                    .collect();
                let payload = match focus.get(index).copied().flatten() {
                    Some(from) => format!(
                        "(from byte {from}) …{}",
                        escaped(
                            &String::from_utf8_lossy(
                                output.payload.get(from..).unwrap_or_default()
                            ),
                            SHOWN_BYTES
                        )
                    ),
                    None => escaped(&String::from_utf8_lossy(&output.payload), SHOWN_BYTES),
                };
                let _ = writeln!(
                    out,
                    "  {lead} [{index}] {}{} {payload}",
                    escaped(&output.subject, SHOWN_BYTES),
                    match headers.is_empty() {
                        true => String::new(),
                        false => format!(" ({})", headers.join(", ")),
                    },
                );
            }
        }
    }
}

/// A sha256 as people compare them: its first 12 hex digits.
pub(super) fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weir_core::diff::Output;

    use super::*;
    use crate::diff::Difference;

    fn outputs(payload: &str) -> Published {
        Published::Outputs(vec![Output {
            subject: "out.a".into(),
            headers: vec![("kind".into(), "order".into())],
            payload: payload.into(),
        }])
    }

    #[test]
    fn a_late_payload_difference_is_shown_where_it_is() {
        let prefix = "x".repeat(300);
        let report = DiffReport {
            pipeline: "p".into(),
            stream: "IN".into(),
            first: 1,
            last: 2,
            inputs: 2,
            candidate_sha256: "ab".repeat(32),
            candidate_contract: "weir:transform/transformer@0.2.0".into(),
            live_plugins: BTreeMap::from([("cd".repeat(32), 2)]),
            changes: BTreeMap::from([(Change::Same, 1), (Change::Outputs, 1)]),
            not_yet_live: 0,
            repeats: 0,
            not_found: 0,
            differences: vec![Difference {
                sequence: 2,
                subject: "in.a".into(),
                change: Change::Outputs,
                live: outputs(&format!("{prefix}OLD")),
                candidate: outputs(&format!("{prefix}NEW")),
            }],
        };
        let shown = render(&report, std::path::Path::new("new.wasm"), 10);
        assert!(
            shown.contains("compared 2: 1 same, 1 different (1 outputs differ)"),
            "{shown}"
        );
        assert!(
            shown.contains("live plugin: cdcdcdcdcdcd (2 inputs)"),
            "{shown}"
        );
        assert!(shown.contains("input 2 (in.a): outputs differ"), "{shown}");
        let from = 300 - SHOWN_BYTES / 4;
        assert!(
            shown.contains(&format!("[0] out.a (kind: order) (from byte {from}) …")),
            "{shown}"
        );
        assert!(shown.contains("OLD") && shown.contains("NEW"), "{shown}");
    }
}
