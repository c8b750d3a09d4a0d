//! Where a pipeline is, for readiness and the status page. The wiring sets what happens
//! before the message path runs (starting, connected or not); the core sets the rest
//! (replaying the outbox, running, retrying a step, stopped). Nothing here decides anything:
//! readiness is read from it.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// What a pipeline is doing, in the order it does it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading the plugin, opening the store, connecting, checking the streams.
    Starting,
    /// Re-publishing what was committed and not known published before the last stop.
    Replaying,
    /// A partitioned pipeline reading its partition's progress and fencing off the
    /// partition's previous owner.
    TakingOver,
    /// A partitioned pipeline waiting for its partition's lease, which another run holds.
    Standby,
    /// Consuming.
    Running,
    /// Stopped: shut down, or failed.
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Replaying => "replaying",
            Phase::TakingOver => "taking-over",
            Phase::Standby => "standby",
            Phase::Running => "running",
            Phase::Stopped => "stopped",
        }
    }
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// What the pipeline is doing while it starts, or why it stopped.
    detail: String,
    connected: bool,
    /// Steps retrying a transient fault: how many retry loops of each are failing, and the
    /// last error.
    retrying: BTreeMap<&'static str, (usize, String)>,
}

/// One pipeline's status, shared between the core, the wiring and the admin server.
#[derive(Debug)]
pub struct PipelineStatus {
    state: Mutex<State>,
}

impl Default for PipelineStatus {
    fn default() -> PipelineStatus {
        PipelineStatus {
            state: Mutex::new(State {
                phase: Phase::Starting,
                detail: "loading the plugin".into(),
                connected: false,
                retrying: BTreeMap::new(),
            }),
        }
    }
}

/// A copy of a pipeline's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    pub phase: Phase,
    pub detail: String,
    pub connected: bool,
    /// `(step, last error)` for every step retrying now.
    pub retrying: Vec<(&'static str, String)>,
}

impl StatusSnapshot {
    /// Why the pipeline is not ready to process inputs, or `None` when it is: running,
    /// connected, and retrying nothing.
    pub fn not_ready_because(&self) -> Option<String> {
        match self.phase {
            Phase::Starting => return Some(format!("starting: {}", self.detail)),
            Phase::Replaying => return Some("replaying the outbox".into()),
            Phase::TakingOver => {
                return Some("taking the partition over from its last owner".into());
            }
            Phase::Stopped => return Some(format!("stopped: {}", self.detail)),
            // Standing by is what it is there to do: a rollout must not wait on it.
            Phase::Standby | Phase::Running => {}
        }
        if !self.connected {
            return Some("server gone: reconnecting".into());
        }
        let (step, error) = self.retrying.first()?;
        Some(format!("{step} retrying: {error}"))
    }
}

impl PipelineStatus {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starting, and doing `what` ("opening the store", "connecting", …).
    pub fn starting(&self, what: &str) {
        let mut state = self.state();
        state.phase = Phase::Starting;
        state.detail = what.to_owned();
    }

    pub fn enter(&self, phase: Phase) {
        let mut state = self.state();
        state.phase = phase;
        state.detail.clear();
    }

    /// Standing by while `holder` holds the partition's lease (`None`: it is free, and
    /// about to be taken).
    pub fn standing_by(&self, holder: Option<&str>) {
        let mut state = self.state();
        state.phase = Phase::Standby;
        state.detail = match holder {
            Some(holder) => format!("the partition's lease is held by {holder}"),
            None => "the partition's lease is free".into(),
        };
    }

    /// Stopped, for `why` ("shut down", or the error).
    pub fn stopped(&self, why: &str) {
        let mut state = self.state();
        state.phase = Phase::Stopped;
        state.detail = why.to_owned();
    }

    pub fn set_connected(&self, connected: bool) {
        self.state().connected = connected;
    }

    /// A retry loop of `step` failed (again) with `error`; `first` on its first failure.
    pub fn retry_failed(&self, step: &'static str, error: String, first: bool) {
        let mut state = self.state();
        let entry = state.retrying.entry(step).or_insert((0, String::new()));
        if first {
            entry.0 += 1;
        }
        entry.1 = error;
    }

    /// A retry loop of `step` that had failed is over (it succeeded, or gave up on shutdown).
    pub fn retry_over(&self, step: &'static str) {
        let mut state = self.state();
        if let Some(entry) = state.retrying.get_mut(step) {
            entry.0 = entry.0.saturating_sub(1);
            if entry.0 == 0 {
                state.retrying.remove(step);
            }
        }
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let state = self.state();
        StatusSnapshot {
            phase: state.phase,
            detail: state.detail.clone(),
            connected: state.connected,
            retrying: state
                .retrying
                .iter()
                .map(|(step, (_, error))| (*step, error.clone()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_running_connected_and_retrying_nothing() {
        let status = PipelineStatus::default();
        let because = || status.snapshot().not_ready_because();
        assert_eq!(because().unwrap(), "starting: loading the plugin");
        status.starting("connecting");
        assert_eq!(because().unwrap(), "starting: connecting");
        status.enter(Phase::Replaying);
        assert_eq!(because().unwrap(), "replaying the outbox");
        status.enter(Phase::Running);
        assert_eq!(because().unwrap(), "server gone: reconnecting");
        status.set_connected(true);
        assert_eq!(because(), None);

        // Two commit loops fail; the step is retrying until both are over.
        status.retry_failed("commit", "disk full".into(), true);
        status.retry_failed("commit", "disk still full".into(), true);
        assert_eq!(because().unwrap(), "commit retrying: disk still full");
        status.retry_over("commit");
        assert!(because().is_some());
        status.retry_over("commit");
        assert_eq!(because(), None);

        status.stopped("shut down");
        assert_eq!(because().unwrap(), "stopped: shut down");
    }
}
