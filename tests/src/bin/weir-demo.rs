//! The demo pipeline, end to end: a local nats-server, the `weir` binary running the orders
//! plugin, orders published (1 in 50 malformed), and what came out.
//!
//! Usage: `weir-demo [COUNT]` (default 20000 orders). Run through scripts/demo.sh, which
//! builds the plugins and weir first.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weir_tests::*;

#[tokio::main]
async fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .map(|arg| arg.parse().expect("COUNT must be a number"))
        .unwrap_or(20_000);
    let malformed = count / 50;
    let server = NatsServer::start();
    println!("demo: nats-server with JetStream at {}", server.url());

    let dir = tempfile::tempdir().expect("a temp dir");
    let plugin = plugin("orders");
    let store_dir = dir.path().join("store");
    let config = dir.path().join("weir.toml");
    let toml = PipelineToml {
        consumer: "weir-orders",
        ..PipelineToml::orders(&server.url(), &plugin, &store_dir)
    }
    .render();
    // The admin port on a free port, so that the demo runs beside a weir already on 7464.
    let admin = format!("127.0.0.1:{}", free_port());
    let toml = format!("[admin]\nlisten = \"{admin}\"\n\n{toml}");
    std::fs::write(&config, &toml).expect("write weir.toml");
    println!(
        "demo: configuration ({})\n{}",
        config.display(),
        toml.trim()
    );

    let mut weir = Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("warn".into()),
        )
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start weir");
    let js = server.jetstream().await;
    wait_for(
        "weir to create the input stream",
        Duration::from_secs(60),
        || async { js.get_stream("ORDERS").await.is_ok() },
    )
    .await;

    let payloads = order_workload(count, 50);
    println!("demo: publishing {count} orders ({malformed} malformed) to orders.in.new");
    let started = Instant::now();
    for chunk in payloads.chunks(1000) {
        publish_all(&js, "orders.in.new", chunk).await;
    }
    let expected_outputs = 2 * (count - malformed) as u64;
    wait_for(
        "every order processed",
        Duration::from_secs(600),
        || async {
            stream_len(&js, "ORDERS_OUT").await >= expected_outputs
                && stream_len(&js, "ORDERS_DLQ").await >= malformed as u64
        },
    )
    .await;
    let elapsed = started.elapsed();
    println!(
        "\ndemo: weir status --admin {admin} (the status page is http://{admin}/ while weir runs)"
    );
    let shown = Command::new(weir_binary())
        .args(["status", "--admin", &admin])
        .status()
        .expect("run weir status");
    assert!(shown.success(), "weir status failed");
    let status = terminate(&mut weir);

    let outputs = read_stream(&js, "ORDERS_OUT").await;
    let dead = read_stream(&js, "ORDERS_DLQ").await;
    println!("\ndemo: first outputs:");
    for output in outputs.iter().take(4) {
        println!(
            "  {} [{}] {}",
            output.subject,
            output.msg_id.as_deref().unwrap_or("-"),
            String::from_utf8_lossy(&output.payload)
        );
    }
    if let Some(letter) = dead.first() {
        println!("demo: first dead letter:");
        println!(
            "  {} {}",
            letter.subject,
            String::from_utf8_lossy(&letter.payload)
        );
        for name in ["Weir-Dlq-Kind", "Weir-Dlq-Reason", "Weir-Input-Sequence"] {
            println!("    {name}: {}", letter.header(name).unwrap_or("-"));
        }
    }
    println!(
        "\ndemo: {count} inputs -> {} outputs + {} dead letters in {:.2} s: {:.0} inputs/s end to end (publish included)",
        outputs.len(),
        dead.len(),
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    println!("demo: weir stopped on SIGTERM with {status}");
    assert!(status.success(), "weir did not stop cleanly");
    assert_eq!(
        outputs.len() as u64,
        expected_outputs,
        "every order, exactly once"
    );
    assert_eq!(dead.len(), malformed, "every malformed order in the DLQ");
}
