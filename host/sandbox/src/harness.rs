//! The plugin test harness behind `weir plugin test`: golden fixtures, a determinism check,
//! and what each case costs.
//!
//! A fixture is one JSON file, one case: the input message and what the plugin must make of
//! it. Payloads are written as `{"text": "…"}`, `{"json": …}` or `{"base64": "…"}`:
//!
//! ```json
//! {
//!   "subject": "orders.in.new",
//!   "headers": [["Content-Type", "application/json"]],
//!   "payload": {"json": {"id": "o-1", "customer": "c-1", "items": []}},
//!   "expect": {"outputs": [{"subject": "enriched", "payload": {"json": {"id": "o-1"}}}]}
//! }
//! ```
//!
//! `expect` is either `{"outputs": [...]}` or `{"error": {"kind": "invalid-input", "reason":
//! "…"}}` (kinds as in dead letters: `invalid-input`, `plugin-failed`, `trap`,
//! `fuel-exhausted`, …). Each case runs three times: twice in fresh instances, as the pipeline
//! runs it, and once more as the second call in an instance that has just run it. A result
//! that differs fails the case as non-deterministic: the plugin depends on something other
//! than its input, or keeps state between calls (which weir would silently drop, since each
//! message gets a fresh instance). The third run is skipped when the plugin draws random
//! bytes: a runtime that initialises itself lazily (CPython) draws them at another point of
//! the seeded stream in a used instance, so a difference there would prove nothing.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use weir_core::dead_letter::MAX_REASON_LEN;
use weir_core::plugin::{FailureKind, Outcome, TransformInput};
use weir_core::policy::OutputPolicy;
use weir_core::text;

use crate::{LimitsConfig, Plugin, Sandbox, SandboxConfig, Usage};

/// The output prefix the harness judges subjects under: as long as a typical pipeline's.
const HARNESS_PREFIX: &str = "weir.plugin.test";

/// NATS's default `max_payload`: what the harness assumes the server accepts.
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// The output policy a pipeline with this plugin's limits applies, on a server with the
/// default `max_payload`: the harness passes nothing the pipeline would dead-letter.
fn policy_of(plugin: &Plugin) -> OutputPolicy {
    OutputPolicy {
        pipeline: "weir-plugin-test".into(),
        prefix: HARNESS_PREFIX.into(),
        max_outputs: plugin.limits().max_outputs,
        max_output_bytes: plugin.limits().max_output_bytes,
        max_message_bytes: DEFAULT_MAX_PAYLOAD,
    }
}

/// The plugin's outcome for `input`, as the pipeline would treat it, and what it used.
fn judged_run(plugin: &Plugin, policy: &OutputPolicy, input: TransformInput) -> (Outcome, Usage) {
    let judged = input.clone();
    let (outcome, usage) = plugin.run_measured(input);
    (policy.judge(&judged, outcome), usage)
}

/// One fixture file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    pub payload: Payload,
    /// The message's data time; by default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_time_unix_ns: u64,
    /// What the plugin must produce; missing until `--update` writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Expectation>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A payload as written in a fixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Payload {
    Text(String),
    Json(serde_json::Value),
    Base64(String),
}

/// What a case must produce.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Expectation {
    Outputs(Vec<ExpectedOutput>),
    Error { kind: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedOutput {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    pub payload: Payload,
}

/// A fixture that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read fixtures from {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fixture {path:?}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no fixtures (*.json) in {0:?}: add one per case")]
    Empty(PathBuf),
}

/// A fixture file and its case.
pub struct Fixture {
    pub name: String,
    pub path: PathBuf,
    pub case: Case,
}

/// Every `*.json` fixture in `dir`, by name.
pub fn load_fixtures(dir: &Path) -> Result<Vec<Fixture>, FixtureError> {
    let read = |source| FixtureError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut fixtures = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| FixtureError::Read {
            path: path.clone(),
            source,
        })?;
        let case: Case = serde_json::from_str(&text).map_err(|e| FixtureError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if let Payload::Base64(text) = &case.payload {
            decode_base64(text).map_err(|message| FixtureError::Invalid {
                path: path.clone(),
                message,
            })?;
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        fixtures.push(Fixture { name, path, case });
    }
    if fixtures.is_empty() {
        return Err(FixtureError::Empty(dir.to_owned()));
    }
    fixtures.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(fixtures)
}

/// How a case went.
#[derive(Debug)]
pub enum Verdict {
    Pass,
    /// The result differs from the expectation: a readable diff, expected lines `-`,
    /// actual lines `+`.
    Fail(String),
    /// Runs of the same input gave different results: a diff of the first run's result
    /// against the other's, and which run that was.
    NotDeterministic {
        diff: String,
        other_run: &'static str,
    },
    /// The fixture had no expectation, or `--update` was given: the actual result was
    /// written into it.
    Updated,
}

pub struct CaseReport {
    pub verdict: Verdict,
    pub usage: Usage,
    /// Limits the case came within 20 % of.
    pub near_limits: Vec<&'static str>,
}

/// Runs one case twice and judges it; with `update`, writes the actual result into the
/// fixture file instead of comparing.
pub fn run_case(plugin: &Plugin, fixture: &Fixture, update: bool) -> std::io::Result<CaseReport> {
    let input = || TransformInput {
        subject: fixture.case.subject.clone(),
        headers: fixture.case.headers.clone(),
        payload: payload_bytes(&fixture.case.payload),
        stream_sequence: 1,
        data_time_unix_ns: fixture.case.data_time_unix_ns,
        dedup_key: format!("fixture:{}", fixture.name),
        seed: TransformInput::seed_for(&format!("fixture:{}", fixture.name)),
    };
    let policy = policy_of(plugin);
    let (first, usage) = judged_run(plugin, &policy, input());
    let (second, _) = judged_run(plugin, &policy, input());
    let other = if first != second {
        Some(("a second fresh instance", second))
    } else {
        let used = plugin
            .run_in_used_instance(input())
            .map(|outcome| policy.judge(&input(), outcome));
        match used {
            Some(outcome) if outcome != first => Some((
                "a second call in the same instance (the plugin keeps state between calls)",
                outcome,
            )),
            _ => None,
        }
    };
    let limits = plugin.limits();
    let mut near_limits = Vec::new();
    if usage.fuel * 5 > limits.fuel * 4 {
        near_limits.push("limits.fuel");
    }
    if usage.peak_memory_bytes * 5 > limits.memory_bytes * 4 {
        near_limits.push("limits.memory_bytes");
    }
    let actual = expectation_of(&first, fixture.case.expect.as_ref());
    let verdict = match (other, &fixture.case.expect) {
        (Some((other_run, other)), _) => {
            let other = expectation_of(&other, fixture.case.expect.as_ref());
            Verdict::NotDeterministic {
                diff: diff(&render(&actual), &render(&other)),
                other_run,
            }
        }
        (None, Some(expected)) if !update => {
            if *expected == actual {
                Verdict::Pass
            } else {
                Verdict::Fail(diff(&render(expected), &render(&actual)))
            }
        }
        (None, _) => {
            let case = Case {
                expect: Some(actual),
                ..fixture.case.clone()
            };
            let text = serde_json::to_string_pretty(&case).expect("a case serialises");
            std::fs::write(&fixture.path, text + "\n")?;
            Verdict::Updated
        }
    };
    Ok(CaseReport {
        verdict,
        usage,
        near_limits,
    })
}

/// The result of running a directory of fixtures.
pub struct SuiteReport {
    pub cases: Vec<(Fixture, CaseReport)>,
}

impl SuiteReport {
    pub fn passed(&self) -> usize {
        self.count(|verdict| matches!(verdict, Verdict::Pass))
    }

    pub fn failed(&self) -> usize {
        self.count(|verdict| matches!(verdict, Verdict::Fail(_) | Verdict::NotDeterministic { .. }))
    }

    pub fn updated(&self) -> usize {
        self.count(|verdict| matches!(verdict, Verdict::Updated))
    }

    fn count(&self, which: impl Fn(&Verdict) -> bool) -> usize {
        self.cases
            .iter()
            .filter(|(_, report)| which(&report.verdict))
            .count()
    }

    /// The report `weir plugin test` prints: a line per case with its cost, a diff under each
    /// failing case, and the totals.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for (fixture, report) in &self.cases {
            let status = match &report.verdict {
                Verdict::Pass => "PASS",
                Verdict::Updated => "UPDATED",
                Verdict::Fail(_) => "FAIL",
                Verdict::NotDeterministic { .. } => "NONDETERMINISTIC",
            };
            let usage = report.usage;
            let near = if report.near_limits.is_empty() {
                String::new()
            } else {
                format!("  near {}", report.near_limits.join(", "))
            };
            text += &format!(
                "{status:<16} {:<28} fuel {:>11}  memory {:>6.1} MiB  {:>8.2} ms{near}\n",
                fixture.name,
                usage.fuel,
                usage.peak_memory_bytes as f64 / (1 << 20) as f64,
                usage.elapsed.as_secs_f64() * 1e3,
            );
            let (heading, diff) = match &report.verdict {
                Verdict::Fail(diff) => ("expected (-) vs actual (+):".to_owned(), diff),
                Verdict::NotDeterministic { diff, other_run } => (
                    format!("a fresh instance (-) vs {other_run} (+), same input:"),
                    diff,
                ),
                _ => continue,
            };
            text += &format!("    {heading}\n");
            for line in diff.lines() {
                text += &format!("    {line}\n");
            }
        }
        text += &format!(
            "{} passed, {} failed, {} updated\n",
            self.passed(),
            self.failed(),
            self.updated()
        );
        text
    }
}

/// Runs every fixture in `dir` against a loaded plugin (`update` rewrites expectations).
pub fn run_fixtures(plugin: &Plugin, dir: &Path, update: bool) -> Result<SuiteReport, String> {
    let fixtures = load_fixtures(dir).map_err(|e| e.to_string())?;
    let mut cases = Vec::with_capacity(fixtures.len());
    for fixture in fixtures {
        let report = run_case(plugin, &fixture, update)
            .map_err(|e| format!("cannot write {}: {e}", fixture.path.display()))?;
        cases.push((fixture, report));
    }
    Ok(SuiteReport { cases })
}

/// The harness for `cargo test` in a plugin crate: loads `component` under weir's default
/// limits and runs the fixtures in `fixtures_dir`, exactly as `weir plugin test` does. `Err`
/// carries the whole report, diffs included, when a case fails or the component cannot run.
///
/// ```no_run
/// #[test]
/// fn golden_fixtures() {
///     // After building the component (`weir plugin build`).
///     let component = "target/wasm32-wasip2/release/my_plugin.wasm";
///     if let Err(report) = weir_sandbox::harness::check(component.as_ref(), "fixtures".as_ref()) {
///         panic!("{report}");
///     }
/// }
/// ```
pub fn check(component: &Path, fixtures_dir: &Path) -> Result<SuiteReport, String> {
    let limits = LimitsConfig::default();
    let sandbox = Sandbox::new(
        &SandboxConfig::default(),
        limits.memory_bytes,
        crate::Compiler::InThisProcess,
    )
    .map_err(|e| format!("{e:#}"))?;
    let plugin = sandbox
        .load(component, &limits)
        .map_err(|e| e.to_string())?;
    let report = run_fixtures(&plugin, fixtures_dir, false)?;
    if report.failed() > 0 {
        return Err(report.render());
    }
    Ok(report)
}

/// An input the fuzzer found that makes the plugin misbehave (anything but outputs or an
/// error it returned).
pub struct FuzzFinding {
    pub subject: String,
    pub payload: Vec<u8>,
    pub kind: FailureKind,
    pub reason: String,
}

impl FuzzFinding {
    /// The finding as a fixture file's text, ready to save next to the others.
    pub fn as_fixture(&self) -> String {
        let case = Case {
            subject: self.subject.clone(),
            headers: Vec::new(),
            payload: payload_like(&self.payload, None),
            data_time_unix_ns: 0,
            expect: None,
        };
        serde_json::to_string_pretty(&case).expect("a case serialises")
    }
}

/// Runs `count` generated inputs through the plugin, each in a fresh instance: mutations
/// of the fixtures' payloads (bit flips, cuts, splices, repeats, stray bytes) and some
/// random bytes, all from `seed`. An error the plugin returns is fine; a trap, running out
/// of fuel, memory or time, or outputs weir would refuse are findings.
pub fn fuzz(plugin: &Plugin, fixtures: &[Fixture], count: usize, seed: u64) -> Vec<FuzzFinding> {
    let corpus: Vec<Vec<u8>> = fixtures
        .iter()
        .map(|fixture| payload_bytes(&fixture.case.payload))
        .collect();
    let subject = fixtures
        .first()
        .map_or("fuzz", |fixture| fixture.case.subject.as_str());
    let mut mutator = Mutator::new(seed);
    let mut findings = Vec::new();
    let policy = policy_of(plugin);
    for index in 0..count {
        let payload = mutator.input(&corpus);
        let dedup_key = format!("fuzz:{seed}:{index}");
        let (outcome, _) = judged_run(
            plugin,
            &policy,
            TransformInput {
                subject: subject.to_owned(),
                headers: Vec::new(),
                payload: payload.clone(),
                stream_sequence: index as u64 + 1,
                data_time_unix_ns: 0,
                seed: TransformInput::seed_for(&dedup_key),
                dedup_key,
            },
        );
        if let Outcome::Failed { kind, reason } = outcome
            && !matches!(kind, FailureKind::InvalidInput | FailureKind::PluginFailed)
            && !findings.iter().any(|f: &FuzzFinding| f.payload == payload)
        {
            findings.push(FuzzFinding {
                subject: subject.to_owned(),
                payload,
                kind,
                reason,
            });
        }
    }
    findings
}

/// Makes fuzz inputs from a corpus, deterministically from a seed (SplitMix64).
struct Mutator {
    state: u64,
}

impl Mutator {
    fn new(seed: u64) -> Mutator {
        Mutator { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }

    fn input(&mut self, corpus: &[Vec<u8>]) -> Vec<u8> {
        if corpus.is_empty() || self.below(10) == 0 {
            let len = self.below(256);
            return (0..len).map(|_| self.next() as u8).collect();
        }
        let mut bytes = corpus[self.below(corpus.len())].clone();
        for _ in 0..=self.below(4) {
            let at = self.below(bytes.len() + 1);
            match self.below(6) {
                0 if !bytes.is_empty() => {
                    let i = self.below(bytes.len());
                    bytes[i] ^= 1 << self.below(8);
                }
                1 => bytes.truncate(at),
                2 => {
                    let other = &corpus[self.below(corpus.len())];
                    let from = self.below(other.len() + 1);
                    bytes.splice(at..at, other[from..].iter().copied());
                }
                3 if at < bytes.len() => {
                    let end = at + self.below(bytes.len() - at) + 1;
                    let piece = bytes[at..end].to_vec();
                    for _ in 0..self.below(8) + 1 {
                        bytes.splice(at..at, piece.iter().copied());
                    }
                }
                4 => {
                    const STRAY: &[u8] = b"{}[]\",:0-9eE.\\\0\xff";
                    let stray = STRAY[self.below(STRAY.len())];
                    bytes.insert(at, stray);
                }
                _ => {
                    let number = b"18446744073709551615";
                    bytes.splice(at..at, number.iter().copied());
                }
            }
        }
        bytes
    }
}

/// The outcome as an expectation, payloads written the way `expected` writes them (so a
/// JSON payload compares as JSON, whatever its key order), else as JSON if they parse,
/// text if UTF-8, base64 otherwise.
fn expectation_of(outcome: &Outcome, expected: Option<&Expectation>) -> Expectation {
    match outcome {
        Outcome::Outputs(outputs) => Expectation::Outputs(
            outputs
                .iter()
                .enumerate()
                .map(|(index, output)| {
                    let like = match expected {
                        Some(Expectation::Outputs(expected)) => {
                            expected.get(index).map(|e| &e.payload)
                        }
                        _ => None,
                    };
                    ExpectedOutput {
                        subject: output.subject.clone(),
                        headers: output.headers.clone(),
                        payload: payload_like(&output.payload, like),
                    }
                })
                .collect(),
        ),
        // As the dead letter would carry it: escaped and bounded, so that neither a
        // terminal nor a fixture file gets what a plugin put in it.
        Outcome::Failed { kind, reason } => Expectation::Error {
            kind: kind.as_str().to_owned(),
            reason: text::escaped(reason, MAX_REASON_LEN),
        },
    }
}

fn payload_like(bytes: &[u8], like: Option<&Payload>) -> Payload {
    let as_json = || serde_json::from_slice(bytes).ok().map(Payload::Json);
    let as_text = || {
        std::str::from_utf8(bytes)
            .ok()
            .map(|t| Payload::Text(t.to_owned()))
    };
    let as_base64 = || Payload::Base64(base64::engine::general_purpose::STANDARD.encode(bytes));
    match like {
        Some(Payload::Json(_)) => as_json().or_else(as_text).unwrap_or_else(as_base64),
        Some(Payload::Text(_)) => as_text().unwrap_or_else(as_base64),
        Some(Payload::Base64(_)) => as_base64(),
        None => as_json().or_else(as_text).unwrap_or_else(as_base64),
    }
}

fn payload_bytes(payload: &Payload) -> Vec<u8> {
    match payload {
        Payload::Text(text) => text.as_bytes().to_vec(),
        Payload::Json(value) => serde_json::to_vec(value).expect("a JSON value serialises"),
        // Checked when the fixture was loaded.
        Payload::Base64(text) => decode_base64(text).unwrap_or_default(),
    }
}

fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("payload is not base64: {e}"))
}

fn render(expectation: &Expectation) -> String {
    serde_json::to_string_pretty(expectation).expect("an expectation serialises")
}

/// A line diff of two renderings: expected-only lines `-`, actual-only lines `+` (longest
/// common subsequence), with three common lines of context around each change.
fn diff(expected: &str, actual: &str) -> String {
    const CONTEXT: usize = 3;
    let (a, b): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut common = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            common[i][j] = if a[i] == b[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push((' ', a[i]));
            (i, j) = (i + 1, j + 1);
        } else if i < a.len() && (j == b.len() || common[i + 1][j] >= common[i][j + 1]) {
            lines.push(('-', a[i]));
            i += 1;
        } else {
            lines.push(('+', b[j]));
            j += 1;
        }
    }
    let changed: Vec<usize> = (0..lines.len()).filter(|&n| lines[n].0 != ' ').collect();
    let near_change = |n: usize| changed.iter().any(|&c| c.abs_diff(n) <= CONTEXT);
    let mut out = String::new();
    let mut elided = false;
    for (n, (mark, line)) in lines.iter().enumerate() {
        if near_change(n) {
            out += &format!("{mark} {line}\n");
            elided = false;
        } else if !elided {
            out += "  …\n";
            elided = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_changed_lines() {
        let diff = diff("a\nb\nc", "a\nx\nc");
        assert_eq!(diff, "  a\n- b\n+ x\n  c\n");
        let long: String = (0..20).map(|n| format!("{n}\n")).collect();
        let diff = super::diff(&long, &long.replace("10\n", "ten\n"));
        assert_eq!(
            diff,
            "  …\n  7\n  8\n  9\n- 10\n+ ten\n  11\n  12\n  13\n  …\n"
        );
    }

    #[test]
    fn payloads_keep_the_fixture_s_form() {
        let json = Payload::Json(serde_json::json!({"b": 1, "a": 2}));
        assert_eq!(payload_like(br#"{"a":2,"b":1}"#, Some(&json)), json);
        assert_eq!(
            payload_like(b"\xff\x00", None),
            Payload::Base64("/wA=".into())
        );
        assert_eq!(payload_like(b"hi", None), Payload::Text("hi".into()));
    }
}
