//! A weir restarted after `kill -9`, or after a clean stop, gets at once the inputs its
//! predecessor held (delivered, never acked), instead of waiting out `ack_wait`: once, they
//! stayed pending for `ack_wait` (30 s by default), and after a few kills they filled the
//! consumer's unacked limit and the restarted weir got nothing. The store tells which of them
//! are done, so handing them all out again is safe. A clean stop hands back what it pulled
//! and did not process, so that the consumer holds nothing for anyone. Each test prints the
//! time from restart to the first new output.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use futures::StreamExt;
use weir_tests::*;

/// Far beyond the tests' waits: an input left to `ack_wait` fails them.
const ACK_WAIT_MS: u64 = 300_000;

/// A rig whose consumer holds inputs for `ACK_WAIT_MS`.
async fn rig(messages: usize) -> FaultRig {
    let rig = FaultRig::start(messages).await;
    let text = std::fs::read_to_string(&rig.config).unwrap().replace(
        "ack_wait_ms = 2000",
        &format!("ack_wait_ms = {ACK_WAIT_MS}"),
    );
    std::fs::write(&rig.config, text).unwrap();
    rig
}

/// How many inputs the consumer has delivered and not had acked.
async fn held(rig: &FaultRig) -> u64 {
    let stream = rig.js.get_stream("ORDERS").await.unwrap();
    stream.consumer_info("weir").await.unwrap().num_ack_pending as u64
}

/// How many inputs a client pulling from the consumer gets redelivered within a second
/// (each handed back again, so that weir's restart processes them).
async fn redelivered_at_once(rig: &FaultRig) -> u64 {
    let stream = rig.js.get_stream("ORDERS").await.unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("weir").await.unwrap();
    let mut messages = consumer
        .fetch()
        .max_messages(1000)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut fetched = Vec::new();
    while let Some(message) = messages.next().await {
        fetched.push(message.unwrap());
    }
    let mut redelivered = 0;
    for message in fetched {
        if message.info().unwrap().delivered > 1 {
            redelivered += 1;
        }
        message
            .ack_with(async_nats::jetstream::AckKind::Nak(None))
            .await
            .unwrap();
    }
    redelivered
}

/// How many inputs a stopping weir says it handed back.
fn handed_back_by_the_log(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|line| line.contains("handed back the inputs pulled and not processed"))
        .unwrap_or_else(|| panic!("no hand back logged:\n{log}"));
    let count = line
        .split("inputs=")
        .nth(1)
        .unwrap_or_else(|| panic!("{line}"));
    let digits: String = count.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("{line}"))
}

/// Restarts weir and returns how long it took to the first output beyond `before` and to
/// every input processed (then verified exactly once), both well within `ACK_WAIT_MS`.
async fn restart_and_verify(rig: &FaultRig) -> (Duration, Duration) {
    let before = stream_len(&rig.js, "ORDERS_OUT").await;
    let restarted = Instant::now();
    let mut weir = spawn_weir(&rig.config, None, None);
    wait_for("a new output", Duration::from_secs(60), || async {
        stream_len(&rig.js, "ORDERS_OUT").await > before
    })
    .await;
    let first_output = restarted.elapsed();
    wait_until_orders_processed(&rig.js, &rig.payloads, Duration::from_secs(60)).await;
    let all = restarted.elapsed();
    assert!(terminate(&mut weir).success());
    verify_orders_exactly_once(&rig.js, &rig.payloads).await;
    (first_output, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_redelivers_what_the_dead_weir_held_at_once() {
    let rig = rig(600).await;
    // Killed with a batch executed and not committed, and more pulled behind it.
    let mut weir = spawn_weir(&rig.config, None, Some("executed:3"));
    let status = wait_for_exit(&mut weir, Duration::from_secs(60)).await;
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
    let held = held(&rig).await;
    assert!(held > 0, "the killed weir held inputs");
    let (first_output, all) = restart_and_verify(&rig).await;
    println!(
        "after kill -9 holding {held} inputs (ack_wait {ACK_WAIT_MS} ms): first new output {:.2} s, all {:.2} s after the restart",
        first_output.as_secs_f64(),
        all.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_clean_stop_redelivers_what_was_pulled_at_once() {
    let rig = rig(600).await;
    // Paused in the middle of the stream, then stopped cleanly: the batches pulled behind
    // the one in hand are never finished.
    let marker = rig.dir.path().join("paused");
    let marker_text = marker.display().to_string();
    let log = rig.dir.path().join("weir.log");
    let mut weir = spawn_weir_with_env(
        &rig.config,
        Some(&log),
        &[
            ("WEIR_FAULT", "committed:3:pause"),
            ("WEIR_FAULT_MARKER", &marker_text),
        ],
    );
    wait_for("weir to pause", Duration::from_secs(60), || {
        std::future::ready(marker.exists())
    })
    .await;
    assert!(terminate(&mut weir).success());
    // Handed back as it stopped: the next owner of the consumer gets every input the
    // stopped weir left unacked at once, which it did only after ack_wait (100 to 400
    // inputs per stop).
    let handed_back = handed_back_by_the_log(&std::fs::read_to_string(&log).unwrap());
    let held = held(&rig).await;
    assert!(held > 0, "the stopped weir had pulled inputs ahead");
    assert_eq!(
        handed_back, held,
        "what the stopped weir says it handed back"
    );
    assert_eq!(
        redelivered_at_once(&rig).await,
        held,
        "inputs the next owner got again within a second"
    );
    let (first_output, all) = restart_and_verify(&rig).await;
    println!(
        "after SIGTERM handing back {handed_back} inputs (ack_wait {ACK_WAIT_MS} ms): first new output {:.2} s, all {:.2} s after the restart",
        first_output.as_secs_f64(),
        all.as_secs_f64()
    );
}
