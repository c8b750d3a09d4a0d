//! Benchmarks that compare weir with itself in one run, on one server and machine, and
//! print ratios (absolute rates depend on the machine; the ratios are the targets).
//!
//! `weir-bench malformed [COUNT]`: COUNT orders (default 50 000) through the orders
//! pipeline, clean and with 1 % malformed (dead-lettered) inputs, alternating, twice each.
//! Target: the malformed run within 10 % of the clean one.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weir_tests::*;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| "malformed".into());
    let count: usize = args
        .next()
        .map(|n| n.parse().expect("COUNT must be a number"))
        .unwrap_or(50_000);
    match scenario.as_str() {
        "malformed" => malformed(count).await,
        other => {
            eprintln!("weir-bench: unknown scenario {other:?}; scenarios: malformed");
            std::process::exit(2);
        }
    }
}

async fn malformed(count: usize) {
    // JetStream's default sync: this measures weir, not the server's fsyncs.
    let server = NatsServer::start_with_sync(false);
    let js = server.jetstream().await;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "weir-bench malformed: {count} orders per run, {cores} cores, nats-server default sync"
    );
    let clean = order_workload(count, 0);
    let one_percent = order_workload(count, 100);
    let mut rates = (Vec::new(), Vec::new());
    for round in 0..2 {
        for (label, payloads) in [("clean", &clean), ("1% malformed", &one_percent)] {
            let rate = run_once(&server, &js, &format!("R{round}{}", label.len()), payloads).await;
            println!("  round {round}  {label:<13} {rate:>9.0} inputs/s");
            if label == "clean" {
                rates.0.push(rate);
            } else {
                rates.1.push(rate);
            }
        }
    }
    let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    let ratio = mean(&rates.1) / mean(&rates.0);
    println!(
        "malformed/clean throughput: {ratio:.3} (target >= 0.90): {}",
        if ratio >= 0.9 { "met" } else { "NOT met" }
    );
}

/// Publishes every payload first, then times weir from start to the last output.
async fn run_once(
    server: &NatsServer,
    js: &async_nats::jetstream::Context,
    tag: &str,
    payloads: &[Vec<u8>],
) -> f64 {
    let dir = tempfile::tempdir().expect("a temp dir");
    let stream = format!("IN{tag}");
    let subject = format!("in{tag}.>");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![subject.clone()],
        ..Default::default()
    })
    .await
    .expect("create the input stream");
    for chunk in payloads.chunks(1000) {
        publish_all(js, &format!("in{tag}.new"), chunk).await;
    }
    let plugin = plugin("orders");
    let store_dir = dir.path().join("store");
    let (out_stream, dlq_stream) = (format!("OUT{tag}"), format!("DLQ{tag}"));
    let text = PipelineToml {
        name: "bench",
        stream: &stream,
        subject: &subject,
        output_prefix: &format!("out{tag}"),
        output_stream: &out_stream,
        dlq_subject: &format!("dlq{tag}"),
        dlq_stream: &dlq_stream,
        ..PipelineToml::orders(&server.url(), &plugin, &store_dir)
    }
    .render()
    .replace("ack_wait_ms = 2000", "ack_wait_ms = 30000");
    let config_path = dir.path().join("weir.toml");
    std::fs::write(&config_path, text).expect("write weir.toml");
    let config = weir::Config::load(&config_path).expect("a valid config");

    let malformed = payloads
        .iter()
        .filter(|p| serde_json::from_slice::<serde_json::Value>(p).is_err())
        .count() as u64;
    let expected_outputs = 2 * (payloads.len() as u64 - malformed);
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(weir::run(config, shutdown.clone()));
    wait_for(
        "every input processed",
        Duration::from_secs(1800),
        || async {
            stream_len(js, &out_stream).await >= expected_outputs
                && stream_len(js, &dlq_stream).await >= malformed
        },
    )
    .await;
    let elapsed = started.elapsed();
    shutdown.cancel();
    running
        .await
        .expect("weir task")
        .expect("weir runs cleanly");
    payloads.len() as f64 / elapsed.as_secs_f64()
}
