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
//! `expect` has either `"outputs": [...]` or `"error": {"kind": "invalid-input", "reason":
//! "…"}` (kinds as in dead letters: `invalid-input`, `plugin-failed`, `trap`,
//! `fuel-exhausted`, `state-limit`, …).
//!
//! A plugin of contract 0.2.0 may keep state per key. A fixture that gives the input's
//! `"state_key"` (by default `"test"`), the key's `"state"` before the input (entries by
//! name, each value a payload) or, in `expect`, the `"state"` after it runs with state, as
//! in a pipeline with `[pipeline.state]`; any other runs as in a pipeline without (the
//! message's state key is empty and a write fails the call). An expectation without
//! `"state"` says the state is unchanged, so a change cannot pass unnoticed. A case can also
//! be a sequence of inputs on one key, each seeing the state the one before left (and a
//! dead-lettered input leaving it as it was), as in a pipeline:
//!
//! ```json
//! {
//!   "state_key": "acct-7",
//!   "state": {"balance": {"text": "10"}},
//!   "sequence": [
//!     {"subject": "tx.acct-7", "payload": {"text": "+5"},
//!      "expect": {"outputs": [...], "state": {"balance": {"json": 15}}}},
//!     {"subject": "tx.acct-7", "payload": {"text": "-20"},
//!      "expect": {"error": {"kind": "invalid-input", "reason": "…"}}}
//!   ]
//! }
//! ```
//!
//! State limits are the defaults of `[pipeline.state]`. Each input runs three times: twice
//! in fresh instances, as the pipeline runs it, and once more as the second call in an
//! instance that has just run it. A result (outputs, error or state) that differs fails the
//! case as non-deterministic: the plugin depends on something other than its input and
//! state, or keeps state of its own between calls (which weir would silently drop, since
//! each message gets a fresh instance). The third run is skipped when the plugin draws
//! random bytes: a runtime that initialises itself lazily (CPython) draws them at another
//! point of the seeded stream in a used instance, so a difference there would prove
//! nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use weir_core::dead_letter::MAX_REASON_LEN;
use weir_core::plugin::{Call, FailureKind, Outcome, TransformInput};
use weir_core::policy::OutputPolicy;
use weir_core::ports::PluginRuntime;
use weir_core::state::{KeyState, StateChanges, StateLimits, StateView};
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

/// One fixture file: a case, which is one input or a sequence of inputs on one state key.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// The state key of the case's inputs, which a 0.2.0 plugin reads in its message; given
    /// or not, see [`Case::is_stateful`].
    pub state_key: Option<String>,
    /// The key's state before the first input, by entry name.
    pub state: BTreeMap<String, Payload>,
    /// The inputs, in stream order, each with what it must produce.
    pub steps: Vec<Step>,
    /// Whether the file lists its inputs under `sequence` (else it is one input, inline).
    pub is_sequence: bool,
}

/// The state key of a fixture that names none.
pub const DEFAULT_STATE_KEY: &str = "test";

/// One input of a case and what the plugin must make of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
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

/// A fixture file with one input, written inline.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SingleFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state_key: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    state: BTreeMap<String, Payload>,
    subject: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
    payload: Payload,
    #[serde(default, skip_serializing_if = "is_zero")]
    data_time_unix_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect: Option<Expectation>,
}

/// A fixture file with a sequence of inputs on one key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SequenceFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state_key: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    state: BTreeMap<String, Payload>,
    sequence: Vec<Step>,
}

impl Case {
    /// Reads a fixture file's text: one input inline, or a `sequence` of them.
    pub fn parse(text: &str) -> Result<Case, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let case = if value.get("sequence").is_some() {
            let file: SequenceFile = serde_json::from_value(value).map_err(|e| e.to_string())?;
            if file.sequence.is_empty() {
                return Err("\"sequence\" is empty: list the inputs of the case in order".into());
            }
            Case {
                state_key: file.state_key,
                state: file.state,
                steps: file.sequence,
                is_sequence: true,
            }
        } else {
            let file: SingleFile = serde_json::from_value(value).map_err(|e| e.to_string())?;
            Case {
                state_key: file.state_key,
                state: file.state,
                steps: vec![Step {
                    subject: file.subject,
                    headers: file.headers,
                    payload: file.payload,
                    data_time_unix_ns: file.data_time_unix_ns,
                    expect: file.expect,
                }],
                is_sequence: false,
            }
        };
        let payloads = case
            .state
            .values()
            .chain(case.steps.iter().flat_map(|step| {
                std::iter::once(&step.payload).chain(step.expect.iter().flat_map(|e| {
                    e.state
                        .iter()
                        .flat_map(BTreeMap::values)
                        .chain(e.outputs.iter().flatten().map(|output| &output.payload))
                }))
            }));
        for payload in payloads {
            if let Payload::Base64(text) = payload {
                decode_base64(text)?;
            }
        }
        if case.state_key.as_deref() == Some("") {
            return Err(
                "\"state_key\" is empty: a pipeline dead-letters an input without one".into(),
            );
        }
        let limits = StateLimits::default();
        let entries = case
            .state
            .iter()
            .map(|(name, value)| name.len() + payload_bytes(value).len());
        if let Some(entry) = entries
            .clone()
            .find(|&bytes| bytes > limits.max_entry_bytes)
        {
            return Err(format!(
                "an entry of \"state\" is {entry} bytes, more than a pipeline allows by default ({} per entry)",
                limits.max_entry_bytes
            ));
        }
        let total: usize = entries.sum();
        if total > limits.max_key_bytes {
            return Err(format!(
                "\"state\" is {total} bytes, more than a pipeline allows a key by default ({})",
                limits.max_key_bytes
            ));
        }
        for step in &case.steps {
            if let Some(expect) = &step.expect
                && expect.outputs.is_some() == expect.error.is_some()
            {
                return Err(
                    "each \"expect\" names either \"outputs\" or \"error\", not both or neither"
                        .into(),
                );
            }
        }
        Ok(case)
    }

    /// Whether the case runs with state, as in a pipeline with `[pipeline.state]`: when it
    /// names a `state_key`, a `state` or an `expect.state`. Otherwise it runs as in a
    /// pipeline without, where a 0.2.0 plugin's message has no state key and a write fails
    /// its call.
    pub fn is_stateful(&self) -> bool {
        self.state_key.is_some()
            || !self.state.is_empty()
            || self
                .steps
                .iter()
                .any(|step| step.expect.as_ref().is_some_and(|e| e.state.is_some()))
    }

    /// The state key its inputs run with, if it is stateful.
    pub fn state_key(&self) -> &str {
        self.state_key.as_deref().unwrap_or(DEFAULT_STATE_KEY)
    }

    /// The fixture file's text, in the form it was read in.
    pub fn to_text(&self) -> String {
        let state_key = self.state_key.clone();
        let text = match (self.is_sequence, self.steps.as_slice()) {
            (false, [step]) => serde_json::to_string_pretty(&SingleFile {
                state_key,
                state: self.state.clone(),
                subject: step.subject.clone(),
                headers: step.headers.clone(),
                payload: step.payload.clone(),
                data_time_unix_ns: step.data_time_unix_ns,
                expect: step.expect.clone(),
            }),
            _ => serde_json::to_string_pretty(&SequenceFile {
                state_key,
                state: self.state.clone(),
                sequence: self.steps.clone(),
            }),
        };
        text.expect("a case serialises") + "\n"
    }
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

/// What an input must produce: `outputs` or an `error`, and the key's `state` after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<ExpectedOutput>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ExpectedError>,
    /// The key's entries after the input. Left out, the state must be as it was before the
    /// input: a fixture cannot let a change go unnoticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BTreeMap<String, Payload>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedError {
    pub kind: String,
    pub reason: String,
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
        let case = Case::parse(&text).map_err(|message| FixtureError::Invalid {
            path: path.clone(),
            message,
        })?;
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
    /// What the case's inputs used together (fuel and time summed, the peak memory of any).
    pub usage: Usage,
    /// Limits an input of the case came within 20 % of.
    pub near_limits: Vec<&'static str>,
    /// Which input of a sequence the verdict is about: its number from 1, and the count.
    pub at_step: Option<(usize, usize)>,
}

/// What one input gave: its outcome as the pipeline judges it, and the key's state after.
#[derive(PartialEq)]
struct StepResult {
    outcome: Outcome,
    after: KeyState,
}

/// Runs a case's inputs in order, each one three times (see the module's text), and judges
/// them; with `update`, writes the actual results into the fixture file instead of
/// comparing. A 0.2.0 plugin's inputs share the case's state key, each seeing the state the
/// one before left.
pub fn run_case(plugin: &Plugin, fixture: &Fixture, update: bool) -> Result<CaseReport, String> {
    let case = &fixture.case;
    let stateful = case.is_stateful();
    if stateful && plugin.contract() != crate::V2_EXPORT {
        return Err(format!(
            "fixture {}: gives state (a state_key, state or expect.state), and the plugin speaks {}, which has no state (0.2.0 has)",
            fixture.path.display(),
            plugin.contract()
        ));
    }
    let policy = policy_of(plugin);
    let lineage = plugin.lineage();
    let mut state = KeyState::from_entries(
        case.state
            .iter()
            .map(|(name, payload)| (name.clone(), payload_bytes(payload))),
    );
    let mut usage = Usage::default();
    let mut near_limits = Vec::new();
    let mut steps = Vec::with_capacity(case.steps.len());
    let mut verdict = None;
    for (index, step) in case.steps.iter().enumerate() {
        let dedup_key = match index {
            0 => format!("fixture:{}", fixture.name),
            _ => format!("fixture:{}#{}", fixture.name, index + 1),
        };
        let call = || Call {
            input: TransformInput {
                subject: step.subject.clone(),
                headers: step.headers.clone(),
                payload: payload_bytes(&step.payload),
                stream_sequence: index as u64 + 1,
                data_time_unix_ns: step.data_time_unix_ns,
                seed: TransformInput::seed_for(&dedup_key),
                dedup_key: dedup_key.clone(),
            },
            state: stateful.then(|| {
                StateView::new(
                    case.state_key().to_owned(),
                    Arc::new(state.clone()),
                    StateLimits::default(),
                )
            }),
        };
        let judged = |(outcome, changes): (Outcome, StateChanges)| {
            let outcome = policy.judge(&call().input, &lineage, outcome);
            let mut after = state.clone();
            if let Outcome::Outputs(_) = outcome {
                after.apply(&changes);
            }
            StepResult { outcome, after }
        };
        let (outcome, step_usage, changes) = plugin.run_measured(call());
        let first = judged((outcome, changes));
        let (outcome, _, changes) = plugin.run_measured(call());
        let second = judged((outcome, changes));
        let other = if first != second {
            Some(("a second fresh instance", second))
        } else {
            match plugin.run_in_used_instance(call()).map(judged) {
                Some(used) if used != first => Some((
                    "a second call in the same instance (the plugin keeps state between calls)",
                    used,
                )),
                _ => None,
            }
        };
        usage.fuel += step_usage.fuel;
        usage.elapsed += step_usage.elapsed;
        usage.peak_memory_bytes = usage.peak_memory_bytes.max(step_usage.peak_memory_bytes);
        let limits = plugin.limits();
        if step_usage.fuel * 5 > limits.fuel * 4 && !near_limits.contains(&"limits.fuel") {
            near_limits.push("limits.fuel");
        }
        if step_usage.peak_memory_bytes * 5 > limits.memory_bytes * 4
            && !near_limits.contains(&"limits.memory_bytes")
        {
            near_limits.push("limits.memory_bytes");
        }
        let expected = step.expect.as_ref();
        let actual = expectation_of(&first, &state, expected);
        let at = (index + 1, case.steps.len());
        if let Some((other_run, other)) = other {
            // Both with their state (of a plugin that has one), so that a difference in it
            // shows.
            let with_state = |result: &StepResult| Expectation {
                state: stateful
                    .then(|| entries_like(&result.after, expected.and_then(|e| e.state.as_ref()))),
                ..expectation_of(result, &state, expected)
            };
            verdict = Some((
                Verdict::NotDeterministic {
                    diff: diff(&render(&with_state(&first)), &render(&with_state(&other))),
                    other_run,
                },
                at,
            ));
            break;
        }
        if let Some(expected) = expected
            && !update
            && *expected != actual
        {
            verdict = Some((Verdict::Fail(diff(&render(expected), &render(&actual))), at));
            break;
        }
        steps.push(Step {
            expect: Some(actual),
            ..step.clone()
        });
        state = first.after;
    }
    let needs_update = update || case.steps.iter().any(|step| step.expect.is_none());
    let (verdict, at) = match verdict {
        Some((verdict, at)) => (verdict, Some(at)),
        None if needs_update => {
            let updated = Case {
                steps,
                ..case.clone()
            };
            std::fs::write(&fixture.path, updated.to_text())
                .map_err(|e| format!("cannot write {}: {e}", fixture.path.display()))?;
            (Verdict::Updated, None)
        }
        None => (Verdict::Pass, None),
    };
    Ok(CaseReport {
        verdict,
        usage,
        near_limits,
        at_step: at.filter(|_| case.is_sequence),
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
            let at = match report.at_step {
                Some((step, count)) => format!("input {step} of {count}: "),
                None => String::new(),
            };
            text += &format!("    {at}{heading}\n");
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
        let report = run_case(plugin, &fixture, update)?;
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
    /// The state key and state it ran with (those of the first fixture), if it ran with
    /// state.
    pub state_key: Option<String>,
    pub state: BTreeMap<String, Payload>,
    pub kind: FailureKind,
    pub reason: String,
}

impl FuzzFinding {
    /// The finding as a fixture file's text, ready to save next to the others.
    pub fn as_fixture(&self) -> String {
        let case = Case {
            state_key: self.state_key.clone(),
            state: self.state.clone(),
            steps: vec![Step {
                subject: self.subject.clone(),
                headers: Vec::new(),
                payload: payload_like(&self.payload, None),
                data_time_unix_ns: 0,
                expect: None,
            }],
            is_sequence: false,
        };
        case.to_text()
    }
}

/// Runs `count` generated inputs through the plugin, each in a fresh instance: mutations
/// of the fixtures' payloads (bit flips, cuts, splices, repeats, stray bytes) and some
/// random bytes, all from `seed`. If the first fixture is stateful, each runs with its state
/// key and state. An error the plugin returns is fine; a trap, running out of fuel, memory
/// or time, or outputs weir would refuse are findings.
pub fn fuzz(plugin: &Plugin, fixtures: &[Fixture], count: usize, seed: u64) -> Vec<FuzzFinding> {
    let corpus: Vec<Vec<u8>> = fixtures
        .iter()
        .flat_map(|fixture| &fixture.case.steps)
        .map(|step| payload_bytes(&step.payload))
        .collect();
    let first = fixtures.first().map(|fixture| &fixture.case);
    let subject = first
        .and_then(|case| case.steps.first())
        .map_or("fuzz", |step| step.subject.as_str());
    let stateful = first.is_some_and(|case| case.is_stateful());
    let (state_key, state) = match first.filter(|_| stateful) {
        Some(case) => (Some(case.state_key().to_owned()), case.state.clone()),
        None => (None, BTreeMap::new()),
    };
    let key_state = Arc::new(KeyState::from_entries(
        state
            .iter()
            .map(|(name, payload)| (name.clone(), payload_bytes(payload))),
    ));
    let mut mutator = Mutator::new(seed);
    let mut findings = Vec::new();
    let policy = policy_of(plugin);
    let lineage = plugin.lineage();
    for index in 0..count {
        let payload = mutator.input(&corpus);
        let dedup_key = format!("fuzz:{seed}:{index}");
        let input = TransformInput {
            subject: subject.to_owned(),
            headers: Vec::new(),
            payload: payload.clone(),
            stream_sequence: index as u64 + 1,
            data_time_unix_ns: 0,
            seed: TransformInput::seed_for(&dedup_key),
            dedup_key,
        };
        let call = Call {
            input: input.clone(),
            state: state_key.as_ref().map(|state_key| {
                StateView::new(state_key.clone(), key_state.clone(), StateLimits::default())
            }),
        };
        let (outcome, _, _) = plugin.run_measured(call);
        if let Outcome::Failed { kind, reason } = policy.judge(&input, &lineage, outcome)
            && !matches!(kind, FailureKind::InvalidInput | FailureKind::PluginFailed)
            && !findings.iter().any(|f: &FuzzFinding| f.payload == payload)
        {
            findings.push(FuzzFinding {
                subject: subject.to_owned(),
                payload,
                state_key: state_key.clone(),
                state: state.clone(),
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

/// A step's result as an expectation, payloads written the way `expected` writes them (so a
/// JSON payload compares as JSON, whatever its key order), else as JSON if they parse,
/// text if UTF-8, base64 otherwise. The state is there if it changed from `before` or
/// `expected` names it.
fn expectation_of(
    result: &StepResult,
    before: &KeyState,
    expected: Option<&Expectation>,
) -> Expectation {
    let expected_state = expected.and_then(|e| e.state.as_ref());
    let state = (result.after != *before || expected_state.is_some())
        .then(|| entries_like(&result.after, expected_state));
    match &result.outcome {
        Outcome::Outputs(outputs) => Expectation {
            outputs: Some(
                outputs
                    .iter()
                    .enumerate()
                    .map(|(index, output)| {
                        let like = expected
                            .and_then(|e| e.outputs.as_ref())
                            .and_then(|outputs| outputs.get(index))
                            .map(|e| &e.payload);
                        ExpectedOutput {
                            subject: output.subject.clone(),
                            headers: output.headers.clone(),
                            payload: payload_like(&output.payload, like),
                        }
                    })
                    .collect(),
            ),
            error: None,
            state,
        },
        // As the dead letter would carry it: escaped and bounded, so that neither a
        // terminal nor a fixture file gets what a plugin put in it.
        Outcome::Failed { kind, reason } => Expectation {
            outputs: None,
            error: Some(ExpectedError {
                kind: kind.as_str().to_owned(),
                reason: text::escaped(reason, MAX_REASON_LEN),
            }),
            state,
        },
    }
}

/// A key's entries as a fixture writes them, each in the form `like` gives its entry.
fn entries_like(
    state: &KeyState,
    like: Option<&BTreeMap<String, Payload>>,
) -> BTreeMap<String, Payload> {
    state
        .entries()
        .iter()
        .map(|(name, value)| {
            let form = like.and_then(|like| like.get(name));
            (name.clone(), payload_like(value, form))
        })
        .collect()
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
    fn fixtures_are_written_back_in_the_form_they_were_read() {
        let single = r#"{
  "state_key": "acct-1",
  "state": {
    "balance": {
      "text": "10"
    }
  },
  "subject": "tx.acct-1",
  "payload": {
    "text": "+5"
  }
}
"#;
        let case = Case::parse(single).unwrap();
        assert!(!case.is_sequence);
        assert!(case.is_stateful());
        assert_eq!(case.steps.len(), 1);
        assert_eq!(case.to_text(), single);

        let sequence = r#"{
  "sequence": [
    {
      "subject": "a",
      "payload": {
        "text": "1"
      }
    }
  ]
}
"#;
        let case = Case::parse(sequence).unwrap();
        assert!(case.is_sequence);
        assert!(!case.is_stateful());
        assert_eq!(case.state_key, None);
        assert_eq!(case.to_text(), sequence);
    }

    #[test]
    fn fixtures_that_cannot_be_judged_are_refused_with_the_reason() {
        let refused = |text: &str| Case::parse(text).unwrap_err();
        assert!(refused(r#"{"sequence": []}"#).contains("\"sequence\" is empty"));
        let both = r#"{"subject": "a", "payload": {"text": ""},
            "expect": {"outputs": [], "error": {"kind": "trap", "reason": ""}}}"#;
        assert!(refused(both).contains("either \"outputs\" or \"error\""));
        let neither = r#"{"subject": "a", "payload": {"text": ""}, "expect": {}}"#;
        assert!(refused(neither).contains("either \"outputs\" or \"error\""));
        let bad_state = r#"{"subject": "a", "payload": {"text": ""},
            "state": {"x": {"base64": "%%"}}}"#;
        assert!(refused(bad_state).contains("not base64"));
        assert!(
            refused(r#"{"subject": "a", "payload": {"text": ""}, "stat": {}}"#)
                .contains("unknown field `stat`")
        );
        let no_key = r#"{"state_key": "", "subject": "a", "payload": {"text": ""}}"#;
        assert!(refused(no_key).contains("\"state_key\" is empty"));
        let big = format!(
            r#"{{"subject": "a", "payload": {{"text": ""}}, "state": {{"e": {{"text": "{}"}}}}}}"#,
            "x".repeat(64 << 10)
        );
        assert!(refused(&big).contains("per entry"));
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
