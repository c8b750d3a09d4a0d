//! `weir status`: what a running `weir run` says of itself on its admin port (`/status`),
//! as a table for a terminal. Everything shown is read from the port; nothing is decided
//! here.

use std::fmt::Write as _;

use weir_admin::{PipelineReport, StatusReport};

/// The longest a plugin's or a stream's text is shown in the table.
const SHOWN: usize = 120;

pub async fn run(admin: &str) -> Result<(), crate::Error> {
    let (code, body) = weir_admin::fetch(admin, "/status").await?;
    let fetch_failed = |reason: String| weir_admin::AdminError::Fetch {
        url: format!("http://{}/status", admin.trim_start_matches("http://")),
        reason,
    };
    if code != 200 {
        return Err(fetch_failed(format!("answered {code}")).into());
    }
    let report: StatusReport = serde_json::from_str(&body).map_err(|e| {
        fetch_failed(format!(
            "not weir's status ({e}): is this weir's admin port?"
        ))
    })?;
    print!("{}", table(admin, &report));
    Ok(())
}

/// The report as the terminal shows it.
fn table(admin: &str, report: &StatusReport) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "weir {} at {admin}: {}",
        shown(&report.version),
        if report.ready { "ready" } else { "NOT READY" }
    );
    let header = [
        "PIPELINE",
        "PHASE",
        "READY",
        "IN/S",
        "LAG",
        "ACKED",
        "DEAD LETTERS",
        "PLUGIN",
    ];
    let rows: Vec<[String; 8]> = report.pipelines.iter().map(row).collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    out.push_str(&line(&header.map(String::from)));
    for row in &rows {
        out.push_str(&line(row));
    }
    for pipeline in &report.pipelines {
        if let Some(because) = &pipeline.not_ready_because {
            let _ = writeln!(
                out,
                "{}: not ready: {}",
                shown(&pipeline.name),
                shown(because)
            );
        }
        for letter in &pipeline.recent_dead_letters {
            let _ = writeln!(
                out,
                "{}: dead letter {} ({}, input {}#{} {}): {}",
                shown(&pipeline.name),
                letter.sequence,
                shown(&letter.kind),
                shown(&letter.input_stream),
                shown(&letter.input_sequence),
                shown(&letter.input_subject),
                shown(&letter.reason)
            );
        }
    }
    out
}

fn row(pipeline: &PipelineReport) -> [String; 8] {
    let dead_letters = if pipeline.dead_letters.is_empty() {
        "0".to_owned()
    } else {
        pipeline
            .dead_letters
            .iter()
            .map(|(kind, count)| format!("{}={count}", shown(kind)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let plugin = pipeline.plugin.as_ref().map_or("-".to_owned(), |plugin| {
        shown(plugin.sha256.get(..12).unwrap_or(&plugin.sha256))
    });
    [
        shown(&pipeline.name),
        shown(&pipeline.phase),
        if pipeline.ready { "yes" } else { "no" }.to_owned(),
        format!("{:.1}", pipeline.inputs_per_second),
        pipeline.lag.to_string(),
        pipeline.acked.to_string(),
        dead_letters,
        plugin,
    ]
}

fn shown(text: &str) -> String {
    weir_core::text::escaped(text, SHOWN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_admin::{PluginIdentity, RecentDeadLetter};

    #[test]
    fn the_table_aligns_its_columns_and_escapes_stream_text() {
        let pipeline = |name: &str, ready: bool| PipelineReport {
            name: name.into(),
            phase: "running".into(),
            ready,
            not_ready_because: (!ready).then(|| "server gone: reconnecting".into()),
            connected: ready,
            retrying: Vec::new(),
            inputs_per_second: 12.34,
            received: 60,
            executed: 60,
            deduplicated: 0,
            published: 110,
            acked: 60,
            dead_letters: [("invalid-input".to_owned(), 10)].into(),
            recent_dead_letters: vec![RecentDeadLetter {
                sequence: 7,
                stored_unix_ms: 0,
                kind: "invalid-input".into(),
                reason: "bad\u{1b}[2Jorder".into(),
                input_stream: "ORDERS".into(),
                input_sequence: "42".into(),
                input_subject: "orders.in.new".into(),
            }],
            lag: 3,
            ack_pending: 0,
            redelivered: 0,
            plugin: Some(PluginIdentity {
                sha256: "0123456789abcdef".into(),
                contract: "weir:transform/transformer@0.1.0".into(),
            }),
            store_dir: None,
            store_bytes: 0,
            store_keys: 0,
        };
        let report = StatusReport {
            version: "0.1.0".into(),
            ready: false,
            pipelines: vec![pipeline("orders", true), pipeline("a-longer-name", false)],
        };
        let text = table("127.0.0.1:7464", &report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "weir 0.1.0 at 127.0.0.1:7464: NOT READY");
        assert_eq!(
            lines[1],
            "PIPELINE       PHASE    READY  IN/S  LAG  ACKED  DEAD LETTERS      PLUGIN"
        );
        assert_eq!(
            lines[2],
            "orders         running  yes    12.3  3    60     invalid-input=10  0123456789ab"
        );
        assert!(
            lines[3].starts_with("a-longer-name  running  no "),
            "{}",
            lines[3]
        );
        assert!(text.contains("a-longer-name: not ready: server gone: reconnecting\n"));
        // The terminal escape in the plugin's reason is shown, not obeyed.
        assert!(
            text.contains("orders: dead letter 7 (invalid-input, input ORDERS#42 orders.in.new): bad\\u{1b}[2Jorder"),
            "{text}"
        );
    }
}
