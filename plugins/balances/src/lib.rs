//! Running balances per account, on contract 0.2.0 through the guest SDK's state API: each
//! input is a transaction, its payload a signed whole amount (`+40`, `-25`), its account the
//! pipeline's state key. The plugin keeps the account's balance in its state and emits the
//! balance after the transaction on `balance.<account>`. A transaction that would take the
//! balance below zero is invalid input: the host dead-letters it and keeps none of its
//! changes, so the plugin may write before it checks.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::ToString;
use weir_guest_sdk::{Context, Message, Output, StatefulTransform, TransformError, subject_token};

/// The state entry that holds the account's balance, as a JSON number.
const BALANCE: &str = "balance";

struct Balances;

impl StatefulTransform for Balances {
    fn transform(msg: Message, ctx: &mut Context) -> Result<(), TransformError> {
        let text = core::str::from_utf8(&msg.payload)
            .map_err(|_| TransformError::invalid_input("the amount is not UTF-8"))?;
        let amount: i64 = text
            .trim()
            .parse()
            .map_err(|_| TransformError::invalid_input(format!("{text:?} is not a whole amount")))?;
        let balance: i64 = ctx.state.get_json(BALANCE)?.unwrap_or(0);
        let after = balance
            .checked_add(amount)
            .ok_or_else(|| TransformError::invalid_input("the balance would overflow"))?;
        ctx.state.set_json(BALANCE, &after)?;
        if after < 0 {
            return Err(TransformError::invalid_input(format!(
                "overdraft: {balance} {amount:+} would leave {after}"
            )));
        }
        // The key becomes a subject token: one with a '.' or a wildcard is invalid input.
        let account = subject_token(&msg.state_key)?;
        ctx.emit(Output::new(format!("balance.{account}"), after.to_string()));
        Ok(())
    }
}

weir_guest_sdk::export_stateful!(Balances);
