//! The fault matrix, a row per test: each signal × target, at each point of the message
//! path held open by the fault hook (see `weir_tests::matrix`), verified exactly-once.

use weir_tests::matrix::{self, Signal, Target};

async fn row(signal: Signal, target: Target) {
    let mut failed = Vec::new();
    for cell in matrix::cells()
        .into_iter()
        .filter(|cell| cell.signal == signal && cell.target == target)
    {
        let report = matrix::run_cell(cell, 300).await;
        println!("{}", report.line());
        if !report.passed() {
            failed.push(report.line());
        }
    }
    assert!(failed.is_empty(), "cells failed:\n{}", failed.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_weir_at_each_point() {
    row(Signal::Kill, Target::Weir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_weir_at_each_point() {
    row(Signal::Term, Target::Weir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_server_at_each_point() {
    row(Signal::Kill, Target::Server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_server_at_each_point() {
    row(Signal::Term, Target::Server).await;
}
