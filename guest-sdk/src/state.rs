//! What a stateful call reaches besides its message: its key's state and the emitter. In a
//! plugin both are the host's; natively (`cargo test`) they are one key's state in memory and
//! a list of the outputs emitted, so that a transform's logic is tested without wasm.

#[cfg(not(target_arch = "wasm32"))]
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

#[cfg(not(target_arch = "wasm32"))]
use crate::{Message, StatefulTransform};
use crate::{Output, TransformError};

/// The most names [`State::names`] returns at once, whatever the limit asked.
pub const MAX_NAMES: u32 = 1000;

/// The entries of the input's state key: named byte values, as the inputs before this one
/// left them.
///
/// The pipeline bounds an entry (name and value) and a key's entries together
/// (`[pipeline.state] max_entry_bytes`, `max_key_bytes`): a write past either ends the call
/// and dead-letters the input as `state-limit`. The in-memory state of native tests does
/// not check them. In a pipeline without `[pipeline.state]` there is no state: `get` finds
/// nothing, and `set` or `delete` ends the call as `plugin-failed`.
pub struct State {
    #[cfg(not(target_arch = "wasm32"))]
    entries: BTreeMap<String, Vec<u8>>,
}

impl State {
    /// The value of entry `name`, if it is set.
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::weir::transform::state::get(name);
        #[cfg(not(target_arch = "wasm32"))]
        return self.entries.get(name).cloned();
    }

    /// Sets entry `name` to `value`.
    pub fn set(&mut self, name: &str, value: impl AsRef<[u8]>) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::weir::transform::state::set(name, value.as_ref());
        #[cfg(not(target_arch = "wasm32"))]
        self.entries.insert(name.into(), value.as_ref().to_vec());
    }

    /// Removes entry `name`, if it is set.
    pub fn delete(&mut self, name: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::weir::transform::state::delete(name);
        #[cfg(not(target_arch = "wasm32"))]
        self.entries.remove(name);
    }

    /// The names of the entries that start with `prefix` and sort after `start_after` (all of
    /// them if it is empty), in byte order, at most `limit` of them and at most
    /// [`MAX_NAMES`]. Page through more by passing the last name as `start_after`.
    pub fn names(&self, prefix: &str, start_after: &str, limit: u32) -> Vec<String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::weir::transform::state::names(prefix, start_after, limit);
        #[cfg(not(target_arch = "wasm32"))]
        return self
            .entries
            .keys()
            .filter(|name| name.starts_with(prefix) && name.as_str() > start_after)
            .take(limit.min(MAX_NAMES) as usize)
            .cloned()
            .collect();
    }

    /// Entry `name` parsed as JSON into `T`, if it is set. A value that does not parse is a
    /// [plugin failure](TransformError::PluginFailed): the plugin wrote it.
    #[cfg(feature = "json")]
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, TransformError> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        serde_json::from_slice(&value).map(Some).map_err(|error| {
            TransformError::plugin_failed(alloc::format!(
                "state entry {name:?} is not the expected JSON: {error}"
            ))
        })
    }

    /// Sets entry `name` to `value` as compact JSON. A value serde cannot serialise is a
    /// [plugin failure](TransformError::PluginFailed).
    #[cfg(feature = "json")]
    pub fn set_json<T: serde::Serialize + ?Sized>(
        &mut self,
        name: &str,
        value: &T,
    ) -> Result<(), TransformError> {
        let bytes = serde_json::to_vec(value).map_err(|error| {
            TransformError::plugin_failed(alloc::format!(
                "cannot write state entry {name:?} as JSON: {error}"
            ))
        })?;
        self.set(name, bytes);
        Ok(())
    }

    /// Every entry, by name: what a native test checks after its inputs.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn entries(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.entries
    }
}

/// What a [`StatefulTransform`](crate::StatefulTransform) call reaches: its key's
/// [`state`](Context::state), and [`emit`](Context::emit) for its outputs.
pub struct Context {
    /// The entries of the input's state key.
    pub state: State,
    #[cfg(not(target_arch = "wasm32"))]
    emitted: Vec<Output>,
}

impl Context {
    /// Emits one output, in order. The pipeline counts outputs against `limits.max_outputs`
    /// and `limits.max_output_bytes` as they arrive: one past them ends the call, and the
    /// input is dead-lettered as `output-rejected`.
    pub fn emit(&mut self, output: Output) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::weir::transform::emitter::emit(&output);
        #[cfg(not(target_arch = "wasm32"))]
        self.emitted.push(output);
    }

    /// The host's state and emitter, for the export macros.
    #[cfg(target_arch = "wasm32")]
    #[doc(hidden)]
    pub fn of_host() -> Context {
        Context { state: State {} }
    }

    /// An empty in-memory key for native tests. Give it entries with `ctx.state.set`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn for_test() -> Context {
        Context {
            state: State {
                entries: BTreeMap::new(),
            },
            emitted: Vec::new(),
        }
    }

    /// Runs `msg` through `T` as the host would: its outputs if it succeeds, with its state
    /// changes kept for the next input; if it fails, the error, with its changes undone and
    /// its outputs dropped.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run<T: StatefulTransform>(
        &mut self,
        msg: Message,
    ) -> Result<Vec<Output>, TransformError> {
        let before = self.state.entries.clone();
        self.emitted.clear();
        match T::transform(msg, self) {
            Ok(()) => Ok(core::mem::take(&mut self.emitted)),
            Err(error) => {
                self.state.entries = before;
                self.emitted.clear();
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Writes `payload` as entry `note`, then fails if the payload says so.
    struct WriteThenDecide;

    impl StatefulTransform for WriteThenDecide {
        fn transform(msg: Message, ctx: &mut Context) -> Result<(), TransformError> {
            ctx.state.set("note", &msg.payload);
            ctx.emit(Output::new("noted", msg.payload.clone()));
            if msg.payload == b"fail" {
                return Err(TransformError::invalid_input("asked to fail"));
            }
            Ok(())
        }
    }

    #[test]
    fn a_failed_input_changes_nothing_as_in_the_host() {
        let mut ctx = Context::for_test();
        let outputs = ctx
            .run::<WriteThenDecide>(Message::for_test("s", "one"))
            .unwrap();
        assert_eq!(outputs.len(), 1);
        assert!(
            ctx.run::<WriteThenDecide>(Message::for_test("s", "fail"))
                .is_err()
        );
        assert_eq!(ctx.state.get("note"), Some(b"one".to_vec()));
        // The failed call's output is gone too.
        let outputs = ctx
            .run::<WriteThenDecide>(Message::for_test("s", "two"))
            .unwrap();
        assert_eq!(outputs[0].payload, b"two");
        assert_eq!(outputs.len(), 1);
    }

    #[test]
    fn names_page_by_prefix_in_byte_order() {
        let mut state = Context::for_test().state;
        for name in ["w.3", "w.1", "x.1", "w.2", "v"] {
            state.set(name, b"");
        }
        assert_eq!(state.names("w.", "", 2), vec!["w.1", "w.2"]);
        assert_eq!(state.names("w.", "w.2", 2), vec!["w.3"]);
        assert_eq!(state.names("", "w.3", 10), vec!["x.1"]);
        state.delete("w.1");
        assert_eq!(state.names("w.", "", u32::MAX), vec!["w.2", "w.3"]);
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_entries_round_trip_and_a_bad_one_is_the_plugin_s_failure() {
        let mut state = Context::for_test().state;
        assert_eq!(state.get_json::<u64>("n").unwrap(), None);
        state.set_json("n", &41u64).unwrap();
        assert_eq!(state.get_json::<u64>("n").unwrap(), Some(41));
        state.set("n", b"forty-one");
        assert!(matches!(
            state.get_json::<u64>("n"),
            Err(TransformError::PluginFailed(reason)) if reason.contains("\"n\"")
        ));
    }
}
