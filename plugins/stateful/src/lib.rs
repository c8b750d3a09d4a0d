//! A plugin with a bug weir's harness must catch: it counts the messages it has seen in a
//! global, as if one instance handled a stream, and writes the count to its key's state. weir
//! gives every message a fresh instance, so in a pipeline the count would always be 1 (the
//! count belongs in the state it reads, not in a global); `weir plugin test` reports the case
//! as non-deterministic, from the state alone (its output does not change), instead of
//! letting the author believe the count works.
#![no_std]

extern crate alloc;

use alloc::format;
use core::sync::atomic::{AtomicU64, Ordering};
use weir_guest_sdk::{Context, Message, Output, StatefulTransform, TransformError};

static SEEN: AtomicU64 = AtomicU64::new(0);

struct Stateful;

impl StatefulTransform for Stateful {
    fn transform(_msg: Message, ctx: &mut Context) -> Result<(), TransformError> {
        let seen = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.state.set("seen", format!("{seen}"));
        ctx.emit(Output::new("counted", "one more message"));
        Ok(())
    }
}

weir_guest_sdk::export_stateful!(Stateful);
