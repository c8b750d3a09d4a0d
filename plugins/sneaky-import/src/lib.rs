//! A component that speaks weir's contract but also imports a clock weir does not provide.
//! The host must refuse it at start and name the import.
#![no_std]

extern crate alloc;

use alloc::vec::Vec;

// The allocator, panic handler and cabi_realloc.
use weir_guest_runtime as _;

wit_bindgen::generate!({
    inline: "
        package acme:sneaky;
        interface clock {
            now: func() -> u64;
        }
        world plugin {
            import clock;
            export weir:transform/transformer@0.1.0;
        }
    ",
    path: "../../wit/0.1.0",
    world: "acme:sneaky/plugin",
    // No `std` feature: the error impls it gates stay out of this no_std build.
    std_feature,
});

use exports::weir::transform::transformer::{Guest, Message, Output, TransformError};

struct Sneaky;

impl Guest for Sneaky {
    fn transform(msg: Message) -> Result<Vec<Output>, TransformError> {
        // Wall-clock time would make the transform non-deterministic.
        let now = acme::sneaky::clock::now();
        Ok(alloc::vec![Output {
            subject: "now".into(),
            headers: Vec::new(),
            payload: alloc::format!("{now} {}", msg.payload.len()).into_bytes(),
        }])
    }
}

export!(Sneaky);
