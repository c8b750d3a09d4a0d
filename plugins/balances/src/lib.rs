//! Running balances per account, on contract 0.2.0: each input is a transaction, its payload
//! a signed whole amount (`+40`, `-25`), its account the pipeline's state key. The plugin
//! keeps the account's balance in its state and emits the balance after the transaction on
//! `balance.<account>`. A transaction that would take the balance below zero is invalid
//! input: the host dead-letters it and keeps none of its changes, so the plugin may write
//! before it checks.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

// The allocator, panic handler and cabi_realloc.
use weir_guest_runtime as _;

wit_bindgen::generate!({
    path: "../../wit/0.2.0",
    world: "plugin",
    // No `std` feature: the error impls it gates stay out of this no_std build.
    std_feature,
});

use exports::weir::transform::transformer::Guest;
use weir::transform::types::{Message, Output, TransformError};
use weir::transform::{emitter, state};

const BALANCE: &str = "balance";

struct Balances;

impl Guest for Balances {
    fn transform(msg: Message) -> Result<(), TransformError> {
        let text = core::str::from_utf8(&msg.payload)
            .map_err(|_| TransformError::InvalidInput("the amount is not UTF-8".into()))?;
        let amount: i64 = text.trim().parse().map_err(|_| {
            TransformError::InvalidInput(format!("{text:?} is not a whole amount"))
        })?;
        let balance = match state::get(BALANCE) {
            Some(stored) => parse_balance(&stored)?,
            None => 0,
        };
        let after = balance
            .checked_add(amount)
            .ok_or_else(|| TransformError::InvalidInput("the balance would overflow".into()))?;
        state::set(BALANCE, after.to_string().as_bytes());
        if after < 0 {
            return Err(TransformError::InvalidInput(format!(
                "overdraft: {balance} {amount:+} would leave {after}"
            )));
        }
        emitter::emit(&Output {
            subject: format!("balance.{}", msg.state_key),
            headers: Vec::new(),
            payload: after.to_string().into_bytes(),
        });
        Ok(())
    }
}

fn parse_balance(stored: &[u8]) -> Result<i64, TransformError> {
    core::str::from_utf8(stored)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            TransformError::PluginFailed(String::from("the stored balance is not a number"))
        })
}

export!(Balances);
