//! Benchmarks that compare weir with a baseline measured in the same run, on the same server
//! and machine, and print ratios (absolute rates depend on the machine; the ratios are the
//! targets). Build the workspace and the plugins first (scripts/test.sh or scripts/demo.sh).
//!
//! - `weir-bench throughput [COUNT] [--sync-always] [--rounds N]`: COUNT messages (default
//!   100 000) of 256 B through (a) a bare async-nats pass-through and (b) `weir run` with an
//!   identity plugin, alternating for N rounds (default 3; the medians are the figures);
//!   then (c) `weir run` with the JSON orders plugin, (d) `weir run` in at-least-once mode
//!   with the identity plugin, the same ids delivered again (a redelivery storm), latency
//!   under a paced load, and the per-message sandbox cost. Each run prints the CPU time
//!   weir (or the pass-through) and nats-server spent per input.
//! - `weir-bench malformed [COUNT]`: COUNT orders (default 50 000), clean and with 1 %
//!   malformed inputs, alternating, twice each. Target: within 10 % of each other.
//! - `weir-bench sandbox`: a fresh instance and one call, in µs, for a trivial Rust
//!   transform, a JSON one and the Python plugin, with each component's size and compile time.
//! - `weir-bench fairness [COUNT]`: COUNT orders (default 2 000) through the orders pipeline
//!   of a `weir run`, once alone and once beside a pipeline whose plugin burns all its fuel
//!   on every input; prints both drain times and their ratio (each pipeline's share of
//!   `sandbox.threads` is what keeps it near 1).
//! - `weir-bench fenced [COUNT] [--sync-always] [--rounds N]`: COUNT messages (default
//!   100 000) through `weir run` exactly-once with its local store (l) and partitioned with
//!   `partitions = 1`, whose commits are atomic batches with a progress marker on the output
//!   stream and no local store (f), and with `partitions = 6` on the same host (p, the
//!   inputs spread over 64 keys), alternating for N rounds; then latency at 2 000 msgs/s of
//!   the first two.
//! - `weir-bench failover [--rounds N]`: a partitioned pipeline (`partitions = 1`, lease TTL
//!   3 s) on two hosts under 2 000 orders/s; N times (default 3) the holder is SIGKILLed and
//!   restarted. Per failover: the time until the partition makes progress on the other host,
//!   the inputs the dead holder had received and not committed (run again by the next, the
//!   work a failover costs), and those it had committed and not acked (acked by the next
//!   without running: what the fence saves). Then the verifier's verdict.
//! - `weir-bench replay [COUNT] [--rounds N]`: COUNT orders (default 50 000) through the live
//!   orders pipeline (l), then the same range again with `weir replay` to another prefix
//!   (r), each timed from its first delivery to its last ack, alternating for N rounds.
//! - `weir-bench swap [COUNT] [--rounds N]`: COUNT orders (default 50 000) through the
//!   orders pipeline without reloads (s), then with its plugin swapped every 250 ms through
//!   the admin port's `POST /reload` between two builds of it that differ only in a custom
//!   section (w), alternating for N rounds: what hot swaps cost the pipeline, how long a
//!   reload takes, and every output still stored once.
//! - `weir-bench store [COUNT]`: COUNT committed ids (default 10 000 000) in a dedup store,
//!   then the cost of looking ids up, and resident memory along the way.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage};
use futures::StreamExt;
use weir_tests::*;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args.first().map(String::as_str).unwrap_or("throughput");
    let count = |default: usize| -> usize {
        args.get(1)
            .filter(|a| !a.starts_with("--"))
            .map(|n| n.parse().expect("COUNT must be a number"))
            .unwrap_or(default)
    };
    let sync_always = args.iter().any(|a| a == "--sync-always");
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .map(|at| {
            args.get(at + 1)
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
                .expect("--rounds takes a number of at least 1")
        })
        .unwrap_or(3);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("weir-bench {scenario}: {cores} cores");
    match scenario {
        "throughput" => throughput(count(100_000), sync_always, rounds).await,
        "malformed" => malformed(count(50_000)).await,
        "store" => store_scale(count(10_000_000)),
        "fairness" => fairness(count(2_000)).await,
        "observability" => observability(count(100_000), rounds).await,
        "state" => state(count(50_000), rounds).await,
        "fenced" => fenced(count(100_000), sync_always, rounds).await,
        "failover" => failover(rounds).await,
        "replay" => replay(count(50_000), rounds).await,
        "swap" => swap(count(50_000), rounds).await,
        // Plugin calls block: off the async workers, as in the pipeline.
        "sandbox" => tokio::task::spawn_blocking(sandbox_overhead)
            .await
            .expect("the sandbox benchmark"),
        other => {
            eprintln!(
                "weir-bench: unknown scenario {other:?}; scenarios: throughput, malformed, store, sandbox, fairness, observability, state, fenced, failover, replay, swap"
            );
            std::process::exit(2);
        }
    }
}

/// The orders pipeline's drain time alone, then beside a plugin that spins on every input.
async fn fairness(count: usize) {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let orders = order_workload(count, 0);
    let alone = drain_beside(&server, &js, "A", &orders, false).await;
    println!(
        "  orders alone                   {count} orders drained in {:.2} s",
        alone.as_secs_f64()
    );
    let beside = drain_beside(&server, &js, "B", &orders, true).await;
    println!(
        "  orders beside a spinning plugin {count} orders drained in {:.2} s  ratio = {:.2}",
        beside.as_secs_f64(),
        beside.as_secs_f64() / alone.as_secs_f64()
    );
}

/// One `weir run` with the orders pipeline (and, with `spinning`, a pipeline whose every input
/// runs the hostile plugin out of fuel, busy before the orders arrive): how long the orders
/// take from their publication until their consumer has acked them all.
async fn drain_beside(
    server: &NatsServer,
    js: &jetstream::Context,
    tag: &str,
    orders: &[Vec<u8>],
    spinning: bool,
) -> Duration {
    let dir = tempfile::tempdir().expect("a temp dir");
    let url = server.url();
    let (orders_plugin, hostile_plugin) = (plugin("orders"), plugin("hostile"));
    let names = |kind: &str| {
        [
            format!("{kind}{tag}"),
            format!("{}{tag}", kind.to_uppercase()),
            format!("{kind}{tag}.>"),
            format!("{kind}out{tag}"),
            format!("{}OUT{tag}", kind.to_uppercase()),
            format!("{kind}dlq{tag}"),
            format!("{}DLQ{tag}", kind.to_uppercase()),
        ]
    };
    let render = |kind: &str, plugin: &std::path::Path| {
        let [
            name,
            stream,
            subject,
            prefix,
            output_stream,
            dlq,
            dlq_stream,
        ] = names(kind);
        let store_dir = dir.path().join(&name);
        PipelineToml {
            name: &name,
            stream: &stream,
            subject: &subject,
            consumer: "weir",
            output_prefix: &prefix,
            output_stream: &output_stream,
            dlq_subject: &dlq,
            dlq_stream: &dlq_stream,
            ..PipelineToml::orders(&url, plugin, &store_dir)
        }
        .render()
        .replace("ack_wait_ms = 2000", "ack_wait_ms = 30000")
    };
    for kind in ["orders", "spin"] {
        let [_, stream, subject, ..] = names(kind);
        js.create_stream(jetstream::stream::Config {
            name: stream,
            subjects: vec![subject],
            ..Default::default()
        })
        .await
        .expect("create an input stream");
    }
    let mut text = render("orders", &orders_plugin);
    if spinning {
        text = format!(
            "[sandbox]\nthreads = 2\n{}{text}",
            render("spin", &hostile_plugin)
        );
        let loops: Vec<Vec<u8>> = (0..4_000).map(|_| b"loop".to_vec()).collect();
        publish_all(js, &format!("spin{tag}.x"), &loops).await;
    } else {
        text = format!("[sandbox]\nthreads = 2\n{text}");
    }
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, ADMIN_OFF.to_owned() + &text).expect("write weir.toml");
    let mut weir = Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start weir");
    let spin_stream = format!("SPIN{tag}");
    if spinning {
        wait_for(
            "the spinning pipeline at work",
            Duration::from_secs(60),
            || async {
                let Ok(stream) = js.get_stream(&spin_stream).await else {
                    return false;
                };
                stream
                    .consumer_info("weir")
                    .await
                    .is_ok_and(|info| info.num_ack_pending > 0)
            },
        )
        .await;
    }
    let started = Instant::now();
    publish_all(js, &format!("orders{tag}.new"), orders).await;
    wait_until_drained(js, &format!("ORDERS{tag}"), "weir").await;
    let took = started.elapsed();
    let _ = weir.kill();
    let _ = weir.wait();
    took
}

/// 256-byte payloads the identity (echo) plugin passes through unchanged.
fn identity_payloads(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut payload = format!("message {i:010} ").into_bytes();
            payload.resize(256, b'.');
            payload
        })
        .collect()
}

async fn throughput(count: usize, sync_always: bool, rounds: usize) {
    let server = NatsServer::start_with_sync(sync_always);
    let js = server.jetstream().await;
    println!(
        "{count} messages per run, nats-server {}",
        if sync_always {
            "sync_interval: always"
        } else {
            "default sync"
        }
    );
    let identity = identity_payloads(count);
    let orders = order_workload(count, 0);

    // The machine's other work moves single runs by ±15 %: (a) and (b) alternate for a few
    // rounds, and the medians are the figures.
    let tags: Vec<(String, String)> = (1..=rounds)
        .map(|round| (format!("A{round}"), format!("B{round}")))
        .collect();
    let mut bare_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut last_identity_run = None;
    let mut fresh_rates = Vec::new();
    for (round, (bare_tag, weir_tag)) in tags.iter().enumerate() {
        let (bare, bare_cpu) = passthrough(&server, &js, bare_tag, &identity).await;
        let identity_run = WeirRun::new(&server, weir_tag, "hostile");
        let fresh = identity_run.process(&js, &identity, count, "weir").await;
        println!("  round {} of {rounds}", round + 1);
        println!("    (a) bare pass-through          {bare:>9.0} msgs/s");
        println!("        {bare_cpu}");
        println!(
            "    (b) weir exactly-once, identity {:>9.0} msgs/s  b/a = {:.2}  max RSS {} MiB",
            fresh.rate,
            fresh.rate / bare,
            fresh.peak_rss >> 20
        );
        println!(
            "        {}, start-up {:.0} ms (not timed)",
            fresh.cpu,
            fresh.start_up.as_secs_f64() * 1e3
        );
        bare_rates.push(bare);
        fresh_rates.push(fresh.rate);
        ratios.push(fresh.rate / bare);
        last_identity_run = Some((identity_run, fresh.rate));
    }
    let bare = median(&mut bare_rates);
    println!(
        "  (a) bare pass-through, median   {bare:>9.0} msgs/s\n  (b) weir exactly-once, median   {:>9.0} msgs/s  b/a = {:.2} (median of the rounds; target >= 0.8)",
        median(&mut fresh_rates),
        median(&mut ratios)
    );
    let (identity_run, fresh_rate) = last_identity_run.expect("at least one round");
    let orders_run = WeirRun::new(&server, "C", "orders");
    let json = orders_run.process(&js, &orders, 2 * count, "weir").await;
    println!(
        "  (c) weir exactly-once, JSON    {:>9.0} msgs/s  c/a = {:.2}  max RSS {} MiB",
        json.rate,
        json.rate / bare,
        json.peak_rss >> 20
    );
    println!("      {}", json.cpu);

    let mut cheap_run = WeirRun::new(&server, "D", "hostile");
    cheap_run.at_least_once = true;
    let cheap = cheap_run.process(&js, &identity, count, "weir").await;
    println!(
        "  (d) weir at-least-once, identity {:>9.0} msgs/s  d/a = {:.2}",
        cheap.rate,
        cheap.rate / bare
    );
    println!("      {}", cheap.cpu);

    // The same ids again, through a second consumer on the same store: every one is
    // already committed, so nothing runs and nothing is re-published.
    let storm = identity_run.process(&js, &[], count, "weir-storm").await;
    println!(
        "  redelivery storm (b's ids)     {:>9.0} msgs/s  storm/fresh = {:.2} (target >= 2)",
        storm.rate,
        storm.rate / fresh_rate
    );
    println!("      {}", storm.cpu);

    latency(&js, &WeirRun::new(&server, "L", "hostile"), "(b)").await;
    tokio::task::spawn_blocking(sandbox_overhead)
        .await
        .expect("the sandbox benchmark");
}

/// What observability costs: weir (exactly-once, identity plugin) with its admin port off
/// (a) and on, with /metrics scraped every second (b); then inputs that carry a 55-byte
/// header weir does not read (c) against the same inputs with it named `traceparent` (d),
/// which weir carries into every output as a child span: d/c is the cost of propagating a
/// trace, apart from the cost of an input's having headers at all. The runs alternate for
/// a few rounds and the medians are the figures.
async fn observability(count: usize, rounds: usize) {
    // The server's default sync: with fsyncs out of the way, weir's own CPU is what limits,
    // and what a metric or a span costs shows most.
    let server = NatsServer::start_with_sync(false);
    let js = server.jetstream().await;
    println!("{count} messages per run, identity plugin, exactly-once, nats-server default sync");
    let identity = identity_payloads(count);
    let tags: Vec<[String; 4]> = (1..=rounds)
        .map(|round| ["OA", "OB", "OC", "OD"].map(|tag| format!("{tag}{round}")))
        .collect();
    let (mut admin_ratios, mut trace_ratios) = (Vec::new(), Vec::new());
    for (round, [a_tag, b_tag, c_tag, d_tag]) in tags.iter().enumerate() {
        let a = WeirRun::new(&server, a_tag, "hostile")
            .process(&js, &identity, count, "weir")
            .await;

        let mut scraped = WeirRun::new(&server, b_tag, "hostile");
        let admin = format!("127.0.0.1:{}", free_port());
        scraped.admin = Some(admin.clone());
        // Prometheus scrapes every 15 s or so by default: every second is well above it.
        let scraper = tokio::spawn(async move {
            loop {
                // Before weir listens, and after it stops, there is nothing to scrape.
                let _ = weir_admin::fetch(&admin, "/metrics").await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let b = scraped.process(&js, &identity, count, "weir").await;
        scraper.abort();

        let mut headed = [(c_tag, "x-not-a-trace", None), (d_tag, "traceparent", None)];
        for (tag, header, timed) in &mut headed {
            let mut run = WeirRun::new(&server, tag, "hostile");
            run.trace_header = Some(header);
            *timed = Some(run.process(&js, &identity, count, "weir").await);
        }
        let [(_, _, Some(c)), (_, _, Some(d))] = headed else {
            unreachable!("both headed runs were timed")
        };
        println!("  round {} of {rounds}", round + 1);
        println!(
            "    (a) admin port off                 {:>9.0} msgs/s              {}",
            a.rate, a.cpu
        );
        println!(
            "    (b) admin port on, scraped 1/s     {:>9.0} msgs/s  b/a = {:.3}  {}",
            b.rate,
            b.rate / a.rate,
            b.cpu
        );
        println!(
            "    (c) inputs with a 55-byte header   {:>9.0} msgs/s              {}",
            c.rate, c.cpu
        );
        println!(
            "    (d) the same header as traceparent {:>9.0} msgs/s  d/c = {:.3}  {}",
            d.rate,
            d.rate / c.rate,
            d.cpu
        );
        admin_ratios.push(b.rate / a.rate);
        trace_ratios.push(d.rate / c.rate);
    }
    println!(
        "  medians: b/a = {:.3} (the admin port; target: within 0.02 of 1), d/c = {:.3} (trace propagation)",
        median(&mut admin_ratios),
        median(&mut trace_ratios)
    );
}

/// What state costs: the balances plugin with `[pipeline.state]` (s), against the same
/// inputs through the stateless identity plugin (b), both exactly-once, inputs spread over
/// 1 000 accounts. The runs alternate for a few rounds and the medians are the figures;
/// the store's growth per key is the stateful store's size on disk less the stateless
/// one's, per account.
/// What the fenced commit costs against the local one: the same identity workload through
/// an exactly-once pipeline with its RocksDB store (l), a partitioned one (f), and one of six
/// partitions on the same host (p).
async fn fenced(count: usize, sync_always: bool, rounds: usize) {
    let server = NatsServer::start_with_sync(sync_always);
    let js = server.jetstream().await;
    println!(
        "{count} messages per run, one output each, nats-server {}",
        if sync_always {
            "sync_interval: always"
        } else {
            "default sync"
        }
    );
    let payloads = identity_payloads(count);
    let (mut ratios, mut six_ratios) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (l_tag, f_tag, p_tag) = (
            format!("FL{round}"),
            format!("FF{round}"),
            format!("FP{round}"),
        );
        let local = WeirRun::new(&server, &l_tag, "hostile");
        let l = local.process(&js, &payloads, count, "weir").await;
        let mut fenced = WeirRun::new(&server, &f_tag, "hostile");
        fenced.partitions = Some(1);
        let f = fenced.process(&js, &payloads, count, "weir").await;
        let mut six = WeirRun::new(&server, &p_tag, "hostile");
        six.partitions = Some(6);
        let p = six.process(&js, &payloads, count, "weir").await;
        println!("  round {round} of {rounds}");
        println!(
            "    (l) local commit (RocksDB)   {:>9.0} msgs/s              {}",
            l.rate, l.cpu
        );
        println!(
            "    (f) fenced commit, 1 part.   {:>9.0} msgs/s  f/l = {:.3}  {}",
            f.rate,
            f.rate / l.rate,
            f.cpu
        );
        println!(
            "    (p) fenced commit, 6 parts.  {:>9.0} msgs/s  p/f = {:.3}  {}",
            p.rate,
            p.rate / f.rate,
            p.cpu
        );
        ratios.push(f.rate / l.rate);
        six_ratios.push(p.rate / f.rate);
    }
    println!(
        "  median f/l = {:.3} (the fenced commit's throughput against the local one)",
        median(&mut ratios)
    );
    println!(
        "  median p/f = {:.3} (six partitions on one host against one)",
        median(&mut six_ratios)
    );
    let local = WeirRun::new(&server, "LL", "hostile");
    latency(&js, &local, "(l) local commit").await;
    let mut fenced = WeirRun::new(&server, "LF", "hostile");
    fenced.partitions = Some(1);
    latency(&js, &fenced, "(f) fenced commit").await;
}

async fn failover(rounds: usize) {
    const TTL_SECS: u64 = 3;
    const RATE: u64 = 2000;
    let server = NatsServer::start_with_sync(false);
    let js = server.jetstream().await;
    create_orders_stream(&js, None).await;
    js.create_stream(jetstream::stream::Config {
        num_replicas: 1,
        ..weir_tests::cluster_chaos::partitioned_output_stream()
    })
    .await
    .expect("the output stream");
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("weir.toml");
    weir_tests::cluster_chaos::write_partitioned_orders_config(&config, &server.url(), 1, TTL_SECS);
    println!(
        "{rounds} failovers of a partitioned pipeline (1 partition, lease TTL {TTL_SECS} s) between two hosts under {RATE} orders/s, nats-server default sync"
    );
    let start = |name: &str| spawn_weir(&config, Some(&dir.path().join(name)), None);
    let mut hosts = [start("h0.log"), start("h1.log")];
    // Enough orders to keep arriving through every round.
    let seconds = 5 + rounds as u64 * (TTL_SECS + 6);
    let payloads = order_workload((RATE * seconds) as usize, 50);
    let publisher = publish_orders_spread(&js, &payloads, Duration::from_millis(50 * 1000 / RATE));
    let (mut times, mut redone, mut saved) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let holder_pid = loop {
            if let Some(pid) = weir_tests::cluster_chaos::lease_holder_pid(&js, "orders", 0).await {
                break pid;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let holder = hosts
            .iter()
            .position(|host| host.id() == holder_pid)
            .expect("one of the two hosts holds the lease");
        hosts[holder].kill().expect("SIGKILL the holder");
        let killed = Instant::now();
        hosts[holder].wait().expect("reap the holder");
        // What the dead holder had: every input delivered to it, and what its last marker
        // says is done.
        let stream = js.get_stream("ORDERS").await.expect("the input stream");
        let consumer = stream.consumer_info("weir").await.expect("the consumer");
        let (delivered, acked) = (
            consumer.delivered.stream_sequence,
            consumer.ack_floor.stream_sequence,
        );
        let marker = js
            .get_stream("ORDERS_OUT")
            .await
            .expect("the output stream")
            .get_last_raw_message_by_subject("_weir.progress.orders.0")
            .await
            .expect("the holder's last marker");
        let progress: serde_json::Value =
            serde_json::from_slice(&marker.payload).expect("a marker is JSON");
        let floor = progress["floor"].as_u64().expect("a floor");
        let done_above: std::collections::BTreeSet<u64> = progress["done_above"]
            .as_array()
            .expect("the inputs done above the floor")
            .iter()
            .map(|sequence| sequence.as_u64().expect("a sequence"))
            .collect();
        let received_not_committed = (floor + 1..=delivered)
            .filter(|sequence| !done_above.contains(sequence))
            .count();
        let committed_not_acked = floor.saturating_sub(acked) as usize
            + done_above.iter().filter(|&&s| s > acked).count();
        // Only the next holder can move the ack floor now.
        loop {
            let consumer = stream.consumer_info("weir").await.expect("the consumer");
            if consumer.ack_floor.stream_sequence > acked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = killed.elapsed();
        println!(
            "  failover {round}: progress after {:.2} s (lease TTL {TTL_SECS} s); run again: {received_not_committed} inputs delivered to it and not committed; acked without running: {committed_not_acked} committed and not acked",
            took.as_secs_f64()
        );
        times.push(took.as_secs_f64());
        redone.push(received_not_committed as f64);
        saved.push(committed_not_acked as f64);
        hosts[holder] = start(&format!("h{holder}-{round}.log"));
    }
    publisher.await.expect("the publisher finishes");
    let processed = tokio::time::timeout(Duration::from_secs(120), async {
        // One partition is consumed as configured: consumer `weir`.
        while !(drained(&js, "ORDERS", "weir").await
            && check_orders_in(&js, "ORDERS_OUT", "ORDERS_OUT", &payloads)
                .await
                .missing
                == 0)
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if processed.is_err() {
        println!(
            "  FAILED: not every order was processed within 120 s; the hosts' logs are in {}",
            dir.keep().display()
        );
        // `exit` drops nothing: the hosts are stopped here.
        for host in &mut hosts {
            terminate(host);
        }
        std::process::exit(1);
    }
    for host in &mut hosts {
        terminate(host);
    }
    let verdict = check_orders_in(&js, "ORDERS_OUT", "ORDERS_OUT", &payloads).await;
    println!(
        "  medians: failover {:.2} s (lease TTL {TTL_SECS} s), run again {:.0} inputs, acked without running {:.0}",
        median(&mut times),
        median(&mut redone),
        median(&mut saved)
    );
    println!(
        "  verdict: {} {}",
        if verdict.is_exact() {
            "EXACTLY-ONCE"
        } else {
            "FAILED"
        },
        verdict.counts()
    );
}

async fn replay(count: usize, rounds: usize) {
    let server = NatsServer::start_with_sync(false);
    let js = server.jetstream().await;
    println!("{count} orders per run, exactly-once, nats-server default sync");
    let payloads = order_workload(count, 50);
    let valid = payloads
        .iter()
        .filter(|p| serde_json::from_slice::<serde_json::Value>(p).is_ok())
        .count();
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let tag = format!("RP{round}");
        let live = WeirRun::new(&server, &tag, "orders");
        let l = live.process(&js, &payloads, 2 * valid, "weir").await;
        // The live run's configuration, replayed whole to another prefix.
        let config = live.dir.path().join("weir.toml");
        let name = format!("bench{round}");
        let spawned = Instant::now();
        let mut replaying = Command::new(weir_binary())
            .args(["replay", "--config"])
            .arg(&config)
            .args(["--from-seq", "1", "--name", &name])
            .args(["--output-prefix", &format!("rep{tag}")])
            .args(["--output-stream", &format!("REP{tag}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start weir replay");
        let stream = js
            .get_stream(format!("IN{tag}"))
            .await
            .expect("the input stream");
        let consumer = format!("weir-replay-{name}");
        let progress = || async {
            let info = stream.consumer_info(&consumer).await.ok()?;
            Some((
                info.delivered.stream_sequence,
                info.ack_floor.stream_sequence,
            ))
        };
        while progress().await.is_none_or(|(delivered, _)| delivered == 0) {
            assert!(
                spawned.elapsed() < Duration::from_secs(60),
                "weir replay took a minute to start"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let started = Instant::now();
        while progress()
            .await
            .is_none_or(|(_, acked)| acked < payloads.len() as u64)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = payloads.len() as f64 / started.elapsed().as_secs_f64();
        let status = replaying.wait().expect("weir replay ends");
        assert!(status.success(), "weir replay failed: {status}");
        assert_eq!(
            stream_len(&js, &format!("REP{tag}")).await,
            2 * valid as u64,
            "every output of the replay stored once"
        );
        println!("  round {round} of {rounds}");
        println!("    (l) live pipeline   {:>9.0} inputs/s", l.rate);
        println!(
            "    (r) weir replay     {r:>9.0} inputs/s  r/l = {:.3}",
            r / l.rate
        );
        ratios.push(r / l.rate);
    }
    println!(
        "  median r/l = {:.3} (a replay's speed against the live pipeline's)",
        median(&mut ratios)
    );
}

async fn swap(count: usize, rounds: usize) {
    const SWAP_EVERY: Duration = Duration::from_millis(250);
    let server = NatsServer::start_with_sync(false);
    let js = server.jetstream().await;
    println!(
        "{count} orders per run, exactly-once, nats-server default sync, a swap every {SWAP_EVERY:?} in (w)"
    );
    let payloads = order_workload(count, 50);
    let valid = payloads
        .iter()
        .filter(|p| serde_json::from_slice::<serde_json::Value>(p).is_ok())
        .count();
    let (mut ratios, mut reloads) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (steady_tag, swapped_tag) = (format!("SW{round}S"), format!("SW{round}W"));
        let steady = WeirRun::new(&server, &steady_tag, "orders");
        let s = steady.process(&js, &payloads, 2 * valid, "weir").await;
        let mut swapped = WeirRun::new(&server, &swapped_tag, "orders");
        let admin = format!("127.0.0.1:{}", free_port());
        swapped.admin = Some(admin.clone());
        // Two builds of one plugin: the same code, another sha256.
        let original = std::fs::read(plugin("orders")).expect("the orders plugin");
        let builds = [original.clone(), with_custom_section(original)];
        let plugin_file = swapped.dir.path().join("plugin.wasm");
        std::fs::write(&plugin_file, &builds[0]).expect("write the plugin file");
        swapped.plugin = plugin_file.clone();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = tokio::spawn({
            let done = done.clone();
            async move {
                let (mut current, mut took) = (0, Vec::new());
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(SWAP_EVERY).await;
                    std::fs::write(&plugin_file, &builds[1 - current]).expect("swap the file");
                    let asked = Instant::now();
                    let answer =
                        weir_admin::post(&admin, "/reload", Duration::from_secs(120)).await;
                    match answer {
                        Ok((200, body)) if body.contains("\"swapped\"") => {
                            took.push(asked.elapsed().as_secs_f64() * 1000.0);
                            current = 1 - current;
                        }
                        // Not started yet, or stopping: the file goes back.
                        _ => std::fs::write(&plugin_file, &builds[current])
                            .expect("restore the file"),
                    }
                }
                took
            }
        });
        let w = swapped.process(&js, &payloads, 2 * valid, "weir").await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut took = swapper.await.expect("the swapper");
        assert!(!took.is_empty(), "no swap landed while the pipeline ran");
        assert_eq!(
            stream_len(&js, &format!("OUT{swapped_tag}")).await,
            2 * valid as u64,
            "every output stored once across the swaps"
        );
        println!("  round {round} of {rounds}");
        println!("    (s) no reloads      {:>9.0} inputs/s", s.rate);
        println!(
            "    (w) {:>3} swaps      {:>9.0} inputs/s  w/s = {:.3}; a reload took {:.0} ms median, {:.0} ms at most",
            took.len(),
            w.rate,
            w.rate / s.rate,
            median(&mut took),
            took.iter().copied().fold(0.0, f64::max)
        );
        ratios.push(w.rate / s.rate);
        reloads.extend(took);
    }
    println!(
        "  median w/s = {:.3} (throughput with a swap every {SWAP_EVERY:?} against none); median reload {:.0} ms over {} swaps",
        median(&mut ratios),
        median(&mut reloads),
        reloads.len()
    );
}

/// `component` with a custom section appended: the same plugin to weir, another sha256.
fn with_custom_section(mut component: Vec<u8>) -> Vec<u8> {
    let name = b"weir-bench";
    let data = b"another build";
    let size = 1 + name.len() + data.len();
    assert!(size < 128 && name.len() < 128, "one-byte LEB128 lengths");
    component.extend([0, size as u8, name.len() as u8]);
    component.extend(name);
    component.extend(data);
    component
}

async fn state(count: usize, rounds: usize) {
    const ACCOUNTS: usize = 1000;
    let server = NatsServer::start_with_sync(false);
    let js = server.jetstream().await;
    println!(
        "{count} transactions per run over {ACCOUNTS} accounts, exactly-once, nats-server default sync"
    );
    let payloads: Vec<Vec<u8>> = (0..count)
        .map(|i| format!("+{}", i % 97 + 1).into_bytes())
        .collect();
    let (mut ratios, mut growths) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (b_tag, s_tag) = (format!("SB{round}"), format!("SS{round}"));
        let mut stateless = WeirRun::new(&server, &b_tag, "hostile");
        stateless.accounts = Some(ACCOUNTS);
        let b = stateless.process(&js, &payloads, count, "weir").await;
        let mut stateful = WeirRun::new(&server, &s_tag, "balances");
        stateful.accounts = Some(ACCOUNTS);
        stateful.stateful = true;
        let s = stateful.process(&js, &payloads, count, "weir").await;
        let size =
            |run: &WeirRun| weir_store::directory_bytes(&run.dir.path().join("store")) as f64;
        let growth = (size(&stateful) - size(&stateless)) / ACCOUNTS as f64;
        println!("  round {round} of {rounds}");
        println!(
            "    (b) stateless identity   {:>9.0} msgs/s              {}",
            b.rate, b.cpu
        );
        println!(
            "    (s) stateful balances    {:>9.0} msgs/s  s/b = {:.3}  {}",
            s.rate,
            s.rate / b.rate,
            s.cpu
        );
        println!("        store: {growth:+.0} bytes per account against (b)'s");
        ratios.push(s.rate / b.rate);
        growths.push(growth);
    }
    println!(
        "  medians: s/b = {:.3} (what state costs per input), store growth {:+.0} bytes per account",
        median(&mut ratios),
        median(&mut growths)
    );
}

/// The baseline: fetch → publish with Nats-Msg-Id → await PublishAcks → double ack, in
/// batches like weir's, and nothing else.
async fn passthrough(
    server: &NatsServer,
    js: &jetstream::Context,
    tag: &str,
    payloads: &[Vec<u8>],
) -> (f64, CpuUse) {
    let (input, output) = (format!("IN{tag}"), format!("OUT{tag}"));
    for (stream, subject) in [
        (&input, format!("in{tag}.>")),
        (&output, format!("out{tag}.>")),
    ] {
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject],
            ..Default::default()
        })
        .await
        .expect("create a stream");
    }
    for chunk in payloads.chunks(1000) {
        publish_all(js, &format!("in{tag}.x"), chunk).await;
    }
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(&input)
        .await
        .expect("the input stream")
        .create_consumer(pull::Config {
            durable_name: Some("bare".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .expect("pull");
    let started = Instant::now();
    let (own_cpu, server_cpu) = (cpu_seconds(std::process::id()), cpu_seconds(server.pid()));
    let mut done = 0;
    while done < payloads.len() {
        let first = messages.next().await.expect("more").expect("a message");
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(5);
        while batch.len() < 256 {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(message))) => batch.push(message),
                _ => break,
            }
        }
        let mut acks = Vec::with_capacity(batch.len());
        for message in &batch {
            let sequence = message.info().expect("metadata").stream_sequence;
            let publish = PublishMessage::build()
                .message_id(format!("bare:{sequence}"))
                .payload(message.payload.clone());
            acks.push(
                js.send_publish(format!("out{tag}.x"), publish)
                    .await
                    .expect("publish"),
            );
        }
        for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
            ack.expect("publish acknowledged");
        }
        for ack in futures::future::join_all(batch.iter().map(|m| m.double_ack())).await {
            ack.expect("ack confirmed");
        }
        done += batch.len();
    }
    let rate = payloads.len() as f64 / started.elapsed().as_secs_f64();
    let cpu = CpuUse {
        consumer: cpu_seconds(std::process::id()) - own_cpu,
        server: cpu_seconds(server.pid()) - server_cpu,
        messages: payloads.len(),
    };
    (rate, cpu)
}

/// A `weir run` process on its own streams and store.
struct WeirRun<'a> {
    server: &'a NatsServer,
    tag: &'a str,
    plugin: std::path::PathBuf,
    dir: tempfile::TempDir,
    /// Run in `at-least-once` mode instead of the default exactly-once.
    at_least_once: bool,
    /// The admin port's address; off when `None`.
    admin: Option<String>,
    /// Publish every input with a W3C traceparent value in this header.
    trace_header: Option<&'static str>,
    /// Publish input `i` on `in<tag>.acct-<i mod accounts>` instead of one subject, and
    /// give the pipeline `[pipeline.state] key = "subject-token:2"` (the account).
    accounts: Option<usize>,
    stateful: bool,
    /// Run partitioned with this many partitions: fenced commits on the output stream, no
    /// store. With more than one, inputs are published over 64 keys (`in<tag>.k<i>`).
    partitions: Option<u32>,
}

impl<'a> WeirRun<'a> {
    fn new(server: &'a NatsServer, tag: &'a str, plugin_name: &str) -> Self {
        WeirRun {
            server,
            tag,
            plugin: plugin(plugin_name),
            dir: tempfile::tempdir().expect("a temp dir"),
            at_least_once: false,
            admin: None,
            trace_header: None,
            accounts: None,
            stateful: false,
            partitions: None,
        }
    }

    fn start(&self, consumer: &str) -> Child {
        let tag = self.tag;
        let url = self.server.url();
        let store_dir = self.dir.path().join("store");
        let (stream, subject) = (format!("IN{tag}"), format!("in{tag}.>"));
        let (prefix, output_stream) = (format!("out{tag}"), format!("OUT{tag}"));
        let (dlq, dlq_stream) = (format!("dlq{tag}"), format!("DLQ{tag}"));
        // Partitioned runs on one server need marker subjects of their own.
        let name = match self.partitions {
            Some(_) => format!("orders{tag}"),
            None => "orders".to_owned(),
        };
        let subject = match self.partitions {
            Some(2..) => format!("in{tag}.*"),
            _ => subject,
        };
        let text = PipelineToml {
            name: &name,
            stream: &stream,
            subject: &subject,
            consumer,
            output_prefix: &prefix,
            output_stream: &output_stream,
            dlq_subject: &dlq,
            dlq_stream: &dlq_stream,
            partitions: self.partitions,
            ..PipelineToml::orders(&url, &self.plugin, &store_dir)
        }
        .render()
        .replace("ack_wait_ms = 2000", "ack_wait_ms = 30000");
        let text = match self.partitions {
            Some(n @ 2..) => text.replace(
                &format!("partitions = {n}"),
                &format!("partitions = {n}\npartition_key = \"subject-token:2\""),
            ),
            _ => text,
        };
        let text = if self.stateful {
            text + "\n[pipeline.state]\nkey = \"subject-token:2\"\n"
        } else {
            text
        };
        let text = if self.at_least_once {
            let store_line = text
                .lines()
                .find(|l| l.starts_with("store_dir"))
                .expect("a store");
            text.replace(store_line, "mode = \"at-least-once\"")
        } else {
            text
        };
        let config = self.dir.path().join(format!("{consumer}.toml"));
        let admin = match &self.admin {
            Some(address) => format!("[admin]\nlisten = \"{address}\"\n"),
            None => ADMIN_OFF.to_owned(),
        };
        std::fs::write(&config, admin + &text).expect("write weir.toml");
        Command::new(weir_binary())
            .args(["run", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_BENCH_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("start weir")
    }

    /// Publishes `payloads` (untimed), then times a weir process with `consumer` from its
    /// first delivery until the input consumer has acked `payloads.len()` (or, for a run
    /// over already-published inputs, every input).
    async fn process(
        &self,
        js: &jetstream::Context,
        payloads: &[Vec<u8>],
        expected_outputs: usize,
        consumer: &str,
    ) -> Timed {
        let tag = self.tag;
        let input = format!("IN{tag}");
        let partitions = self.partitions.filter(|&n| n > 1);
        if !payloads.is_empty() {
            js.create_stream(jetstream::stream::Config {
                name: input.clone(),
                subjects: vec![match partitions {
                    Some(_) => format!("in{tag}.*"),
                    None => format!("in{tag}.>"),
                }],
                subject_transform: partitions.map(|n| jetstream::stream::SubjectTransform {
                    source: format!("in{tag}.*"),
                    destination: format!("{{{{partition({n},1)}}}}.in{tag}.{{{{wildcard(1)}}}}"),
                }),
                ..Default::default()
            })
            .await
            .expect("create the input stream");
            for (at, chunk) in payloads.chunks(1000).enumerate() {
                if partitions.is_some() {
                    for (i, keyed) in chunk.chunks(50).enumerate() {
                        let key = (at * 20 + i) % 64;
                        publish_all(js, &format!("in{tag}.k{key}"), keyed).await;
                    }
                } else if let Some(accounts) = self.accounts {
                    let mut acks = Vec::with_capacity(chunk.len());
                    for (i, payload) in chunk.iter().enumerate() {
                        let account = (at * 1000 + i) % accounts;
                        let subject = format!("in{tag}.acct-{account}");
                        let ack = js.publish(subject, payload.clone().into()).await;
                        acks.push(ack.expect("publish an input"));
                    }
                    for ack in acks {
                        ack.await.expect("input acknowledged by JetStream");
                    }
                } else if let Some(header) = self.trace_header {
                    publish_traced(js, &format!("in{tag}.x"), chunk, at, header).await;
                } else {
                    publish_all(js, &format!("in{tag}.x"), chunk).await;
                }
            }
        }
        let inputs = stream_len(js, &input).await;
        let spawned = Instant::now();
        let mut weir = self.start(consumer);
        // The clock starts at the first delivery, as the pass-through's starts at its first
        // pull: start-up (loading the plugin, opening the store) is reported apart.
        let stream = js.get_stream(&input).await.expect("the input stream");
        // Several partitions: one consumer each, over interleaved stream sequences.
        let consumers: Vec<String> = match partitions {
            Some(n) => (0..n).map(|p| format!("{consumer}-p{p}")).collect(),
            None => vec![consumer.to_owned()],
        };
        // Whether any input was delivered, and whether every one is acked.
        let consumer_progress = || async {
            let (mut delivered, mut all_acked) = (false, true);
            for name in &consumers {
                let info = stream.consumer_info(name).await.ok()?;
                delivered |= info.delivered.stream_sequence > 0;
                all_acked &= match partitions {
                    Some(_) => info.num_pending == 0 && info.num_ack_pending == 0,
                    None => info.ack_floor.stream_sequence >= inputs,
                };
            }
            Some((delivered, all_acked))
        };
        loop {
            if consumer_progress()
                .await
                .is_some_and(|(delivered, _)| delivered)
            {
                break;
            }
            assert!(
                spawned.elapsed() < Duration::from_secs(60),
                "weir took a minute to start"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let started = Instant::now();
        let (weir_cpu, server_cpu) = (cpu_seconds(weir.id()), cpu_seconds(self.server.pid()));
        while consumer_progress()
            .await
            .is_none_or(|(_, all_acked)| !all_acked)
        {
            // Often enough to time the end within 0.5 % of a run, rarely enough to cost the
            // server next to nothing.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let elapsed = started.elapsed();
        let peak_rss = memory(weir.id(), "VmHWM");
        let cpu = CpuUse {
            consumer: cpu_seconds(weir.id()) - weir_cpu,
            server: cpu_seconds(self.server.pid()) - server_cpu,
            messages: inputs as usize,
        };
        stop(&mut weir);
        assert!(
            stream_len(js, &format!("OUT{tag}")).await >= expected_outputs as u64,
            "every output stored"
        );
        Timed {
            rate: inputs as f64 / elapsed.as_secs_f64(),
            start_up: started - spawned,
            peak_rss,
            cpu,
        }
    }
}

/// Publishes `payloads`, each with a traceparent of its own trace in `header`, and awaits
/// the acks.
async fn publish_traced(
    js: &jetstream::Context,
    subject: &str,
    payloads: &[Vec<u8>],
    chunk: usize,
    header: &str,
) {
    let mut acks = Vec::with_capacity(payloads.len());
    for (index, payload) in payloads.iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        let traceparent = format!(
            "00-{:032x}-{:016x}-01",
            (chunk << 20) + index + 1,
            index + 1
        );
        headers.insert(header, traceparent.as_str());
        let ack = js
            .publish_with_headers(subject.to_owned(), headers, payload.clone().into())
            .await
            .expect("publish a traced input");
        acks.push(ack);
    }
    for ack in acks {
        ack.await.expect("the input stream stores it");
    }
}

/// What one timed weir run measured.
struct Timed {
    /// Inputs per second from the first delivery to the last ack.
    rate: f64,
    /// From spawning weir to its first delivery.
    start_up: Duration,
    peak_rss: u64,
    cpu: CpuUse,
}

/// The middle value (the upper one of an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// CPU time (user + system) a process has used so far, in seconds, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces:
    // utime and stime are the 12th and 13th of them.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / per_second
}

/// Where the CPU went during one timed run: the consuming process and nats-server.
struct CpuUse {
    consumer: f64,
    server: f64,
    messages: usize,
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_message = |seconds: f64| seconds * 1e6 / self.messages.max(1) as f64;
        write!(
            f,
            "CPU per input: consumer {:.1} µs, nats-server {:.1} µs",
            per_message(self.consumer),
            per_message(self.server)
        )
    }
}

/// A memory figure of a process from /proc (`VmHWM` peak, `VmRSS` current), in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|rest| {
                    rest.trim_start_matches(':')
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib * 1024)
}

fn stop(weir: &mut Child) {
    let status = terminate(weir);
    assert!(status.success(), "weir stops cleanly on SIGTERM");
}

/// End-to-end latency (input stored → output stored, both by the server's clock) with
/// inputs published at a steady 2 000/s for 5 s through `run`, labelled `label`.
async fn latency(js: &jetstream::Context, run: &WeirRun<'_>, label: &str) {
    let tag = run.tag;
    let (input, subject, output) = (
        format!("IN{tag}"),
        format!("in{tag}.x"),
        format!("OUT{tag}"),
    );
    js.create_stream(jetstream::stream::Config {
        name: input.clone(),
        subjects: vec![format!("in{tag}.>")],
        ..Default::default()
    })
    .await
    .expect("create the input stream");
    let mut weir = run.start("weir");
    wait_for("weir to be ready", Duration::from_secs(60), || async {
        match js.get_stream(&input).await {
            Ok(stream) => stream.consumer_info("weir").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    let payloads = identity_payloads(10_000);
    let pace = Duration::from_millis(50);
    let mut tick = tokio::time::interval(pace);
    for chunk in payloads.chunks(100) {
        tick.tick().await;
        publish_all(js, &subject, chunk).await;
    }
    // A partitioned pipeline's output stream also holds its progress markers.
    let outputs = || async {
        let prefix = format!("out{tag}.");
        let stored = read_stream(js, &output).await;
        stored
            .into_iter()
            .filter(|message| message.subject.starts_with(&prefix))
            .collect::<Vec<_>>()
    };
    wait_for("every output", Duration::from_secs(120), || async {
        outputs().await.len() >= payloads.len()
    })
    .await;
    stop(&mut weir);
    let inputs = read_stream(js, &input).await;
    let mut latencies: Vec<i128> = outputs()
        .await
        .iter()
        .map(|output| {
            let id = output.msg_id.as_deref().expect("an output id");
            let sequence: usize = id
                .rsplit('#')
                .next()
                .and_then(|rest| rest.split(':').next())
                .and_then(|s| s.parse().ok())
                .expect("the output id names the input sequence");
            output.stored_unix_ns - inputs[sequence - 1].stored_unix_ns
        })
        .collect();
    latencies.sort_unstable();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1e6;
    println!(
        "  latency at 2 000 msgs/s {label:<20} p50 {:.1} ms  p99 {:.1} ms",
        percentile(0.5),
        percentile(0.99)
    );
}

/// A fresh instance and one call per message, in this process: a trivial Rust transform,
/// a JSON one, and the Python plugin (CPython in the component) with its deterministic WASI.
fn sandbox_overhead() {
    let sandbox = weir_sandbox::Sandbox::new(
        &weir_sandbox::SandboxConfig::default(),
        64 << 20,
        weir_sandbox::Compiler::InThisProcess,
    )
    .expect("an engine");
    let cases: [(&str, &str, &[u8], usize); 3] = [
        ("Rust, echo", "hostile", &[b'.'; 256], 20_000),
        (
            "Rust, JSON orders",
            "orders",
            br#"{"id":"o-1","customer":"c-7","items":[{"sku":"A","qty":2,"price_cents":150}]}"#,
            20_000,
        ),
        (
            "Python, JSON stamp",
            "stamp-py",
            br#"{"user":"ada","plan":"pro"}"#,
            1_000,
        ),
    ];
    let mut echo_us = None;
    for (label, name, payload, runs) in cases {
        let path = plugin(name);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        let loaded = sandbox
            .load(&path, &weir_sandbox::LimitsConfig::default())
            .expect("a plugin weir runs");
        let load_s = started.elapsed().as_secs_f64();
        let input = weir_core::plugin::TransformInput {
            subject: "in.x".into(),
            headers: vec![],
            payload: payload.to_vec(),
            stream_sequence: 1,
            data_time_unix_ns: 0,
            dedup_key: "k".into(),
            seed: 0,
        };
        for _ in 0..runs / 20 {
            loaded.run(input.clone());
        }
        let started = Instant::now();
        for _ in 0..runs {
            loaded.run(input.clone());
        }
        let per_message_us = started.elapsed().as_secs_f64() * 1e6 / runs as f64;
        let versus = echo_us.map_or(String::new(), |echo: f64| {
            format!("  ({:.0}x the echo)", per_message_us / echo)
        });
        echo_us.get_or_insert(per_message_us);
        println!(
            "  sandbox: {label:<19} {:>9.1} KiB  compile {load_s:>6.2} s  fresh instance + call {per_message_us:>9.1} µs{versus}",
            size as f64 / 1024.0
        );
    }
}

async fn malformed(count: usize) {
    // JetStream's default sync: this measures weir, not the server's fsyncs.
    let server = NatsServer::start_with_sync(false);
    let js = server.jetstream().await;
    println!("{count} orders per run, nats-server default sync");
    let clean = order_workload(count, 0);
    let one_percent = order_workload(count, 100);
    let (mut clean_rates, mut malformed_rates) = (Vec::new(), Vec::new());
    for round in 0..2 {
        for (label, payloads) in [("clean", &clean), ("1% malformed", &one_percent)] {
            let tag = format!("R{round}{}", label.len());
            let run = WeirRun::new(&server, &tag, "orders");
            let valid = payloads
                .iter()
                .filter(|p| serde_json::from_slice::<serde_json::Value>(p).is_ok())
                .count();
            let rate = run.process(&js, payloads, 2 * valid, "weir").await.rate;
            println!("  round {round}  {label:<13} {rate:>9.0} inputs/s");
            if label == "clean" {
                clean_rates.push(rate);
            } else {
                malformed_rates.push(rate);
            }
        }
    }
    let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    let ratio = mean(&malformed_rates) / mean(&clean_rates);
    println!(
        "malformed/clean throughput: {ratio:.3} (target >= 0.90): {}",
        if ratio >= 0.9 { "met" } else { "NOT met" }
    );
}

/// Commits `count` ids to a dedup store in batches, then times lookups of present and
/// absent ids; prints resident memory as the store grows.
fn store_scale(count: usize) {
    use weir_core::record::{Disposition, DoneRecord, Lineage, OutboundMessage};
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = weir_store::Store::open(
        dir.path(),
        weir_store::StoreSettings {
            retention: Duration::from_secs(7 * 24 * 3600),
            cache_bytes: 64 << 20,
        },
    )
    .expect("a store");
    let record = DoneRecord {
        disposition: Disposition::Transformed,
        messages: vec![OutboundMessage {
            subject: "out.echo".into(),
            msg_id: "bench:IN@0#0:0".into(),
            headers: vec![],
            payload: vec![b'.'; 64],
        }],
        lineage: Some(Lineage {
            sha256: "ab".repeat(32),
            contract: "weir:transform/transformer@0.2.0".into(),
        }),
    };
    let key = |i: usize| format!("IN@1795600000000000000#{i}");
    let batch_size = 10_000;
    let started = Instant::now();
    let mut next_report = count / 10;
    for start in (0..count).step_by(batch_size) {
        let keys: Vec<String> = (start..(start + batch_size).min(count)).map(key).collect();
        let records: Vec<(&str, &DoneRecord)> =
            keys.iter().map(|k| (k.as_str(), &record)).collect();
        store.commit(&records, &[]).expect("commit");
        store
            .clear_outbox(&keys.iter().map(String::as_str).collect::<Vec<_>>())
            .expect("clear the outbox");
        if start + batch_size >= next_report {
            println!(
                "  {:>10} ids committed, {:>8.0} ids/s, RSS {} MiB: {}",
                start + batch_size,
                (start + batch_size) as f64 / started.elapsed().as_secs_f64(),
                memory(std::process::id(), "VmRSS") >> 20,
                store.memory_report()
            );
            next_report += count / 10;
        }
    }
    let lookups = 100_000;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut random = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (label, offset) in [("present", 0usize), ("absent", count)] {
        let keys: Vec<String> = (0..lookups)
            .map(|_| key(offset + (random() as usize % count)))
            .collect();
        let started = Instant::now();
        for chunk in keys.chunks(256) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            store.lookup(&refs).expect("lookup");
        }
        println!(
            "  lookup of {label} ids: {:.2} µs per id (batches of 256), RSS {} MiB",
            started.elapsed().as_secs_f64() * 1e6 / lookups as f64,
            memory(std::process::id(), "VmRSS") >> 20
        );
    }
}
