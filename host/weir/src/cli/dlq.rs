//! `weir dlq …`: the command-line face of `crate::dlq`.

use std::fmt::Write as _;

use crate::dlq::{DeadLetter, DeadLetters};
use indicatif::{ProgressBar, ProgressStyle};

use super::DlqCommand;

pub async fn run(command: DlqCommand) -> Result<(), crate::Error> {
    match command {
        DlqCommand::List { target } => {
            let pipeline = target.load()?;
            let letters = DeadLetters::open(&pipeline).await?;
            let list = letters.list().await?;
            println!(
                "{} dead letters of pipeline {:?} in stream {:?}",
                list.len(),
                pipeline.name,
                letters.stream()
            );
            if !list.is_empty() {
                println!(
                    "{:>8}  {:<20}  {:<15}  {:<32}  {:<12}  REASON",
                    "SEQ", "STORED (UTC)", "KIND", "INPUT", "PLUGIN"
                );
            }
            for letter in &list {
                let headers = &letter.headers;
                let input = format!(
                    "{}#{} {}",
                    headers.input_stream, headers.input_sequence, headers.input_subject
                );
                let sha = headers
                    .plugin_sha256
                    .get(..12)
                    .unwrap_or(&headers.plugin_sha256);
                println!(
                    "{:>8}  {:<20}  {:<15}  {:<32}  {:<12}  {}",
                    letter.sequence,
                    timestamp(letter.stored_unix_ns),
                    shown(&headers.kind),
                    shown(&input),
                    shown(sha),
                    shown(&headers.reason)
                );
            }
            Ok(())
        }
        DlqCommand::Show { target, sequence } => {
            let pipeline = target.load()?;
            let letters = DeadLetters::open(&pipeline).await?;
            print!("{}", describe(&letters.get(sequence).await?));
            Ok(())
        }
        DlqCommand::Replay {
            target,
            all,
            sequences,
        } => {
            let pipeline = target.load()?;
            let letters = DeadLetters::open(&pipeline).await?;
            let selected = if all {
                letters.list().await?
            } else {
                let mut selected = Vec::with_capacity(sequences.len());
                for sequence in sequences {
                    selected.push(letters.get(sequence).await?);
                }
                selected
            };
            let progress = ProgressBar::new(selected.len() as u64).with_style(
                ProgressStyle::with_template("replaying {bar:40} {pos}/{len} ({eta} left)")
                    .expect("the template is valid"),
            );
            let mut skipped = 0;
            for letter in &selected {
                if let Some(why) = letters.replay(letter).await? {
                    skipped += 1;
                    // Not `progress.println`: a bar that is hidden (no terminal) drops it.
                    progress.suspend(|| println!("skipped dead letter {}: {why}", letter.sequence));
                }
                progress.inc(1);
            }
            progress.finish_and_clear();
            println!(
                "replayed {} of {} dead letters into {:?} (pipeline {:?})",
                selected.len() - skipped,
                selected.len(),
                pipeline.input.stream,
                pipeline.name
            );
            if skipped > 0 {
                return Err(crate::Error::Skipped(skipped));
            }
            Ok(())
        }
    }
}

/// How much of a dead letter's payload `show` prints.
const SHOWN_PAYLOAD: usize = 64 * 1024;

/// Text from a stream, as a terminal may show it: control characters escaped, bounded.
/// Anyone who can publish on the DLQ subject controls it.
fn shown(text: &str) -> String {
    weir_core::text::escaped(text, SHOWN_PAYLOAD)
}

/// Everything about one dead letter, as text.
fn describe(letter: &DeadLetter) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "sequence:      {}", letter.sequence);
    let _ = writeln!(out, "stored:        {}", timestamp(letter.stored_unix_ns));
    let _ = writeln!(out, "kind:          {}", shown(&letter.headers.kind));
    let _ = writeln!(out, "reason:        {}", shown(&letter.headers.reason));
    let _ = writeln!(
        out,
        "plugin sha256: {}",
        shown(&letter.headers.plugin_sha256)
    );
    let _ = writeln!(
        out,
        "contract:      {}",
        shown(&letter.headers.plugin_contract)
    );
    let _ = writeln!(
        out,
        "input:         stream {:?}, sequence {}, subject {:?}",
        letter.headers.input_stream, letter.headers.input_sequence, letter.headers.input_subject
    );
    let _ = writeln!(out, "headers:       {}", letter.headers.input_headers.len());
    for (name, value) in &letter.headers.input_headers {
        let _ = writeln!(out, "  {}: {}", shown(name), shown(value));
    }
    if let Some(block) = &letter.headers.input_header_block {
        let _ = writeln!(
            out,
            "header block:  {} bytes as stored, unreadable as headers:",
            block.len()
        );
        let _ = writeln!(out, "{}", shown(&String::from_utf8_lossy(block)));
    }
    if letter.headers.payload_omitted {
        let _ = writeln!(out, "payload:       omitted (too large for the DLQ)");
    } else {
        match std::str::from_utf8(&letter.payload) {
            Ok(text) => {
                let _ = writeln!(out, "payload:       {} bytes, UTF-8", letter.payload.len());
                let _ = writeln!(out, "{}", shown(text));
            }
            Err(_) => {
                let _ = writeln!(out, "payload:       {} bytes, hex", letter.payload.len());
                let hex: String = letter.payload.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(out, "{hex}");
            }
        }
    }
    out
}

fn timestamp(unix_ns: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ns))
        .ok()
        .and_then(|t| {
            t.replace_nanosecond(0)
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_ns.to_string())
}
