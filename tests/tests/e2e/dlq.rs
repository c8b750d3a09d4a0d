//! `weir dlq list/show/replay`: dead letters are listed with why, shown whole, and replayed
//! after a plugin fix, each exactly once, without the dedup store swallowing them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weir_tests::*;

fn config(dir: &Path, url: &str, plugin: &Path, file: &str) -> std::path::PathBuf {
    PipelineToml::orders(url, plugin, &dir.join("store")).write(dir, file)
}

fn weir_cli(args: &[&str], config: &Path) -> (bool, String, String) {
    let output = Command::new(weir_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_replayed_once_after_a_fix() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let payloads = order_workload(40, 10);
    let malformed: Vec<&Vec<u8>> = payloads
        .iter()
        .filter(|p| serde_json::from_slice::<serde_json::Value>(p).is_err())
        .collect();
    assert_eq!(malformed.len(), 4);

    // The orders plugin dead-letters the malformed orders.
    let orders_config = config(dir.path(), &server.url(), &plugin("orders"), "orders.toml");
    let weir = InProcessWeir::start(&orders_config, &js, "ORDERS").await;
    publish_all(&js, "orders.in.new", &payloads).await;
    wait_for(
        "outputs and dead letters",
        Duration::from_secs(60),
        || async {
            stream_len(&js, "ORDERS_OUT").await >= 72 && stream_len(&js, "ORDERS_DLQ").await >= 4
        },
    )
    .await;
    weir.stop().await;

    let (ok, listing, stderr) = weir_cli(&["dlq", "list"], &orders_config);
    assert!(ok, "{stderr}");
    assert!(
        listing.starts_with("4 dead letters of pipeline \"orders\" in stream \"ORDERS_DLQ\""),
        "{listing}"
    );
    let rows: Vec<&str> = listing.lines().skip(2).collect();
    assert_eq!(rows.len(), 4, "{listing}");
    for row in &rows {
        assert!(
            row.contains("invalid-input")
                && row.contains("ORDERS#")
                && row.contains("not an order"),
            "{row}"
        );
    }
    let first_sequence = rows[0].split_whitespace().next().unwrap();

    let (ok, shown, stderr) = weir_cli(&["dlq", "show", first_sequence], &orders_config);
    assert!(ok, "{stderr}");
    assert!(shown.contains("kind:          invalid-input"), "{shown}");
    assert!(
        shown.contains("contract:      weir:transform/transformer@0.2.0"),
        "{shown}"
    );
    assert!(shown.contains("subject \"orders.in.new\""), "{shown}");
    assert!(
        shown.contains(std::str::from_utf8(malformed[0]).unwrap()),
        "{shown}"
    );

    let (ok, _, stderr) = weir_cli(&["dlq", "show", "999999"], &orders_config);
    assert!(!ok && stderr.contains("is not in stream"), "{stderr}");

    // "Fix" the plugin: the echo plugin accepts anything. Replay every dead letter.
    let fixed_config = config(dir.path(), &server.url(), &plugin("hostile"), "fixed.toml");
    let (ok, replayed, stderr) = weir_cli(&["dlq", "replay", "--all"], &fixed_config);
    assert!(ok, "{stderr}");
    assert!(
        replayed.contains("replayed 4 of 4 dead letters"),
        "{replayed}"
    );
    assert_eq!(
        stream_len(&js, "ORDERS_DLQ").await,
        0,
        "replayed entries leave the DLQ"
    );
    let (ok, replayed, _) = weir_cli(&["dlq", "replay", "--all"], &fixed_config);
    assert!(
        ok && replayed.contains("replayed 0 of 0"),
        "a second replay finds nothing: {replayed}"
    );

    let weir = InProcessWeir::start(&fixed_config, &js, "ORDERS").await;
    wait_for(
        "the replayed inputs' outputs",
        Duration::from_secs(60),
        || async { stream_len(&js, "ORDERS_OUT").await >= 76 },
    )
    .await;
    let stats = weir.stop_stats().await;
    assert_eq!(
        stats.executed, 4,
        "only the replayed inputs are new: {stats:?}"
    );

    let echoed: Vec<Vec<u8>> = read_stream(&js, "ORDERS_OUT")
        .await
        .into_iter()
        .filter(|m| m.subject == "orders.out.echo")
        .map(|m| m.payload)
        .collect();
    let mut expected: Vec<Vec<u8>> = malformed.into_iter().cloned().collect();
    let mut echoed_sorted = echoed.clone();
    expected.sort();
    echoed_sorted.sort();
    assert_eq!(
        echoed_sorted, expected,
        "each replayed input processed exactly once"
    );
    let inputs = read_stream(&js, "ORDERS").await;
    let replays = inputs
        .iter()
        .filter(|m| m.header("Weir-Replay-Of").is_some())
        .count();
    assert_eq!(replays, 4);
}

/// The orders pipeline's DLQ stream, made by the test so that it can hold letters weir did
/// not write.
async fn create_dlq_stream(js: &async_nats::jetstream::Context) {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDERS_DLQ".into(),
        subjects: vec!["orders.dlq".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}

/// A replay that had to skip entries says so and exits 1, as the README says (it once
/// exited 2, the code for a configuration that cannot work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_skipped_entries_exits_1() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    create_dlq_stream(&js).await;
    // Not a weir dead letter: no Weir-Input-Subject to replay it to.
    publish_all(&js, "orders.dlq", &[b"stray".to_vec()]).await;
    let config = config(dir.path(), &server.url(), &plugin("orders"), "orders.toml");
    let output = Command::new(weir_binary())
        .args(["dlq", "replay", "--all", "--config"])
        .arg(&config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 dead letters were skipped"), "{stderr}");
    assert_eq!(
        stream_len(&js, "ORDERS_DLQ").await,
        1,
        "a skipped entry stays"
    );
}

/// Whoever can publish on the DLQ subject controls what `weir dlq` prints: control
/// characters are escaped, so that a letter can neither forge lines nor drive the terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_show_escape_what_a_letter_carries() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    create_dlq_stream(&js).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Weir-Dlq-Kind", "trap\u{1b}[31m");
    headers.insert("Weir-Input-Subject", "orders.in.new");
    headers.insert("X-Note", "\u{1b}]0;owned\u{7}");
    js.publish_with_headers(
        "orders.dlq",
        headers,
        "{}\nERROR weir: store record corrupt\r\u{1b}[2J".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let config = config(dir.path(), &server.url(), &plugin("orders"), "orders.toml");
    for args in [&["dlq", "list"][..], &["dlq", "show", "1"][..]] {
        let (ok, printed, stderr) = weir_cli(args, &config);
        assert!(ok, "{stderr}");
        assert!(
            !printed.contains('\u{1b}') && !printed.contains('\r'),
            "{printed:?}"
        );
        assert!(
            printed.lines().all(|line| !line.starts_with("ERROR")),
            "{printed}"
        );
    }
}
