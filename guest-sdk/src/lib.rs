//! Write weir transform plugins in Rust.
//!
//! A plugin implements [`Transform`] for a type and exports it with [`export!`]. The crate
//! is `no_std` + `alloc` at its core so that plugins build on any wasm32 target; the
//! `runtime` feature supplies the global allocator and panic handler a `no_std` plugin needs,
//! and the `std` feature is for plugins built with the standard library.
//!
//! ```
//! use weir_guest_sdk::{Message, Output, Transform, TransformError};
//!
//! struct Upper;
//!
//! impl Transform for Upper {
//!     fn transform(msg: Message) -> Result<Vec<Output>, TransformError> {
//!         let text = core::str::from_utf8(&msg.payload)
//!             .map_err(|_| TransformError::invalid_input("payload is not UTF-8"))?;
//!         Ok(vec![Output::new("upper", text.to_uppercase())])
//!     }
//! }
//!
//! // In the plugin crate (a `cdylib` built for wasm32): `weir_guest_sdk::export!(Upper);`
//! # let msg = Message {
//! #     subject: "in".into(), headers: vec![], payload: b"hi".to_vec(),
//! #     stream_sequence: 1, data_time_unix_ns: 0, dedup_key: "k".into(), seed: 0,
//! # };
//! # assert_eq!(Upper::transform(msg).unwrap()[0].payload, b"HI");
//! ```
//!
//! The contract these types come from is `wit/transform.wit` (`weir:transform@0.1.0`).
#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

// The generated code names this crate by its external name, also from inside it.
extern crate self as weir_guest_sdk;

use alloc::string::String;
use alloc::vec::Vec;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The bindings generated from the WIT contract; only the export macro reaches in here.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "weir_guest_sdk::bindings",
        runtime_path: "weir_guest_sdk::__wit_bindgen::rt",
        std_feature,
    });
}

/// One input message: subject, headers, payload and the message's identity and data time.
pub use bindings::exports::weir::transform::transformer::Message;
/// One message for the host to publish, under the pipeline's output prefix.
pub use bindings::exports::weir::transform::transformer::Output;
/// Why a transform produced no outputs: the input goes to the dead-letter subject.
pub use bindings::exports::weir::transform::transformer::TransformError;

/// The one function a plugin implements.
///
/// The host calls it once per input message, each time in a fresh instance: statics do not
/// survive between calls. It must be deterministic (the same message gives the same result),
/// which the sandbox enforces by giving the plugin no clock, randomness or I/O; use
/// [`Message::data_time_unix_ns`] and [`Message::seed`] instead.
pub use bindings::exports::weir::transform::transformer::Guest as Transform;

/// Exports a [`Transform`] implementation as the plugin's `transform` function.
///
/// Call it once, at the top level of the plugin crate: `weir_guest_sdk::export!(MyPlugin);`.
#[macro_export]
macro_rules! export {
    ($plugin:ident) => {
        $crate::bindings::__export_plugin!($plugin with_types_in $crate::bindings);
    };
}

impl Message {
    /// The value of the first header named `name` (compared case-sensitively, as NATS does).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header_name, _)| header_name == name)
            .map(|(_, value)| value.as_str())
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

    /// Adds a header. Names starting `Nats-` belong to NATS: the host ignores `Nats-Msg-Id`
    /// (it sets a deterministic one) and refuses an output with any other.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Output {
        self.headers.push((name.into(), value.into()));
        self
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

// The allocator, panic handler and `cabi_realloc` of `no_std` plugins (feature `runtime`).
#[cfg(feature = "runtime")]
use weir_guest_runtime as _;
