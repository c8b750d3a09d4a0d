//! `weir replay`: a range of the input stream run again through another plugin to another
//! prefix (a backfill after a fix), exactly once, with the live pipeline's consumer and
//! outputs untouched; and a replay SIGKILLed three times and started again with the same
//! command, still exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use weir_tests::*;

/// `weir replay --config <config> <args>`, run to its end.
fn replay(config: &Path, args: &[&str]) -> Output {
    Command::new(weir_binary())
        .arg("replay")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run weir replay")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `weir replay` with `args`, which must succeed and say `says`; what it printed.
fn replayed(config: &Path, args: &[&str], says: &str) -> String {
    let output = replay(config, args);
    let printed = stdout(&output);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains(says), "{printed}");
    printed
}

/// The arguments that replay `range` through `plugin` to prefix `fixed` in stream `FIXED`.
fn to_fixed<'a>(range: &[&'a str], plugin: &'a Path) -> Vec<&'a str> {
    let plugin = plugin.to_str().expect("a UTF-8 path");
    let to = ["--plugin", plugin, "--output-prefix", "fixed"];
    [range, &to, &["--output-stream", "FIXED"]].concat()
}

/// The live consumer's ack floor.
async fn live_ack_floor(js: &jetstream::Context) -> u64 {
    let stream = js.get_stream("ORDERS").await.unwrap();
    stream
        .consumer_info("weir")
        .await
        .unwrap()
        .ack_floor
        .stream_sequence
}

/// The input stream's payloads by sequence.
async fn inputs_by_sequence(js: &jetstream::Context) -> BTreeMap<u64, Vec<u8>> {
    read_stream(js, "ORDERS")
        .await
        .into_iter()
        .map(|message| (message.sequence, message.payload))
        .collect()
}

/// Asserts that `FIXED` holds exactly one `fixed.echo` output per input of `range` (the
/// `hostile` plugin echoes each payload), each with a distinct id and made by `plugin`,
/// and nothing else.
async fn assert_replayed_once(
    js: &jetstream::Context,
    range: std::ops::RangeInclusive<u64>,
    plugin: &Path,
) {
    let inputs = inputs_by_sequence(js).await;
    let mut expected: Vec<Vec<u8>> = inputs
        .range(range.clone())
        .map(|(_, payload)| payload.clone())
        .collect();
    let outputs = read_stream(js, "FIXED").await;
    let ids: BTreeSet<&str> = outputs.iter().filter_map(|m| m.msg_id.as_deref()).collect();
    assert_eq!(ids.len(), outputs.len(), "every output has its own id");
    let sha = sha256_of(plugin);
    for output in &outputs {
        assert_eq!(output.subject, "fixed.echo");
        assert_eq!(output.header("Weir-Plugin-Sha256"), Some(sha.as_str()));
    }
    let mut got: Vec<Vec<u8>> = outputs.into_iter().map(|m| m.payload).collect();
    expected.sort();
    got.sort();
    assert_eq!(
        got.len(),
        expected.len(),
        "one output per input of {range:?}"
    );
    assert!(
        got == expected,
        "the outputs are the range's inputs, once each"
    );
}

fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A fix replayed over exactly the affected range: every input of the range gets the new
/// plugin's output once, under the new prefix and sha; none outside it; the live
/// pipeline's consumer and outputs are as they were. Run again, the finished run publishes
/// nothing more; `--dry-run` counts the range, given by sequences or by stored times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fix_replayed_over_a_range_gives_each_input_of_it_the_fixed_outputs_once() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineToml::orders(&server.url(), &plugin("orders"), &dir.path().join("store"))
        .write(dir.path(), "weir.toml");
    create_orders_stream(&js, None).await;
    let payloads = order_workload(300, 50);
    publish_all(&js, "orders.in.new", &payloads).await;
    let mut live = spawn_weir(&config, None, None);
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(60)).await;
    assert!(terminate(&mut live).success());
    let live_outputs = stream_len(&js, "ORDERS_OUT").await;
    let live_floor = live_ack_floor(&js).await;

    let fixed = plugin("hostile");
    let args = to_fixed(&["--from-seq", "101", "--to-seq", "200"], &fixed);
    let dry = replayed(
        &config,
        &[&args[..], &["--dry-run"]].concat(),
        ": 100 inputs",
    );
    assert!(dry.contains("to 200"), "{dry}");
    assert_eq!(
        stream_len(&js, "FIXED").await,
        0,
        "a dry run publishes nothing"
    );

    // The same range by the inputs' stored times: from the first input stored at or after
    // a time to the last stored at or before another (ends where the time moves on).
    let stored: BTreeMap<u64, i128> = read_stream(&js, "ORDERS")
        .await
        .into_iter()
        .map(|message| (message.sequence, message.stored_unix_ns))
        .collect();
    let first = (101..).find(|s| stored[s] > stored[&(s - 1)]).unwrap();
    let last = (first..=200)
        .rev()
        .find(|s| stored[s] < stored[&(s + 1)])
        .unwrap();
    let at = |sequence: u64| {
        weir::replay::rfc3339(
            time::OffsetDateTime::from_unix_timestamp_nanos(stored[&sequence]).unwrap(),
        )
    };
    let (from_time, to_time) = (at(first), at(last));
    let by_time = to_fixed(&["--from-time", &from_time, "--to-time", &to_time], &fixed);
    let dry = replayed(
        &config,
        &[&by_time[..], &["--dry-run"]].concat(),
        &format!(": {} inputs", last - first + 1),
    );
    assert!(
        dry.contains(&format!("stream sequence {first} (stored")),
        "{dry}"
    );
    assert!(dry.contains(&format!("to {last} (stored")), "{dry}");

    let ran = replayed(&config, &args, "complete: 100 inputs run");
    assert_replayed_once(&js, 101..=200, &fixed).await;

    // The same command again: the run is done, nothing more is published.
    replayed(&config, &args, "going on where it stopped");
    assert_replayed_once(&js, 101..=200, &fixed).await;

    // The same name with other arguments is refused, saying what to do.
    let name: String = ran
        .split_whitespace()
        .nth(1)
        .expect("the run's name")
        .to_owned();
    let other_args = to_fixed(&["--from-seq", "102", "--to-seq", "200"], &fixed);
    let other = replay(&config, &[&other_args[..], &["--name", &name]].concat());
    assert_eq!(other.status.code(), Some(2), "{}", stdout(&other));
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("give the same arguments to resume it"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );

    // The live pipeline's consumer and outputs are untouched.
    assert_eq!(stream_len(&js, "ORDERS_OUT").await, live_outputs);
    let floor = live_ack_floor(&js).await;
    assert_eq!(floor, live_floor);
}

/// A replay SIGKILLed three times mid-range and started again each time with the same
/// command goes on where it stopped: every input of the range has its output exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_three_times_and_started_again_publishes_each_output_once() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    // Small batches, each committed (and synced) apart: a replay slow enough to be killed.
    let config = PipelineToml {
        extra: "[pipeline.batch]\nmax_messages = 8\n",
        ..PipelineToml::orders(&server.url(), &plugin("orders"), &dir.path().join("store"))
    }
    .write(dir.path(), "weir.toml");
    create_orders_stream(&js, None).await;
    let payloads = order_workload(6000, 50);
    publish_all(&js, "orders.in.new", &payloads).await;
    let fixed = plugin("hostile");
    let args = to_fixed(&["--from-seq", "1"], &fixed);
    let log = dir.path().join("replay.log");
    let start = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("the replay's log");
        Command::new(weir_binary())
            .arg("replay")
            .arg("--config")
            .arg(&config)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start weir replay")
    };
    for kill in 1..=3u64 {
        let mut running = start();
        let reached = kill * 500;
        let since = std::time::Instant::now();
        while stream_len(&js, "FIXED").await < reached {
            if let Some(status) = running.try_wait().unwrap() {
                panic!(
                    "the replay ended ({status}) before kill {kill}:\n{}",
                    log_tail(&log)
                );
            }
            assert!(
                since.elapsed() < Duration::from_secs(120),
                "the replay did not reach {reached} outputs:\n{}",
                log_tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        running.kill().unwrap();
        running.wait().unwrap();
    }
    let last = start().wait_with_output().unwrap();
    assert!(last.status.success(), "{}", log_tail(&log));
    let text = stdout(&last);
    assert!(text.contains("going on where it stopped"), "{text}");
    assert!(text.contains("complete"), "{text}");
    assert_replayed_once(&js, 1..=6000, &fixed).await;
}

/// A partitioned pipeline's replay reads every partition of its input at once (stored as
/// `<partition>.<subject>`), each input once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_pipelines_range_is_replayed_across_its_partitions_once() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    cluster_chaos::create_partitioned_orders_streams_of(&js, 3, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        cluster_chaos::partitioned_orders_config(&server.url(), 3, 3),
    )
    .unwrap();
    let payloads = order_workload(600, 50);
    for (customer, chunk) in payloads.chunks(50).enumerate() {
        publish_all(&js, &format!("orders.in.c{customer}"), chunk).await;
    }
    let fixed = plugin("hostile");
    replayed(
        &config,
        &to_fixed(&["--from-seq", "1"], &fixed),
        "complete: 600 inputs run",
    );
    assert_replayed_once(&js, 1..=600, &fixed).await;
}
