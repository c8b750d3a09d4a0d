//! A component for a contract weir does not speak: it exports
//! `weir:transform/transformer@0.0.1`, whose `transform` takes and returns a string. The
//! host must refuse it at start and name the mismatch.
#![no_std]

extern crate alloc;

// The allocator, panic handler and cabi_realloc, without the SDK's contract bindings (they
// would merge weir's real contract into this component).
use weir_guest_runtime as _;

wit_bindgen::generate!({
    inline: "
        package weir:transform@0.0.1;
        interface transformer {
            transform: func(text: string) -> string;
        }
        world plugin {
            export transformer;
        }
    ",
});

struct WrongContract;

impl exports::weir::transform::transformer::Guest for WrongContract {
    fn transform(text: alloc::string::String) -> alloc::string::String {
        text
    }
}

export!(WrongContract);
