//! Orders flow through a real pipeline: every output exactly once, by content; malformed
//! inputs in the DLQ with their coordinates; a committed input arriving again does not run
//! the plugin.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use weir_tests::*;

struct Setup {
    server: NatsServer,
    dir: tempfile::TempDir,
}

impl Setup {
    /// The orders pipeline with `consumer`, written to `<consumer>.toml`.
    fn config(&self, consumer: &str) -> PathBuf {
        let plugin = plugin("orders");
        let store_dir = self.dir.path().join("store");
        PipelineToml {
            consumer,
            ..PipelineToml::orders(&self.server.url(), &plugin, &store_dir)
        }
        .write(self.dir.path(), &format!("{consumer}.toml"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_transformed_exactly_once_and_malformed_ones_dead_lettered() {
    let setup = Setup {
        server: NatsServer::start(),
        dir: tempfile::tempdir().unwrap(),
    };
    let js = setup.server.jetstream().await;
    let payloads = order_workload(300, 10);
    let valid = payloads.len() - payloads.len() / 10;

    let weir = InProcessWeir::start(&setup.config("weir"), &js, "ORDERS").await;
    publish_all(&js, "orders.in.new", &payloads).await;
    wait_for(
        "all outputs and dead letters",
        Duration::from_secs(60),
        || async {
            stream_len(&js, "ORDERS_OUT").await >= 2 * valid as u64
                && stream_len(&js, "ORDERS_DLQ").await >= (payloads.len() - valid) as u64
        },
    )
    .await;
    let stats = weir.stop_stats().await;
    assert_eq!(stats.executed, 300, "{stats:?}");
    assert_eq!(stats.dead_lettered, 30, "{stats:?}");
    assert_eq!(stats.acked, 300, "{stats:?}");

    // Every valid order: one enriched order and one customer event, with the right total,
    // each naming the plugin that made it.
    let plugin_sha256: String = Sha256::digest(std::fs::read(plugin("orders")).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let contract = "weir:transform/transformer@0.2.0";
    let outputs = read_stream(&js, "ORDERS_OUT").await;
    assert_eq!(outputs.len(), 2 * valid);
    let mut enriched: HashMap<String, u64> = HashMap::new();
    let mut events: HashMap<String, u64> = HashMap::new();
    for output in &outputs {
        let body: serde_json::Value = serde_json::from_slice(&output.payload).unwrap();
        let order = body
            .get("id")
            .or(body.get("order"))
            .unwrap()
            .as_str()
            .unwrap();
        let total = body["total_cents"].as_u64().unwrap();
        assert_eq!(
            output.header("Weir-Plugin-Sha256"),
            Some(plugin_sha256.as_str())
        );
        assert_eq!(output.header("Weir-Plugin-Contract"), Some(contract));
        let seen = if output.subject == "orders.out.enriched" {
            assert_eq!(
                output.header("Content-Type"),
                Some("application/json"),
                "plugin headers are carried"
            );
            enriched.insert(order.to_owned(), total)
        } else {
            let customer = body["customer"].as_str().unwrap();
            assert_eq!(output.subject, format!("orders.out.customer.{customer}"));
            events.insert(order.to_owned(), total)
        };
        assert!(
            seen.is_none(),
            "order {order} has two outputs on one subject"
        );
    }
    for payload in &payloads {
        let Ok(order) = serde_json::from_slice::<serde_json::Value>(payload) else {
            continue;
        };
        let (_, id, total) = expected_order_total(&order).unwrap();
        assert_eq!(enriched.get(&id), Some(&total), "enriched order {id}");
        assert_eq!(events.get(&id), Some(&total), "customer event {id}");
    }

    // The malformed inputs, in the DLQ, with why and where they came from.
    let dead = read_stream(&js, "ORDERS_DLQ").await;
    assert_eq!(dead.len(), 30);
    for letter in &dead {
        let sequence: usize = letter
            .header("Weir-Input-Sequence")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            letter.payload,
            payloads[sequence - 1],
            "DLQ carries the input"
        );
        assert_eq!(letter.header("Weir-Dlq-Kind"), Some("invalid-input"));
        assert!(
            letter
                .header("Weir-Dlq-Reason")
                .unwrap()
                .contains("not an order")
        );
        assert_eq!(
            letter.header("Weir-Plugin-Sha256"),
            Some(plugin_sha256.as_str())
        );
        assert_eq!(letter.header("Weir-Plugin-Contract"), Some(contract));
        assert_eq!(letter.header("Weir-Input-Stream"), Some("ORDERS"));
        assert_eq!(letter.header("Weir-Input-Subject"), Some("orders.in.new"));
    }

    // The same inputs again, through a second consumer on the same store: every one is
    // already committed, so the plugin must not run, and nothing new is stored downstream.
    let weir = InProcessWeir::start(&setup.config("weir-again"), &js, "ORDERS").await;
    wait_until_drained(&js, "ORDERS", "weir-again").await;
    let stats = weir.stop_stats().await;
    assert_eq!(
        stats.executed, 0,
        "committed inputs ran the plugin: {stats:?}"
    );
    assert_eq!(stats.deduplicated, 300, "{stats:?}");
    assert_eq!(stream_len(&js, "ORDERS_OUT").await, 2 * valid as u64);
    assert_eq!(stream_len(&js, "ORDERS_DLQ").await, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_mid_stream_loses_and_doubles_nothing() {
    let mut setup = Setup {
        server: NatsServer::start(),
        dir: tempfile::tempdir().unwrap(),
    };
    let payloads = order_workload(600, 0);
    let weir = {
        let js = setup.server.jetstream().await;
        let weir = InProcessWeir::start(&setup.config("weir"), &js, "ORDERS").await;
        publish_all(&js, "orders.in.new", &payloads[..300]).await;
        wait_for("some outputs", Duration::from_secs(30), || async {
            stream_len(&js, "ORDERS_OUT").await > 0
        })
        .await;
        weir
    };
    // SIGKILL the server while weir works, and bring it back on the same port and store.
    setup.server.restart();
    let js = setup.server.jetstream().await;
    publish_all(&js, "orders.in.new", &payloads[300..]).await;
    wait_for(
        "every output after the restart",
        Duration::from_secs(90),
        || async { stream_len(&js, "ORDERS_OUT").await >= 1200 },
    )
    .await;
    weir.stop().await;

    let outputs = read_stream(&js, "ORDERS_OUT").await;
    let mut ids = std::collections::HashSet::new();
    for output in &outputs {
        assert!(
            ids.insert(output.msg_id.clone().unwrap()),
            "duplicate output"
        );
    }
    assert_eq!(
        outputs.len(),
        1200,
        "two outputs per order, none lost, none doubled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_input_stream_is_processed_afresh() {
    let setup = Setup {
        server: NatsServer::start(),
        dir: tempfile::tempdir().unwrap(),
    };
    let js = setup.server.jetstream().await;
    let weir = InProcessWeir::start(&setup.config("weir"), &js, "ORDERS").await;
    let payloads = order_workload(10, 0);
    publish_all(&js, "orders.in.new", &payloads).await;
    wait_for("the first outputs", Duration::from_secs(30), || async {
        stream_len(&js, "ORDERS_OUT").await >= 20
    })
    .await;

    // Same name, same sequences 1..10, new messages: they must not look processed.
    js.delete_stream("ORDERS").await.unwrap();
    create_orders_stream(&js, None).await;
    let fresh = order_workload(20, 0).split_off(10);
    publish_all(&js, "orders.in.new", &fresh).await;
    wait_for(
        "outputs of the re-created stream",
        Duration::from_secs(60),
        || async { stream_len(&js, "ORDERS_OUT").await >= 40 },
    )
    .await;
    let stats = weir.stop_stats().await;
    assert_eq!(stats.executed, 20, "{stats:?}");
    assert_eq!(stats.deduplicated, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_keeps_failing_is_retried_and_nothing_is_acked_meanwhile() {
    let setup = Setup {
        server: NatsServer::start(),
        dir: tempfile::tempdir().unwrap(),
    };
    let js = setup.server.jetstream().await;
    let weir = InProcessWeir::start(&setup.config("weir"), &js, "ORDERS").await;
    let payloads = order_workload(20, 0);
    publish_all(&js, "orders.in.new", &payloads[..10]).await;
    wait_for("the first outputs", Duration::from_secs(30), || async {
        stream_len(&js, "ORDERS_OUT").await >= 20
    })
    .await;

    // No stream stores the outputs any more: every publish fails ("no responders").
    js.delete_stream("ORDERS_OUT").await.unwrap();
    publish_all(&js, "orders.in.new", &payloads[10..]).await;
    let consumer_info = || async {
        js.get_stream("ORDERS")
            .await
            .unwrap()
            .consumer_info("weir")
            .await
            .unwrap()
    };
    wait_for(
        "the second half in weir's hands",
        Duration::from_secs(30),
        || async {
            let info = consumer_info().await;
            info.delivered.stream_sequence == 20 && info.num_ack_pending == 10
        },
    )
    .await;
    // Held past ack_wait (2 s): only weir's progress acks keep the server from redelivering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let consumer = consumer_info().await;
    assert_eq!(
        consumer.ack_floor.stream_sequence, 10,
        "inputs whose outputs cannot be published are not acked"
    );
    assert_eq!(
        consumer.num_redelivered, 0,
        "progress acks hold the inputs meanwhile"
    );

    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDERS_OUT".into(),
        subjects: vec!["orders.out.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    wait_for("the held outputs", Duration::from_secs(30), || async {
        stream_len(&js, "ORDERS_OUT").await >= 20
    })
    .await;
    let stats = weir.stop_stats().await;
    assert_eq!(stats.executed, 20, "{stats:?}");
    assert_eq!(stats.acked, 20, "{stats:?}");
    assert_eq!(stream_len(&js, "ORDERS_OUT").await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_input_is_processed_again_and_a_live_one_is_not() {
    let setup = Setup {
        server: NatsServer::start(),
        dir: tempfile::tempdir().unwrap(),
    };
    let js = setup.server.jetstream().await;
    // Remember processed inputs for 4 s (the shortest the 2 s ack wait allows).
    let with_retention = |consumer: &str| {
        let path = setup.config(consumer);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("store_dir = ", "dedup_retention_secs = 4\nstore_dir = "),
        )
        .unwrap();
        path
    };
    let weir = InProcessWeir::start(&with_retention("first"), &js, "ORDERS").await;
    publish_all(&js, "orders.in.new", &order_workload(5, 0)).await;
    wait_until_drained(&js, "ORDERS", "first").await;
    assert_eq!(weir.stop_stats().await.executed, 5);

    // Seen again at once: remembered, not executed.
    let weir = InProcessWeir::start(&with_retention("live"), &js, "ORDERS").await;
    wait_until_drained(&js, "ORDERS", "live").await;
    let stats = weir.stop_stats().await;
    assert_eq!((stats.executed, stats.deduplicated), (0, 5), "{stats:?}");

    // Seen again after the retention: forgotten, executed again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let weir = InProcessWeir::start(&with_retention("expired"), &js, "ORDERS").await;
    wait_until_drained(&js, "ORDERS", "expired").await;
    let stats = weir.stop_stats().await;
    assert_eq!((stats.executed, stats.deduplicated), (5, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_mode_keeps_no_store_and_relies_on_the_duplicate_window() {
    let setup = Setup {
        server: NatsServer::start(),
        dir: tempfile::tempdir().unwrap(),
    };
    let js = setup.server.jetstream().await;
    let at_least_once = |consumer: &str| {
        let path = setup.config(consumer);
        let text = std::fs::read_to_string(&path).unwrap();
        let store_line = text.lines().find(|l| l.starts_with("store_dir")).unwrap();
        std::fs::write(&path, text.replace(store_line, "mode = \"at-least-once\"")).unwrap();
        path
    };
    let weir = InProcessWeir::start(&at_least_once("first"), &js, "ORDERS").await;
    publish_all(&js, "orders.in.new", &order_workload(20, 0)).await;
    wait_for("the outputs", Duration::from_secs(30), || async {
        stream_len(&js, "ORDERS_OUT").await >= 40
    })
    .await;
    assert_eq!(weir.stop_stats().await.executed, 20);
    assert!(!setup.dir.path().join("store").exists(), "no store is kept");

    // The same inputs again: without a store the plugin runs again, but the outputs carry
    // the same ids, so JetStream (inside its duplicate window) stores nothing new.
    let weir = InProcessWeir::start(&at_least_once("again"), &js, "ORDERS").await;
    wait_until_drained(&js, "ORDERS", "again").await;
    let stats = weir.stop_stats().await;
    assert_eq!((stats.executed, stats.deduplicated), (20, 0), "{stats:?}");
    assert_eq!(stream_len(&js, "ORDERS_OUT").await, 40);
}
