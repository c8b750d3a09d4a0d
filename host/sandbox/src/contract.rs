//! The contracts this host runs, and what the host gives a plugin of each: 0.1.0 returns
//! its outputs; 0.2.0 emits them one at a time and reads and writes its key's state, through
//! the host functions here.

use weir_core::plugin::{FailureKind, PluginOutput};
use weir_core::policy::output_bytes;

use crate::CallState;

pub mod v1 {
    wasmtime::component::bindgen!({
        path: "../../wit/0.1.0",
        world: "plugin",
    });
}

pub mod v2 {
    wasmtime::component::bindgen!({
        path: "../../wit/0.2.0",
        world: "plugin",
        // A write past a limit ends the call: the host function traps.
        imports: { default: trappable },
    });
}

/// The export of contract 0.1.0.
pub const V1_EXPORT: &str = "weir:transform/transformer@0.1.0";
/// The export of contract 0.2.0.
pub const V2_EXPORT: &str = "weir:transform/transformer@0.2.0";
/// What a 0.2.0 plugin may import besides WASI.
const V2_IMPORTS: [&str; 3] = [
    "weir:transform/types@0.2.0",
    "weir:transform/state@0.2.0",
    "weir:transform/emitter@0.2.0",
];

/// Whether a plugin may import `name` from weir (WASI apart).
pub fn provides(name: &str) -> bool {
    V2_IMPORTS.contains(&name)
}

/// Why a host function ended a call: the input is dead-lettered with this kind and reason,
/// whatever the trap that follows says.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: FailureKind,
    pub reason: String,
}

impl CallState {
    fn refuse(&mut self, kind: FailureKind, reason: String) -> wasmtime::Error {
        let error = wasmtime::Error::msg(reason.clone());
        self.refusal.get_or_insert(Refusal { kind, reason });
        error
    }

    fn no_state(&mut self) -> wasmtime::Error {
        self.refuse(
            FailureKind::PluginFailed,
            "it wrote state, and its pipeline keeps none: give the pipeline a [pipeline.state] key"
                .into(),
        )
    }
}

impl v2::weir::transform::types::Host for CallState {}

impl v2::weir::transform::state::Host for CallState {
    fn get(&mut self, name: String) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(self
            .state
            .as_ref()
            .and_then(|state| state.get(&name))
            .map(<[u8]>::to_vec))
    }

    fn set(&mut self, name: String, value: Vec<u8>) -> wasmtime::Result<()> {
        let Some(state) = &mut self.state else {
            return Err(self.no_state());
        };
        state
            .set(&name, value)
            .map_err(|exceeded| self.refuse(FailureKind::StateLimit, exceeded.0))
    }

    fn delete(&mut self, name: String) -> wasmtime::Result<()> {
        let Some(state) = &mut self.state else {
            return Err(self.no_state());
        };
        state.delete(&name);
        Ok(())
    }

    fn names(
        &mut self,
        prefix: String,
        start_after: String,
        limit: u32,
    ) -> wasmtime::Result<Vec<String>> {
        Ok(self.state.as_ref().map_or_else(Vec::new, |state| {
            state.list(&prefix, &start_after, limit as usize)
        }))
    }
}

impl v2::weir::transform::emitter::Host for CallState {
    fn emit(&mut self, output: v2::weir::transform::types::Output) -> wasmtime::Result<()> {
        let output = PluginOutput {
            subject: output.subject,
            headers: output.headers,
            payload: output.payload,
        };
        if self.emitted.len() >= self.max_outputs {
            let reason = format!(
                "emitted more than {} outputs (limits.max_outputs)",
                self.max_outputs
            );
            return Err(self.refuse(FailureKind::OutputRejected, reason));
        }
        self.emitted_bytes += output_bytes(&output);
        if self.emitted_bytes > self.max_output_bytes {
            let reason = format!(
                "emitted {} output bytes, more than {} (limits.max_output_bytes)",
                self.emitted_bytes, self.max_output_bytes
            );
            return Err(self.refuse(FailureKind::OutputRejected, reason));
        }
        self.emitted.push(output);
        Ok(())
    }
}
