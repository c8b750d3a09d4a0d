//! A plugin that misbehaves on command, to prove the sandbox contains it.
//!
//! The payload names the misbehaviour; anything else is echoed on the `echo` subject, so the
//! tests can check that well-behaved messages keep flowing between hostile ones.
#![no_std]

extern crate alloc;

use alloc::vec::Vec;
use weir_guest_sdk::{Message, Output, Transform, TransformError};

struct Hostile;

impl Transform for Hostile {
    fn transform(msg: Message) -> Result<Vec<Output>, TransformError> {
        match msg.payload.as_slice() {
            b"loop" => {
                let mut n: u64 = 0;
                loop {
                    // black_box keeps the loop from being optimised into a trap-free spin.
                    n = core::hint::black_box(n.wrapping_add(1));
                }
            }
            b"grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(core::hint::black_box(alloc::vec![7u8; 1 << 20]));
                }
            }
            b"trap" => panic!("the hostile plugin panics on purpose"),
            b"flood" => Ok((0..10_000).map(|_| Output::new("flood", "x")).collect()),
            b"escape" => Ok(alloc::vec![Output::new("elsewhere.>", "x")]),
            b"fail" => Err(TransformError::plugin_failed("asked to fail")),
            _ => Ok(alloc::vec![Output::new("echo", msg.payload)]),
        }
    }
}

weir_guest_sdk::export!(Hostile);
