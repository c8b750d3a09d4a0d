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
            b"grow-within" => {
                // 4 MiB: well inside the tests' 16 MiB limit, so this one succeeds.
                let block = core::hint::black_box(alloc::vec![7u8; 4 << 20]);
                Ok(alloc::vec![Output::new("echo", alloc::vec![block[0]])])
            }
            b"recurse" => Ok(alloc::vec![Output::new(
                "never",
                dive(core::hint::black_box(0)).to_le_bytes().to_vec()
            )]),
            b"trap" => panic!("the hostile plugin panics on purpose"),
            b"partial" => {
                let mut outputs = Vec::new();
                for i in 0..10u8 {
                    outputs.push(Output::new("partial", alloc::vec![i]));
                }
                // A trap after outputs were produced: none of them may be published.
                core::hint::black_box(&outputs);
                panic!("the hostile plugin panics half-way through its outputs")
            }
            b"bloat" => Ok(alloc::vec![Output::new("bloat", alloc::vec![b'x'; 8 << 20])]),
            b"flood" => Ok((0..10_000).map(|_| Output::new("flood", "x")).collect()),
            b"escape" => Ok(alloc::vec![Output::new("elsewhere.>", "x")]),
            b"rollup" => Ok(alloc::vec![
                Output::new("rollup", "x").with_header("Nats-Rollup", "all")
            ]),
            // One header value past JetStream's 64 KiB header limit.
            b"big-header" => Ok(alloc::vec![
                Output::new("echo", "x").with_header("X-Big", "v".repeat(70_000))
            ]),
            // 2 000 headers, none large (about 100 KB of them): the same limit, reached another
            // way.
            b"many-headers" => {
                let mut output = Output::new("echo", "x");
                for i in 0..2_000u32 {
                    output = output.with_header(alloc::format!("h{i}"), "v".repeat(40));
                }
                Ok(alloc::vec![output])
            }
            // A header that belongs to weir: a plugin must not forge a dead letter's kind.
            b"forge" => Ok(alloc::vec![
                Output::new("echo", "x").with_header("Weir-Dlq-Kind", "trap")
            ]),
            b"fail" => Err(TransformError::plugin_failed("asked to fail")),
            _ => Ok(alloc::vec![Output::new("echo", msg.payload)]),
        }
    }
}

/// Recursion without end and without a base case the optimiser can see through: it overflows
/// the wasm stack.
#[inline(never)]
fn dive(depth: u64) -> u64 {
    if depth == u64::MAX {
        return depth;
    }
    dive(depth + 1).rotate_left(7) ^ depth
}

weir_guest_sdk::export!(Hostile);
