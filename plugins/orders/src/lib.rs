//! The demo transform: a JSON order in, an enriched order and a per-customer event out.
//!
//! Input: `{"id":"o-1","customer":"c-7","items":[{"sku":"A","qty":2,"price_cents":150}]}`.
//! Outputs: on `enriched`, the order with `total_cents`, `item_count` and `data_time_unix_ns`;
//! on `customer.<customer>`, `{"customer","order","total_cents"}`. A payload that is not such
//! an order, or a customer id that cannot be a subject token, is invalid input.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};
use weir_guest_sdk::{Message, Output, Transform, TransformError};

#[derive(Deserialize)]
struct Order {
    id: String,
    customer: String,
    items: Vec<Item>,
}

#[derive(Deserialize, Serialize)]
struct Item {
    sku: String,
    qty: u32,
    price_cents: u64,
}

#[derive(Serialize)]
struct EnrichedOrder<'a> {
    id: &'a str,
    customer: &'a str,
    items: &'a [Item],
    item_count: u64,
    total_cents: u64,
    data_time_unix_ns: u64,
}

#[derive(Serialize)]
struct CustomerEvent<'a> {
    customer: &'a str,
    order: &'a str,
    total_cents: u64,
}

struct Orders;

impl Transform for Orders {
    fn transform(msg: Message) -> Result<Vec<Output>, TransformError> {
        let order: Order = serde_json::from_slice(&msg.payload)
            .map_err(|e| TransformError::invalid_input(format!("not an order: {e}")))?;
        let is_token_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if order.customer.is_empty() || !order.customer.chars().all(is_token_char) {
            return Err(TransformError::invalid_input(format!(
                "customer id {:?} must be letters, digits, '-' or '_'",
                order.customer
            )));
        }
        let mut total_cents: u64 = 0;
        let mut item_count: u64 = 0;
        for item in &order.items {
            let line = item.price_cents.checked_mul(u64::from(item.qty));
            total_cents = line
                .and_then(|line| total_cents.checked_add(line))
                .ok_or_else(|| TransformError::invalid_input("order total overflows"))?;
            item_count += u64::from(item.qty);
        }
        let enriched = EnrichedOrder {
            id: &order.id,
            customer: &order.customer,
            items: &order.items,
            item_count,
            total_cents,
            data_time_unix_ns: msg.data_time_unix_ns,
        };
        let event = CustomerEvent {
            customer: &order.customer,
            order: &order.id,
            total_cents,
        };
        // Serialising these plain structs cannot fail.
        let enriched = serde_json::to_vec(&enriched).expect("an order serialises");
        let event = serde_json::to_vec(&event).expect("an event serialises");
        Ok(alloc::vec![
            Output::new("enriched", enriched).with_header("Content-Type", "application/json"),
            Output::new(format!("customer.{}", order.customer), event),
        ])
    }
}

weir_guest_sdk::export!(Orders);
