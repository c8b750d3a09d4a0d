//! Tumbling one-minute counts per customer, by data time, on contract 0.2.0: the pipeline's
//! state key is the customer. The plugin counts the customer's inputs in the minute that is
//! open for them; the first input of a later minute closes it, emits its count on
//! `counts.<customer>` and opens its own minute. A window is closed by the next input of its
//! customer, not by a clock: a plugin has none, and a replay must give the same counts.
//!
//! Output: `{"customer":"c-7","window_start_unix_ns":…,"window_end_unix_ns":…,"count":3}`.
//! An input older than the open window (data time runs backwards) is invalid input: it
//! would belong to a window already emitted.
#![no_std]

extern crate alloc;

use alloc::format;
use serde::{Deserialize, Serialize};
use weir_guest_sdk::{Context, Message, Output, StatefulTransform, TransformError, subject_token};

const MINUTE_NS: u64 = 60_000_000_000;

/// The state entry that holds the open window.
const OPEN: &str = "open";

/// The customer's open window: which minute, and its count so far.
#[derive(Serialize, Deserialize)]
struct Window {
    minute: u64,
    count: u64,
}

#[derive(Serialize)]
struct Count<'a> {
    customer: &'a str,
    window_start_unix_ns: u64,
    window_end_unix_ns: u64,
    count: u64,
}

struct WindowCounts;

impl StatefulTransform for WindowCounts {
    fn transform(msg: Message, ctx: &mut Context) -> Result<(), TransformError> {
        let customer = subject_token(&msg.state_key)?;
        let minute = msg.data_time_unix_ns / MINUTE_NS;
        let open = match ctx.state.get_json::<Window>(OPEN)? {
            Some(open) if open.minute == minute => Window {
                count: open.count + 1,
                ..open
            },
            Some(open) if open.minute > minute => {
                return Err(TransformError::invalid_input(format!(
                    "late: data time {} ns is before the open window, which starts at {} ns",
                    msg.data_time_unix_ns,
                    open.minute * MINUTE_NS
                )));
            }
            closed => {
                if let Some(closed) = closed {
                    let count = Count {
                        customer,
                        window_start_unix_ns: closed.minute * MINUTE_NS,
                        window_end_unix_ns: (closed.minute + 1) * MINUTE_NS,
                        count: closed.count,
                    };
                    ctx.emit(Output::json(format!("counts.{customer}"), &count)?);
                }
                Window { minute, count: 1 }
            }
        };
        ctx.state.set_json(OPEN, &open)
    }
}

weir_guest_sdk::export_stateful!(WindowCounts);
