//! A partitioned pipeline (`partitions = 1`): no store on the host, every commit an atomic
//! batch on the output stream with the progress marker that says which inputs are done. A
//! weir killed and restarted with nothing on disk resumes exactly where the last one
//! stopped. (`standby.rs` runs several hosts on a cluster.)

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
/// which weir creates. A lease of a second: a restarted weir waits for the killed one's to
/// expire.
fn partitioned_config(dir: &Path, url: &str, plugin: &Path) -> std::path::PathBuf {
    let text = PipelineToml {
        partitions: Some(1),
        extra: "[pipeline.batch]\nmax_messages = 64\n",
        ..PipelineToml::orders(url, plugin, Path::new("unused"))
    }
    .render()
    .replace("partitions = 1", "partitions = 1\nlease_ttl_secs = 1");
    let path = dir.join("weir.toml");
    std::fs::write(&path, ADMIN_OFF.to_owned() + &text).unwrap();
    path
}

/// Waits until every input is acked and every output and dead letter is in `ORDERS_OUT`
/// (showing the end of the weir log `log` if that never comes).
async fn wait_until_processed(js: &jetstream::Context, payloads: &[Vec<u8>], log: &Path) {
    wait_for_showing_log(
        "every input processed",
        Duration::from_secs(120),
        log,
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
    // Spread over ~12 s: each restart waits up to a second or two for the killed run's lease.
    let publisher = publish_orders_spread(&js, &payloads, Duration::from_millis(300));
    let mut weir = sigkill_while_working(&js, "ORDERS_OUT", KILLS, &mut rng, weir, start).await;
    publisher.await.unwrap();
    let started = Instant::now();
    wait_until_processed(&js, &payloads, &log).await;
    println!("drained {:?} after the last restart", started.elapsed());
    // The last run takes the partition over too, even with nothing left to do.
    wait_for_showing_log(
        "the last run to take over",
        Duration::from_secs(30),
        &log,
        || async {
            runs_in(&progress_markers(&js, "ORDERS_OUT", MARKERS).await).len() == KILLS + 1
        },
    )
    .await;
    let status = terminate(&mut weir);
    assert!(status.success(), "SIGTERM stops weir cleanly, got {status}");

    let verdict = check_orders_in(&js, "ORDERS_OUT", "ORDERS_OUT", &payloads).await;
    assert!(verdict.is_exact(), "not exactly once: {verdict:?}");
    assert!(
        !dir.path().join("unused").exists(),
        "a partitioned pipeline keeps nothing on disk"
    );
    // Every run took the partition over (commit 0), then numbered its commits. A run whose
    // renewal came late under load loses its lease and takes the partition over again, as
    // `<run>#2`: that counts as another owner, never as another run.
    let markers = progress_markers(&js, "ORDERS_OUT", MARKERS).await;
    assert_eq!(runs_in(&markers).len(), KILLS + 1, "every run took over");
    let owners: HashSet<&str> = markers.iter().map(|(owner, _)| owner.as_str()).collect();
    let takeovers = markers.iter().filter(|(_, commit)| *commit == 0).count();
    assert_eq!(takeovers, owners.len(), "one takeover marker per owner");
}

/// The runs that wrote `markers`: an owner is `<run>#<takeover>`.
fn runs_in(markers: &[(String, u64)]) -> HashSet<&str> {
    markers
        .iter()
        .map(|(owner, _)| {
            owner
                .rsplit_once('#')
                .map_or(owner.as_str(), |(run, _)| run)
        })
        .collect()
}

/// Three partitions on host a; b joins (a hands it its share) and a is killed: b takes the
/// rest, and every partition was committed by a and then by b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_partitions_fail_over_to_a_second_host_and_every_output_is_exactly_once() {
    const PARTITIONS: usize = 3;
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let text = PipelineToml {
        subject: "orders.in.*",
        partitions: Some(PARTITIONS as u32),
        extra: "[pipeline.batch]\nmax_messages = 64\n",
        ..PipelineToml::orders(&server.url(), &plugin("orders"), Path::new("unused"))
    }
    .render()
    .replace(
        "partitions = 3",
        "partitions = 3\npartition_key = \"subject-token:3\"\nlease_ttl_secs = 2",
    );
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, ADMIN_OFF.to_owned() + &text).unwrap();
    let (a_log, b_log) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let leases_taken = |log: &Path| {
        read_log_of(log)
            .matches("took the partition's lease")
            .count()
    };

    let mut a = spawn_weir(&config, Some(&a_log), None);
    wait_for(
        "a to take every partition",
        Duration::from_secs(60),
        || async { leases_taken(&a_log) == PARTITIONS },
    )
    .await;
    let mut b = spawn_weir(&config, Some(&b_log), None);
    // Each order on its customer's subject: the stream stores it under its partition.
    let payloads = order_workload(INPUTS, MALFORMED_EVERY);
    let publisher =
        publish_spread_through_elections(&js, &payloads, Duration::from_millis(40), |input| {
            format!("orders.in.c{}", input % 16)
        });
    wait_for("a to make progress", Duration::from_secs(60), || async {
        stream_len(&js, "ORDERS_OUT").await > 500
    })
    .await;
    a.kill().unwrap();
    a.wait().unwrap();
    wait_for(
        "b to take every partition",
        Duration::from_secs(60),
        || async { leases_taken(&b_log) == PARTITIONS },
    )
    .await;
    publisher.await.unwrap();
    wait_for("every input processed", Duration::from_secs(120), || {
        partitions_processed(&js, PARTITIONS as u32, &payloads)
    })
    .await;
    assert!(terminate(&mut b).success());

    let verdict = check_orders_in(&js, "ORDERS_OUT", "ORDERS_OUT", &payloads).await;
    println!("verdict: {}", verdict.counts());
    assert!(verdict.is_exact(), "not exactly once: {verdict:?}");
    // Every partition had inputs, committed by a and then by b.
    for partition in 0..PARTITIONS {
        let subject = format!("_weir.progress.orders.{partition}");
        let markers = progress_markers(&js, "ORDERS_OUT", &subject).await;
        let owners: HashSet<&str> = markers.iter().map(|(owner, _)| owner.as_str()).collect();
        assert_eq!(owners.len(), 2, "partition {partition}: {markers:?}");
        assert!(
            markers.iter().any(|(_, commit)| *commit > 0),
            "partition {partition} committed inputs: {markers:?}"
        );
    }
    // weir saw each input's subject as it was published, without its partition: the dead
    // letters name it.
    let letters: Vec<StoredMessage> = read_stream(&js, "ORDERS_OUT")
        .await
        .into_iter()
        .filter(|message| message.subject == "orders.dlq")
        .collect();
    assert!(!letters.is_empty());
    for letter in letters {
        let subject = letter
            .header("Weir-Input-Subject")
            .expect("the input's subject");
        assert!(subject.starts_with("orders.in.c"), "{subject}");
    }
}

fn read_log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
