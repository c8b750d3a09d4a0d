//! A plugin of contract 0.1.0, as plugins built before 0.2.0 are: it returns its outputs
//! (the payload, on `echo`) instead of emitting them, and has no state. weir keeps running
//! such plugins, and refuses them in a pipeline with state. Written with `wit-bindgen`
//! directly: the guest SDK speaks 0.2.0.
#![no_std]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

// The allocator, panic handler and cabi_realloc.
use weir_guest_runtime as _;

wit_bindgen::generate!({
    path: "../../wit/0.1.0",
    world: "plugin",
    // No `std` feature: the error impls it gates stay out of this no_std build.
    std_feature,
});

use exports::weir::transform::transformer::{Guest, Message, Output, TransformError};

struct EchoV1;

impl Guest for EchoV1 {
    fn transform(msg: Message) -> Result<Vec<Output>, TransformError> {
        Ok(vec![Output {
            subject: "echo".into(),
            headers: Vec::new(),
            payload: msg.payload,
        }])
    }
}

export!(EchoV1);
