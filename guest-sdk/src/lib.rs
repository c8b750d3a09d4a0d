//! Write weir transform plugins in Rust.
//!
//! A plugin implements [`Transform`] (outputs from an input) or [`StatefulTransform`]
//! (outputs from an input and its key's state) for a type, and exports it with [`export!`]
//! or [`export_stateful!`]. The crate is `no_std` + `alloc` at its core so that plugins build
//! on any wasm32 target; the `runtime` feature supplies the global allocator and panic
//! handler a `no_std` plugin needs, the `std` feature is for plugins built with the standard
//! library, and the `json` feature (on by default) adds serde-based JSON helpers.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use weir_guest_sdk::{Message, Output, Transform, TransformError, subject_token};
//!
//! #[derive(Deserialize)]
//! struct Signup {
//!     user: String,
//!     country: String,
//! }
//!
//! #[derive(Serialize)]
//! struct Welcome<'a> {
//!     user: &'a str,
//!     signed_up_at_ns: u64,
//! }
//!
//! struct Welcomer;
//!
//! impl Transform for Welcomer {
//!     fn transform(msg: Message) -> Result<Vec<Output>, TransformError> {
//!         // A payload that is not a signup is invalid input: it goes to the dead letters.
//!         let signup: Signup = msg.json()?;
//!         // Route by a value from the payload: `welcome.<country>` under the output prefix.
//!         let country = subject_token(&signup.country)?;
//!         let welcome = Welcome {
//!             user: &signup.user,
//!             signed_up_at_ns: msg.data_time_unix_ns,
//!         };
//!         Ok(vec![Output::json(format!("welcome.{country}"), &welcome)?])
//!     }
//! }
//!
//! // In the plugin crate (a `cdylib` built for wasm32): `weir_guest_sdk::export!(Welcomer);`
//!
//! // The same code runs natively, so `cargo test` checks the logic without wasm:
//! let msg = Message::for_test("signups.new", r#"{"user":"ada","country":"uk"}"#);
//! let outputs = Welcomer::transform(msg).unwrap();
//! assert_eq!(outputs[0].subject, "welcome.uk");
//! assert_eq!(outputs[0].header("Content-Type"), Some("application/json"));
//! assert_eq!(outputs[0].payload, br#"{"user":"ada","signed_up_at_ns":0}"#);
//!
//! let bad = Message::for_test("signups.new", "user=ada");
//! assert!(matches!(Welcomer::transform(bad), Err(TransformError::InvalidInput(_))));
//! ```
//!
//! A stateful transform reads and writes the entries of its input's state key (the pipeline's
//! `[pipeline.state] key` says which part of the input that is), and emits its outputs. The
//! host commits the changes with the input's outputs, or, if the input is dead-lettered,
//! undoes them: a transform may write before it decides.
//!
//! ```
//! use weir_guest_sdk::{Context, Message, Output, StatefulTransform, TransformError};
//!
//! /// Counts each customer's orders, and says when one reaches ten.
//! struct Loyalty;
//!
//! impl StatefulTransform for Loyalty {
//!     fn transform(msg: Message, ctx: &mut Context) -> Result<(), TransformError> {
//!         let orders: u64 = ctx.state.get_json("orders")?.unwrap_or(0) + 1;
//!         ctx.state.set_json("orders", &orders)?;
//!         if orders == 10 {
//!             ctx.emit(Output::new(format!("loyal.{}", msg.state_key), "10 orders"));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! // In the plugin crate: `weir_guest_sdk::export_stateful!(Loyalty);`
//!
//! // Natively, a `Context` keeps one key's state in memory, and `run` treats each input as
//! // the host does: an error undoes its changes and drops its outputs.
//! let mut ctx = Context::for_test();
//! for _ in 0..9 {
//!     assert!(ctx.run::<Loyalty>(Message::for_test("orders.c-7", "{}")).unwrap().is_empty());
//! }
//! let outputs = ctx.run::<Loyalty>(Message::for_test("orders.c-7", "{}")).unwrap();
//! assert_eq!(outputs[0].subject, "loyal.test");
//! assert_eq!(ctx.state.get("orders").as_deref(), Some(&b"10"[..]));
//! ```
//!
//! Plugins built with this crate speak contract `weir:transform@0.2.0`
//! (`wit/0.2.0/transform.wit`): a stateless [`Transform`]'s outputs are emitted one at a
//! time as well, so weir's output limits apply as they arrive.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

// The generated code names this crate by its external name, also from inside it.
extern crate self as weir_guest_sdk;

use alloc::string::String;
use alloc::vec::Vec;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The bindings generated from the WIT contract; only the export macros reach in here.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/0.2.0",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "weir_guest_sdk::bindings",
        runtime_path: "weir_guest_sdk::__wit_bindgen::rt",
        std_feature,
    });
}

mod state;
pub use state::{Context, MAX_NAMES, State};

/// One input message: subject, headers, payload, the message's identity and data time, and
/// its state key.
pub use bindings::weir::transform::types::Message;
/// One message for the host to publish, under the pipeline's output prefix.
pub use bindings::weir::transform::types::Output;
/// Why a transform did not succeed: the input goes to the dead-letter subject, and its state
/// changes are undone.
pub use bindings::weir::transform::types::TransformError;

/// A transform without state: outputs from one input.
///
/// The host calls it once per input message, each time in a fresh instance: statics do not
/// survive between calls. It must be deterministic (the same message gives the same result),
/// which the sandbox enforces by giving the plugin no clock, randomness or I/O; use
/// [`Message::data_time_unix_ns`] and [`Message::seed`] instead.
pub trait Transform {
    /// The outputs of `msg`, in order, or why it has none.
    fn transform(msg: Message) -> Result<Vec<Output>, TransformError>;
}

/// A transform with state: it reads and writes its input's key's entries through
/// [`Context::state`] and emits outputs through [`Context::emit`].
///
/// Inputs of one key run in stream order, each seeing the state the one before left;
/// inputs of different keys run in parallel. As with [`Transform`], each call gets a fresh
/// instance and must be deterministic: the state is the only memory between calls.
pub trait StatefulTransform {
    /// Handles `msg`: `Ok` commits what it emitted and wrote, `Err` dead-letters the input
    /// and undoes both.
    fn transform(msg: Message, ctx: &mut Context) -> Result<(), TransformError>;
}

/// Exports a [`Transform`] implementation as the plugin's `transform` function.
///
/// Call it once, at the top level of the plugin crate: `weir_guest_sdk::export!(MyPlugin);`.
/// It exports only on wasm32: natively (`cargo test` of the transform's logic) there is no
/// component to export from, and a native library could not carry the export's name.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        $crate::__export_transform!(|msg| {
            $crate::__emit_all(<$plugin as $crate::Transform>::transform(msg)?);
            Ok(())
        });
    };
}

/// Exports a [`StatefulTransform`] implementation as the plugin's `transform` function:
/// `weir_guest_sdk::export_stateful!(MyPlugin);`, once, at the top level of the plugin
/// crate. Like [`export!`], it exports only on wasm32.
#[macro_export]
macro_rules! export_stateful {
    ($plugin:ty) => {
        $crate::__export_transform!(|msg| {
            <$plugin as $crate::StatefulTransform>::transform(msg, &mut $crate::Context::of_host())
        });
    };
}

/// The export both macros make, on wasm32: the contract's `transform`, whose body is `$call`
/// on the message `$msg`.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_transform {
    (|$msg:ident| $call:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct Exported;
            impl $crate::bindings::exports::weir::transform::transformer::Guest for Exported {
                fn transform($msg: $crate::Message) -> Result<(), $crate::TransformError> {
                    $call
                }
            }
    $crate::bindings::__export_plugin!(Exported with_types_in $crate::bindings);
        };
    };
}

/// Emits a stateless transform's outputs to the host, in order.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub fn __emit_all(outputs: Vec<Output>) {
    let mut ctx = Context::of_host();
    for output in outputs {
        ctx.emit(output);
    }
}

impl Message {
    /// A message for unit tests of transform logic, run natively with `cargo test`: the
    /// given subject and payload, no headers, sequence 1, data time 0, dedup key `"test"`,
    /// seed 0 and state key `"test"`. Set the other fields directly when a test needs them.
    pub fn for_test(subject: impl Into<String>, payload: impl Into<Vec<u8>>) -> Message {
        Message {
            subject: subject.into(),
            headers: Vec::new(),
            payload: payload.into(),
            stream_sequence: 1,
            data_time_unix_ns: 0,
            dedup_key: "test".into(),
            seed: 0,
            state_key: "test".into(),
        }
    }

    /// The value of the first header named `name` (compared case-sensitively, as NATS does).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The values of every header named `name`, in the order they were sent.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(header_name, _)| header_name == name)
            .map(|(_, value)| value.as_str())
    }

    /// The subject's tokens: `"orders.eu.new"` gives `"orders"`, `"eu"`, `"new"`.
    pub fn subject_tokens(&self) -> impl Iterator<Item = &str> {
        self.subject.split('.')
    }

    /// A pseudo-random generator seeded with the message's [`seed`](Message::seed): the same
    /// message always draws the same numbers, so a replay gives the same outputs.
    pub fn rng(&self) -> SeededRng {
        SeededRng::new(self.seed)
    }

    /// The payload parsed as JSON into `T`. A payload that does not parse, or does not fit
    /// `T`, is [invalid input](TransformError::InvalidInput), with serde's reason.
    #[cfg(feature = "json")]
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, TransformError> {
        serde_json::from_slice(&self.payload).map_err(|error| {
            TransformError::invalid_input(alloc::format!(
                "payload is not the expected JSON: {error}"
            ))
        })
    }
}

impl Output {
    /// An output with no headers on `subject` (non-empty, no wildcards), relative to the
    /// pipeline's output prefix.
    pub fn new(subject: impl Into<String>, payload: impl Into<Vec<u8>>) -> Output {
        Output {
            subject: subject.into(),
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    /// An output whose payload is `value` as compact JSON, with the header
    /// `Content-Type: application/json`. A value serde cannot serialise (a map with
    /// non-string keys) is a [plugin failure](TransformError::PluginFailed).
    #[cfg(feature = "json")]
    pub fn json<T: serde::Serialize + ?Sized>(
        subject: impl Into<String>,
        value: &T,
    ) -> Result<Output, TransformError> {
        let payload = serde_json::to_vec(value).map_err(|error| {
            TransformError::plugin_failed(alloc::format!(
                "cannot write the output as JSON: {error}"
            ))
        })?;
        Ok(Output::new(subject, payload).with_header("Content-Type", "application/json"))
    }

    /// Adds a header. Names starting `Nats-` belong to NATS and names starting `Weir-` to
    /// weir: the host ignores `Nats-Msg-Id` (it sets a deterministic one) and the lineage
    /// headers `Weir-Plugin-Sha256` and `Weir-Plugin-Contract` (it sets its own), and refuses
    /// an output with any other of them.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Output {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(header_name, _)| header_name == name)
        .map(|(_, value)| value.as_str())
}

/// Checks that `value` can be one token of an output subject, for routing by a value from
/// the payload (`format!("customer.{id}")`): non-empty, and no `.`, `*`, `>` or whitespace,
/// which would change the subject's shape. Anything else is
/// [invalid input](TransformError::InvalidInput) naming the value.
pub fn subject_token(value: &str) -> Result<&str, TransformError> {
    let bad = |c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control();
    if value.is_empty() || value.chars().any(bad) {
        return Err(TransformError::invalid_input(alloc::format!(
            "{value:?} cannot be a subject token: it must be non-empty, without '.', '*', '>' or whitespace"
        )));
    }
    Ok(value)
}

/// A small, fast pseudo-random generator (SplitMix64) for transforms that sample, shuffle or
/// make ids. Seed it from the message ([`Message::rng`]) so that replays agree. Not for
/// secrets.
#[derive(Debug, Clone)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    /// A generator that starts from `seed`.
    pub fn new(seed: u64) -> SeededRng {
        SeededRng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` must be greater than 0), without modulo bias.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "SeededRng::below needs a bound greater than 0");
        // Lemire's method: multiply, and redraw in the rare biased zone.
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(bound);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }
}

impl TransformError {
    /// The input is bad: it goes to the dead-letter subject, marked as invalid input.
    pub fn invalid_input(reason: impl Into<String>) -> TransformError {
        TransformError::InvalidInput(reason.into())
    }

    /// The plugin could not handle the input: it goes to the dead-letter subject, marked as
    /// a plugin failure.
    pub fn plugin_failed(reason: impl Into<String>) -> TransformError {
        TransformError::PluginFailed(reason.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn subject_tokens_refuse_what_would_change_the_subject() {
        assert_eq!(subject_token("c-7").ok(), Some("c-7"));
        for bad in ["", "a.b", "*", ">", "a b", "tab\t"] {
            assert!(
                matches!(subject_token(bad), Err(TransformError::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_seeded_rng_is_reproducible_and_in_range() {
        let mut a = Message::for_test("s", "").rng();
        let mut b = SeededRng::new(0);
        let draws: Vec<u64> = (0..100).map(|_| a.below(6)).collect();
        assert_eq!(draws, (0..100).map(|_| b.below(6)).collect::<Vec<_>>());
        assert!(draws.iter().all(|&d| d < 6));
        assert!((0..6).all(|face| draws.contains(&face)));
    }

    #[test]
    fn headers_keep_every_value_in_order() {
        let mut msg = Message::for_test("s", "");
        msg.headers = vec![
            ("A".into(), "1".into()),
            ("B".into(), "x".into()),
            ("A".into(), "2".into()),
        ];
        assert_eq!(msg.header("A"), Some("1"));
        assert_eq!(msg.header_values("A").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(msg.header("a"), None);
    }
}

// The allocator, panic handler and `cabi_realloc` of `no_std` plugins (feature `runtime`).
#[cfg(feature = "runtime")]
use weir_guest_runtime as _;
