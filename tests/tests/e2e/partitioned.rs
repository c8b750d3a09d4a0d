//! A partitioned pipeline (`partitions = 1`): no store on the host, every commit an atomic
//! batch on the output stream with the progress marker that says which inputs are done. A
//! weir killed and restarted with nothing on disk resumes exactly where the last one
//! stopped; one paused while another takes the partition over publishes nothing more when it
//! wakes, and stops saying why.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use weir_tests::*;

const INPUTS: usize = 2000;
const MALFORMED_EVERY: usize = 50;
const KILLS: usize = 8;
const MARKERS: &str = "_weir.progress.orders.0";

/// The orders pipeline, partitioned: outputs, dead letters and markers all in `ORDERS_OUT`,
/// which weir creates.
fn partitioned_config(dir: &Path, url: &str, plugin: &Path) -> std::path::PathBuf {
    PipelineToml {
        partitions: Some(1),
        extra: "[pipeline.batch]\nmax_messages = 64\n",
        ..PipelineToml::orders(url, plugin, Path::new("unused"))
    }
    .write(dir, "weir.toml")
}

/// Waits until every input is acked and every output and dead letter is in `ORDERS_OUT`.
async fn wait_until_processed(js: &jetstream::Context, payloads: &[Vec<u8>]) {
    wait_for(
        "every input processed",
        Duration::from_secs(120),
        || async {
            drained(js, "ORDERS", "weir").await
                && check_orders_in(js, "ORDERS_OUT", "ORDERS_OUT", payloads)
                    .await
                    .missing
                    == 0
        },
    )
    .await;
}

/// Every progress marker stored, in order: (owner, commit) of each.
async fn markers(js: &jetstream::Context) -> Vec<(String, u64)> {
    read_stream(js, "ORDERS_OUT")
        .await
        .into_iter()
        .filter(|message| message.subject == MARKERS)
        .map(|marker| {
            let progress: serde_json::Value =
                serde_json::from_slice(&marker.payload).expect("a marker is JSON");
            (
                progress["owner"].as_str().expect("an owner").to_owned(),
                progress["commit"].as_u64().expect("a commit number"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weir_killed_again_and_again_with_nothing_on_disk_leaves_every_output_exactly_once() {
    let seed = seed_from_env("WEIR_CRASH_SEED");
    println!("seed: {seed} (rerun with WEIR_CRASH_SEED={seed})");
    let mut rng = SeededRng(seed);
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let config = partitioned_config(dir.path(), &server.url(), &plugin("orders"));
    let log = dir.path().join("weir.log");
    let start = || spawn_weir(&config, Some(&log), None);

    let weir = start();
    wait_for_stream(&js, "ORDERS").await;
    let payloads = order_workload(INPUTS, MALFORMED_EVERY);
    let publisher = publish_orders_spread(&js, &payloads, Duration::from_millis(40));
    let mut weir = sigkill_while_working(&js, "ORDERS_OUT", KILLS, &mut rng, weir, start).await;
    publisher.await.unwrap();
    let started = Instant::now();
    wait_until_processed(&js, &payloads).await;
    println!("drained {:?} after the last restart", started.elapsed());
    let status = terminate(&mut weir);
    assert!(status.success(), "SIGTERM stops weir cleanly, got {status}");

    let verdict = check_orders_in(&js, "ORDERS_OUT", "ORDERS_OUT", &payloads).await;
    assert!(verdict.is_exact(), "not exactly once: {verdict:?}");
    assert!(
        !dir.path().join("unused").exists(),
        "a partitioned pipeline keeps nothing on disk"
    );
    // Every run took the partition over once (commit 0), then numbered its commits.
    let markers = markers(&js).await;
    let owners: HashSet<&str> = markers.iter().map(|(owner, _)| owner.as_str()).collect();
    assert_eq!(owners.len(), KILLS + 1, "one owner per run");
    let takeovers = markers.iter().filter(|(_, commit)| *commit == 0).count();
    assert_eq!(takeovers, KILLS + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weir_paused_while_another_takes_over_publishes_nothing_more_and_stops() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let config = partitioned_config(dir.path(), &server.url(), &plugin("orders"));
    let (first_log, second_log) = (dir.path().join("first.log"), dir.path().join("second.log"));

    let mut first = spawn_weir(&config, Some(&first_log), None);
    wait_for_stream(&js, "ORDERS").await;
    let payloads = order_workload(INPUTS + 500, MALFORMED_EVERY);
    let (before, after) = payloads.split_at(INPUTS);
    let publisher = publish_orders_spread(&js, before, Duration::from_millis(20));
    wait_for(
        "the first weir to make progress",
        Duration::from_secs(60),
        || async { stream_len(&js, "ORDERS_OUT").await > 200 },
    )
    .await;
    // Stopped mid-work, as a host that stalls or loses the network for a while.
    send_signal(&first, libc::SIGSTOP);
    let mut second = spawn_weir(&config, Some(&second_log), None);
    publisher.await.unwrap();
    wait_until_processed(&js, before).await;

    // The first wakes, with batches in hand or pulling new ones beside the second: its next
    // commit is refused whole, and it stops.
    send_signal(&first, libc::SIGCONT);
    publish_all(&js, "orders.in.new", after).await;
    let status = wait_for_exit(&mut first, Duration::from_secs(30)).await;
    assert!(!status.success(), "the stale owner stops with an error");
    let log = std::fs::read_to_string(&first_log).unwrap();
    assert!(log.contains("taken over"), "{log}");
    wait_until_processed(&js, &payloads).await;
    let status = terminate(&mut second);
    assert!(status.success(), "SIGTERM stops weir cleanly, got {status}");

    let verdict = check_orders_in(&js, "ORDERS_OUT", "ORDERS_OUT", &payloads).await;
    assert!(verdict.is_exact(), "not exactly once: {verdict:?}");
    // Once the second took the partition over, no marker of the first's follows.
    let markers = markers(&js).await;
    let first_owner = markers[0].0.clone();
    let takeover = markers
        .iter()
        .position(|(owner, _)| *owner != first_owner)
        .expect("the second took over");
    assert!(
        markers[takeover..]
            .iter()
            .all(|(owner, _)| *owner != first_owner),
        "{markers:?}"
    );
}
