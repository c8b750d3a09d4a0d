//! A plugin with a bug weir's harness must catch: it counts the messages it has seen in a
//! global, as if one instance handled a stream. weir gives every message a fresh instance, so
//! in a pipeline the count would always be 1; `weir plugin test` reports the case as
//! non-deterministic instead of letting the author believe the count works.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use weir_guest_sdk::{Message, Output, Transform, TransformError};

static SEEN: AtomicU64 = AtomicU64::new(0);

struct Stateful;

impl Transform for Stateful {
    fn transform(_msg: Message) -> Result<Vec<Output>, TransformError> {
        let seen = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(vec![Output::new("counted", format!("message number {seen}"))])
    }
}

weir_guest_sdk::export!(Stateful);
