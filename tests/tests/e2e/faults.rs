//! Exactly-once at each exact window of the message path: weir aborts (no cleanup, like
//! `kill -9`) at a named point through the `WEIR_FAULT` hook of the tests' `weir-faulty`, is
//! restarted, and the verifier finds every output exactly once and the DLQ exactly the
//! malformed inputs.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use weir_tests::*;

/// Aborts weir at the third time it reaches `point`, restarts it, and verifies.
async fn abort_at(point: &str) {
    // Bound, not `..`: the server and the directory must live until the end.
    let FaultRig {
        server: _server,
        js,
        dir: _dir,
        config,
        payloads,
    } = FaultRig::start(300).await;
    let mut weir = spawn_weir(&config, None, Some(&format!("{point}:3")));
    let status = wait_for_exit(&mut weir, Duration::from_secs(60)).await;
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "weir aborted at {point}, got {status}"
    );

    let mut weir = spawn_weir(&config, None, None);
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(60)).await;
    assert!(terminate(&mut weir).success());
    verify_orders_exactly_once(&js, &payloads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_fetch() {
    abort_at("fetched").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_execution_before_commit() {
    abort_at("executed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_between_commit_and_publish() {
    abort_at("committed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_between_publish_and_ack() {
    abort_at("published").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_between_ack_and_outbox_clear() {
    abort_at("acked").await;
}

/// The binary the README builds carries no fault injection: `WEIR_FAULT` means nothing to it
/// (once, `cargo build --workspace` unified the tests' feature into it and it aborted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_fault_does_nothing_to_the_weir_binary() {
    let FaultRig {
        server: _server,
        js,
        dir: _dir,
        config,
        payloads,
    } = FaultRig::start(100).await;
    let mut command = std::process::Command::new(weir_binary());
    command
        .args(["run", "--config"])
        .arg(&config)
        .env("WEIR_FAULT", "fetched:1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut weir = command.spawn().expect("start weir");
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(60)).await;
    assert!(
        terminate(&mut weir).success(),
        "weir ran past every fault point and stopped cleanly"
    );
    verify_orders_exactly_once(&js, &payloads).await;
}
